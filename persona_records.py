"""The canonical dialog record: its schema, its errors, validation, sampled distractors and assembling the splits.

One dialog = ``{"personality": [str], "utterances": [{"history": [str], "candidates": [str]}]}``, the gold reply
being the LAST candidate (docs/architecture.md, the data contract). An utterance may carry curated ``"rejected":
[str]`` replies for preference training (`persona_dpo`): non-empty where given, never holding the gold. Readers
(`persona_readers`, `persona_sources`) turn each source record into a `Record`; `assemble_splits` validates every
record, samples distractors for the formats that have none, and builds one `datasets.Dataset` per split. Bad records
raise a `PersonaDataError` naming file, line/record and field, or with ``on_bad_record="skip"`` are counted in a
`SplitReport` and logged at the end.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import chain

import datasets

from persona_errors import PersonaDataError, UsageError

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
# Splits where some utterance carries curated rejected replies: the others get an empty list (never a given one).
PREFERENCE_FEATURES = datasets.Features(
    {
        "personality": DIALOG_FEATURES["personality"],
        "utterances": datasets.List(
            {**DIALOG_FEATURES["utterances"].feature, "rejected": datasets.List(datasets.Value("string"))}
        ),
    }
)
UTTERANCE_FIELDS = ("history", "candidates", "rejected")
# A lone UTF-16 surrogate (a JSON escape \ud800 without its pair) is not text: Arrow and every tokenizer refuse it
# later, without naming the record.
_SURROGATE = re.compile("[\ud800-\udfff]")
# ParlAI's placeholder first turn when the bot opens a dialog: it keeps the history length odd, so the token types
# follow the reference's segment parity (docs/architecture.md, the model inputs).
SILENCE = "__SILENCE__"


@dataclass
class ReadOptions:
    """Options of `load_dialogs` understood by the file readers (each is a keyword argument of it)."""

    on_bad_record: str = "error"  # "error": raise on the first bad record; "skip": count, log and go on
    num_distractors: int = 19  # sampled distractors per reply, for formats that have no candidates
    distractor_seed: int = 0
    spc_bot_role: str = "user2"  # Synthetic-Persona-Chat: the user the bot plays: user1, user2 or both
    column_mapping: dict[str, str] | str | None = None  # hub: {dataset column: record field}, or "a=b,c=d"
    split: str | None = None  # split name of one-split files (default: train/valid/test found in the file name)
    # A longer text is a bad record (0 or None: no limit): a guard against a mis-parsed file that puts a whole file
    # into one field. Long texts below it are read, and cut like any long context when the rows are built.
    max_turn_chars: int | None = 100_000

    def __post_init__(self):
        if self.on_bad_record not in ("error", "skip"):
            raise UsageError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}.")
        if self.spc_bot_role not in ("user1", "user2", "both"):
            raise UsageError(f"spc_bot_role must be 'user1', 'user2' or 'both', got {self.spc_bot_role!r}.")
        if not isinstance(self.num_distractors, int) or self.num_distractors < 0:
            raise UsageError(f"num_distractors must be an integer >= 0, got {self.num_distractors!r}.")
        if self.max_turn_chars is not None and (not isinstance(self.max_turn_chars, int) or self.max_turn_chars < 0):
            raise UsageError(
                f"max_turn_chars must be an integer >= 0 (0: no limit) or None, got {self.max_turn_chars!r}."
            )
        self.max_turn_chars = self.max_turn_chars or None
        self.column_mapping = parse_column_mapping(self.column_mapping)


def parse_column_mapping(mapping: dict[str, str] | str | None) -> dict[str, str]:
    """``"persona=personality,dialog=utterances"`` (or a JSON object, or a dict) → ``{dataset column: field}``.

    >>> parse_column_mapping("persona=personality, dialog = utterances")
    {'persona': 'personality', 'dialog': 'utterances'}
    >>> parse_column_mapping('{"who": "persona"}')
    {'who': 'persona'}
    """
    if mapping is None or mapping == "":
        return {}
    if isinstance(mapping, dict):
        return {str(k): str(v) for k, v in mapping.items()}
    text = mapping.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"column_mapping is not valid JSON: {err.msg}.") from None
        if not isinstance(parsed, dict):
            raise UsageError(f"column_mapping must be a JSON object, got {type(parsed).__name__}.")
        return parse_column_mapping(parsed)
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in pair:
            raise UsageError(f"column_mapping entry {pair!r} must look like 'dataset_column=field'.")
        src, dst = (s.strip() for s in pair.split("=", 1))
        out[src] = dst
    return out


@dataclass
class SplitReport:
    """What a reader saw in one split: source records read, skipped, dialogs kept."""

    records: int = 0
    skipped: int = 0
    dialogs: int = 0
    short_candidates: int = 0  # replies that got fewer distractors than num_distractors (pool too small)
    sampled: int = 0  # replies without candidates of their own, given sampled distractors
    replies: int = 0  # utterances (gold replies) kept
    gold_in_distractors: int = 0  # replies with a distractor identical to the gold (the choice cannot be learnt)
    reasons: list[str] = field(default_factory=list)


# A reader yields, per split, (where, build) pairs: `build()` returns the canonical dialogs of one source record
# (several for SPC with spc_bot_role="both") or raises PersonaDataError. Utterances that need sampled distractors
# carry "_sample": True; the assembly step validates, samples and strips it.
Record = tuple[str, Callable[[], list[dict]]]


def check_str_list(value, where: str, field: str, allow_empty: bool = True) -> list[str]:
    """`value` if it is a list of strings (non-empty unless `allow_empty`), else a `PersonaDataError`."""
    if not isinstance(value, list):
        raise PersonaDataError(f"{where}: field {field!r} must be a list of strings, got {_json_type(value)}.")
    bad = next((i for i, s in enumerate(value) if not isinstance(s, str)), None)
    if bad is not None:
        raise PersonaDataError(
            f"{where}: field {field!r} must be a list of strings; item {bad} is {_json_type(value[bad])}."
        )
    if not allow_empty and not value:
        raise PersonaDataError(f"{where}: field {field!r} is empty.")
    return value


def _json_type(value) -> str:
    """What a file holds, in the file's words: null rather than NoneType (the files are JSON)."""
    return "null" if value is None else type(value).__name__


def check_fields(obj: dict, known: tuple[str, ...], where: str) -> None:
    """A `PersonaDataError` naming the first field of `obj` that is not in `known` (a typo is never ignored)."""
    unknown = [key for key in obj if key not in known]
    if unknown:
        raise PersonaDataError(f"{where}: unknown field {unknown[0]!r} (the fields are {list(known)}).")


def check_canonical_fields(dialog, where: str) -> list[dict]:
    """`[dialog]` when neither it nor its utterances carry unknown fields (files; `datasets` rows may have more)."""
    if isinstance(dialog, dict):
        check_fields(dialog, ("personality", "utterances"), where)
        if isinstance(dialog.get("utterances"), list):
            for u, utterance in enumerate(dialog["utterances"]):
                if isinstance(utterance, dict):
                    check_fields(utterance, UTTERANCE_FIELDS, f"{where}, utterance {u}")
                    if "rejected" in utterance and utterance["rejected"] is None:
                        raise PersonaDataError(
                            f"{where}, utterance {u}: field 'rejected' must be a list of rejected replies, got null; "
                            "leave the field out for none."
                        )
    return [dialog]


def validate_dialog(dialog, where: str, max_turn_chars: int | None = None) -> dict:
    """Return `dialog` as a canonical record, or raise `PersonaDataError` naming `where` and the field.

    An empty persona is valid; an empty gold reply (the last candidate) or a turn over `max_turn_chars` is not.
    """
    if not isinstance(dialog, dict):
        raise PersonaDataError(f"{where}: a dialog must be an object, got {type(dialog).__name__}.")
    for field_ in ("personality", "utterances"):
        if field_ not in dialog:
            raise PersonaDataError(f"{where}: missing field {field_!r}.")
    personality = check_str_list(dialog["personality"], where, "personality")
    utterances = dialog["utterances"]
    if not isinstance(utterances, list) or not utterances:
        raise PersonaDataError(f"{where}: field 'utterances' must be a non-empty list.")
    clean = []
    for u, utterance in enumerate(utterances):
        at = f"{where}, utterance {u}"
        if not isinstance(utterance, dict):
            raise PersonaDataError(f"{at}: an utterance must be an object.")
        for field_ in ("history", "candidates"):
            if field_ not in utterance:
                raise PersonaDataError(f"{at}: missing field {field_!r}.")
        history = check_str_list(utterance["history"], at, "history")
        candidates = check_str_list(utterance["candidates"], at, "candidates", allow_empty=False)
        if not candidates[-1].strip():
            raise PersonaDataError(f"{at}: field 'candidates': the gold reply (the last candidate) is empty.")
        blank = next((i for i, text in enumerate(candidates[:-1]) if not text.strip()), None)
        if blank is not None:  # an empty distractor is no choice: the multiple-choice head learns nothing from it
            raise PersonaDataError(f"{at}: field 'candidates': item {blank} (a distractor) is empty; remove it.")
        texts_of = [("personality", personality), ("history", history), ("candidates", candidates)]
        if utterance.get("rejected") is not None:
            texts_of.append(("rejected", check_rejected(utterance["rejected"], candidates[-1], at)))
        check_surrogates(texts_of, at)
        if max_turn_chars:
            for name, texts in texts_of:
                longest = max(map(len, texts), default=0)
                if longest > max_turn_chars:
                    raise PersonaDataError(
                        f"{at}: field {name!r} has a text of {longest} characters, over --max_turn_chars "
                        f"{max_turn_chars} (a mis-parsed file?); raise it, or 0 for no limit."
                    )
        clean.append({"history": history, "candidates": candidates})
        if len(texts_of) > 3:
            clean[-1]["rejected"] = texts_of[3][1]
    return {"personality": personality, "utterances": clean}


def check_surrogates(texts_of: list[tuple[str, list[str]]], at: str) -> None:
    """A `PersonaDataError` naming the field and item of the first text holding a lone UTF-16 surrogate."""
    for name, texts in texts_of:
        for i, text in enumerate(texts):
            found = _SURROGATE.search(text)
            if found:
                raise PersonaDataError(
                    f"{at}: field {name!r}: item {i} holds a lone UTF-16 surrogate (U+{ord(found.group()):04X} at "
                    f"character {found.start()}), which is not text; in JSON a \\ud800-\\udfff escape needs its pair. "
                    "Fix or remove it."
                )


def check_rejected(rejected, gold: str, at: str) -> list[str]:
    """The curated rejected replies of an utterance: a non-empty list of non-blank strings without the gold reply."""
    rejected = check_str_list(rejected, at, "rejected", allow_empty=False)
    blank = next((i for i, text in enumerate(rejected) if not text.strip()), None)
    if blank is not None:
        raise PersonaDataError(f"{at}: field 'rejected': item {blank} is empty.")
    if gold in rejected:
        raise PersonaDataError(
            f"{at}: field 'rejected' holds the gold reply (the last candidate) at item {rejected.index(gold)}; a "
            "reply cannot be both preferred and rejected."
        )
    return rejected


def sample_distractors(
    dialogs: list[dict],
    groups: list[int],
    needs: list[list[bool]],
    num_distractors: int,
    seed: int,
    own_texts: list[list[str]] | None = None,
) -> int:
    """Prepend `num_distractors` distractors (in place) to the marked utterances; returns how many got fewer.

    Distractors are turns of dialogs of OTHER groups (a group = one source record), never a text that also occurs in
    the dialog's own group (its turns, and `own_texts`: e.g. the lines that make up a merged turn). Each dialog draws
    from its own generator seeded by (seed, dialog index), and the pool is ordered by first occurrence, so the result
    does not depend on PYTHONHASHSEED, set order or process.
    """
    pool: dict[str, set[int]] = {}
    for dialog, group in zip(dialogs, groups):
        for u in dialog["utterances"]:
            for text in chain(u["history"], u["candidates"][-1:]):
                if text.strip() and text != SILENCE:
                    pool.setdefault(text, set()).add(group)
    for texts_, group in zip(own_texts or [], groups):
        for text in texts_:
            if text.strip():
                pool.setdefault(text, set()).add(group)
    texts, owners = list(pool), list(pool.values())
    short = 0
    for d, (dialog, group, marks) in enumerate(zip(dialogs, groups, needs)):
        rng = random.Random(f"{seed}/{d}")  # str seeds hash with SHA-512: the same in every process
        for utterance, mark in zip(dialog["utterances"], marks):
            if not mark or num_distractors == 0:
                continue
            # A few spare draws absorb the rare picks from the dialog's own group.
            picks = rng.sample(range(len(texts)), min(len(texts), num_distractors + 8))
            chosen = [texts[i] for i in picks if group not in owners[i]][:num_distractors]
            if len(chosen) < num_distractors:  # small pool: walk all of it in a seeded order
                rest = [i for i in range(len(texts)) if group not in owners[i]]
                rng.shuffle(rest)
                chosen = [texts[i] for i in rest[:num_distractors]]
                short += len(chosen) < num_distractors
            utterance["candidates"] = [*chosen, *utterance["candidates"]]
    return short


def _assemble_split(records: Iterable[Record], options: ReadOptions, report: SplitReport) -> datasets.Dataset:
    dialogs, groups, needs, own_texts = [], [], [], []
    for group, (where, build) in enumerate(records):
        report.records += 1
        try:
            made = [(validate_dialog(d, where, options.max_turn_chars), d) for d in build()]
        except PersonaDataError as err:
            if options.on_bad_record == "error":
                raise PersonaDataError(f"{err} (or pass --on_bad_record skip to skip and count bad records)") from None
            report.skipped += 1
            report.reasons.append(str(err))
            logger.debug("Skipped: %s", err)
            continue
        for clean, raw in made:
            dialogs.append(clean)
            groups.append(group)
            needs.append([bool(u.get("_sample")) for u in raw["utterances"]])
            own_texts.append(raw.get("_own_texts", []))
    report.sampled = sum(chain.from_iterable(needs))
    if report.sampled:
        report.short_candidates = sample_distractors(
            dialogs, groups, needs, options.num_distractors, options.distractor_seed, own_texts
        )
    report.dialogs = len(dialogs)
    report.replies = sum(len(d["utterances"]) for d in dialogs)
    report.gold_in_distractors = sum(
        u["candidates"][-1] in u["candidates"][:-1] for d in dialogs for u in d["utterances"]
    )
    features = DIALOG_FEATURES
    if any("rejected" in u for d in dialogs for u in d["utterances"]):
        features = PREFERENCE_FEATURES
        for u in chain.from_iterable(d["utterances"] for d in dialogs):
            u.setdefault("rejected", [])
    columns = {key: [d[key] for d in dialogs] for key in features}  # from_list cannot type an empty list
    return datasets.Dataset.from_dict(columns, features=features)


def canonical_records(splits: dict, source: str, strict: bool = False) -> dict[str, list[Record]]:
    """Records of dialogs that are already canonical (``{split: [dialog...]}``), each named by split and index.

    `strict` (files): a field the record does not define is an error rather than ignored.
    """
    build = check_canonical_fields if strict else lambda dialog, where: [dialog]
    records = {}
    for split, dialogs in splits.items():
        if not isinstance(dialogs, list):
            raise PersonaDataError(
                f"{source}: split {split!r} must be a list of dialogs, got {type(dialogs).__name__}."
            )
        records[split] = [
            (where, partial(build, d, where))
            for i, d in enumerate(dialogs)
            for where in [f"{source}: split {split!r}, dialog {i}"]
        ]
    return records


def dialogs_to_dataset_dict(splits: dict[str, list], source: str, on_bad_record: str = "error") -> datasets.DatasetDict:
    """Validate raw canonical dialogs per split and build the `DatasetDict`; bad records raise or are counted."""
    options = ReadOptions(on_bad_record=on_bad_record)
    return assemble_splits(canonical_records(splits, source), source, options, allow_empty=True)[0]


def assemble_splits(
    splits: dict[str, Iterable[Record]], source: str, options: ReadOptions, allow_empty: bool = False
) -> tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    """One `Dataset` of valid canonical dialogs per split, and per split what was read, skipped and kept.

    A split without records (unless `allow_empty`, for in-memory dialogs) or whose every record was skipped is an
    error: training or evaluating on nothing is never what was meant.
    """
    out, reports = {}, {}
    for split, records in splits.items():
        reports[split] = SplitReport()
        out[split] = _assemble_split(records, options, reports[split])
        r = reports[split]
        if r.records == 0 and not allow_empty:
            raise PersonaDataError(f"{source}: split {split!r} has no dialogs (an empty file or split); check it.")
        if r.records and not r.dialogs:
            raise PersonaDataError(
                f"{source}: split {split!r}: all {r.records} records are bad, none is left. First: {r.reasons[0]}"
            )
    for split, r in reports.items():
        if r.skipped:
            logger.warning(
                "%s: split %r: read %d records, skipped %d bad ones, kept %d dialogs. First: %s",
                source,
                split,
                r.records,
                r.skipped,
                r.dialogs,
                r.reasons[0],
            )
        if r.short_candidates:
            logger.warning(
                "%s: split %r: %d replies got fewer than %d distractors (too few other dialogs).",
                source,
                split,
                r.short_candidates,
                options.num_distractors,
            )
        if r.gold_in_distractors:
            logger.warning(
                "%s: split %r: %d of %d replies have a distractor identical to the gold reply, which no model can "
                "tell apart (they count against Hits@1); deduplicate the candidates.",
                source,
                split,
                r.gold_in_distractors,
                r.replies,
            )
    return datasets.DatasetDict(out), reports
