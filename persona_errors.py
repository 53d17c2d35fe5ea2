"""The project's error types: a user's mistake (a flag, a file, a record, a checkpoint), never a bug.

The console scripts print these as one line and exit with status 2 (`persona_cli.run_console_script`); anything else
that escapes is a bug and keeps its traceback. Library code raises the most specific type, with the file, record and
field or the flag in the message.
"""

from __future__ import annotations


class PersonaError(Exception):
    """Base of every error the command-line boundary reports as one line."""


class UsageError(PersonaError, ValueError):
    """A mistake in a flag, an option or a value given to the scripts or the library."""


class CheckpointError(PersonaError, OSError):
    """A checkpoint that cannot be loaded (missing, damaged or incomplete files, a model type that cannot serve)."""


class PersonaDataError(PersonaError, ValueError):
    """Malformed persona data; the message names the file, the record and the field."""


class ChatTemplateError(PersonaError, ValueError):
    """A tokenizer or chat template that cannot build persona rows; the message names the template and the fix."""


class NLIModelError(PersonaError, ValueError):
    """A checkpoint that cannot serve as an NLI model (labels not mappable, not a classifier): one line for users."""


def quote(value, limit: int = 200) -> str:
    """`value` as Python writes it, cut to about `limit` characters, for messages that quote what a user gave: a
    config value can be millions of characters long, and a YAML alias bomb a structure whose full `repr` would never
    finish. Containers go through `reprlib`, which never walks past the first items of each level.

    >>> quote("x" * 1000, limit=12)
    "'xxxxxxxxxxx'... (1000 characters)"
    >>> quote([1, 2])
    '[1, 2]'
    >>> quote([[i] * 100 for i in range(100)], limit=40)
    '[[0, 0, 0, 0, 0, 0, ...], [1, 1, 1, 1, ... (100 items)'
    """
    import reprlib

    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[: limit - 1]!r}... ({len(value)} characters)"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit // 4, limit // 4
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    text = short.repr(value)
    size = (
        f" ({len(value)} item{'s' if len(value) != 1 else ''})" if isinstance(value, (list, tuple, dict, set)) else ""
    )
    if len(text) > limit:
        return f"{text[: limit - 1]}...{size}"
    return text if "..." not in text else f"{text}{size}"


def check_positive(obj, *names: str, allow_none: bool = True, minimum: float = 1) -> None:
    """A `UsageError` naming `--name` for each attribute of `obj` below `minimum` (None passes with `allow_none`)."""
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if value is None or not value >= minimum:  # `not >=` also catches NaN
            raise UsageError(f"--{name} must be >= {minimum:g}, got {value}.")
