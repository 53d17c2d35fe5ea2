"""One reader per file format, each turning a local file into per-split `Record`s of the canonical dialog.

Formats (``dataset_format``; `detect_format` guesses it from the file name and first line):

- ``personachat_json``: ``{"train": [dialog...], "valid": [dialog...]}`` (a bare list is one split).
- ``jsonl``: one canonical dialog per line.
- ``chat_jsonl``: one ``{"persona": [str], "turns": [str]}`` per line; turns alternate, the partner first, so the
  bot (who has the persona) speaks turns 2, 4, ... (set ``"bot_first": true`` when the bot opens); an optional
  ``"rejected"`` holds one entry per bot turn, a list of curated rejected replies or null.
- ``convai2_txt``: ParlAI/ConvAI2 text (``1 your persona: ...``, ``n text\\tlabel\\t\\tcand|cand|...``; a dialog
  restarts at line number 1; ``*_no_cands.txt`` and ``*_both_*`` too).
- ``spc_csv``: Synthetic-Persona-Chat CSV (``user 1 personas``, ``user 2 personas``, ``Best Generated
  Conversation``); the bot plays ``spc_bot_role`` (user2, user1 or both).

Files are checked, decompressed (gzip) and decoded by `persona_files`, line by line, so one bad byte spoils only its
own record and the error names its line. A field a format does not define is an error, never ignored. Formats
without distractors mark their utterances for sampling (`persona_records.sample_distractors`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial

from persona_errors import PersonaDataError
from persona_files import DuplicateKeyError, loads_strict, parse_json, read_text, strip_gz, text_lines
from persona_records import (
    SILENCE,
    ReadOptions,
    Record,
    canonical_records,
    check_canonical_fields,
    check_fields,
    check_str_list,
)

logger = logging.getLogger(__name__)

SPC_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")
CHAT_FIELDS = ("persona", "turns", "bot_first", "rejected")


def _fail(message: str) -> list[dict]:
    """The build step of a record already known to be bad: it fails when assembled, so "skip" can count it."""
    raise PersonaDataError(message)


def _split_from_name(path: str, options: ReadOptions) -> str:
    if options.split:
        return options.split
    words = re.split(r"[^a-z]+", os.path.basename(strip_gz(path)).lower())
    for word in words:
        if word in ("train", "valid", "validation", "test", "dev"):
            return word
    return "train"


def _json_lines(path: str, source: str) -> Iterator[tuple[str, object, str | None]]:
    """(where, parsed object or None, problem or None) per non-empty line of a JSON Lines file."""
    for line_no, text, problem in text_lines(path, source):
        where = f"{source}: line {line_no}"
        if not text.strip():
            continue
        if problem:
            yield where, None, problem
            continue
        try:
            yield where, loads_strict(text), None
        except DuplicateKeyError as err:
            yield where, None, f"{where}, column {err.column}: {err.problem}; remove one."
        except json.JSONDecodeError as err:
            yield where, None, f"{where}, column {err.colno}: not valid JSON: {err.msg}."
        except RecursionError:
            yield where, None, f"{where}: JSON nested too deeply."
        except ValueError as err:  # a number too long for Python to convert
            yield where, None, f"{where}: not valid JSON data: {err}."


def read_personachat_json(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """PERSONA-CHAT "self_original" JSON: ``{"train": [dialog...], "valid": [dialog...]}`` (a list: one split)."""
    data = parse_json(read_text(path, source), source)
    if isinstance(data, list):
        data = {_split_from_name(path, options): data}
    elif options.split and isinstance(data, dict):
        raise PersonaDataError(
            f"{source}: --split names the split of a one-split file, but this file has the splits {list(data)}; "
            f"drop --split."
        )
    if not isinstance(data, dict) or not data:
        raise PersonaDataError(f'{source}: expected an object of splits like {{"train": [...], "valid": [...]}}.')
    return canonical_records(data, source, strict=True)


def read_dialogs_jsonl(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """JSON Lines, one canonical dialog per line; one split (named by `split` or the file name)."""
    records = [
        (where, partial(_fail, problem) if problem else partial(check_canonical_fields, obj, where))
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


def chat_dialog(obj, where: str, strict: bool = False) -> list[dict]:
    """The canonical dialog of one chat record ``{"persona": [str], "turns": [str][, "bot_first": bool]}``.

    `strict` (files): a field other than these is an error (`datasets` rows may carry other columns).
    """
    if not isinstance(obj, dict):
        raise PersonaDataError(f"{where}: a chat record must be an object, got {type(obj).__name__}.")
    if strict:
        check_fields(obj, CHAT_FIELDS, where)
        if "rejected" in obj and obj["rejected"] is None:  # null is not "absent": a file says what it means
            raise PersonaDataError(
                f"{where}: field 'rejected' must be a list with one entry per bot turn, got null; leave the field out "
                "for none."
            )
    for name in ("persona", "turns"):
        if name not in obj:
            raise PersonaDataError(
                f'{where}: missing field {name!r} (a chat record is {{"persona": [...], "turns": [...]}}).'
            )
    persona = check_str_list(obj["persona"], where, "persona")
    turns = check_str_list(obj["turns"], where, "turns")
    bot_first = obj.get("bot_first")
    # "false" is truthy: never guess. A file's null is refused too; `datasets` rows give None where a row lacks it.
    if (bot_first is not None or (strict and "bot_first" in obj)) and not isinstance(bot_first, bool):
        got = "null" if bot_first is None else repr(bot_first)
        raise PersonaDataError(f"{where}: field 'bot_first' must be true or false, got {got} (leave it out for false).")
    if bot_first:
        turns = [SILENCE, *turns]
    dialog = _dialog_from_turns(persona, turns, where)
    rejected = obj.get("rejected")
    if rejected is not None:  # one entry per bot turn: its curated rejected replies, or null
        if not isinstance(rejected, list) or len(rejected) != len(dialog["utterances"]):
            raise PersonaDataError(
                f"{where}: field 'rejected' must be a list with one entry per bot turn ({len(dialog['utterances'])}): "
                "a list of rejected replies, or null for none."
            )
        for utterance, replies in zip(dialog["utterances"], rejected):
            if replies is not None:
                utterance["rejected"] = replies
    return [dialog]


def read_chat_jsonl(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """Simple chat JSON Lines: ``{"persona": [str], "turns": [str]}`` per line (partner first; bot turns 2, 4, ...)."""
    records = [
        (where, partial(_fail, problem) if problem else partial(chat_dialog, obj, where, strict=True))
        for where, obj, problem in _json_lines(path, source)
    ]
    return {_split_from_name(path, options): records}


_NUMBERED = re.compile(r"^(\d{1,9}) ?(.*)$", re.DOTALL)  # a longer number is no line number (nor fits int())


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
        extra = next((i for i, value in enumerate(fields_[4:], start=5) if value.strip()), None)
        if extra is not None:  # ParlAI's fields: text, label, reward, candidates; a fifth would be silently lost
            raise PersonaDataError(
                f"{at}: {len(fields_)} tab-separated fields, at most 4 expected (text, label, reward, candidates); "
                f"field {extra} {fields_[extra - 1][:60]!r} would be lost (a tab inside a text?)."
            )
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
    for line_no, text, problem in text_lines(path, source):
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
# A speaker tag of someone else ("User 3:", "User 0:") would otherwise be merged into the previous turn.
_SPC_OTHER_SPEAKER = re.compile(r"^[\s*]*(User\s*\d+)\s*\**\s*:", re.IGNORECASE)
_STAGE_DIRECTION = re.compile(r"^\[.*\]$|^[\W_]*$")


def _spc_turns(conversation: str, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """[(speaker "1"/"2", text)] of an SPC conversation, and the text of every speaker line before merging.

    Consecutive turns of one speaker are merged; a line without a speaker continues the previous turn (recipes,
    lists); bracketed stage directions and separator lines are dropped.
    """
    turns: list[list[str]] = []
    pieces: list[str] = []
    for line_no, line in enumerate(conversation.splitlines(), start=1):
        line = line.strip()
        match = _SPC_TURN.match(line)
        other = None if match else _SPC_OTHER_SPEAKER.match(line)
        if other:
            raise PersonaDataError(
                f"{where}: field 'Best Generated Conversation', its line {line_no}: unknown speaker "
                f"{other.group(1)!r} (only User 1 and User 2 take turns)."
            )
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


def spc_records(rows: Iterable[tuple[str, dict | None, str | None]], options: ReadOptions) -> list[Record]:
    """Records of Synthetic-Persona-Chat rows given as (where, row, problem or None); one dialog per bot role."""
    roles = {"user1": ["1"], "user2": ["2"], "both": ["2", "1"]}[options.spc_bot_role]
    return [
        (where, partial(_fail, problem) if problem else partial(_spc_dialogs, row, where, roles))
        for where, row, problem in rows
    ]


def read_spc_csv(path: str, source: str, options: ReadOptions) -> dict[str, Iterable[Record]]:
    """Synthetic-Persona-Chat CSV; the bot plays `spc_bot_role` (user2, user1, or both: two dialogs per row)."""
    bad_lines: dict[int, str] = {}

    def lines():
        for line_no, text, problem in text_lines(path, source):
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
        twice = next((h for i, h in enumerate(header) if h in header[:i]), None)
        if twice is not None:
            raise PersonaDataError(f"{source}: line 1: the header names the column {twice!r} twice; remove one.")
        unknown = [h for h in header if h not in SPC_COLUMNS]
        if unknown:  # ids, notes, scores: a user's own columns are not dialog data
            logger.warning(
                "%s: ignoring the column(s) %s; the dialogs are read from %s.", source, unknown, list(SPC_COLUMNS)
            )
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
    return {_split_from_name(path, options): spc_records(rows, options)}


READERS: dict[str, Callable[[str, str, ReadOptions], dict[str, Iterable[Record]]]] = {
    "personachat_json": read_personachat_json,
    "jsonl": read_dialogs_jsonl,
    "chat_jsonl": read_chat_jsonl,
    "convai2_txt": read_convai2_txt,
    "spc_csv": read_spc_csv,
}
FORMAT_ALIASES = {"json": "personachat_json", "txt": "convai2_txt", "parlai": "convai2_txt", "csv": "spc_csv"}


def _first_json_line(path: str, source: str) -> object:
    for _, text, problem in text_lines(path, source):
        if text.strip():
            try:
                return None if problem else json.loads(text)
            except (ValueError, RecursionError):  # not JSON, or a number too long to convert
                return None
    return None


def detect_format(path: str, name: str | None = None) -> str:
    """Guess the reader of a local file from its name (`name`, e.g. a URL, defaults to `path`) and first line."""
    ext = os.path.splitext(strip_gz(name or path))[1].lower()
    if ext == ".json":
        return "personachat_json"
    if ext == ".jsonl":
        first = _first_json_line(path, name or path)
        return "chat_jsonl" if isinstance(first, dict) and "turns" in first and "utterances" not in first else "jsonl"
    if ext == ".txt":
        return "convai2_txt"
    if ext == ".csv":
        return "spc_csv"
    raise PersonaDataError(
        f"{name or path}: cannot tell the format from the name; pass --dataset_format (one of "
        f"{sorted(READERS) + ['hub']})."
    )
