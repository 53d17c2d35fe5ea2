"""Persona dialogs in, model inputs out: the two entry points of the data layer.

- `load_dialogs(source, dataset_format=None, **options)`: a local file, an http(s) URL, a Hub id or a local
  `datasets` folder, read by the reader of its format (`persona_readers`, `persona_sources`) into one `DatasetDict`
  of canonical dialogs (`persona_records`); `load_dialogs_with_report` also says what was read, skipped and kept.
- `build_features(dialogs, tokenizer, ...)`: the batched, cached `datasets.map` that tokenizes a split and builds
  the model inputs of every candidate (`persona_inputs`), one row per permutation × utterance.

The record, the formats and the input rules are described in docs/architecture.md.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import fields

import datasets
from datasets.fingerprint import Hasher

from persona_errors import PersonaDataError, UsageError
from persona_formats import InputFormat, input_format_of
from persona_inputs import build_inputs, fit_to_length, history_window
from persona_locations import is_url
from persona_readers import FORMAT_ALIASES, READERS, detect_format
from persona_records import ReadOptions, SplitReport, assemble_splits, dialogs_to_dataset_dict
from persona_sources import fetch, forget_download, is_datasets_source, read_hub_dataset

# Importable from here as well as from their own modules: the public API (README) and the names other code uses.
__all__ = [
    "PersonaDataError",
    "ReadOptions",
    "SplitReport",
    "build_features",
    "build_inputs",
    "candidate_rows",
    "dialogs_to_dataset_dict",
    "fit_to_length",
    "load_dialogs",
    "load_dialogs_with_report",
]

logger = logging.getLogger(__name__)

# Bump when build_features' output changes for the same inputs: invalidates every cached feature file.
FEATURES_VERSION = "4"  # 3: persona permutations capped per dialog; 4: special-token strings in texts stay text
# Per-row notes of what fitting max_length cut, counted for the warning and then dropped: context (history turns or
# persona sentences), the gold reply, a distractor; and the reply budget.
CUT_COLUMNS = ["cut_context", "cut_gold", "cut_distractor", "reply_budget"]


def load_dialogs_with_report(
    source: str, dataset_format: str | None = None, **options
) -> tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    """`load_dialogs`, also returning per split what was read, skipped and kept."""
    cache_dir = options.pop("cache_dir", None)
    known = {f.name for f in fields(ReadOptions)}
    read_options = ReadOptions(**{k: options.pop(k) for k in list(options) if k in known})
    fmt = FORMAT_ALIASES.get(dataset_format, dataset_format)
    if fmt == "hub" or (fmt is None and is_datasets_source(source)):
        splits = read_hub_dataset(source, read_options, cache_dir=cache_dir, **options)
    else:
        if options:
            raise UsageError(
                f"Unknown load_dialogs option(s) {sorted(options)} for a {dataset_format or 'data'} file; known: "
                f"{sorted(known | {'cache_dir'})}."
            )
        if fmt is not None and fmt not in READERS:
            raise UsageError(f"Unknown --dataset_format {fmt!r}; choose one of {sorted(READERS) + ['hub']}.")
        local = fetch(source, cache_dir)
        try:
            fmt = fmt or detect_format(local, source.split("?")[0] if is_url(source) else None)
            _check_options_apply(source, fmt, read_options)
            splits = READERS[fmt](local, source, read_options)
            return _assemble(splits, source, read_options)
        except PersonaDataError:
            if source.startswith(("http://", "https://")):
                forget_download(source, local)  # a later run, the server fixed, downloads it again
            raise
    return _assemble(splits, source, read_options)


def _check_options_apply(source: str, fmt: str, options: ReadOptions) -> None:
    """Options that would change the meaning of the data if they applied are an error when they cannot."""
    if options.column_mapping:
        raise PersonaDataError(
            f"{source}: --column_mapping renames the columns of a `datasets` source (a Hub id or a folder); a "
            f"{fmt} file has fixed fields. Drop --column_mapping, or pass --dataset_format hub for a data file "
            f"that `datasets` should read."
        )
    if fmt != "spc_csv" and options.spc_bot_role != ReadOptions.spc_bot_role:
        raise PersonaDataError(
            f"{source}: --spc_bot_role applies to Synthetic-Persona-Chat CSV (spc_csv) only, not to {fmt}, where the "
            f"bot is the speaker with the persona; drop --spc_bot_role."
        )


def _assemble(splits, source: str, read_options: ReadOptions) -> tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    dialogs, reports = assemble_splits(splits, source, read_options)
    logger.info("Loaded %s: %s", source, {split: ds.num_rows for split, ds in dialogs.items()})
    return dialogs, reports


def load_dialogs(source: str, dataset_format: str | None = None, **options) -> datasets.DatasetDict:
    """Canonical dialogs per split from a local path, an http(s) URL, a Hub id or a local `datasets` folder.

    Options: those of `ReadOptions` (`on_bad_record`, `num_distractors`, `distractor_seed`, `spc_bot_role`,
    `column_mapping`, `split`, `max_turn_chars`), `cache_dir` (downloads); for Hub datasets the rest goes to
    `datasets.load_dataset`.
    """
    return load_dialogs_with_report(source, dataset_format, **options)[0]


def _tokenizer_signature(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return Hasher.hash((type(tokenizer).__name__, state, tokenizer.all_special_tokens))


def _build_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer,
    num_candidates: int | None,
    max_history: int,
    personality_permutations: int,
    max_length: int | None,
    source: str,
    input_format: InputFormat,
) -> dict[str, list]:
    to_persona, build = input_format.row_builder(batch, max_history, num_candidates)
    out = {key: [] for key in [*input_format.columns, *CUT_COLUMNS]}
    for personality, utterances, dialog_idx in zip(batch["personality"], batch["utterances"], indices):
        persona = to_persona(personality)
        for _ in range(distinct_rotations(persona, personality_permutations)):
            for u_idx, u in enumerate(utterances):
                candidates = u["candidates"]
                if num_candidates is not None and len(candidates) < num_candidates:
                    raise PersonaDataError(
                        f"{source}dialog {dialog_idx}, utterance {u_idx}: field 'candidates' has {len(candidates)} "
                        f"candidates but --num_candidates {num_candidates}; lower --num_candidates."
                    )
                candidates = candidates if num_candidates is None else candidates[-num_candidates:]
                rows, cuts = build(persona, history_window(u["history"], max_history), candidates, max_length)
                for key, value in (rows | cuts).items():
                    out[key].append(value)
                out["mc_labels"].append(len(candidates) - 1)
            persona = [persona[-1]] + persona[:-1] if persona else persona
    return out


def distinct_rotations(persona: list, personality_permutations: int) -> int:
    """How many times a dialog is used: `personality_permutations`, capped at its number of persona sentences (more
    rotations would repeat earlier ones, over-weighting dialogs with short personas), at least once."""
    return min(personality_permutations, max(1, len(persona)))


def candidate_rows(
    tokenizer,
    persona: list[str],
    history: list[str],
    candidates: list[str],
    *,
    max_history: int,
    max_length: int | None = None,
    input_format: InputFormat | None = None,
) -> dict[str, list]:
    """The model inputs of one turn's candidates (texts) exactly as `build_features` builds an evaluation row: columns
    of per-candidate lists (`input_ids` [C][T], `mc_token_ids` [C], ...), the last candidate labelled, `mc_labels`.
    What generation ranks its sampled replies with, so the multiple-choice head sees what it was trained on.
    `input_format`: the tokenizer's own (`persona_formats.input_format_of`) when None."""
    input_format = input_format or input_format_of(tokenizer)
    batch = {
        "personality": [list(persona)],
        "utterances": [[{"history": list(history), "candidates": list(candidates)}]],
    }
    out = _build_batch(
        batch,
        [0],
        tokenizer=tokenizer,
        num_candidates=None,
        max_history=max_history,
        personality_permutations=1,
        max_length=max_length,
        source="",
        input_format=input_format,
    )
    return {key: out[key][0] for key in input_format.columns}


def build_features(
    dialogs: datasets.Dataset,
    tokenizer,
    *,
    num_candidates: int | None,
    max_history: int,
    personality_permutations: int = 1,
    max_length: int | None = None,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    load_from_cache_file: bool | None = None,
    source: str | None = None,
    input_format: InputFormat | None = None,
) -> datasets.Dataset:
    """Model-input rows (one per permutation × utterance) of a canonical dialogs split.

    `num_candidates=None` keeps every candidate (evaluation). The rows follow the checkpoint's input format, as the
    console scripts do: `input_format` (`persona_formats`: `SpeakerTokens` or a `ChatFormat`) when given, else
    `input_format_of(tokenizer)` (the format `load_model_and_tokenizer` recorded, else the tokenizer's default). A
    chat format gives the tokenizer's chat template (persona as the system message, no `token_type_ids`); speaker
    tokens give the rows of `persona_inputs`. Candidate selection, history, persona permutations, truncation and
    errors follow the same rules for both. The result is cached by a fingerprint of the dialogs, the tokenizer and
    every option: in the dialogs' own cache folder, or in `cache_dir` for in-memory dialogs.
    `source` (e.g. "data.json: split 'train'") prefixes error messages.
    """
    if num_candidates is not None and num_candidates < 1:
        raise UsageError(f"num_candidates must be >= 1 or None, got {num_candidates}.")
    if personality_permutations < 1:
        raise UsageError(f"personality_permutations must be >= 1, got {personality_permutations}.")
    if max_history < 0:
        raise UsageError(f"max_history must be >= 0, got {max_history}.")
    input_format = input_format or input_format_of(tokenizer)
    if max_length is not None and max_length < input_format.min_length:
        raise PersonaDataError(
            f"--max_length {max_length} cannot hold bos, one turn's speaker, a 1-token reply, its speaker and eos "
            f"({input_format.min_length} tokens); raise --max_length."
        )
    options = dict(
        num_candidates=num_candidates,
        max_history=max_history,
        personality_permutations=personality_permutations,
        max_length=max_length,
    )
    # The format changes every row (a chat format's template, system prompt and persona placement).
    key = (FEATURES_VERSION, dialogs._fingerprint, _tokenizer_signature(tokenizer), options, *input_format.signature)
    fingerprint = Hasher.hash(key)
    where = f"{source}: " if source else ""
    _warn_capped_permutations(dialogs, personality_permutations, where)
    cache_file_name = None
    if not dialogs.cache_files and cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file_name = os.path.join(cache_dir, f"persona-features-{fingerprint}.arrow")
    with _damaged_cache_hint(cache_file_name or _datasets_cache_file(dialogs, fingerprint)):
        features = dialogs.map(
            _build_batch,
            batched=True,
            batch_size=100,
            with_indices=True,
            remove_columns=dialogs.column_names,
            fn_kwargs=dict(tokenizer=tokenizer, source=where, input_format=input_format, **options),
            num_proc=num_proc,
            new_fingerprint=fingerprint,
            cache_file_name=cache_file_name,
            load_from_cache_file=load_from_cache_file,
            desc="Building persona model inputs",
        )
        _warn_cuts(features, max_length, source)
        return features.remove_columns(CUT_COLUMNS)


def _datasets_cache_file(dialogs: datasets.Dataset, fingerprint: str) -> str | None:
    """Where `datasets` caches the features of dialogs that have a cache file of their own (a Hub dataset)."""
    if not dialogs.cache_files:
        return None
    return os.path.join(os.path.dirname(dialogs.cache_files[0]["filename"]), f"cache-{fingerprint}.arrow")


@contextmanager
def _damaged_cache_hint(cache_file: str | None):
    """A cached features file that cannot be read (cut short by a killed run, damaged on disk) is named, with the way
    out; pyarrow's own errors (a plain OSError "Expected to be able to read ... bytes") name neither."""
    import pyarrow

    # Only a file there before is "damaged", not a failure to write a new one; num_proc > 1 adds a shard suffix.
    cached = cache_file is not None and bool(glob.glob(glob.escape(os.path.splitext(cache_file)[0]) + "*.arrow"))
    try:
        yield
    except (pyarrow.ArrowException, OSError, EOFError) as err:
        if not cached:
            raise
        folder = os.path.dirname(cache_file)
        raise PersonaDataError(
            f"{cache_file}: the cached features cannot be read ({' '.join(str(err).split())[:200]}): the cache is "
            f"damaged. Delete the folder {folder} (or pass a fresh --dataset_cache) and rerun; persona-train can also "
            "rebuild it with --overwrite_cache true."
        ) from err


def _warn_capped_permutations(dialogs: datasets.Dataset, personality_permutations: int, where: str) -> None:
    if personality_permutations < 2:
        return
    capped = sum(
        distinct_rotations(p, personality_permutations) < personality_permutations for p in dialogs["personality"]
    )
    if capped:
        logger.warning(
            "%s--personality_permutations %d: %d of %d dialogs have fewer persona sentences, so fewer distinct "
            "rotations; each of them is used once per rotation (as many times as it has sentences, at least once).",
            where,
            personality_permutations,
            capped,
            dialogs.num_rows,
        )


def _warn_cuts(features: datasets.Dataset, max_length: int | None, source: str | None) -> None:
    """One warning that counts, apart, rows that lost context and rows whose gold reply or a distractor was cut."""
    context, gold, distractor = (sum(features[c]) for c in ("cut_context", "cut_gold", "cut_distractor"))
    if not (context or gold or distractor):
        return
    parts = []
    if context:
        parts.append(f"{context} of {features.num_rows} rows lost their oldest history turns or persona sentences")
    if gold:
        shortest = min(b for b, g in zip(features["reply_budget"], features["cut_gold"]) if g)
        parts.append(f"{gold} rows had their gold reply cut (to as few as {shortest} tokens)")
    if distractor:
        parts.append(f"{distractor} rows had a distractor cut")
    where = f"{source}: " if source else ""
    logger.warning("%s--max_length %s: %s; raise --max_length to keep them whole.", where, max_length, "; ".join(parts))


# Names tried, in order, for evaluation when the user names no split.
EVAL_SPLIT_FALLBACKS = ("valid", "validation", "test")


def find_split(dialogs, name: str | None, source: str, fallbacks: Sequence[str] = EVAL_SPLIT_FALLBACKS) -> str:
    """The split of `dialogs` called `name`; with `name=None`, the first of `fallbacks` present. A `UsageError`
    listing the splits when there is none: a split the user named never falls back to another."""
    candidates = (name,) if name is not None else tuple(fallbacks)
    split = next((s for s in candidates if s in dialogs), None)
    if split is None:
        wanted = repr(name) if name is not None else " or ".join(repr(s) for s in fallbacks)
        raise UsageError(f"{source} has no split {wanted} (it has {list(dialogs)}).")
    return split


def persona_split(dialogs) -> str:
    """The split to draw personas from: the validation split when there is one, else the first."""
    return next((s for s in EVAL_SPLIT_FALLBACKS if s in dialogs), next(iter(dialogs)))


def dataset_personas(dialogs) -> list[list[str]]:
    """The personas a chat draws from: every non-empty persona of the validation split (else the first split)."""
    split = persona_split(dialogs)
    return [list(p) for p in dialogs[split]["personality"] if p]


def random_persona(personas: Sequence[Sequence[str]], rng) -> list[str]:
    """One of `personas` drawn with `rng` (a `random.Random`); [] when there is none."""
    return list(rng.choice(personas)) if personas else []
