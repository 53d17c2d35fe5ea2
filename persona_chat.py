"""The `persona-chat` command line: talk to a persona bot in the terminal, or one reply per stdin line.

    persona-chat --model_name_or_path runs/my-bot --persona "i love cats." --persona "i am a nurse."
    echo "hi, how are you?" | persona-chat --model_name_or_path runs/my-bot --dataset_path data.json --stdin

Generation itself (context, `PersonaBot`) lives in `persona_generation`, the decoding options in `persona_decoding`;
the generation API is importable from here too, as the README shows. It is imported on first use: the flags are
parsed (and `--help` printed) before torch and the model stack load.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from persona_arguments import DialogArguments, InferenceArguments
from persona_cli import parse_args_with_config, run_console_script, sentence_list, setup_logging, warn_ignored
from persona_decoding import GenerationArguments, NLIRankingArguments
from persona_errors import UsageError
from persona_files import check_text_file, read_text
from persona_process import check_device, say

logger = logging.getLogger(__name__)
PERSONA_FILE = "a text file, one sentence per line"  # what to pass instead of a --persona_file that is no file

# The public generation API, importable from here (`persona_chat.PersonaBot`, `persona_chat.load_for_chat`, ...), loaded
# on first use, so that the flags parse (and --help prints) before torch loads.
PUBLIC_API = ("PersonaBot", "generate_ranked", "generate_ranked_replies", "generate_replies", "load_for_chat")


def __getattr__(name: str):
    if name in PUBLIC_API:
        import persona_generation

        return getattr(persona_generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def random_persona(
    dataset_path: str, dataset_format: str | None = None, seed: int | None = None, **read_options
) -> list[str]:
    """The persona of a random dialog of a dataset (`persona_data.dataset_personas`: its validation split when there
    is one)."""
    from persona_data import dataset_personas, load_dialogs
    from persona_data import random_persona as draw

    personas = dataset_personas(load_dialogs(dataset_path, dataset_format, **read_options))
    if not personas:
        raise UsageError(f"{dataset_path}: no dialog with a persona to take one from.")
    return draw(personas, random.Random(seed))


@dataclass(kw_only=True)
class ChatArguments(DialogArguments, InferenceArguments):
    """Options of `persona-chat` besides decoding (`GenerationArguments`): the shared model and dialog options, the
    persona, and the stdin mode. `--dataset_path` gives a random persona."""

    persona: list[str] = field(
        default_factory=list, metadata={"help": "A persona sentence; repeat for more.", "action": "append"}
    )
    persona_file: str | None = field(default=None, metadata={"help": "A text file with one persona sentence per line."})
    stdin: bool = field(
        default=False, metadata={"help": "Read user turns from stdin, one per line; write one reply per line."}
    )

    def __post_init__(self):
        self.persona = sentence_list(self.persona, "--persona")
        if self.persona_file is not None:  # checked now, read after parsing: missing, a folder, unreadable
            check_text_file(self.persona_file, f"--persona_file {self.persona_file}", PERSONA_FILE, UsageError)
        if self.dataset_path is not None and (any(s.strip() for s in self.persona) or self.persona_file):
            reason = "it draws a random persona, and --persona / --persona_file give one"
            warn_ignored("persona-chat", ["dataset_path"], reason)
        super().__post_init__()


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ChatArguments, GenerationArguments, NLIRankingArguments), prog="persona-chat", description=__doc__
    )


def read_text_lines(path: str, what: str) -> list[str]:
    """The non-blank lines of the text file given as `what` (a flag), stripped, read by `persona_files.read_text` (the
    one rule for a user's text files: UTF-8, or UTF-16/UTF-32 with a byte-order mark); a `UsageError` naming the
    file for a binary or undecodable one."""
    text = read_text(path, f"{what} {path}", PERSONA_FILE, UsageError)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_persona(args: ChatArguments, seed: int | None, interactive: bool) -> list[str]:
    persona = [s.strip() for s in args.persona if s.strip()]
    if args.persona_file:
        sentences = read_text_lines(args.persona_file, "--persona_file")
        if not sentences:
            raise UsageError(f"--persona_file {args.persona_file}: no persona sentence in it (one per line).")
        persona += sentences
    if not persona and args.dataset_path:
        persona = random_persona(args.dataset_path, args.dataset_format, seed, **args.read_options())
    if not persona and interactive:
        persona = _type_persona()
    return persona


def _type_persona() -> list[str]:
    print("Type the persona, one sentence per line; an empty line ends it.")
    sentences = []
    while (line := input("persona> ").strip()) != "":
        sentences.append(line)
    return sentences


def _show_persona(persona: Sequence[str], file=None) -> None:
    file = file or sys.stdout  # the stream of the moment, not the one at import
    print("Persona:" if persona else "Persona: (none)", file=file)
    for sentence in persona:
        print(f"  - {sentence}", file=file)


COMMANDS_HELP = "/reset clears the history, /persona shows it, /persona a. | b. replaces it, /quit (or Ctrl-D) quits"
# Each command and whether it takes an argument (/persona's is optional: the new persona).
COMMANDS = {"/quit": False, "/exit": False, "/reset": False, "/persona": True}


def _split_command(text: str) -> tuple[str, str]:
    """`/persona a. | b.` -> ("/persona", "a. | b."); any whitespace separates the command from its argument."""
    name, *argument = text.split(None, 1)
    return name, argument[0].strip() if argument else ""


def _command_problem(text: str) -> str | None:
    """What is wrong with a /command line, or None when it is a command as typed (or not a command at all)."""
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, argument = _split_command(text)
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name.lower(), COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown command {name}{hint}: {COMMANDS_HELP}; begin a message with '//' to send a '/'"
    if argument and not COMMANDS[name]:
        return f"{name} takes no argument, got {argument!r}: type {name} alone; begin a message with '//' to send a '/'"
    return None


def _interactive_loop(bot) -> None:
    print(f"Talk to the bot. {COMMANDS_HELP}.")
    while True:
        try:
            text = input(">>> ").strip()
        except UnicodeDecodeError:
            print("(that line is not UTF-8 text; type it again)")
            continue
        if not text:
            continue
        problem = _command_problem(text)
        if problem:
            print(f"({problem})")
            continue
        command, argument = _split_command(text)
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            bot.reset()
            print("(history cleared)")
        elif command == "/persona" and not argument:
            _show_persona(bot.persona)
        elif command == "/persona" and not argument.replace("|", "").strip():
            print("(/persona a. | b. needs sentences between the '|'; the persona is unchanged)")
        elif command == "/persona":
            bot.persona = [s.strip() for s in argument.split("|")]
            _show_persona(bot.persona)
            print("(new persona, history cleared)")
        else:
            if text.startswith("//"):
                text = text[1:]
            print(bot.reply(text))


def _stdin_lines():
    """(line number, text) of each stdin line; a `UsageError` naming the line when it is not UTF-8."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in place of stdin (tests, embedding)
        yield from enumerate(sys.stdin, start=1)
        return
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(
                f"stdin line {number}: not UTF-8 text (byte {err.start + 1}); send UTF-8 text, one turn per line."
            ) from None
        if "\x00" in text:  # binary input, not a turn; the tokenizer would take it without a word
            raise UsageError(f"stdin line {number}: NUL byte at byte {raw.index(0) + 1}; send text, one turn per line.")
        yield number, text


def _stdin_loop(bot) -> None:
    """One output line per input line: the reply, or an empty line for a blank input line (not a turn)."""
    for _, line in _stdin_lines():
        text = line.strip()
        # One reply per output line even if the model produced a newline.
        print(" ".join(bot.reply(text).split()) if text else "", flush=True)


def main(args: ChatArguments, generation: GenerationArguments, ranking: NLIRankingArguments | None = None) -> int:
    setup_logging(logging.WARNING, stream=sys.stderr)  # stdout carries the replies
    from persona_generation import PersonaBot, check_reply_budget, load_for_chat

    check_device(args.device)  # an accelerator this machine lacks: said before the persona is asked for
    ranking = ranking or NLIRankingArguments()
    ranking.check_with(generation.num_ranked)
    interactive = not args.stdin
    try:
        persona = _read_persona(args, generation.seed, interactive)
        if not persona:
            say(
                "persona-chat: warning: no persona (give --persona, --persona_file or --dataset_path): the bot "
                "replies without one."
            )
        model, tokenizer = load_for_chat(args.model_name_or_path, args.device, args.dtype, **args.load_options())
        check_reply_budget(model, generation.max_new_tokens)
        bot = PersonaBot(
            model,
            tokenizer,
            persona,
            max_history=args.max_history,
            nli_scorer=ranking.load_scorer(args.device),
            nli_penalty=ranking.nli_penalty,
            **generation.generation_options(),
        )
        # In --stdin mode stdout carries replies only, one per line.
        _show_persona(bot.persona, file=sys.stderr if args.stdin else sys.stdout)
        if args.stdin:
            _stdin_loop(bot)
        else:
            _interactive_loop(bot)
    except (KeyboardInterrupt, EOFError):
        if interactive:
            print()
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `persona-chat` console script."""

    def chat(args: list[str]) -> int:
        return main(*parse_args_with_config(make_parser(), args))

    return run_console_script("persona-chat", chat, argv)


if __name__ == "__main__":
    sys.exit(cli())
