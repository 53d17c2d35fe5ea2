"""The command-line layer under the four console scripts: parsing, shared look-ups and one error boundary.

`persona-train`, `persona-chat`, `persona-eval` and `persona-demo` parse argument dataclasses (`persona_arguments`) with
`parse_args_with_config` (a lone first `.yaml`/`.json` argument is a config file, later flags override it) and run
their `main` through `run_console_script`, which turns a user error into one line on stderr and exit status 2
(`PERSONA_DEBUG=1` shows the traceback instead) and a bug into its traceback and exit status 1. This module imports
only the project's error types and GGUF path check (`persona_gguf`, light): it sits below the use layer (generation's
argument checks raise its `UsageError`) and the four scripts.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

from persona_assets import shipped_config
from persona_errors import PersonaError, UsageError, quote
from persona_files import parse_json, read_text
from persona_process import end_process_groups, is_rank_zero, say

EXIT_USER_ERROR = 2
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
CONFIG_FILE = "a YAML or JSON config file"  # what to pass instead of a config path that is no readable file
# Text options that also take a mapping in a config file (`persona_records.parse_column_mapping` reads both); the
# Trainer's own (`deepspeed`, `fsdp_config`, ...) say so in their annotations.
MAPPING_OPTIONS = {"column_mapping"}
# The longest error line the boundary prints: a message quoting a huge user value is cut in its middle.
MAX_ERROR_CHARS = 2000


EXIT_BUG = 1


def _check_utf8_arguments(argv: list[str]) -> None:
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates (``\\udcff``), which every tokenizer
    and file API refuses later with a traceback: one line naming the flag instead."""
    bad = next((i for i, arg in enumerate(argv) if any("\ud800" <= c <= "\udfff" for c in arg)), None)
    if bad is None:
        return
    arg = argv[bad]
    flag = arg if arg.startswith("-") else next((a for a in reversed(argv[:bad]) if a.startswith("-")), "an argument")
    raise UsageError(f"{flag.split('=')[0]}: {arg!r} is not UTF-8 text (a byte the system did not decode); pass UTF-8.")


def parse_args_with_config(parser, argv: Sequence[str] | None = None) -> tuple:
    """`parser.parse_args_into_dataclasses(argv)`, where a first argument ending in .yaml/.yml/.json is a config file
    whose values the following flags override.

    Every mistake is a `UsageError` of one line: an unknown flag or config key (with the closest known name), a bad
    value (argparse's own message), a config file that is unreadable, not a mapping or has a key twice. The argument
    dataclasses check their values in `__post_init__`, so all of this happens before any model or data is loaded.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_utf8_arguments(argv)
    flags = [a for action in parser._actions for a in action.option_strings if a.startswith("--")]

    def error(message: str):
        raise UsageError(f"{message} (see --help)")

    parser.error = error  # argparse would print the usage block and exit; the boundary prints one line instead
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        config_path, argv = argv[0], argv[1:]
        config = read_config_file(config_path)
        _check_config_keys(parser, config_path, config)
        actions = {action.dest: action for action in parser._actions}
        # Options whose dataclass field takes a list (`report_to: [tensorboard]`) besides the repeatable flags, from
        # the classes' own annotations (HfArgumentParser rewrites the fields' types).
        takes_list = {
            name
            for dataclass_type in getattr(parser, "dataclass_types", ())
            for klass in dataclass_type.__mro__
            for name, annotation in vars(klass).get("__annotations__", {}).items()
            if "list" in str(annotation).lower()
        }
        takes_dict = MAPPING_OPTIONS | {
            name
            for dataclass_type in getattr(parser, "dataclass_types", ())
            for klass in dataclass_type.__mro__
            for name, annotation in vars(klass).get("__annotations__", {}).items()
            if "dict" in str(annotation).lower()
        }
        for key, value in config.items():
            config[key] = _check_config_value(
                config_path, key, value, actions[key], key in takes_list, key in takes_dict
            )
            actions[key].required = False  # the config file gives it (argparse only counts flags)
        parser.set_defaults(**config)
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except PersonaError:
        raise
    except ValueError as err:  # an argument dataclass's own check (`__post_init__`): a flag mistake
        raise UsageError(str(err)) from err
    _check_rest(rest, flags)
    return tuple(parsed)


def check_option_names(parser, argv: Sequence[str]) -> None:
    """The unknown flags and config keys of `argv` as `parse_args_with_config` reports them, from a parser that only
    names the options (persona-train's `help_parser`, built without the Trainer's stack), so that a mistyped name is
    said before torch loads. Values are the real parser's to check."""
    argv = list(argv)
    _check_utf8_arguments(argv)
    flags = [a for action in parser._actions for a in action.option_strings if a.startswith("--")]

    def error(message: str):
        raise UsageError(f"{message} (see --help)")

    parser.error = error
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        _check_config_keys(parser, argv[0], read_config_file(argv[0]))
        argv = argv[1:]
    for action in parser._actions:
        action.required = False  # a config file may give it
    _, rest = parser.parse_known_args(argv)
    _check_rest(rest, flags)


def _check_config_keys(parser, config_path: str, config: dict) -> None:
    known = {action.dest for action in parser._actions} - {"help"}
    unknown = sorted(set(config) - known)
    if unknown:
        close = (f"{key[3:]}: false" if key.startswith("no_") and key[3:] in known else _closest(key, known)
                 for key in unknown)  # fmt: skip
        hints = "".join(f" (did you mean {near!r}?)" for near in close if near)
        raise UsageError(
            f"{config_path}: unknown option(s) {quote(unknown)}{hints}; the options are the script's flags."
        )


def _check_rest(rest: list[str], flags: list[str]) -> None:
    if rest:
        unknown = next((a for a in rest if a.startswith("-")), rest[0])
        close = _closest(unknown.split("=")[0], flags) if unknown.startswith("--") else None
        hint = f"; did you mean {close}?" if close else "; see --help for the flags"
        raise UsageError(f"unrecognized argument {quote(unknown)}{hint}")


def _check_config_value(path: str, key: str, value, action, takes_list: bool = False, takes_dict: bool = False):
    """Type-check one config value as its flag would be, and return it: `parser.set_defaults` takes values as they
    are, so a `learning_rate: [1]` or `num_candidates: null` would otherwise reach the run unchecked. A number where
    text belongs (`output_dir: 2024`) becomes that text."""
    if value is None:
        if action.default is not None or action.required:
            raise UsageError(f"{path}: option {key!r} has no value; give one or remove the line.")
        return value
    from transformers.hf_argparser import string_to_bool

    if action.type is str:
        if isinstance(value, dict):
            if takes_dict:
                return value  # a mapping option (a DeepSpeed config, --column_mapping): its dataclass checks it
            raise UsageError(f"{path}: option {key!r} takes text (a path, a name), not a mapping {quote(value)}.")
        if isinstance(value, list) and not (takes_list or action.nargs in ("+", "*")):
            raise UsageError(f"{path}: option {key!r} takes one value, got a list {quote(value)}.")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, (bool, list, dict)) or item is None for item in items):
            raise UsageError(f"{path}: option {key!r} must be text, got {quote(value)}.")
        items = [str(item) for item in items]
        return items if isinstance(value, list) or action.nargs in ("+", "*") else items[0]
    if action.type not in (int, float, string_to_bool):
        return value  # choices: checked by the argument dataclasses
    values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
    for item in values:
        wrong = isinstance(item, (list, dict)) or (isinstance(item, bool) and action.type is not string_to_bool)
        try:
            if not wrong:
                action.type(str(item))
        except (TypeError, ValueError):
            wrong = True
        if wrong:
            kind = {int: "a whole number", float: "a number", string_to_bool: "true or false"}[action.type]
            raise UsageError(f"{path}: option {key!r} must be {kind}, got {quote(item)}.")
    return value


def _closest(name: str, known) -> str | None:
    import difflib

    return next(iter(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)), None)


def read_config_file(path: str) -> dict:
    """The options of a YAML or JSON config file, as a dict; a `UsageError` for anything else (a list, a scalar,
    broken syntax, a key given twice, a file that is not text). Read by `persona_files.read_text`, the one rule for a
    user's text files; a ``configs/...`` path that is not here is the recipe shipped with persona-chat."""
    text = read_text(shipped_config(path) or path, path, CONFIG_FILE, UsageError)
    if not text.strip():
        config = None
    elif path.endswith(".json"):
        config = parse_json(text, path, UsageError)
    else:
        config = _load_yaml_config(path, text)
    if config is None or config == {}:  # a file cut short or never written would run every default: say so
        raise UsageError(f"{path}: the config file holds no options; fill it in, or pass the flags without it.")
    if not isinstance(config, dict):
        raise UsageError(
            f"{path}: a config file holds 'option: value' lines (a mapping), not "
            f"{'a list' if isinstance(config, list) else 'a single value'}."
        )
    bad = [key for key in config if not isinstance(key, str)]
    if bad:
        raise UsageError(f"{path}: option names must be text, got {quote(bad)}.")
    return config


def _load_yaml_config(path: str, text: str):
    import yaml

    merge_tag = "tag:yaml.org,2002:merge"

    class UniqueKeyLoader(yaml.SafeLoader):
        """A key twice in one mapping is refused, as `persona_files.loads_strict` refuses it in JSON. Only the keys
        written in a mapping count: a merge key (`<<: *base`) brings defaults that the mapping's own keys override,
        as `yaml.safe_load` reads it."""

        def check_own_keys(self, node):
            own = sum(key_node.tag != merge_tag for key_node, _ in node.value)
            merged = [value for key_node, value in node.value if key_node.tag == merge_tag]
            for value in merged:  # a mapping written inside `<<:` is never constructed on its own
                for sub in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    if isinstance(sub, yaml.MappingNode):
                        self.check_own_keys(sub)
            self.flatten_mapping(node)  # the merged keys first, then the mapping's own (`=` keys made text)
            seen = set()
            for key_node, _ in node.value[len(node.value) - own :]:
                key = self.construct_object(key_node, deep=False)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader itself refuses it below ("found unhashable key")
                if key in seen:
                    mark = key_node.start_mark
                    raise UsageError(
                        f"{path}: line {mark.line + 1}, column {mark.column + 1}: duplicate key {key!r} in this "
                        "mapping (YAML keeps only the last value); remove one."
                    )
                seen.add(key)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.check_own_keys(node)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UsageError(f"{path}: not valid YAML ({where}{problem}).") from None


def sentence_list(values, flag: str) -> list[str]:
    """The sentences of a repeatable text flag: `--persona a --persona b`, `--persona a b` and a config file's list or
    single text all give a flat list of text; a `UsageError` naming the flag for anything else.

    >>> sentence_list([["i like tea."], "i am a nurse."], "--persona")
    ['i like tea.', 'i am a nurse.']
    """
    sentences = []
    for item in values if isinstance(values, list) else [values]:
        for sentence in item if isinstance(item, list) else [item]:
            if not isinstance(sentence, str):
                raise UsageError(f"{flag}: {quote(sentence)} is not a sentence; give text (quote it in a config file).")
            sentences.append(sentence)
    return sentences


def given_options(parser, argv) -> set[str]:
    """The option names a command line sets: a config file's keys (first argument) and the flags it passes."""
    argv = list(argv)
    given = set()
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        given.update(read_config_file(argv.pop(0)))
    options = parser._option_string_actions
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        # argparse takes a unique prefix of a flag (`--learning_r`) as the flag itself.
        dests = {options[name].dest} if name in options else {a.dest for o, a in options.items() if o.startswith(name)}
        if len(dests) == 1:
            given.update(dests)
    return given


def set_by_user(args, names) -> list[str]:
    """The `names` of fields of the dataclass `args` whose value differs from the field's default."""
    defaults = {}
    for f in fields(args):
        if f.name in names:
            defaults[f.name] = f.default_factory() if callable(f.default_factory) else f.default
    return [name for name in names if getattr(args, name) != defaults[name]]


def warn_ignored(prog: str, names, reason: str) -> None:
    """One line saying that the flags `names` have no effect, and why."""
    if names:
        flags = ", ".join(f"--{name}" for name in names)
        say(f"{prog}: warning: {flags} {'is' if len(names) == 1 else 'are'} ignored: {reason}.")


def setup_logging(level: int, stream=None, library_level: int | None = None) -> None:
    """The one logging set-up of the console scripts: one line per record on `stream` (stdout by default;
    persona-chat's stdout carries replies, so it passes stderr), the project's modules at `level`, and `datasets` and
    `transformers` at `library_level` when given (persona-train's `--log_level`; else their own default)."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        # By the record's logger name, not by setting each module's level: a module imported after this call (the
        # scripts import lazily) logs at `level` too. Other libraries' loggers stay at warnings.
        ours = record.name.startswith("persona_") or record.name in ("run_persona", "__main__")
        return record.levelno >= (level if ours else logging.WARNING)

    handler = logging.StreamHandler(stream or sys.stdout)
    handler.addFilter(keep)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[handler], level=min(level, logging.WARNING))  # fmt: skip
    for library in ("datasets", "transformers"):
        if library_level is not None and library in sys.modules:  # a script that never imports one does not pay
            sys.modules[library].utils.logging.set_verbosity(library_level)
    for name in ("DeepSpeed", "transformers.modeling_utils"):
        logging.getLogger(name).addFilter(_library_noise)


def _library_noise(record) -> bool:
    """Drop DeepSpeed's notice of its CPU fall-back (accelerate imports DeepSpeed wherever it is installed, even
    unused, on every command) and strip the terminal colour codes transformers writes into its load reports."""
    record.msg = re.sub(r"\x1b\[[0-9;]*m", "", str(record.msg))
    return "Setting accelerator to CPU" not in record.msg


def is_user_error(err: BaseException) -> bool:
    """What the boundary reports as one line: the project's own error types (argument and config checks become
    `UsageError`s while parsing) and file errors that name their file. Anything else is a bug."""
    return isinstance(err, PersonaError) or (isinstance(err, OSError) and err.filename is not None)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        line = f"{err.filename}: {err.strerror}"
    else:
        line = " ".join(str(err).split()) or type(err).__name__
    if len(line) > MAX_ERROR_CHARS:  # a value quoted whole somewhere below (`persona_errors.quote` cuts at the source)
        half = MAX_ERROR_CHARS // 2
        line = f"{line[:half]} ... ({len(line) - 2 * half} characters cut) ... {line[-half:]}"
    return line


def run_console_script(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` (parse, then work) inside the one error boundary of the console scripts.

    A user error (`is_user_error`) prints `prog: error: <message>` once (rank 0 under torchrun) and exits with status
    2, without a traceback unless `PERSONA_DEBUG=1`. Anything else is a bug: its
    traceback, then one line saying so, exit status 1. Returns main's exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PERSONA_DEBUG", "") not in ("", "0")
    finished = False
    try:
        status = main(argv) or 0
        finished = True
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if debug:
            raise
        if not is_user_error(err):
            import traceback

            traceback.print_exc()
            print(f"{prog}: internal error: this is a bug, not your input; please report it with the traceback above.",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(EXIT_BUG) from None
        if is_rank_zero():
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        end_process_groups(synchronize=finished)
