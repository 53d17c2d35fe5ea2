"""Browser chat with a persona bot: a Gradio app over `persona_generation` (install with `pip install -e .[demo]`).

Left: the persona (one sentence per line, or a random one from a dataset); right: the chat, with the decoding
controls in an accordion. Each browser session keeps its own history; editing the persona starts a new chat.

    persona-demo --model_name_or_path demo_assets/run --dataset_path demo_assets/personachat.json
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings

from transformers import HfArgumentParser  # noqa: E402

from persona_arguments import DialogArguments, InferenceArguments  # noqa: E402
from persona_cli import parse_args_with_config, run_console_script, sentence_list, setup_logging
from persona_decoding import GENERATION_DEFAULTS, MAX_RANKED, NLIRankingArguments  # noqa: E402
from persona_errors import PersonaError, UsageError, check_positive  # noqa: E402
from persona_process import check_device, say

TITLE = "persona-chat"
logger = logging.getLogger(__name__)


def refusal(message: str) -> Exception:
    """The page's answer to a message it refuses (too long, a persona over the limits, options the checkpoint cannot
    serve): shown in the page and logged as one line. A refusal is not a bug, so Gradio prints no traceback for it;
    any other exception keeps Gradio's traceback."""
    import gradio as gr

    logger.warning("refused a message: %s", message)
    return gr.Error(message, print_exception=False)


def _persona_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _messages(turns: Sequence[str]) -> list[dict]:
    """Chatbot messages from the turn list (the user speaks first, then user and bot alternate)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def dataset_personas(dataset_path: str, dataset_format: str | None = None, **read_options) -> list[list[str]]:
    """Every persona of a dataset's validation split (or its first split), for the "random persona" button."""
    from persona_data import dataset_personas as personas_of
    from persona_data import load_dialogs

    return personas_of(load_dialogs(dataset_path, dataset_format, **read_options))


def build_demo(
    model,
    tokenizer,
    *,
    personas: Sequence[Sequence[str]] = (),
    persona: Sequence[str] = (),
    max_history: int = 2,
    seed: int | None = None,
    max_message_chars: int = 2000,
    max_persona_sentences: int = 50,
    max_persona_chars: int = 5000,
    nli_scorer=None,
    nli_penalty: float = 0.0,
):
    """The Gradio Blocks app. API endpoints: `/send`, `/set_persona`, `/reset`, `/random_persona`.

    A message longer than `max_message_chars`, or a persona over `max_persona_sentences` sentences or
    `max_persona_chars` characters, is refused with a message in the page (generation runs one request at a time, so
    a huge input would stall every session); the session goes on. `nli_scorer`/`nli_penalty`: the contradiction
    penalty on ranked replies (`persona_ranking`).
    """
    import gradio as gr

    from persona_data import random_persona as draw_persona

    rng = random.Random(seed)
    persona = list(persona) or draw_persona(personas, rng)

    def check_sizes(message: str, persona_text: str) -> None:
        if len(message) > max_message_chars:
            raise refusal(
                f"Your message has {len(message)} characters; the limit is {max_message_chars}. Send a shorter one."
            )
        sentences = _persona_lines(persona_text)
        if len(sentences) > max_persona_sentences or len(persona_text or "") > max_persona_chars:
            raise refusal(
                f"The persona has {len(sentences)} sentences and {len(persona_text)} characters; the limits are "
                f"{max_persona_sentences} sentences and {max_persona_chars} characters. Shorten it."
            )

    def send(
        message,
        persona_text,
        turns,
        temperature,
        top_p,
        top_k,
        max_new_tokens,
        greedy,
        num_ranked=GENERATION_DEFAULTS["num_ranked"],
        no_repeat_ngram_size=GENERATION_DEFAULTS["no_repeat_ngram_size"],
        repetition_penalty=GENERATION_DEFAULTS["repetition_penalty"],
    ):
        """Answer `message`; `turns` is this session's history (user and bot turns alternating)."""
        message = (message or "").strip()
        if not message:
            return "", _messages(turns), turns
        check_sizes(message, persona_text or "")
        # The generation API on this session's turns: the context cut to the last turns it uses, and the bot's
        # own turns (all of them) counted by the repetition options.
        options = {
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": int(top_k),
            "max_new_tokens": int(max_new_tokens),
            "min_length": min(GENERATION_DEFAULTS["min_length"], int(max_new_tokens)),
            "no_sample": bool(greedy),
            "num_ranked": 1 if greedy else int(num_ranked),  # greedy decoding gives one reply: nothing to rank
            "no_repeat_ngram_size": int(no_repeat_ngram_size),
            "repetition_penalty": float(repetition_penalty),
        }
        try:
            from persona_generation import generate_replies  # looked up per message: a test may wrap it

            (answer,) = generate_replies(
                model,
                tokenizer,
                [(_persona_lines(persona_text), [*turns, message])],
                max_history=max_history,
                own_turns=[list(turns[1::2])],
                nli_scorer=nli_scorer,
                nli_penalty=nli_penalty,
                **options,
            )
        except PersonaError as err:  # e.g. ranking without a trained head, a reply budget the window cannot hold
            raise refusal(str(err)) from None
        except ValueError as err:
            raise gr.Error(str(err)) from err  # not the user's: its traceback is printed
        turns = [*turns, message, answer]
        return "", _messages(turns), turns

    def reset():
        return [], []

    def random_persona():
        return "\n".join(draw_persona(personas, rng)) if personas else gr.skip()

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"# {TITLE}\nTalk to a bot that keeps a persona. Edit the persona on the left; that starts a new chat."
        )
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                persona_box = gr.Textbox(
                    value="\n".join(persona),
                    label="Persona (one sentence per line)",
                    lines=6,
                    elem_id="persona",
                )
                random_btn = gr.Button("Random persona", visible=bool(personas), elem_id="random-persona")
                with gr.Accordion("Decoding", open=False, elem_id="decoding"):
                    temperature = gr.Slider(0.05, 2.0, value=GENERATION_DEFAULTS["temperature"], label="Temperature")
                    top_p = gr.Slider(0.01, 1.0, value=GENERATION_DEFAULTS["top_p"], label="Top-p (1 = off)")
                    top_k = gr.Slider(0, 200, value=GENERATION_DEFAULTS["top_k"], step=1, label="Top-k (0 = off)")
                    max_new_tokens = gr.Slider(
                        1, 100, value=GENERATION_DEFAULTS["max_new_tokens"], step=1, label="Max reply tokens"
                    )
                    greedy = gr.Checkbox(value=False, label="Greedy (no sampling)")
                    num_ranked = gr.Slider(
                        1, MAX_RANKED, value=GENERATION_DEFAULTS["num_ranked"], step=1,
                        label="Candidates to rank (sample N, the multiple-choice head picks)", elem_id="num-ranked",
                    )  # fmt: skip
                    no_repeat_ngram_size = gr.Slider(
                        0, 6, value=GENERATION_DEFAULTS["no_repeat_ngram_size"], step=1,
                        label="Block repeated n-grams of its own turns (0 = off; the persona is exempt)",
                        elem_id="no-repeat-ngram-size",
                    )  # fmt: skip
                    repetition_penalty = gr.Slider(
                        0.5, 2.0, value=GENERATION_DEFAULTS["repetition_penalty"], step=0.05,
                        label="Repetition penalty on its own turns (1 = off)", elem_id="repetition-penalty",
                    )  # fmt: skip
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                message = gr.Textbox(placeholder="Say something and press Enter", show_label=False, elem_id="message")
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                    reset_btn = gr.Button("Reset", elem_id="reset")

        inputs = [message, persona_box, turns, temperature, top_p, top_k, max_new_tokens, greedy]
        inputs += [num_ranked, no_repeat_ngram_size, repetition_penalty]
        outputs = [message, chatbot, turns]
        # One generation at a time: sessions share the model and torch's global random state.
        send_btn.click(send, inputs, outputs, api_name="send", concurrency_id="generate", concurrency_limit=1)
        message.submit(send, inputs, outputs, api_name=False, concurrency_id="generate", concurrency_limit=1)
        reset_btn.click(reset, None, [chatbot, turns], api_name="reset")
        # A new persona is a new conversation: the old turns were said by someone else.
        persona_box.change(reset, None, [chatbot, turns], api_name="set_persona")
        random_btn.click(random_persona, None, persona_box, api_name="random_persona")
    return demo


@dataclass(kw_only=True)
class DemoArguments(DialogArguments, InferenceArguments):
    """Options of `persona-demo`: the shared model and dialog options (`--dataset_path` gives the random personas),
    the page's limits and where it is served."""

    persona: list[str] = field(
        default_factory=list, metadata={"help": "Initial persona sentence; repeat for more.", "action": "append"}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of the random personas."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind (0.0.0.0 exposes it to the network)."})
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live link (needs internet)."})
    max_message_chars: int = field(default=2000, metadata={"help": "Longest message a user may send (characters)."})
    max_persona_sentences: int = field(default=50, metadata={"help": "Most persona sentences a user may set."})
    max_persona_chars: int = field(default=5000, metadata={"help": "Longest persona a user may set (characters)."})

    def __post_init__(self):
        self.persona = sentence_list(self.persona, "--persona")
        check_positive(self, "max_message_chars", "max_persona_sentences", "max_persona_chars")
        if not self.host.strip():
            raise UsageError("--host is empty; pass 127.0.0.1 (this machine only) or 0.0.0.0 (the network).")
        if ":" in self.host:
            raise UsageError(f"--host {self.host}: Gradio serves IPv4 addresses and host names; pass e.g. 127.0.0.1.")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, got {self.port}.")
        if not is_loopback(self.host):
            say(
                f"persona-demo: warning: --host {self.host} exposes the demo to the network: anyone who can reach "
                "this machine can chat with the model. Pass --host 127.0.0.1 to keep it on this machine."
            )
        if len(self.persona) > self.max_persona_sentences:
            raise UsageError(f"--persona: {len(self.persona)} sentences, over --max_persona_sentences.")
        chars = len("\n".join(self.persona))  # as the persona box holds it
        if chars > self.max_persona_chars:
            raise UsageError(f"--persona: {chars} characters, over --max_persona_chars ({self.max_persona_chars}).")
        super().__post_init__()


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, localhost)."""
    return host == "localhost" or host.startswith("127.")


def check_port_free(host: str, port: int) -> int:
    """The port to serve on: `port`, or with 0 a free port the system picks (Gradio itself would print a URL with
    port 0 and fail). A `UsageError` when another program listens on `host:port` (checked before the model loads)."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
            return sock.getsockname()[1]
        except OSError as err:
            if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"--host {host}: not an address of this machine ({err.strerror}); pass e.g. 127.0.0.1 or 0.0.0.0."
                ) from None
            raise UsageError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); pass another --port."
            ) from None


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((DemoArguments, NLIRankingArguments), prog="persona-demo", description=__doc__)


def main(args: DemoArguments, ranking: NLIRankingArguments | None = None) -> int:
    ranking = ranking or NLIRankingArguments()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("persona-demo needs Gradio: pip install 'persona-chat[demo]'") from None
    from persona_generation import load_for_chat

    check_device(args.device)
    port = check_port_free(args.host, args.port)
    setup_logging(logging.WARNING, stream=sys.stderr)
    try:
        model, tokenizer = load_for_chat(args.model_name_or_path, args.device, args.dtype, **args.load_options())
    except PersonaError as err:
        raise UsageError(
            f"cannot load the checkpoint {args.model_name_or_path!r}: {err} Pass a directory written by persona-train "
            "(or a Hub id); for an offline demo checkpoint run: python persona_synthetic.py --output_dir demo_assets "
            "&& persona-train configs/demo.yaml"
        ) from err
    nli_scorer = ranking.load_scorer(args.device)
    try:
        personas = (
            dataset_personas(args.dataset_path, args.dataset_format, **args.read_options()) if args.dataset_path else []
        )
    except PersonaError as err:
        raise UsageError(f"cannot read personas from {args.dataset_path!r}: {err}") from err
    demo = build_demo(
        model,
        tokenizer,
        personas=personas,
        persona=args.persona,
        max_history=args.max_history,
        seed=args.seed,
        max_message_chars=args.max_message_chars,
        max_persona_sentences=args.max_persona_sentences,
        max_persona_chars=args.max_persona_chars,
        nli_scorer=nli_scorer,
        nli_penalty=ranking.nli_penalty,
    )
    try:
        demo.queue().launch(server_name=args.host, server_port=port, share=args.share)
    except OSError as err:  # the port was taken between the check and the launch
        raise UsageError(f"--port {port}: {err}; pass another --port.") from None
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `persona-demo` console script."""

    def serve(args: list[str]) -> int:
        return main(*parse_args_with_config(make_parser(), args))

    return run_console_script("persona-demo", serve, argv)


if __name__ == "__main__":
    sys.exit(cli())
