"""The chat-template options a user writes: a `--chat_template FILE` read and checked, a `--system_prompt` checked (one
placeholder, `{persona}`), the default system prompt."""

from __future__ import annotations

import logging
import re

from persona_errors import ChatTemplateError, UsageError
from persona_files import parse_json, read_text

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are chatting with someone. Stay in character. Your persona:\n{persona}"
PERSONA_FIELD = "{persona}"
# A brace around one word is meant as a placeholder (`{name}`, `{Persona}`, `{ persona }`): only {persona} is one.
_PLACEHOLDER = re.compile(r"\{\s*[A-Za-z_][\w.-]*\s*\}")
TEMPLATE_FILE = "a Jinja template file or a tokenizer_config.json"  # what to pass instead of an unreadable path
_WARNED_BACKSLASH_N: set[str] = set()  # say once per prompt that "\n" was written as two characters


def load_chat_template(path: str) -> str:
    """The Jinja chat template in `path`: a template file (.jinja, .txt...) or a JSON file with a `chat_template` field
    (`tokenizer_config.json`, `chat_template.json`). Read by `persona_files.read_text`, the one rule for a user's text
    files (UTF-8, or UTF-16/UTF-32 with a byte-order mark; JSON without a key twice)."""
    source = f"--chat_template {path}"
    text = read_text(path, source, TEMPLATE_FILE, ChatTemplateError)
    if path.endswith(".json") and text.strip():
        data = parse_json(text, source, ChatTemplateError)
        if not isinstance(data, dict):
            raise ChatTemplateError(f"{source}: not a JSON object with a 'chat_template' field.")
        text = data.get("chat_template")
        if isinstance(text, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            text = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}.get("default")
    if not isinstance(text, str) or not text.strip():
        raise ChatTemplateError(f"{source}: the file holds no chat template.")
    return text


def require_persona_field(system_prompt: str) -> None:
    """A `UsageError` unless the system prompt says where the persona goes."""
    if PERSONA_FIELD not in system_prompt:
        raise UsageError(
            f"--system_prompt must contain {PERSONA_FIELD} (where the persona sentences go); got {system_prompt!r}."
        )


def check_system_prompt(system_prompt: str | None, *, warn: bool = True) -> None:
    """Check a `--system_prompt` as given on the command line (not one a checkpoint recorded: that one is what the model
    was trained with).

    It must hold `{persona}`. Any other `{word}` is refused rather than saved literally: it is a misspelt placeholder
    (`{Persona}`) or one that is never filled in (`{name}`), and the model would be trained, served and evaluated on
    the braces themselves. A backslash followed by `n` (what bash's double quotes pass for "\\n") is kept as written,
    with a warning once (unless `warn` is false: the argument parser checks before logging is set up): it may be
    meant, but mostly it is a newline that did not happen. None (no flag) passes.
    """
    if system_prompt is None:
        return
    require_persona_field(system_prompt)
    others = sorted({m.group() for m in _PLACEHOLDER.finditer(system_prompt)} - {PERSONA_FIELD})
    if others:
        raise UsageError(
            f"--system_prompt: {', '.join(others)} is not filled in (the only placeholder is {PERSONA_FIELD}, the "
            "persona sentences); write it out or use {persona}."
        )
    if warn and "\\n" in system_prompt and system_prompt not in _WARNED_BACKSLASH_N:
        _WARNED_BACKSLASH_N.add(system_prompt)
        logger.warning(
            "--system_prompt holds a backslash followed by 'n' (two characters, not a newline: bash's double quotes "
            "pass \\n as written); it is used as written. For newlines write $'...\\n...' in bash or a YAML config."
        )
