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


def quote(value, limit: int = 200) -> str:
    """`repr(value)` cut to `limit` characters, for messages that quote what a user gave: a config value can be
    millions of characters long (a YAML alias bomb), and one error line must stay readable.

    >>> quote("x" * 1000, limit=12)
    "'xxxxxxxxxxx... (1002 characters)"
    >>> quote([1, 2])
    '[1, 2]'
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}... ({len(text)} characters)"
