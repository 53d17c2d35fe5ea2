"""Where dialogs come from besides a local file: URLs (downloaded once, cached by URL), and Hub ids or local
`datasets` folders read through `datasets` in any of the known layouts.

A `datasets` source may hold the canonical record (``personality, utterances``), one row per utterance
(``personality, history, candidates[, conv_id]``, as bavard/personachat_truecased), the chat layout
(``persona, turns``) or the Synthetic-Persona-Chat columns; ``column_mapping`` renames other columns to these.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from functools import partial

import datasets
from datasets import DownloadConfig
from datasets.utils.file_utils import cached_path

from persona_errors import PersonaDataError
from persona_files import check_file
from persona_locations import is_url, looks_like_hub_id
from persona_readers import SPC_COLUMNS, chat_dialog, spc_records
from persona_records import ReadOptions, Record

logger = logging.getLogger(__name__)


def is_datasets_source(source: str) -> bool:
    """Whether `source` is read through `datasets`: a local folder, or a name that can only be a Hub id."""
    if os.path.isdir(source):
        return True
    return not os.path.exists(source) and not is_url(source) and looks_like_hub_id(source)


# Seconds a whole download may take (a server trickling bytes must not hang a run), and a single read may wait.
DOWNLOAD_TIMEOUT_ENV = "PERSONA_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0
READ_TIMEOUT = 60.0
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")


def download_timeout() -> float:
    """The overall download timeout in seconds: `PERSONA_DOWNLOAD_TIMEOUT`, else one hour."""
    value = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_DOWNLOAD_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise PersonaDataError(f"{DOWNLOAD_TIMEOUT_ENV}={value!r}: must be a number of seconds > 0.")
    return seconds


def _receive(url: str, out, timeout: float) -> None:
    """Write the body of `url` to `out`, checking time, length and that it is not a web page."""
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url, timeout=min(READ_TIMEOUT, timeout)) as response:
        length = response.headers.get("Content-Length")
        received, head = 0, b""
        while True:
            if time.monotonic() > deadline:
                raise PersonaDataError(
                    f"{url}: download took over {timeout:g} s (received {received} bytes); try again, or raise "
                    f"{DOWNLOAD_TIMEOUT_ENV} for a slow server."
                )
            chunk = response.read1(1 << 16)  # read1: returns what arrived, so the deadline is checked while trickling
            if not chunk:
                break
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            received += len(chunk)
            out.write(chunk)
        if length is not None and length.isdigit() and received != int(length):
            raise PersonaDataError(f"{url}: download cut short: received {received} of {length} bytes; try again.")
        if response.headers.get_content_type() == "text/html" or head.lstrip().lower().startswith(_HTML_STARTS):
            raise PersonaDataError(
                f"{url}: the server sent a web page (HTML), not a data file; check the URL (a raw-file link, not "
                f"the page that shows the file)."
            )
    if received == 0:
        raise PersonaDataError(f"{url}: the server sent an empty file; check the URL.")


def download(url: str, cache_dir: str | None) -> str:
    """Local copy of an http(s) URL, kept in `cache_dir` (re-used on later runs, also offline).

    Only a complete download is kept: the body goes to a temporary file, renamed once its length matches the
    server's Content-Length and it is not an HTML page; a failure, a timeout (`PERSONA_DOWNLOAD_TIMEOUT` seconds for
    the whole download) or an interruption leaves nothing in the cache. `load_dialogs` also drops the copy when its
    reader rejects the file.
    """
    # Our own few lines rather than datasets' `cached_path` or huggingface_hub's `http_get`: both refuse every URL,
    # a plain http server of the user's included, while HF_HUB_OFFLINE is set; fsspec's `simplecache::` works
    # offline but writes its cache file in place.
    timeout = download_timeout()
    folder = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "persona_data"), "downloads")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(url.split("?")[0]) or "data"
    path = os.path.join(folder, f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        return path
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            _receive(url, out, timeout)
        os.replace(tmp, path)  # atomic: a concurrent process never reads a half-written file
    except PersonaDataError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise PersonaDataError(f"{url}: download failed ({err}). Check the URL or pass a local path.") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def forget_download(url: str, path: str) -> None:
    """Drop the cached copy of `url` at `path` (its reader rejected it: the next run downloads it again)."""
    if path != url and os.path.isfile(path):
        os.unlink(path)


def fetch(source: str, cache_dir: str | None) -> str:
    """Local path of a file `source`, downloading (and caching) URLs; a local file is checked before reading."""
    if source.startswith(("http://", "https://")):
        return download(source, cache_dir)
    if is_url(source):
        try:
            return cached_path(source, download_config=DownloadConfig(cache_dir=cache_dir))
        except Exception as err:  # fsspec and Hub errors: one clear line
            raise PersonaDataError(f"{source}: download failed ({type(err).__name__}: {err}).") from None
    check_file(source, source)
    return source


def _rows_to_records(ds: datasets.Dataset, where: str) -> list[Record]:
    columns = set(ds.column_names)
    rows = ((f"{where}, record {i}", row) for i, row in enumerate(ds))
    if {"personality", "utterances"} <= columns:
        return [(at, partial(_canonical_row, row)) for at, row in rows]
    if {"persona", "turns"} <= columns:
        return [(at, partial(chat_dialog, row, at)) for at, row in rows]
    if {"personality", "history", "candidates"} <= columns:
        return _utterance_row_records(rows)
    raise PersonaDataError(
        f"{where}: columns {ds.column_names} match no known layout: canonical (personality, utterances), "
        f"one row per utterance (personality, history, candidates[, conv_id]), chat (persona, turns) or "
        f"Synthetic-Persona-Chat {list(SPC_COLUMNS)}; map yours with --column_mapping."
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
    saved = os.path.isdir(source) and any(
        os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")
    )
    try:
        loaded = datasets.load_from_disk(source) if saved else datasets.load_dataset(source, **load_kwargs)
    except PersonaDataError:
        raise
    except Exception as err:  # pyarrow, network and builder errors: one clear line instead of their traceback
        import pyarrow

        kind = "a folder" if os.path.isdir(source) else "a Hub id (no such local file or folder)"
        hint = ""
        # pyarrow reading a cache file cut short raises a plain OSError (network errors are subclasses of it).
        if not saved and (type(err) is OSError or isinstance(err, (pyarrow.ArrowException, EOFError))):
            cache = load_kwargs.get("cache_dir") or datasets.config.HF_DATASETS_CACHE
            hint = f"; if it loaded before, its cache may be damaged: delete {cache} (or pass a fresh --dataset_cache)."
        raise PersonaDataError(
            f"{source}: could not load it as a datasets dataset ({kind}): {type(err).__name__}: {err}{hint}"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({options.split or "train": loaded})
    elif options.split:
        raise PersonaDataError(
            f"{source}: --split names the split of a one-split dataset, but this one has the splits "
            f"{list(loaded)}; drop --split."
        )

    splits = {}
    for split, ds in loaded.items():
        if options.column_mapping:
            absent = sorted(set(options.column_mapping) - set(ds.column_names))
            if absent:
                raise PersonaDataError(
                    f"{source}: split {split!r}: --column_mapping names column(s) {absent} it lacks "
                    f"({ds.column_names})."
                )
            try:
                ds = ds.rename_columns(options.column_mapping)
            except ValueError as err:  # e.g. a target name that is already a column
                raise PersonaDataError(f"{source}: split {split!r}: --column_mapping: {err}") from None
        where = f"{source}: split {split!r}"
        if set(SPC_COLUMNS) <= set(ds.column_names):
            extra = [c for c in ds.column_names if c not in SPC_COLUMNS]
            if extra:  # as the CSV reader: a user's own columns (ids, notes) are not dialog data
                logger.warning(
                    "%s: ignoring the column(s) %s; the dialogs are read from %s.", where, extra, list(SPC_COLUMNS)
                )
            rows = [(f"{where}, record {i}", row, None) for i, row in enumerate(ds)]
            splits[split] = spc_records(rows, options)
        else:
            if options.spc_bot_role != ReadOptions.spc_bot_role:
                raise PersonaDataError(
                    f"{where}: --spc_bot_role applies to Synthetic-Persona-Chat data {list(SPC_COLUMNS)} only, and "
                    f"this split has the columns {ds.column_names}; drop --spc_bot_role."
                )
            splits[split] = _rows_to_records(ds, where)
    return splits
