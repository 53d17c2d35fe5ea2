#!/usr/bin/env python
"""ConvAI2 evaluation without ParlAI: Hits@k, token- and word-level perplexity, F1, repetition and persona
consistency (NLI C-score) of generated replies.

    persona-eval --model_name_or_path runs/my-run --dataset_path personachat_self_original.json
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --max_turns 200 --no_f1
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --nli_model path/to/nli-checkpoint
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --self_chat 16 --probe_turns 2,8,16
    accelerate launch persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json
    torchrun --nproc_per_node 8 persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json

Definitions (ParlAI's; `persona_metrics`): Hits@k ranks each turn's candidates (20 in PERSONA-CHAT) by the
multiple-choice head, a tie counting against the gold; LM Hits@k (`lm_hits@k`) by the reply's log-probability under
the LM (per token, its tokens and end token; `lm_hits@1_sum`: summed), for every checkpoint, a plain causal LM
without a trained head included (its head's hits@k are reported, marked untrained); `ppl` is exp of the mean NLL
over gold reply tokens (token-level), `ppl_word` the same NLL without the end-of-reply token per ParlAI
`split_tokenize` word; F1 compares the greedy reply with the gold after ParlAI's normalisation. Repetition and
diversity (`distinct_*`, `repeat_*`) and, with `--nli_model`, the C-score are reported for the generated replies and
(`_gold`) the gold replies of the same turns. The history always holds the gold replies. Candidates are scored by
`PersonaTrainer`'s own evaluation step, so these numbers and the Trainer's `eval_*` metrics come from one piece of
code. The same F1, Hits@k and C-score ship as an `evaluate` metric:
`evaluate.load(persona_eval.CONVAI2_METRIC_PATH)` (config "f1", "hits" or "consistency").
`--self_chat N` runs N-turn conversations with a partner instead and scores the bot's consistency turn by turn
(`persona_selfchat`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser

from persona_arguments import DialogArguments, ModelArguments
from persona_assets import CONVAI2_METRIC_PATH  # noqa: F401 (the `evaluate` module: in a checkout and an install)
from persona_cli import parse_args_with_config, run_console_script, set_by_user, setup_logging, warn_ignored
from persona_decoding import EvalGenerationArguments
from persona_errors import UsageError, check_positive
from persona_inputs import MIN_INPUT_LENGTH, history_window
from persona_locations import check_model_path, check_writable
from persona_metrics import PAIR_ORDERS, f1_score  # noqa: F401 (f1_score: public API, the ConvAI2 F1 of one pair)
from persona_probes import MAX_SELF_CHAT_TURNS, PARTNERS, check_turns, parse_probe_turns
from persona_process import is_rank_zero

logger = logging.getLogger(__name__)


def __getattr__(name: str):
    # `persona_eval.evaluate_convai2` (public API), loaded on first use: the flags parse before torch loads.
    if name == "evaluate_convai2":
        import persona_convai2

        return persona_convai2.evaluate_convai2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(kw_only=True)
class EvalArguments(DialogArguments, ModelArguments):
    """Options of `persona-eval` besides decoding (`EvalGenerationArguments`): the shared model and dialog options
    (the Trainer places the model: every process gets its device), the split and what to score."""

    dataset_path: str = field(metadata={"help": "Local path, http(s) URL or Hub id of the persona dialogs."})
    split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate; none: the first of valid, validation, test the data has."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest input in tokens, as in training; none: the model's maximum positions."},
    )
    batch_size: int = field(default=8, metadata={"help": "Turns per batch and process (each turn has ~20 candidates)."})
    max_turns: int | None = field(default=None, metadata={"help": "Score only the first N turns (quick looks)."})
    f1: bool = field(default=True, metadata={"help": "Generate replies and score F1 (the slow part); --no_f1 skips."})
    output_file: str | None = field(
        default=None,
        metadata={"help": "JSON results; none: convai2_eval_<split>.json in the checkpoint folder, or here."},
    )
    save_predictions: bool = field(
        default=False,
        metadata={
            "help": "Also store each turn's generated reply in the JSON, with its gold reply, persona and context "
            "(with --nli_model, their NLI labels too)."
        },
    )
    nli_model: str | None = field(
        default=None,
        metadata={
            "help": "NLI sequence classifier (local folder or Hub id) scoring persona consistency (C-score) of the "
            "generated and gold replies; labels are read by name from its config."
        },
    )
    nli_pair_order: str = field(
        default="reply_first",
        metadata={"help": "NLI input order: reply_first (PAML's) or persona_first.", "choices": list(PAIR_ORDERS)},
    )
    nli_batch_size: int = field(default=64, metadata={"help": "(reply, persona sentence) pairs per NLI batch."})
    nli_penalty: float = field(default=0.0, metadata={"help": "Re-rank --num_ranked replies by --nli_model (README)."})
    self_chat: int | None = field(
        default=None,
        metadata={
            "help": f"Self-chat instead of the ConvAI2 scores: N-turn conversations (1..{MAX_SELF_CHAT_TURNS}) of the "
            "bot with a partner, scored turn by turn (README: Self-chat)."
        },
    )
    num_conversations: int = field(default=8, metadata={"help": "Self-chats: one per dialog persona of the split."})
    partner: str = field(
        default="bot",
        metadata={
            "help": "The self-chat partner: bot (the checkpoint, or --partner_model, with the next dialog's persona) "
            "or scripted (the partner turns of the split's dialogs).",
            "choices": list(PARTNERS),
        },
    )
    partner_model: str | None = field(
        default=None, metadata={"help": "Another checkpoint as the partner bot (its own tokenizer and input format)."}
    )
    probe_turns: str | None = field(
        default=None, metadata={"help": "Bot turns (1-based, e.g. 2,8,16) where the partner asks about a persona fact."}
    )
    probe_file: str | None = field(
        default=None,
        metadata={"help": 'JSONL probes, one a line: {"persona": DIALOG_INDEX, "question": "...", "sentence": INDEX}.'},
    )

    def __post_init__(self):
        check_positive(self, "max_turns", "batch_size", "nli_batch_size", "num_conversations")
        self._check_self_chat()
        check_positive(self, "max_length", minimum=MIN_INPUT_LENGTH)
        if self.save_predictions and not self.f1 and self.self_chat is None:
            raise UsageError("--save_predictions keeps the replies generated for F1; drop --no_f1 (or --f1 false).")
        if not (math.isfinite(self.nli_penalty) and self.nli_penalty >= 0):
            raise UsageError(f"--nli_penalty must be a finite number >= 0, got {self.nli_penalty}.")
        if self.nli_penalty > 0 and self.nli_model is None:
            raise UsageError(
                "--nli_penalty needs --nli_model: the penalty is lambda times an NLI model's contradictions."
            )
        if self.nli_model is None:
            unused = set_by_user(self, ("nli_pair_order", "nli_batch_size"))
            warn_ignored("persona-eval", unused, "NLI options apply with --nli_model")
        else:
            check_model_path(self.nli_model, "--nli_model")
            if not self.f1 and self.self_chat is None:
                raise UsageError("--nli_model scores the replies generated for F1; drop --no_f1 (or --f1 false).")
        super().__post_init__()
        # Where the results go, checked before anything loads: an evaluation must not end with nowhere to save.
        if self.output_file is not None:
            check_writable(self.output_file, "--output_file")
        else:
            folder = self.model_name_or_path if os.path.isdir(self.model_name_or_path) else "."
            check_writable(folder, "--output_file (none: the checkpoint folder, or here)", folder=True)

    def _check_self_chat(self) -> None:
        only = ("num_conversations", "partner", "partner_model", "probe_turns", "probe_file")
        if self.self_chat is None:
            given = set_by_user(self, only)
            if given:
                raise UsageError(f"--{given[0]} is an option of the self-chat; add --self_chat N (turns).")
            return
        check_turns(self.self_chat, parse_probe_turns(self.probe_turns) if self.probe_turns else ())
        if self.partner not in PARTNERS:
            raise UsageError(f"--partner must be one of {', '.join(PARTNERS)}, got {self.partner!r}.")
        if self.partner_model is not None:
            if self.partner == "scripted":
                raise UsageError("--partner_model is a partner bot; --partner scripted says scripted turns. Pick one.")
            check_model_path(self.partner_model, "--partner_model")
        if self.probe_file is not None and not self.probe_turns:
            raise UsageError("--probe_file gives the probe questions; say when to ask them with --probe_turns 2,8,16.")
        warn_ignored(
            "persona-eval",
            set_by_user(self, ("max_turns", "f1", "save_predictions", "max_length")),
            "the self-chat scores its own conversations (saved beside the results)",
        )


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((EvalArguments, EvalGenerationArguments), prog="persona-eval", description=__doc__)
    # HfArgumentParser gives every bool that defaults to true a `--no_X` complement: `--no_no_sample` would only
    # repeat `--no_sample false`.
    parser._handle_conflict_resolve(None, [("--no_no_sample", parser._option_string_actions["--no_no_sample"])])
    return parser


UNTRAINED_HEAD = "untrained (not in the checkpoint): hits@k rank at random, lm_hits@k is the model's ranking"


def default_output_file(args: EvalArguments, split: str | None = None) -> str:
    name = f"{'self_chat' if args.self_chat else 'convai2_eval'}_{split or args.split}.json"
    if os.path.isdir(args.model_name_or_path):
        return os.path.join(args.model_name_or_path, name)
    return name


def format_table(metrics: dict, head_trained: bool = True) -> str:
    """Terminal table of the metrics, the two perplexities named by their unit, the LM rankings by their score, and
    the head's hits@k marked when the head is untrained."""
    labels = {
        "ppl": "perplexity (token-level)",
        "ppl_word": "perplexity (word-level, ParlAI words)",
        "lm_loss": "mean NLL per gold token",
        "lm_hits@1_sum": "lm_hits@1_sum (summed log-prob)",
    }
    for k in (1, 5, 10):
        labels[f"lm_hits@{k}"] = f"lm_hits@{k} (log-prob per token)"
        if not head_trained:
            labels[f"hits@{k}"] = f"hits@{k} (untrained head)"
    rows = [(labels.get(k, k), f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 14)
    return "\n".join([rule, *(f"{name:<{width}}  {value:>12}" for name, value in rows), rule])


def prediction_rows(predictions: list, turns: list[dict], args: EvalArguments) -> list[dict]:
    """The saved predictions, readable without the data file: each turn's reply with its gold reply, persona and the
    context the bot saw (the last 2*max_history+1 turns), and the NLI labels when there are some."""
    rows = []
    for prediction, turn in zip(predictions, turns, strict=True):
        row = prediction if isinstance(prediction, dict) else {"reply": prediction}
        context = history_window(turn["history"], args.max_history)
        rows.append({**row, "gold": turn["gold"], "persona": list(turn["persona"]), "context": list(context)})
    return rows


def main(args: EvalArguments, generation: EvalGenerationArguments | None = None) -> dict:
    """Evaluate a checkpoint; the main process prints the table and writes the JSON. Returns the results."""
    from transformers import set_seed

    from persona_convai2 import evaluate_convai2, flatten_turns, ranking_trainer
    from persona_data import find_split, load_dialogs
    from persona_model import load_model_and_tokenizer, multiple_choice_head_loaded
    from persona_nli import NLIScorer

    generation = generation or EvalGenerationArguments()
    if args.self_chat is not None:
        return main_self_chat(args, generation)
    if args.nli_penalty > 0 and generation.num_ranked < 2:
        raise UsageError(f"--nli_penalty re-ranks sampled replies; set --num_ranked > 1 (got {generation.num_ranked}).")
    setup_logging(logging.INFO if is_rank_zero() else logging.WARNING)
    nli = None
    if args.nli_model is not None:  # first: a checkpoint whose labels cannot be read fails before anything loads
        options = {"pair_order": args.nli_pair_order, "batch_size": args.nli_batch_size}
        nli = NLIScorer.from_pretrained(args.nli_model, device="cpu", **options)
    # Seeded before loading: a checkpoint without the persona tokens gets new embeddings, the same on every process.
    set_seed(generation.seed or 0)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype, **args.load_options())
    trainer = ranking_trainer(model, tokenizer, args.batch_size)
    with trainer.args.main_process_first(desc="loading persona dialogs"):
        dialogs = load_dialogs(args.dataset_path, args.dataset_format, **args.read_options())
    split = find_split(dialogs, args.split, args.dataset_path)

    metrics = evaluate_convai2(
        model,
        tokenizer,
        dialogs[split],
        trainer=trainer,
        max_history=args.max_history,
        max_length=args.max_length,
        max_turns=args.max_turns,
        f1=args.f1,
        generation_options=generation.generation_options(),
        cache_dir=args.dataset_cache,
        return_predictions=args.save_predictions,
        nli=nli,
        nli_penalty=args.nli_penalty,
    )
    predictions = metrics.pop("predictions", None)
    head_trained = multiple_choice_head_loaded(model)
    results = {
        "checkpoint": args.model_name_or_path,
        "dataset": args.dataset_path,
        "split": split,
        "turns": metrics["turns"],
        "metrics": metrics,
        "multiple_choice_head": "trained" if head_trained else UNTRAINED_HEAD,
        "ranking": "hits@k: by the multiple-choice head; lm_hits@k: by the reply's LM log-probability per token (its "
        "tokens and end token); lm_hits@1_sum: by the summed log-probability",
        "perplexity": "ppl: token-level, exp of the mean NLL over gold reply tokens (end token included); ppl_word: "
        "the same NLL without the end token over ParlAI split_tokenize words",
        "num_processes": trainer.accelerator.num_processes,
        "options": {**asdict(args), **asdict(generation)},
    }
    if predictions is not None:
        results["predictions"] = prediction_rows(predictions, flatten_turns(dialogs[split], args.max_turns)[1], args)
    if trainer.accelerator.is_main_process:
        output_file = args.output_file or default_output_file(args, split)
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        replaced = os.path.exists(output_file)
        with open(output_file, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"ConvAI2 metrics of {args.model_name_or_path} on {split} ({metrics['turns']} turns):")
        print(format_table({k: v for k, v in metrics.items() if k != "candidates_per_turn"}, head_trained))
        print(f"Saved {output_file}" + (" (it replaces the earlier results that file held)" if replaced else ""))
    return results


def main_self_chat(args: EvalArguments, generation: EvalGenerationArguments) -> dict:
    """`--self_chat N`: the conversations (JSONL), the per-turn drift curves and their summary (JSON), the plot."""
    from accelerate import Accelerator
    from transformers import set_seed

    from persona_data import find_split, load_dialogs
    from persona_model import load_model_and_tokenizer
    from persona_nli import NLIScorer
    from persona_selfchat import build_report, dialog_conversations, save_self_chat, self_chat, summary_table
    from persona_trainer import has_accelerator

    if args.nli_penalty > 0 and generation.num_ranked < 2:
        raise UsageError(f"--nli_penalty re-ranks sampled replies; set --num_ranked > 1 (got {generation.num_ranked}).")
    setup_logging(logging.INFO if is_rank_zero() else logging.WARNING)
    # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no accelerator.
    accelerator = Accelerator(cpu=not has_accelerator())
    nli = None
    if args.nli_model is not None:
        options = {"pair_order": args.nli_pair_order, "batch_size": args.nli_batch_size}
        nli = NLIScorer.from_pretrained(args.nli_model, device=accelerator.device, **options)
    with accelerator.main_process_first():
        dialogs = load_dialogs(args.dataset_path, args.dataset_format, **args.read_options())
    split = find_split(dialogs, args.split, args.dataset_path)
    plan = dialog_conversations(dialogs[split], args.num_conversations, args.self_chat, args.partner, args.probe_file)
    set_seed(generation.seed or 0)  # before loading: new persona-token embeddings are the same on every process
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype, **args.load_options())
    partner = {}
    if args.partner_model is not None:
        partner_model, partner_tokenizer = load_model_and_tokenizer(
            args.partner_model, dtype=args.dtype, **args.load_options()
        )
        partner = {"partner_model": partner_model.to(accelerator.device).eval(), "partner_tokenizer": partner_tokenizer}
    options = generation.generation_options()
    if nli is not None and args.nli_penalty > 0:
        options.update(nli_scorer=nli, nli_penalty=args.nli_penalty)
    results = self_chat(
        model.to(accelerator.device).eval(),
        tokenizer,
        **plan,
        **partner,
        turns=args.self_chat,
        probe_turns=parse_probe_turns(args.probe_turns) if args.probe_turns else (),
        nli=nli,
        max_history=args.max_history,
        batch_size=args.batch_size,
        accelerator=accelerator,
        **options,
    )
    output_file = args.output_file or default_output_file(args, split)
    meta = {"checkpoint": args.model_name_or_path, "dataset": args.dataset_path, "split": split}
    meta.update(partner=args.partner_model or args.partner, num_processes=accelerator.num_processes)
    meta["options"] = {**asdict(args), **asdict(generation)}
    report = build_report(results, meta, output_file)
    if accelerator.is_main_process:
        plot_line = save_self_chat(results, report, output_file)
        print(f"Self-chat of {args.model_name_or_path}: {report['conversations']} chats of {args.self_chat} turns")
        print(summary_table(results["summary"]))
        print(f"Saved {output_file} and {report['conversations_file']}")
        print(plot_line)
    return report


def cli(argv: list[str] | None = None) -> int:
    """Console script `persona-eval`."""

    def evaluate(args: list[str]) -> None:
        main(*parse_args_with_config(make_parser(), args))

    return run_console_script("persona-eval", evaluate, argv)


if __name__ == "__main__":
    sys.exit(cli())
