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
