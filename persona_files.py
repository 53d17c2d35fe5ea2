"""A user's files as text: checks before reading, gzip, encodings, and JSON that refuses duplicate keys.

Every text file a user gives (data files, `--persona_file`, config files, `--chat_template` files) is read here, by
one rule: UTF-8 (a byte-order mark dropped) or UTF-16/UTF-32 with a byte-order mark. Every problem is one error
naming the file (and the line or byte) and what to do: a missing file, a folder, a link loop, an unreadable file, a
binary file (or UTF-16/UTF-32 without a mark), invalid UTF-8, a broken gzip stream, a JSON object with a key twice
(``json`` would silently keep the last value). Data files raise `PersonaDataError` (and refuse an empty file);
callers reading other files pass their own error type and what the user should pass instead.

>>> loads_strict('{"a": 1, "b": {"c": 2}}')
{'a': 1, 'b': {'c': 2}}
>>> loads_strict('{"a": 1,\\n "a": 2}')
Traceback (most recent call last):
...
persona_files.DuplicateKeyError: line 1, column 1: duplicate key 'a' in this object (JSON keeps only the last value)
"""

from __future__ import annotations

import gzip
import json
import json.decoder
import json.scanner
import os
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from persona_errors import PersonaDataError, PersonaError

GZIP_MAGIC = b"\x1f\x8b"
# UTF-32 first: its little-endian mark begins with UTF-16's. The codecs named read the mark and drop it.
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
UTF8_BOM = b"\xef\xbb\xbf"
# gzip/zlib failures of a truncated or corrupt stream.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)
# What to pass instead of a data source that is not a readable file.
DATA_SOURCE = "an existing file, a `datasets` folder, an http(s) URL or a Hub id"


def _error(error: type[PersonaError] | None, message: str) -> PersonaError:
    """`error(message)`; None is `PersonaDataError` (data files)."""
    return (error or PersonaDataError)(message)


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice; `line`, `column` (of the object, in the parsed text) and `key` say where."""

    def __init__(self, line: int = 0, column: int = 0, key: str = ""):
        self.line, self.column, self.key = line, column, key
        super().__init__(f"line {line}, column {column}: {self.problem}")

    @property
    def problem(self) -> str:
        return f"duplicate key {self.key!r} in this object (JSON keeps only the last value)"


def file_in_the_way(path: str) -> str | None:
    """The file, if any, among the folders above `path` (creating `path` would fail with "Not a directory")."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent if os.path.exists(parent) and not os.path.isdir(parent) else None


def check_file(path: str, source: str) -> None:
    """Raise a `PersonaDataError` unless the data source `path` is a readable, non-empty regular file (named
    `source`)."""
    if not path.strip():
        raise _error(None, f"the data path is empty; pass {DATA_SOURCE.replace('an existing file', 'a file')}.")
    scheme = path.split("://", 1)[0] if "://" in path else None
    if scheme is not None and not os.path.lexists(path):
        raise _error(
            None,
            f"{source}: URLs must start with http:// or https://, not {scheme}://; pass a local file by its path "
            "(download it first).",
        )
    if os.path.isdir(path):
        raise _error(
            None,
            f"{source}: is a folder; pass one file in it, or leave --dataset_format unset (or 'hub') to read the "
            f"folder through `datasets`.",
        )
    check_text_file(path, source, DATA_SOURCE)
    if os.stat(path).st_size == 0:
        raise _error(None, f"{source}: empty file (0 bytes); check the path or the download.")


def check_text_file(path: str, source: str, expect: str, error: type[PersonaError] | None = None) -> None:
    """Raise `error` (None: `PersonaDataError`), naming `source`, unless `path` is a regular file this process can
    read; `expect` says what to pass instead (``"a text file, one sentence per line"``)."""
    if not os.path.lexists(path):
        raise _error(error, f"{source}: no such file; pass {expect}.")
    try:
        info = os.stat(path)
    except OSError as err:  # a dangling symbolic link or a loop of them
        raise _error(error, f"{source}: cannot be opened ({err.strerror}); check the symbolic link.") from None
    if stat.S_ISDIR(info.st_mode):
        raise _error(error, f"{source}: is a folder; pass {expect}.")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise _error(error, f"{source}: not a regular file; pass {expect}.")
    if not os.access(path, os.R_OK):
        raise _error(error, f"{source}: permission denied; make the file readable (chmod +r).")


def is_gzip(path: str) -> bool:
    """Whether the file starts with the gzip magic bytes (whatever its name)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def strip_gz(name: str) -> str:
    """`name` without a ``.gz`` suffix: the name of the format inside (``data.json.gz`` → ``data.json``)."""
    return name[:-3] if name.lower().endswith(".gz") else name


@contextmanager
def open_binary(
    path: str, source: str, expect: str | None = None, error: type[PersonaError] | None = None
) -> Iterator[BinaryIO]:
    """The checked file's bytes, decompressed when it is gzip; read errors become `error` (None: `PersonaDataError`).
    Without `expect` the file is a data source (`check_file`); with it, any readable file (`check_text_file`)."""
    if expect is None:
        check_file(path, source)
    else:
        check_text_file(path, source, expect, error)
    compressed = False
    try:
        compressed = is_gzip(path)
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            yield f
    except PersonaError:
        raise
    except _GZIP_ERRORS as err:
        if not compressed:
            raise _error(error, f"{source}: cannot be read ({err.strerror or err}).") from None
        raise _error(error, f"{source}: broken gzip file ({err}); download or compress it again.") from None


def bom_encoding(head: bytes) -> str | None:
    """The encoding a byte-order mark at the start of `head` announces (UTF-32 or UTF-16), or None (UTF-8 then)."""
    return next((name for bom, name in _BOMS if head.startswith(bom)), None)


def _decode_wide(raw: bytes, encoding: str, source: str, error: type[PersonaError] | None = None) -> str:
    """UTF-16/UTF-32 text (Windows editors' "Unicode"): the codec reads the byte-order mark and drops it."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].decode(encoding, errors="replace").count("\n") + 1
        raise _error(
            error,
            f"{source}: line {line}: not valid {encoding} text (byte {err.start} of the file: a lone surrogate or a "
            f"cut-off character); re-encode the file as UTF-8.",
        ) from None


def _nul_error(source: str, line_no: int, offset: int | None, error: type[PersonaError] | None = None):
    where = "a NUL byte" if offset is None else f"a NUL byte (byte {offset} of the file)"
    return _error(
        error,
        f"{source}: line {line_no}: {where}: a binary file, or UTF-16/UTF-32 text without a byte-order mark; pass a "
        f"UTF-8 text file.",
    )


def text_lines(path: str, source: str) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text without line end, encoding problem or None) per line of a UTF-8 (or gzipped) file.

    A UTF-8 BOM and CRLF are tolerated, UTF-16/UTF-32 with a byte-order mark read. Decoding UTF-8 line by line lets a
    bad byte spoil only its own record, and names its line; a NUL byte means binary data (or UTF-16/32 without a
    mark) and fails the whole file.
    """
    offset = 0
    with open_binary(path, source) as f:
        encoding = bom_encoding(f.read(4))
        f.seek(0)
        if encoding is not None:  # rare, and not splittable into lines as bytes: decoded whole
            for line_no, text in enumerate(_decode_wide(f.read(), encoding, source).split("\n"), start=1):
                if "\0" in text:
                    raise _nul_error(source, line_no, None)
                yield line_no, text.rstrip("\r"), None
            return
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                if raw.startswith(UTF8_BOM):
                    raw, offset = raw[len(UTF8_BOM) :], len(UTF8_BOM)
            if b"\0" in raw:
                raise _nul_error(source, line_no, offset + raw.index(b"\0"))
            start, offset = offset, offset + len(raw)
            raw = raw.rstrip(b"\r\n")
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                problem = (
                    f"{source}: line {line_no}: not UTF-8 (byte {start + err.start} of the file); "
                    f"re-encode the file as UTF-8."
                )
                yield line_no, raw.decode("utf-8", errors="replace"), problem


def read_text(path: str, source: str, expect: str | None = None, error: type[PersonaError] | None = None) -> str:
    """The whole checked file as text (UTF-8, BOM dropped, or UTF-16/UTF-32 with a byte-order mark; gzip
    decompressed): the one reader of a user's text file.

    A data source by default (`PersonaDataError`, an empty file refused); any other file gives `expect` (what to pass
    instead, for a missing file or a folder) and `error` (the type raised, e.g. `UsageError`), and may be empty.
    """
    with open_binary(path, source, expect, error) as f:
        raw = f.read()
    encoding = bom_encoding(raw)
    if encoding is not None:
        text = _decode_wide(raw, encoding, source, error)
        if "\0" in text:
            raise _nul_error(source, text.count("\n", 0, text.index("\0")) + 1, None, error)
        return text
    if b"\0" in raw:
        raise _nul_error(source, raw.count(b"\n", 0, raw.index(b"\0")) + 1, raw.index(b"\0"), error)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise _error(
            error, f"{source}: line {line}: not UTF-8 (byte {err.start} of the file); re-encode the file as UTF-8."
        ) from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKeyError()  # located by `_locate_duplicate`, only on this rare path
    return obj


def _locate_duplicate(text: str) -> DuplicateKeyError:
    """The error naming the first object (innermost first) that has a key twice, and the key."""
    found: list[tuple[int, str]] = []
    decoder = json.JSONDecoder()

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        seen = set()
        for key, _ in pairs:
            if key in seen and not found:
                found.append((s_and_end[1] - 1, key))
            seen.add(key)
        return dict(pairs), end

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the C scanner cannot say where an object starts
    decoder.decode(text)
    pos, key = found[0]
    return DuplicateKeyError(text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos), key)


def loads_strict(text: str) -> object:
    """`json.loads`, but an object with a key twice raises `DuplicateKeyError` naming the line and the key."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except DuplicateKeyError:
        raise _locate_duplicate(text) from None


def parse_json(text: str, source: str, error: type[PersonaError] | None = None) -> object:
    """The JSON in `text` (read from the file `source`) by `loads_strict`; broken JSON, a key given twice or JSON
    nested too deeply is one `error` (None: `PersonaDataError`) naming the file, the line and the column."""
    try:
        return loads_strict(text)
    except DuplicateKeyError as err:
        raise _error(error, f"{source}: {err}; remove one.") from None
    except json.JSONDecodeError as err:
        raise _error(error, f"{source}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}.") from None
    except RecursionError:
        raise _error(error, f"{source}: JSON nested too deeply.") from None
    except ValueError as err:  # a number too long for Python to convert
        raise _error(error, f"{source}: not valid JSON data: {' '.join(str(err).split())}.") from None
