"""The command-line layer under the four console scripts: parsing, shared look-ups and one error boundary.

`persona-train`, `persona-chat`, `persona-eval` and `persona-demo` parse argument dataclasses with
`parse_args_with_config` (a lone first `.yaml`/`.json` argument is a config file, later flags override it) and run
their `main` through `run_console_script`, which turns a user error into one line on stderr and exit status 2.
`--debug` (or `PERSONA_DEBUG=1`) shows the traceback instead. This module imports nothing of the project, so every
script and library module above it may use its helpers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Names tried, in order, when the split asked for evaluation is missing.
EVAL_SPLIT_FALLBACKS = ("validation", "valid")


class UsageError(ValueError):
    """A mistake of the user (a flag, a file, a value): the console scripts print its message as one line."""


# What the boundary reports as one line: the project's typed errors (PersonaDataError and UsageError are
# ValueErrors, as are the argument dataclasses' checks) and file errors.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def parse_args_with_config(parser, argv: Sequence[str] | None = None) -> tuple:
    """`parser.parse_args_into_dataclasses(argv)`, where a first argument ending in .yaml/.yml/.json is a config file
    whose values the following flags override. Unknown keys in the file are an error naming the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_path, argv = argv[0], argv[1:]
        config = read_config_file(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UsageError(f"{config_path}: unknown option(s) {unknown}.")
        parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(args=argv)


def read_config_file(path: str) -> dict:
    """The options of a YAML or JSON config file, as a dict."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        import yaml

        return yaml.safe_load(f) or {}


def find_split(dialogs, name: str, source: str, fallbacks: Sequence[str] = EVAL_SPLIT_FALLBACKS) -> str:
    """The split of `dialogs` called `name`, else the first of `fallbacks` present; a `UsageError` if none is."""
    split = next((s for s in (name, *fallbacks) if s in dialogs), None)
    if split is None:
        raise UsageError(f"{source} has no split {name!r} (it has {list(dialogs)}).")
    return split


def persona_split(dialogs) -> str:
    """The split to draw personas from: the validation split when there is one, else the first."""
    return next((s for s in EVAL_SPLIT_FALLBACKS[::-1] if s in dialogs), next(iter(dialogs)))


def max_positions(model) -> int | None:
    """The model's window: its maximum number of positions (None when the config does not say)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def input_budget(model, max_length: int | None) -> int | None:
    """The longest input in tokens: `max_length` capped by the model's window (the window when None)."""
    window = max_positions(model)
    if max_length is None or window is None:
        return max_length or window
    return min(max_length, window)


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


def run_console_script(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` (parse, then work) inside the one error boundary of the console scripts.

    A user error (`USER_ERRORS`) prints `prog: error: <message>` once (rank 0 under torchrun) and exits with status 2,
    without a traceback unless `--debug` is among the arguments or `PERSONA_DEBUG=1`. Returns main's exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PERSONA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv) or 0
    except USER_ERRORS as err:
        if debug:
            raise
        if _is_rank_zero():
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
