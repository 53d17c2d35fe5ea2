"""Persona dialogs: readers into the canonical PERSONA-CHAT record, and the map that builds model inputs.

The canonical record (DESIGN.md) is one dialog = ``{"personality": [str], "utterances": [{"history": [str],
"candidates": [str]}]}`` with the gold reply as the LAST candidate. Every reader returns a ``DatasetDict`` of
these; ``build_features`` turns one split into rows of model inputs (one row per permutation × utterance).

Formats (``dataset_format``, detected from the file when omitted):

- ``personachat_json``: ``{"train": [dialog...], "valid": [dialog...]}`` (a bare list is one split).
- ``jsonl``: one canonical dialog per line.
- ``chat_jsonl``: one ``{"persona": [str], "turns": [str]}`` per line; turns alternate, the partner first, so the
  bot (who has the persona) speaks turns 2, 4, ... (set ``"bot_first": true`` when the bot opens).
- ``convai2_txt``: ParlAI/ConvAI2 text (``1 your persona: ...``, ``n text\\tlabel\\t\\tcand|cand|...``; a dialog
  restarts at line number 1; ``*_no_cands.txt`` and ``*_both_*`` too).
- ``spc_csv``: Synthetic-Persona-Chat CSV (``user 1 personas``, ``user 2 personas``, ``Best Generated
  Conversation``); the bot plays ``spc_bot_role`` (user2, user1 or both).
- ``hub``: a Hub id or a local ``datasets`` folder/files whose columns (after ``column_mapping``) are those of the
  canonical record, one row per utterance (``personality, history, candidates[, conv_id]``), the chat layout or
  the SPC layout.

Formats without distractors get ``num_distractors`` sampled (seeded) from the turns of OTHER dialogs of the split.
Bad records raise a `PersonaDataError` naming file, line/record and field, or with ``on_bad_record="skip"`` are
counted and reported at the end.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import chain

import datasets
from datasets.fingerprint import Hasher

from persona_tokens import SpecialTokenIds

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
# ParlAI's placeholder first turn when the bot opens a dialog: it keeps the history length odd, so the token types
# follow the reference's segment parity (DESIGN.md, model inputs 3).
SILENCE = "__SILENCE__"
SPC_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")


class PersonaDataError(ValueError):
    """Malformed persona data; the message names the file, the record and the field."""


@dataclass
class ReadOptions:
    """Options of `load_dialogs` understood by the file readers (each is a keyword argument of it)."""

    on_bad_record: str = "error"  # "error": raise on the first bad record; "skip": count, log and go on
    num_distractors: int = 19  # sampled distractors per reply, for formats that have no candidates
    distractor_seed: int = 0
    spc_bot_role: str = "user2"  # Synthetic-Persona-Chat: the user the bot plays: user1, user2 or both
    column_mapping: dict[str, str] | str | None = None  # hub: {dataset column: record field}, or "a=b,c=d"
    split: str | None = None  # split name of one-split files (default: train/valid/test found in the file name)
    max_turn_chars: int | None = 10_000  # a longer turn is a bad record (None: no limit)

    def __post_init__(self):
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}.")
        if self.spc_bot_role not in ("user1", "user2", "both"):
            raise ValueError(f"spc_bot_role must be 'user1', 'user2' or 'both', got {self.spc_bot_role!r}.")
        if not isinstance(self.num_distractors, int) or self.num_distractors < 0:
            raise ValueError(f"num_distractors must be an integer >= 0, got {self.num_distractors!r}.")
        if self.max_turn_chars is not None and self.max_turn_chars < 1:
            raise ValueError(f"max_turn_chars must be >= 1 or None, got {self.max_turn_chars!r}.")
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
            raise ValueError(f"column_mapping is not valid JSON: {err.msg}.") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"column_mapping must be a JSON object, got {type(parsed).__name__}.")
        return parse_column_mapping(parsed)
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in pair:
            raise ValueError(f"column_mapping entry {pair!r} must look like 'dataset_column=field'.")
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
    reasons: list[str] = field(default_factory=list)


# A reader yields, per split, (where, build) pairs: `build()` returns the canonical dialogs of one source record
# (several for SPC with spc_bot_role="both") or raises PersonaDataError. Utterances that need sampled distractors
# carry "_sample": True; the assembly step validates, samples and strips it.
Record = tuple[str, Callable[[], list[dict]]]


def _fail(message: str) -> list[dict]:
    raise PersonaDataError(message)


# ----------------------------------------------------------------------------------------------------------------------
# Reading: files


def _is_url(source: str) -> bool:
    return re.match(r"^(https?|s3|gs|hf)://", source) is not None


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not os.path.splitext(source)[1]


def _download(url: str, cache_dir: str | None) -> str:
    """Local copy of an http(s) URL, kept in `cache_dir` (re-used on later runs, also offline)."""
    folder = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "persona_data"), "downloads")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(url.split("?")[0]) or "data"
    path = os.path.join(folder, f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
    if os.path.exists(path):
        return path
    try:
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp,
        ):
            shutil.copyfileobj(response, tmp)
    except (urllib.error.URLError, OSError) as err:
        raise PersonaDataError(f"{url}: download failed ({err}). Check the URL or pass a local path.") from None
    os.replace(tmp.name, path)  # atomic: a concurrent process never reads a half-written file
    return path


def _fetch(source: str, cache_dir: str | None) -> str:
    """Local path of `source`, downloading (and caching) URLs."""
    if source.startswith(("http://", "https://")):
        return _download(source, cache_dir)
    if _is_url(source):
        from datasets import DownloadConfig
        from datasets.utils.file_utils import cached_path

        return cached_path(source, download_config=DownloadConfig(cache_dir=cache_dir))
    if not os.path.exists(source):
        raise FileNotFoundError(f"Dataset file not found: {source!r}. Pass a local path, an http(s) URL or a Hub id.")
    return source


def _split_from_name(path: str, options: ReadOptions) -> str:
    if options.split:
        return options.split
    words = re.split(r"[^a-z]+", os.path.basename(path).lower())
    for word in words:
        if word in ("train", "valid", "validation", "test", "dev"):
            return word
    return "train"


def _refuse_utf16(head: bytes, source: str) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 BOM: every line would fail on its own
        raise PersonaDataError(f"{source}: line 1: UTF-16 text (byte-order mark); re-encode the file as UTF-8.")


def _text_lines(path: str, source: str) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text without line end, encoding error or None) of a UTF-8 file; BOM and CRLF tolerated.

    Decoding line by line lets a bad byte spoil only its own record, and names its line.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                _refuse_utf16(raw, source)
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            raw = raw.rstrip(b"\r\n")
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                problem = f"{source}: line {line_no}: not UTF-8 (byte {err.start} of the line); re-encode the file."
                yield line_no, raw.decode("utf-8", errors="replace"), problem


def _json_lines(path: str, source: str) -> Iterator[tuple[str, object, str | None]]:
    """(where, parsed object or None, problem or None) per non-empty line of a JSON Lines file."""
    for line_no, text, problem in _text_lines(path, source):
        where = f"{source}: line {line_no}"
        if not text.strip():
            continue
        if problem:
            yield where, None, problem
            continue
        try:
            yield where, json.loads(text), None
        except json.JSONDecodeError as err:
            yield where, None, f"{where}, column {err.colno}: not valid JSON: {err.msg}."
        except RecursionError:
            yield where, None, f"{where}: JSON nested too deeply."


def read_personachat_json(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """PERSONA-CHAT "self_original" JSON: ``{"train": [dialog...], "valid": [dialog...]}`` (a list: one split)."""
    with open(path, "rb") as f:
        raw = f.read()
    _refuse_utf16(raw, source)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PersonaDataError(f"{source}: line {line}: not UTF-8 (byte {err.start}); re-encode the file.") from None
    except json.JSONDecodeError as err:
        raise PersonaDataError(
            f"{source}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}."
        ) from None
    except RecursionError:
        raise PersonaDataError(f"{source}: JSON nested too deeply.") from None
    if isinstance(data, list):
        data = {_split_from_name(path, options): data}
    if not isinstance(data, dict) or not data:
        raise PersonaDataError(f'{source}: expected an object of splits like {{"train": [...], "valid": [...]}}.')
    splits = {}
    for split, dialogs in data.items():
        if not isinstance(dialogs, list):
            raise PersonaDataError(
                f"{source}: split {split!r} must be a list of dialogs, got {type(dialogs).__name__}."
            )
        splits[split] = [(f"{source}: split {split!r}, dialog {i}", partial(list, [d])) for i, d in enumerate(dialogs)]
    return splits


def read_dialogs_jsonl(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """JSON Lines, one canonical dialog per line; one split (named by `split` or the file name)."""
    records = [
        (where, partial(_fail, problem) if problem else partial(list, [obj]))
        for where, obj, problem in _json_lines(path, source)
    ]
    return {_split_from_name(path, options): records}


def _dialog_from_turns(persona: list[str], turns: list[str], where: str) -> dict:
    """Canonical dialog of alternating turns, the partner first: one utterance per bot turn (odd index)."""
    if len(turns) < 2:
        raise PersonaDataError(
            f"{where}: field 'turns' needs a partner turn and a bot reply, got {len(turns)} turn(s)."
        )
    utterances = [{"history": turns[:i], "candidates": [turns[i]], "_sample": True} for i in range(1, len(turns), 2)]
    return {"personality": persona, "utterances": utterances}


def _chat_dialog(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise PersonaDataError(f"{where}: a chat record must be an object, got {type(obj).__name__}.")
    for name in ("persona", "turns"):
        if name not in obj:
            raise PersonaDataError(
                f'{where}: missing field {name!r} (a chat record is {{"persona": [...], "turns": [...]}}).'
            )
    persona = _check_str_list(obj["persona"], where, "persona")
    turns = _check_str_list(obj["turns"], where, "turns")
    if obj.get("bot_first"):
        turns = [SILENCE, *turns]
    return [_dialog_from_turns(persona, turns, where)]


def read_chat_jsonl(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """Simple chat JSON Lines: ``{"persona": [str], "turns": [str]}`` per line (partner first; bot turns 2, 4, ...)."""
    records = [
        (where, partial(_fail, problem) if problem else partial(_chat_dialog, obj, where))
        for where, obj, problem in _json_lines(path, source)
    ]
    return {_split_from_name(path, options): records}


_NUMBERED = re.compile(r"^(\d+) ?(.*)$", re.DOTALL)


def _convai2_dialog(lines: list[tuple[int, str]], problems: list[str], where: str, source: str) -> list[dict]:
    if problems:
        raise PersonaDataError(problems[0])
    persona, turns, utterances = [], [], []
    for line_no, text in lines:
        at = f"{source}: line {line_no}"
        if text.startswith("your persona:"):
            persona.append(text[len("your persona:") :].strip())
            continue
        if text.startswith("partner's persona:"):
            continue  # *_both_* files: the partner's persona is not the bot's
        fields_ = text.split("\t")
        if len(fields_) < 2:
            raise PersonaDataError(f"{at}: field 'label' (the gold reply after a tab) is missing.")
        message, label = fields_[0], fields_[1]
        if not label.strip():
            raise PersonaDataError(f"{at}: field 'label' (the gold reply) is empty.")
        cands_field = fields_[3] if len(fields_) > 3 else ""
        history = [*turns, message]
        if cands_field.strip():
            cands = cands_field.split("|")
            if label not in cands:
                raise PersonaDataError(f"{at}: field 'label' {label[:60]!r} is not among the candidates.")
            cands.remove(label)
            utterances.append({"history": history, "candidates": [*cands, label]})
        else:
            utterances.append({"history": history, "candidates": [label], "_sample": True})
        turns = [*history, label]
    if not utterances:
        raise PersonaDataError(f"{where}: dialog has persona lines but no 'text\\tlabel' lines.")
    return [{"personality": persona, "utterances": utterances}]


def read_convai2_txt(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """ParlAI / ConvAI2 text: numbered lines; a dialog starts when the number restarts at 1."""
    records: list[Record] = []
    lines: list[tuple[int, str]] = []
    problems: list[str] = []
    first_line = 0

    def close():
        if lines or problems:
            where = f"{source}: dialog starting at line {first_line}"
            records.append((where, partial(_convai2_dialog, lines, problems, where, source)))

    expected = None
    for line_no, text, problem in _text_lines(path, source):
        if not text.strip():
            continue
        match = _NUMBERED.match(text)
        number = int(match.group(1)) if match else None
        if number == 1 or first_line == 0:
            close()
            lines, problems, first_line, expected = [], [], line_no, None
        if problem:
            problems.append(problem)
        if match is None:
            problems.append(f"{source}: line {line_no}: does not start with a line number (ParlAI text format).")
        elif number != (expected or 1):
            problems.append(
                f"{source}: line {line_no}: line number {number}, expected {expected or 1} (lines out of order)."
            )
        else:
            lines.append((line_no, match.group(2)))
        expected = (number or 0) + 1
    close()
    return {_split_from_name(path, options): records}


_SPC_TURN = re.compile(r"^[\s*]*User\s*([12])\s*\**\s*:\s*\**\s*(.*)$", re.IGNORECASE)
_STAGE_DIRECTION = re.compile(r"^\[.*\]$|^[\W_]*$")


def _spc_turns(conversation: str, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """[(speaker "1"/"2", text)] of an SPC conversation, and the text of every speaker line before merging.

    Consecutive turns of one speaker are merged; a line without a speaker continues the previous turn (recipes,
    lists); bracketed stage directions and separator lines are dropped.
    """
    turns: list[list[str]] = []
    pieces: list[str] = []
    for line in conversation.splitlines():
        line = line.strip()
        match = _SPC_TURN.match(line)
        if match:
            speaker, text = match.group(1), match.group(2).strip()
            pieces.append(text)
            if turns and turns[-1][0] == speaker:
                turns[-1][1] = f"{turns[-1][1]} {text}".strip()
            else:
                turns.append([speaker, text])
        elif line and turns and not _STAGE_DIRECTION.match(line):
            turns[-1][1] = f"{turns[-1][1]} {line}".strip()
    return [(s, t) for s, t in turns], pieces


def _spc_dialogs(row: dict, where: str, roles: list[str]) -> list[dict]:
    for name in SPC_COLUMNS:
        if not isinstance(row.get(name), str):
            raise PersonaDataError(f"{where}: field {name!r} is missing.")
    turns, pieces = _spc_turns(row["Best Generated Conversation"], where)
    speakers = {s for s, _ in turns}
    if not turns:
        raise PersonaDataError(f"{where}: field 'Best Generated Conversation' has no 'User 1:'/'User 2:' turns.")
    if len(speakers) < 2:
        raise PersonaDataError(
            f"{where}: field 'Best Generated Conversation' is one-sided (only User {speakers.pop()} speaks)."
        )
    dialogs = []
    for bot in roles:
        persona = [s.strip() for s in row[f"user {bot} personas"].splitlines() if s.strip()]
        texts = [t for _, t in turns]
        if turns[0][0] == bot:
            texts = [SILENCE, *texts]
        dialog = _dialog_from_turns(persona, texts, where)
        # Merged turns hide their lines; a distractor must not repeat any of them either.
        dialog["_own_texts"] = pieces
        dialogs.append(dialog)
    return dialogs


def _spc_records(rows: Iterable[tuple[str, dict | None, str | None]], options: ReadOptions) -> list[Record]:
    roles = {"user1": ["1"], "user2": ["2"], "both": ["2", "1"]}[options.spc_bot_role]
    return [
        (where, partial(_fail, problem) if problem else partial(_spc_dialogs, row, where, roles))
        for where, row, problem in rows
    ]


def read_spc_csv(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """Synthetic-Persona-Chat CSV; the bot plays `spc_bot_role` (user2, user1, or both: two dialogs per row)."""
    bad_lines: dict[int, str] = {}

    def lines():
        for line_no, text, problem in _text_lines(path, source):
            if problem:
                bad_lines[line_no] = problem
            yield text + "\n"

    reader = csv.reader(lines(), strict=False)
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long fields are judged by max_turn_chars, with a clear message
    rows = []
    try:
        header = next(reader, None)
        if header is None:
            raise PersonaDataError(f"{source}: empty file; expected the header {list(SPC_COLUMNS)}.")
        header = [h.strip() for h in header]
        missing = [c for c in SPC_COLUMNS if c not in header]
        if missing:
            raise PersonaDataError(f"{source}: line 1: the header lacks the column(s) {missing} (it has {header}).")
        start = reader.line_num + 1
        for i, values in enumerate(reader):
            where = f"{source}: record {i} (line {start})"
            problem = next((bad_lines[n] for n in range(start, reader.line_num + 1) if n in bad_lines), None)
            start = reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if problem is None and len(values) != len(header):
                problem = f"{where}: has {len(values)} fields, expected {len(header)} (broken quoting?)."
            rows.append((where, dict(zip(header, values)), problem))
    except csv.Error as err:
        raise PersonaDataError(f"{source}: line {reader.line_num}: broken CSV: {err}.") from None
    finally:
        csv.field_size_limit(old_limit)
    return {_split_from_name(path, options): _spc_records(rows, options)}


READERS: dict[str, Callable[[str, str, ReadOptions], dict[str, Iterable[Record]]]] = {
    "personachat_json": read_personachat_json,
    "jsonl": read_dialogs_jsonl,
    "chat_jsonl": read_chat_jsonl,
    "convai2_txt": read_convai2_txt,
    "spc_csv": read_spc_csv,
}
FORMAT_ALIASES = {"json": "personachat_json", "txt": "convai2_txt", "parlai": "convai2_txt", "csv": "spc_csv"}


def _first_json_line(path: str) -> object:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    return None
    return None


def detect_format(path: str, name: str | None = None) -> str:
    """Guess the reader of a local file from its name (`name`, e.g. a URL, defaults to `path`) and first line."""
    ext = os.path.splitext(name or path)[1].lower()
    if ext == ".json":
        return "personachat_json"
    if ext == ".jsonl":
        first = _first_json_line(path)
        return "chat_jsonl" if isinstance(first, dict) and "turns" in first and "utterances" not in first else "jsonl"
    if ext == ".txt":
        return "convai2_txt"
    if ext == ".csv":
        return "spc_csv"
    raise PersonaDataError(
        f"{name or path}: cannot tell the format from the name; pass dataset_format ({sorted(READERS) + ['hub']})."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Reading: Hub datasets and local `datasets` folders


def _rows_to_records(ds: datasets.Dataset, where: str) -> list[Record]:
    columns = set(ds.column_names)
    rows = ((f"{where}, record {i}", row) for i, row in enumerate(ds))
    if {"personality", "utterances"} <= columns:
        return [(at, partial(_canonical_row, row)) for at, row in rows]
    if {"persona", "turns"} <= columns:
        return [(at, partial(_chat_dialog, row, at)) for at, row in rows]
    if {"personality", "history", "candidates"} <= columns:
        return _utterance_row_records(rows)
    raise PersonaDataError(
        f"{where}: columns {ds.column_names} match no known layout: canonical (personality, utterances), "
        f"one row per utterance (personality, history, candidates[, conv_id]), chat (persona, turns) or "
        f"Synthetic-Persona-Chat {list(SPC_COLUMNS)}; map yours with column_mapping."
    )


def _utterance_row_records(rows: Iterable[tuple[str, dict]]) -> list[Record]:
    """One row per utterance (as bavard/personachat_truecased): consecutive rows of one `conv_id` are a dialog."""
    records: list[Record] = []
    group: list[dict] = []
    first = key = None
    for i, (at, row) in enumerate(rows):
        row_key = row.get("conv_id", i)  # without conv_id every row is a dialog of its own
        if group and row_key != key:
            records.append((first, partial(_dialog_from_utterance_rows, group)))
            group = []
        if not group:
            first = at
        key = row_key
        group.append(row)
    if group:
        records.append((first, partial(_dialog_from_utterance_rows, group)))
    return records


def _dialog_from_utterance_rows(rows: list[dict]) -> list[dict]:
    utterances = [{"history": row["history"], "candidates": row["candidates"]} for row in rows]
    return [{"personality": rows[0]["personality"], "utterances": utterances}]


def _canonical_row(row: dict) -> list[dict]:
    utterances = row.get("utterances")
    if isinstance(utterances, dict):  # a columnar struct list: {"history": [...], "candidates": [...]}
        utterances = [dict(zip(utterances, values)) for values in zip(*utterances.values())]
    return [{**row, "utterances": utterances}]


def read_hub_dataset(source: str, options: ReadOptions, **load_kwargs) -> dict[str, Iterable[Record]]:
    """A Hub dataset, a local `datasets` folder (``save_to_disk`` or data files) in a known layout."""
    try:
        if os.path.isdir(source) and any(
            os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")
        ):
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source, **load_kwargs)
    except (FileNotFoundError, PersonaDataError):
        raise
    except Exception as err:  # pyarrow, network and builder errors: one clear line instead of their traceback
        raise PersonaDataError(
            f"{source}: could not load it as a datasets dataset: {type(err).__name__}: {err}"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({options.split or "train": loaded})
    splits = {}
    for split, ds in loaded.items():
        if options.column_mapping:
            absent = sorted(set(options.column_mapping) - set(ds.column_names))
            if absent:
                raise PersonaDataError(
                    f"{source}: split {split!r}: column_mapping names column(s) {absent} it lacks ({ds.column_names})."
                )
            try:
                ds = ds.rename_columns(options.column_mapping)
            except ValueError as err:  # e.g. a target name that is already a column
                raise PersonaDataError(f"{source}: split {split!r}: column_mapping: {err}") from None
        where = f"{source}: split {split!r}"
        if set(SPC_COLUMNS) <= set(ds.column_names):
            rows = [(f"{where}, record {i}", row, None) for i, row in enumerate(ds)]
            splits[split] = _spc_records(rows, options)
        else:
            splits[split] = _rows_to_records(ds, where)
    return splits


# ----------------------------------------------------------------------------------------------------------------------
# Validation, distractors, assembly


def _check_str_list(value, where: str, field: str, allow_empty: bool = True) -> list[str]:
    if not isinstance(value, list):
        raise PersonaDataError(f"{where}: field {field!r} must be a list of strings, got {type(value).__name__}.")
    bad = next((i for i, s in enumerate(value) if not isinstance(s, str)), None)
    if bad is not None:
        raise PersonaDataError(
            f"{where}: field {field!r} must be a list of strings; item {bad} is {type(value[bad]).__name__}."
        )
    if not allow_empty and not value:
        raise PersonaDataError(f"{where}: field {field!r} is empty.")
    return value


def validate_dialog(dialog, where: str, max_turn_chars: int | None = None) -> dict:
    """Return `dialog` as a canonical record, or raise `PersonaDataError` naming `where` and the field.

    An empty persona is valid; an empty gold reply (the last candidate) or a turn over `max_turn_chars` is not.
    """
    if not isinstance(dialog, dict):
        raise PersonaDataError(f"{where}: a dialog must be an object, got {type(dialog).__name__}.")
    for field_ in ("personality", "utterances"):
        if field_ not in dialog:
            raise PersonaDataError(f"{where}: missing field {field_!r}.")
    personality = _check_str_list(dialog["personality"], where, "personality")
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
        history = _check_str_list(utterance["history"], at, "history")
        candidates = _check_str_list(utterance["candidates"], at, "candidates", allow_empty=False)
        if not candidates[-1].strip():
            raise PersonaDataError(f"{at}: field 'candidates': the gold reply (the last candidate) is empty.")
        if max_turn_chars is not None:
            for name, texts in (("personality", personality), ("history", history), ("candidates", candidates)):
                longest = max(map(len, texts), default=0)
                if longest > max_turn_chars:
                    raise PersonaDataError(
                        f"{at}: field {name!r} has a text of {longest} characters (max_turn_chars={max_turn_chars})."
                    )
        clean.append({"history": history, "candidates": candidates})
    return {"personality": personality, "utterances": clean}


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
                raise PersonaDataError(f"{err} (pass on_bad_record='skip' to skip bad records)") from None
            report.skipped += 1
            report.reasons.append(str(err))
            logger.debug("Skipped: %s", err)
            continue
        for clean, raw in made:
            dialogs.append(clean)
            groups.append(group)
            needs.append([bool(u.get("_sample")) for u in raw["utterances"]])
            own_texts.append(raw.get("_own_texts", []))
    if any(chain.from_iterable(needs)):
        report.short_candidates = sample_distractors(
            dialogs, groups, needs, options.num_distractors, options.distractor_seed, own_texts
        )
    report.dialogs = len(dialogs)
    columns = {key: [d[key] for d in dialogs] for key in DIALOG_FEATURES}  # from_list cannot type an empty list
    return datasets.Dataset.from_dict(columns, features=DIALOG_FEATURES)


def dialogs_to_dataset_dict(splits: dict[str, list], source: str, on_bad_record: str = "error") -> datasets.DatasetDict:
    """Validate raw canonical dialogs per split and build the `DatasetDict`; bad records raise or are counted."""
    options = ReadOptions(on_bad_record=on_bad_record)
    for split, dialogs in splits.items():
        if not isinstance(dialogs, list):
            raise PersonaDataError(
                f"{source}: split {split!r} must be a list of dialogs, got {type(dialogs).__name__}."
            )
    records = {
        split: [(f"{source}: split {split!r}, dialog {i}", partial(list, [d])) for i, d in enumerate(dialogs)]
        for split, dialogs in splits.items()
    }
    return _assemble(records, source, options)[0]


def _assemble(
    splits: dict[str, Iterable[Record]], source: str, options: ReadOptions
) -> tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    out, reports = {}, {}
    for split, records in splits.items():
        reports[split] = SplitReport()
        out[split] = _assemble_split(records, options, reports[split])
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
    return datasets.DatasetDict(out), reports


def load_dialogs_with_report(
    source: str, dataset_format: str | None = None, **options
) -> tuple[datasets.DatasetDict, dict[str, SplitReport]]:
    """`load_dialogs`, also returning per split what was read, skipped and kept."""
    cache_dir = options.pop("cache_dir", None)
    known = {f.name for f in fields(ReadOptions)}
    read_options = ReadOptions(**{k: options.pop(k) for k in list(options) if k in known})
    fmt = FORMAT_ALIASES.get(dataset_format, dataset_format)
    is_hub = fmt == "hub" or (
        fmt is None
        and (
            os.path.isdir(source) or (not os.path.exists(source) and not _is_url(source) and _looks_like_hub_id(source))
        )
    )
    if is_hub:
        splits = read_hub_dataset(source, read_options, cache_dir=cache_dir, **options)
    else:
        if options:
            raise ValueError(
                f"Unknown load_dialogs option(s) {sorted(options)}; known: {sorted(known | {'cache_dir'})}."
            )
        if fmt is not None and fmt not in READERS:
            raise ValueError(f"Unknown dataset_format {fmt!r}; choose one of {sorted(READERS) + ['hub']}.")
        local = _fetch(source, cache_dir)
        fmt = fmt or detect_format(local, source.split("?")[0] if _is_url(source) else None)
        splits = READERS[fmt](local, source, read_options)
    dialogs, reports = _assemble(splits, source, read_options)
    logger.info("Loaded %s: %s", source, {split: ds.num_rows for split, ds in dialogs.items()})
    return dialogs, reports


def load_dialogs(source: str, dataset_format: str | None = None, **options) -> datasets.DatasetDict:
    """Canonical dialogs per split from a local path, an http(s) URL, a Hub id or a local `datasets` folder.

    Options: those of `ReadOptions` (`on_bad_record`, `num_distractors`, `distractor_seed`, `spc_bot_role`,
    `column_mapping`, `split`, `max_turn_chars`), `cache_dir` (downloads); for Hub datasets the rest goes to
    `datasets.load_dataset`.
    """
    return load_dialogs_with_report(source, dataset_format, **options)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Model inputs


def build_inputs(
    persona: Sequence[Sequence[int]],
    history: Sequence[Sequence[int]],
    reply: Sequence[int],
    ids: SpecialTokenIds,
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
    ids: SpecialTokenIds,
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
    if num_candidates is not None and num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1 or None, got {num_candidates}.")
    if personality_permutations < 1:
        raise ValueError(f"personality_permutations must be >= 1, got {personality_permutations}.")
    if max_history < 0:
        raise ValueError(f"max_history must be >= 0, got {max_history}.")
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
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
