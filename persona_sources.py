"""Where dialogs come from besides a local file: URLs (downloaded once, cached by URL), and Hub ids or local
`datasets` folders read through `datasets` in any of the known layouts.

A `datasets` source may hold the canonical record (``personality, utterances``), one row per utterance
(``personality, history, candidates[, conv_id]``, as bavard/personachat_truecased), the chat layout
(``persona, turns``) or the Synthetic-Persona-Chat columns; ``column_mapping`` renames other columns to these.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from functools import partial

import datasets
from datasets import DownloadConfig
from datasets.utils.file_utils import cached_path

from persona_readers import SPC_COLUMNS, chat_dialog, spc_records
from persona_records import PersonaDataError, ReadOptions, Record


def is_url(source: str) -> bool:
    """Whether `source` is a URL (http, https, s3, gs or hf)."""
    return re.match(r"^(https?|s3|gs|hf)://", source) is not None


def is_datasets_source(source: str) -> bool:
    """Whether `source` is read through `datasets`: a local folder, or a name that can only be a Hub id."""
    if os.path.isdir(source):
        return True
    return not os.path.exists(source) and not is_url(source) and _looks_like_hub_id(source)


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None and not os.path.splitext(source)[1]


def download(url: str, cache_dir: str | None) -> str:
    """Local copy of an http(s) URL, kept in `cache_dir` (re-used on later runs, also offline)."""
    # Our own few lines rather than datasets' `cached_path` or huggingface_hub's `http_get`: both refuse every URL,
    # a plain http server of the user's included, while HF_HUB_OFFLINE is set; fsspec's `simplecache::` works
    # offline but writes its cache file in place. Here a temp file in the cache folder is renamed when complete.
    folder = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "persona_data"), "downloads")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(url.split("?")[0]) or "data"
    path = os.path.join(folder, f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}")
    if os.path.exists(path):
        return path
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except (urllib.error.URLError, OSError) as err:
            tmp.close()
            os.unlink(tmp.name)
            raise PersonaDataError(f"{url}: download failed ({err}). Check the URL or pass a local path.") from None
    os.replace(tmp.name, path)  # atomic: a concurrent process never reads a half-written file
    return path


def fetch(source: str, cache_dir: str | None) -> str:
    """Local path of a file `source`, downloading (and caching) URLs."""
    if source.startswith(("http://", "https://")):
        return download(source, cache_dir)
    if is_url(source):
        return cached_path(source, download_config=DownloadConfig(cache_dir=cache_dir))
    if not os.path.exists(source):
        raise FileNotFoundError(f"Dataset file not found: {source!r}. Pass a local path, an http(s) URL or a Hub id.")
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
            splits[split] = spc_records(rows, options)
        else:
            splits[split] = _rows_to_records(ds, where)
    return splits
