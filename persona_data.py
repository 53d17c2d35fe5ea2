"""Persona dialogs: readers into the canonical PERSONA-CHAT record, and the map that builds model inputs.

The canonical record (DESIGN.md) is one dialog = ``{"personality": [str], "utterances": [{"history": [str],
"candidates": [str]}]}`` with the gold reply as the LAST candidate. Every reader returns a ``DatasetDict`` of
these; ``build_features`` turns one split into rows of model inputs (one row per permutation × utterance).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import datasets
from datasets.fingerprint import Hasher

logger = logging.getLogger(__name__)

DIALOG_FEATURES = datasets.Features(
    {
        "personality": datasets.Sequence(datasets.Value("string")),
        "utterances": datasets.Sequence(
            {
                "history": datasets.Sequence(datasets.Value("string")),
                "candidates": datasets.Sequence(datasets.Value("string")),
            }
        ),
    }
)
MODEL_INPUT_COLUMNS = ["input_ids", "token_type_ids", "mc_token_ids", "labels", "mc_labels"]
# Bump when build_features' output changes for the same inputs: invalidates every cached feature file.
FEATURES_VERSION = "1"


class PersonaDataError(ValueError):
    """Malformed persona data; the message names the file, the record and the field."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def _is_url(source: str) -> bool:
    return re.match(r"^(https?|s3|gs|hf)://", source) is not None


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not os.path.splitext(source)[1]


def _fetch(source: str, cache_dir: str | None) -> str:
    """Local path of `source`, downloading (and caching) URLs."""
    if _is_url(source):
        from datasets import DownloadConfig
        from datasets.utils.file_utils import cached_path

        return cached_path(source, download_config=DownloadConfig(cache_dir=cache_dir))
    if not os.path.exists(source):
        raise FileNotFoundError(f"Dataset file not found: {source!r}. Pass a local path, an http(s) URL or a Hub id.")
    return source


def _check_str_list(value, where: str, field: str, allow_empty: bool = True) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise PersonaDataError(f"{where}: field {field!r} must be a list of strings, got {type(value).__name__}.")
    if not allow_empty and not value:
        raise PersonaDataError(f"{where}: field {field!r} is empty.")
    return value


def validate_dialog(dialog, where: str) -> dict:
    """Return `dialog` as a canonical record, or raise `PersonaDataError` naming `where` and the field."""
    if not isinstance(dialog, dict):
        raise PersonaDataError(f"{where}: a dialog must be an object, got {type(dialog).__name__}.")
    for field in ("personality", "utterances"):
        if field not in dialog:
            raise PersonaDataError(f"{where}: missing field {field!r}.")
    personality = _check_str_list(dialog["personality"], where, "personality")
    utterances = dialog["utterances"]
    if not isinstance(utterances, list) or not utterances:
        raise PersonaDataError(f"{where}: field 'utterances' must be a non-empty list.")
    clean = []
    for u, utterance in enumerate(utterances):
        at = f"{where}, utterance {u}"
        if not isinstance(utterance, dict):
            raise PersonaDataError(f"{at}: an utterance must be an object.")
        for field in ("history", "candidates"):
            if field not in utterance:
                raise PersonaDataError(f"{at}: missing field {field!r}.")
        history = _check_str_list(utterance["history"], at, "history")
        candidates = _check_str_list(utterance["candidates"], at, "candidates", allow_empty=False)
        clean.append({"history": history, "candidates": candidates})
    return {"personality": personality, "utterances": clean}


def dialogs_to_dataset_dict(splits: dict[str, list], source: str, on_bad_record: str = "error") -> datasets.DatasetDict:
    """Validate raw dialogs per split and build the canonical `DatasetDict`; bad records raise or are counted."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}.")
    out = {}
    for split, dialogs in splits.items():
        if not isinstance(dialogs, list):
            raise PersonaDataError(f"{source}: split {split!r} must be a list of dialogs.")
        records, skipped = [], 0
        for i, dialog in enumerate(dialogs):
            try:
                records.append(validate_dialog(dialog, f"{source}: split {split!r}, dialog {i}"))
            except PersonaDataError as err:
                if on_bad_record == "error":
                    raise
                skipped += 1
                logger.warning("Skipped: %s", err)
        if skipped:
            logger.warning("%s: split %r: kept %d dialogs, skipped %d bad ones.", source, split, len(records), skipped)
        columns = {key: [r[key] for r in records] for key in DIALOG_FEATURES}  # from_list cannot type an empty list
        out[split] = datasets.Dataset.from_dict(columns, features=DIALOG_FEATURES)
    return datasets.DatasetDict(out)


def read_personachat_json(path: str, source: str, on_bad_record: str = "error") -> datasets.DatasetDict:
    """PERSONA-CHAT "self_original" JSON: ``{"train": [dialog...], "valid": [dialog...]}``."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise PersonaDataError(
            f"{source}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}."
        ) from None
    except UnicodeDecodeError as err:
        raise PersonaDataError(f"{source}: not UTF-8 text (byte {err.start}). Re-encode the file as UTF-8.") from None
    if not isinstance(data, dict) or not data:
        raise PersonaDataError(f'{source}: expected an object of splits like {{"train": [...], "valid": [...]}}.')
    return dialogs_to_dataset_dict(data, source, on_bad_record)


def read_dialogs_jsonl(
    path: str, source: str, on_bad_record: str = "error", split: str = "train"
) -> datasets.DatasetDict:
    """JSON Lines, one canonical dialog per line; one split (named by `split`)."""
    dialogs = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                dialogs.append(json.loads(line))
            except json.JSONDecodeError as err:
                if on_bad_record == "error":
                    raise PersonaDataError(f"{source}: line {line_no}: not valid JSON: {err.msg}.") from None
                logger.warning("Skipped %s line %d: not valid JSON.", source, line_no)
    return dialogs_to_dataset_dict({split: dialogs}, source, on_bad_record)


def read_hub_dataset(source: str, on_bad_record: str = "error", **load_kwargs) -> datasets.DatasetDict:
    """A Hub dataset (or a local `datasets` script/folder) whose rows are canonical dialogs."""
    loaded = datasets.load_dataset(source, **load_kwargs)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    for split, ds in loaded.items():
        missing = {"personality", "utterances"} - set(ds.column_names)
        if missing:
            raise PersonaDataError(
                f"{source}: split {split!r} lacks the columns {sorted(missing)} of the canonical record "
                f"(it has {ds.column_names})."
            )
    return dialogs_to_dataset_dict({split: ds.to_list() for split, ds in loaded.items()}, source, on_bad_record)


READERS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "personachat_json": read_personachat_json,
    "jsonl": read_dialogs_jsonl,
}


def detect_format(path: str) -> str:
    """Guess the reader of a local file from its name."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return "personachat_json"
    if ext == ".jsonl":
        return "jsonl"
    raise PersonaDataError(f"{path}: cannot tell the format from the name; pass dataset_format ({sorted(READERS)}).")


def load_dialogs(source: str, dataset_format: str | None = None, **options) -> datasets.DatasetDict:
    """Canonical dialogs per split from a local path, an http(s) URL or a Hub dataset id.

    Options: `on_bad_record` ("error" or "skip"), `cache_dir` (downloads); the rest goes to the reader.
    """
    cache_dir = options.pop("cache_dir", None)
    if dataset_format == "hub" or (
        dataset_format is None and not os.path.exists(source) and _looks_like_hub_id(source)
    ):
        return read_hub_dataset(source, **options)
    local = _fetch(source, cache_dir)
    fmt = dataset_format or detect_format(local if not _is_url(source) else source.split("?")[0])
    if fmt not in READERS:
        raise ValueError(f"Unknown dataset_format {fmt!r}; choose one of {sorted(READERS) + ['hub']}.")
    dialogs = READERS[fmt](local, source, **options)
    logger.info("Loaded %s: %s", source, {split: ds.num_rows for split, ds in dialogs.items()})
    return dialogs


# ----------------------------------------------------------------------------------------------------------------------
# Model inputs


@dataclass(frozen=True)
class SpeakerIds:
    bos: int
    eos: int
    speaker1: int
    speaker2: int


def build_inputs(
    persona: Sequence[Sequence[int]],
    history: Sequence[Sequence[int]],
    reply: Sequence[int],
    ids: SpeakerIds,
    *,
    lm_labels: bool = False,
    with_eos: bool = True,
) -> dict[str, list[int]]:
    """Model inputs of one candidate, exactly as the reference `build_input_from_segments` (DESIGN.md).

    The reply segment is prefixed by speaker1 (the bot); earlier segments alternate backwards. `token_type_ids`
    follow segment parity from the persona segment. With `lm_labels`, only the reply tokens (and eos) are labelled.
    """
    sequence = [[ids.bos, *chain.from_iterable(persona)], *history, [*reply, *([ids.eos] if with_eos else [])]]
    n = len(sequence)
    sequence = [sequence[0]] + [
        [ids.speaker1 if (n - j) % 2 else ids.speaker2, *s] for j, s in enumerate(sequence[1:], start=1)
    ]
    out = {
        "input_ids": list(chain.from_iterable(sequence)),
        "token_type_ids": [ids.speaker2 if j % 2 else ids.speaker1 for j, s in enumerate(sequence) for _ in s],
    }
    out["mc_token_ids"] = len(out["input_ids"]) - 1
    if lm_labels:
        context_len = len(out["input_ids"]) - len(sequence[-1])
        out["labels"] = [-100] * (context_len + 1) + sequence[-1][1:]
    else:
        out["labels"] = [-100] * len(out["input_ids"])
    return out


def fit_to_length(
    persona: list[list[int]], history: list[list[int]], longest_reply: int, max_length: int | None
) -> tuple[list[list[int]], list[list[int]], int, bool]:
    """Shorten a context so bos + persona + speaker-prefixed turns + reply + eos fits `max_length`.

    Oldest history turns go first (the last one stays), then persona sentences from the end; if that is not enough
    the reply budget shrinks, and at last the final turn loses its oldest tokens. Returns the shortened persona and
    history, the reply budget (tokens) and whether anything was cut. Shared by every candidate of a turn so they keep
    one common context.
    """
    if max_length is None:
        return persona, history, longest_reply, False
    # bos + persona; each turn +1 speaker; the reply +1 speaker +1 eos.
    length = lambda: 1 + sum(map(len, persona)) + sum(len(h) + 1 for h in history) + longest_reply + 2  # noqa: E731
    if length() <= max_length:
        return persona, history, longest_reply, False
    persona, history = list(persona), list(history)
    while length() > max_length and len(history) > 1:
        history.pop(0)
    while length() > max_length and persona:
        persona.pop()
    budget = longest_reply
    if length() > max_length:
        budget = max(1, longest_reply - (length() - max_length))
        longest_reply = budget
    if length() > max_length and history:
        keep = max(0, len(history[-1]) - (length() - max_length))
        history[-1] = history[-1][len(history[-1]) - keep :]
    if length() > max_length:
        raise ValueError(f"max_length={max_length} is too small to hold even the special tokens and one reply token.")
    return persona, history, budget, True


def _tokenizer_signature(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return Hasher.hash((type(tokenizer).__name__, state, tokenizer.all_special_tokens))


def _build_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer,
    ids: SpeakerIds,
    num_candidates: int | None,
    max_history: int,
    personality_permutations: int,
    max_length: int | None,
    source: str,
) -> dict[str, list]:
    texts = set(chain.from_iterable(batch["personality"]))
    for utterances in batch["utterances"]:
        for u in utterances:
            texts.update(u["history"][-(2 * max_history + 1) :])
            texts.update(u["candidates"] if num_candidates is None else u["candidates"][-num_candidates:])
    texts = sorted(texts)
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}

    out = {key: [] for key in MODEL_INPUT_COLUMNS + ["truncated"]}
    for personality, utterances, dialog_idx in zip(batch["personality"], batch["utterances"], indices):
        persona = [encoded[s] for s in personality]
        for _ in range(personality_permutations):
            for u_idx, u in enumerate(utterances):
                candidates = u["candidates"]
                if num_candidates is not None and len(candidates) < num_candidates:
                    raise PersonaDataError(
                        f"{source}dialog {dialog_idx}, utterance {u_idx}: field 'candidates' has {len(candidates)} "
                        f"candidates but num_candidates={num_candidates}; lower num_candidates."
                    )
                candidates = candidates if num_candidates is None else candidates[-num_candidates:]
                history = [encoded[h] for h in u["history"][-(2 * max_history + 1) :]]
                replies = [encoded[c] for c in candidates]
                p, h, budget, cut = fit_to_length(persona, history, max(map(len, replies)), max_length)
                rows = [
                    build_inputs(p, h, r[:budget], ids, lm_labels=(i == len(replies) - 1))
                    for i, r in enumerate(replies)
                ]
                for key in ("input_ids", "token_type_ids", "mc_token_ids", "labels"):
                    out[key].append([row[key] for row in rows])
                out["mc_labels"].append(len(replies) - 1)
                out["truncated"].append(cut)
            persona = [persona[-1]] + persona[:-1] if persona else persona
    return out


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
) -> datasets.Dataset:
    """Model-input rows (one per permutation × utterance) of a canonical dialogs split.

    `num_candidates=None` keeps every candidate (evaluation). The result is cached by a fingerprint of the dialogs,
    the tokenizer and every option: in the dialogs' own cache folder, or in `cache_dir` for in-memory dialogs.
    `source` (e.g. "data.json: split 'train'") prefixes error messages.
    """
    from persona_model import SpecialTokenIds  # the token ids live with the model; no torch model is built here

    if num_candidates is not None and num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1 or None, got {num_candidates}.")
    if personality_permutations < 1:
        raise ValueError(f"personality_permutations must be >= 1, got {personality_permutations}.")
    if max_history < 0:
        raise ValueError(f"max_history must be >= 0, got {max_history}.")
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    ids = SpeakerIds(special.bos, special.eos, special.speaker1, special.speaker2)
    options = dict(
        num_candidates=num_candidates,
        max_history=max_history,
        personality_permutations=personality_permutations,
        max_length=max_length,
    )
    fingerprint = Hasher.hash((FEATURES_VERSION, dialogs._fingerprint, _tokenizer_signature(tokenizer), options))
    cache_file_name = None
    if not dialogs.cache_files and cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file_name = os.path.join(cache_dir, f"persona-features-{fingerprint}.arrow")
    features = dialogs.map(
        _build_batch,
        batched=True,
        batch_size=100,
        with_indices=True,
        remove_columns=dialogs.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, ids=ids, source=f"{source}: " if source else "", **options),
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file_name,
        load_from_cache_file=load_from_cache_file,
        desc="Building persona model inputs",
    )
    truncated = sum(features["truncated"])
    if truncated:
        logger.warning(
            "%d of %d rows were longer than max_length=%s: oldest history turns, then persona sentences were dropped.",
            truncated,
            features.num_rows,
            max_length,
        )
    return features.remove_columns("truncated")
