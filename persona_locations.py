"""Where a name points: a local path, a URL or a Hub id; which files make a folder a checkpoint or a tokenizer;
whether an output path can be written.

One rule for every caller: the flag checks of the console scripts, the data sources, the model loader and a LoRA
adapter's base model all ask `looks_local` / `looks_like_hub_id`, so a name is never a path for one and a Hub id for
another.
"""

from __future__ import annotations

import os
import re
import tempfile

from persona_errors import UsageError
from persona_gguf import check_gguf_path

# The folder persona-train writes runs into by default: `runs/NAME` is a path even before it exists.
RUNS_FOLDER = "runs"
# Any of these makes a folder a tokenizer (fast, BPE, SentencePiece or WordPiece files; tokenizer.save_pretrained
# writes no config.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)
# A file name's suffix (`.json`, `.gguf`, `.csv`): letters first, so the dots of Hub ids ("Qwen2.5-0.5B") are not one.
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_url(name: str) -> bool:
    """Whether `name` is a URL (http, https, s3, gs or hf).

    >>> is_url("https://example.org/data.json"), is_url("data.json")
    (True, False)
    """
    return re.match(r"^(https?|s3|gs|hf)://", name) is not None


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id ('org/name'): it exists, is absolute, starts with
    '.' or '~', has a backslash or more than one '/', ends with '/', ends with a file suffix, or its first part is an
    existing folder or `runs` (where persona-train writes runs).

    >>> [looks_local(n) for n in ("gpt2", "org/name", "runs/base", "./m", "a/b/c", "model.gguf", "Qwen/Qwen2.5-0.5B")]
    [False, False, True, True, True, True, False]
    """
    if is_url(name):
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith(("/", os.sep)) or os.path.exists(name):
        return True
    if os.path.isabs(name) or os.sep != "/" and os.sep in name:
        return True
    parts = name.split("/")
    if len(parts) > 2 or _FILE_SUFFIX.search(parts[-1]):
        return True
    return len(parts) == 2 and (parts[0] == RUNS_FOLDER or os.path.isdir(parts[0]))


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` can only be a Hub id: 'name' or 'org/name' of word characters, dots and dashes, not a URL and
    not meant as a local path (`looks_local`).

    >>> [looks_like_hub_id(n) for n in ("gpt2", "org/name", "runs/base", "data.json", "http://x.org/d", "a b")]
    [True, True, False, False, False, False]
    """
    return _HUB_ID.fullmatch(name) is not None and not looks_local(name)


def is_tokenizer_folder(path: str) -> bool:
    """Whether the folder `path` holds a tokenizer's files (`TOKENIZER_FILES`)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def check_model_path(name_or_path: str, flag: str = "--model_name_or_path", gguf_file: str | None = None) -> None:
    """A `UsageError` at once for a local-looking model path that is not a checkpoint folder or a GGUF file (instead
    of Hub retries); Hub ids pass. For `--tokenizer_name` a tokenizer folder is enough."""
    path = os.path.expanduser(name_or_path)
    if not name_or_path.strip():
        raise UsageError(f"{flag} is empty; pass a checkpoint folder or a Hub id.")
    if flag == "--model_name_or_path" and check_gguf_path(name_or_path, gguf_file, flag):
        return
    if os.path.isfile(path):
        raise UsageError(f"{flag} {name_or_path}: is a file; pass the checkpoint folder that holds config.json.")
    if os.path.isdir(path):
        checkpoint = any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))
        if not checkpoint and not (flag == "--tokenizer_name" and is_tokenizer_folder(path)):
            raise UsageError(
                f"{flag} {name_or_path}: no config.json in this folder; pass a folder written by persona-train "
                "(or save_pretrained)."
            )
        return
    if looks_local(name_or_path):
        raise UsageError(f"{flag} {name_or_path}: no such folder (Hub ids look like 'org/name').")


def check_writable(path: str, flag: str, *, folder: bool = False) -> None:
    """A `UsageError` naming `flag` when `path` (a file, or with `folder` a folder) cannot be written: a folder where
    a file goes or the reverse, a file among the folders above it, or a place where nothing can be created (a
    read-only folder, /proc, /sys).

    Writability is tried, not read from permission bits: a temporary file is created and removed in the nearest
    existing folder (root ignores permission bits, and /proc refuses new files whatever its bits say). An existing
    file is opened for appending, which leaves it as it is.
    """
    full = os.path.abspath(os.path.expanduser(path))
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a file, not a folder; pass a folder.")
    if not folder and os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a directory; pass a file name (e.g. results.json).")
    existing = full if folder else os.path.dirname(full)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; pass another path.")
    try:
        if not folder and os.path.exists(full):
            with open(full, "a", encoding="utf-8"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".persona-write-check-"):
                pass
    except OSError as err:
        where = full if not folder and os.path.exists(full) else existing
        raise UsageError(
            f"{flag} {path}: cannot write {'to' if where == full else 'in'} {where} ({err.strerror}); pass a path "
            "where you can write."
        ) from None
