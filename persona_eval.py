#!/usr/bin/env python
"""ConvAI2 evaluation without ParlAI: Hits@k, token- and word-level perplexity, F1, repetition and persona
consistency (NLI C-score) of generated replies.

    persona-eval --model_name_or_path runs/my-run --dataset_path personachat_self_original.json
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --max_turns 200 --no_f1
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --nli_model path/to/nli-checkpoint
    accelerate launch persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json
    torchrun --nproc_per_node 8 persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json

Definitions (ParlAI's; `persona_metrics`): Hits@k ranks each turn's candidates (20 in PERSONA-CHAT) by the
multiple-choice head, a tie counting against the gold; `ppl` is exp of the mean NLL over gold reply tokens
(token-level), `ppl_word` the same NLL without the end-of-reply token per ParlAI `split_tokenize` word; F1 compares
the greedy reply with the gold after ParlAI's normalisation. Repetition and diversity (`distinct_*`, `repeat_*`) and,
with `--nli_model`, the C-score are reported for the generated replies and (`_gold`) the gold replies of the same
turns. The history always holds the gold replies. Candidates are scored by `PersonaTrainer`'s own evaluation step,
so these numbers and the Trainer's `eval_*` metrics come from one piece of code. The same F1, Hits@k and C-score ship
as an `evaluate` metric: `evaluate.load("metrics/convai2")` (config "f1", "hits" or "consistency").
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from persona_arguments import DialogArguments, ModelArguments
from persona_chat_template import chat_format_of
from persona_cli import (
    MIN_INPUT_LENGTH,
    UsageError,
    check_model_path,
    check_positive,
    find_split,
    input_budget,
    is_rank_zero,
    parse_args_with_config,
    run_console_script,
    setup_logging,
)
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_files import file_in_the_way
from persona_generation import GenerationArguments, generate_replies
from persona_metrics import (
    HITS_KS,
    consistency_metrics,
    f1_score,
    mean_f1,
    persona_copy_rate,
    ranking_metrics,
    repetition_metrics,
    split_tokenize,
    stat_columns,
    word_perplexity,
)
from persona_nli import PAIR_ORDERS, NLIScorer
from persona_trainer import PersonaTrainer, PersonaTrainingArguments, has_accelerator

logger = logging.getLogger(__name__)

# The `evaluate` module with the same F1 and Hits@k (valid in a source checkout).
CONVAI2_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "convai2")
__all__ = ["evaluate_convai2", "f1_score", "main", "cli"]


def flatten_turns(dialogs: datasets.Dataset, max_turns: int | None = None) -> tuple[datasets.Dataset, list[dict]]:
    """The dialogs holding the first `max_turns` turns, and those turns as `{persona, history, gold, dialog}` (the
    dialog's index) in row order."""
    turns, num_dialogs = [], 0
    for dialog in dialogs:
        if max_turns is not None and len(turns) >= max_turns:
            break
        num_dialogs += 1
        for utterance in dialog["utterances"]:
            gold = utterance["candidates"][-1]
            turns.append(
                {"persona": dialog["personality"], "history": utterance["history"], "gold": gold, "dialog": num_dialogs}
            )
    return dialogs.select(range(num_dialogs)), turns[:max_turns]


def ranking_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> PersonaTrainer:
    """A `PersonaTrainer` that only evaluates `model`, on this machine's accelerator (or all processes of a launch)."""
    args = PersonaTrainingArguments(
        # Nothing is saved; the Trainer only creates the folder.
        output_dir=os.path.join(tempfile.gettempdir(), "persona-eval"),
        per_device_eval_batch_size=batch_size,
        report_to="none",
        # Without it accelerate ignores torchrun's WORLD_SIZE on a machine with no accelerator (no gloo group).
        use_cpu=not has_accelerator(),
        do_train=False,
        eval_strategy="no",
        save_strategy="no",
    )
    return PersonaTrainer(model=model, args=args, data_collator=PersonaCollator(tokenizer.pad_token_id))


def rank_candidates(trainer: PersonaTrainer, features: datasets.Dataset) -> np.ndarray:
    """Per-turn `persona_metrics.STAT_COLUMNS` of `features` ([N, 6], in `features` order) from the Trainer's
    evaluation step.

    Turns are ordered by candidate count, longest first within a count, so each batch pads little and memory runs out
    (if it does) at once; the result is put back in `features` order.
    """
    last_tokens = features["mc_token_ids"]  # [N][C]: each candidate's length - 1
    counts = np.array([len(ids) for ids in last_tokens])
    longest = np.array([max(ids) for ids in last_tokens])
    order = np.lexsort((-longest, counts))  # by count, then longest first (stable)
    stats = trainer.predict(features.select(order)).predictions  # [N, 6]
    out = np.empty_like(stats)
    out[order] = stats
    return out


def generate_for_turns(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict],
    accelerator: Accelerator,
    *,
    max_history: int,
    batch_size: int,
    **generation_options,
) -> list[str]:
    """Replies of `persona_generation.generate_replies` to every turn's gold history, spread over the processes."""
    seed = generation_options.pop("seed", None)
    if seed is not None:
        # Once for the whole run: generate_replies would restart the random stream at every batch.
        set_seed(seed + accelerator.process_index)
    loader = accelerator.prepare_data_loader(DataLoader(range(len(turns)), batch_size=batch_size))
    replies = []
    for indices in tqdm(loader, desc="Generating replies", disable=not accelerator.is_local_main_process):
        contexts = [(turns[i]["persona"], turns[i]["history"]) for i in indices.tolist()]
        texts = generate_replies(
            model, tokenizer, contexts, max_history=max_history, batch_size=batch_size, **generation_options
        )
        replies.extend(accelerator.gather_for_metrics(list(zip(indices.tolist(), texts)), use_gather_object=True))
    by_turn = dict(replies)
    if sorted(by_turn) != list(range(len(turns))):
        raise RuntimeError(f"Generated {len(by_turn)} distinct replies for {len(turns)} turns.")
    return [by_turn[i] for i in range(len(turns))]


def reply_metrics(
    turns: list[dict], replies: list[str], *, max_history: int, nli: NLIScorer | None, accelerator, suffix: str = ""
) -> tuple[dict, list[list[int]] | None]:
    """Repetition and diversity of one reply per turn (generated, or the gold with `suffix="_gold"`) and, with `nli`,
    its persona consistency; returns the metrics and the per-turn NLI labels (one per persona sentence)."""
    contexts = [t["history"][-(2 * max_history + 1) :] for t in turns]  # the turns the bot saw
    metrics = repetition_metrics(replies, contexts, [t["dialog"] for t in turns], suffix=suffix)
    if nli is None:
        return metrics, None
    personas = [t["persona"] for t in turns]
    labels = nli.turn_labels(replies, personas, progress=accelerator.is_local_main_process, accelerator=accelerator)
    metrics.update(consistency_metrics(labels, suffix))
    metrics[f"persona_copy_rate{suffix}"] = persona_copy_rate(replies, personas)
    return metrics, labels


def evaluate_convai2(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogs: datasets.Dataset,
    *,
    trainer: PersonaTrainer | None = None,
    max_history: int = 2,
    max_length: int | None = None,
    batch_size: int = 8,
    max_turns: int | None = None,
    f1: bool = True,
    generation_options: dict | None = None,
    cache_dir: str | None = None,
    return_predictions: bool = False,
    nli: NLIScorer | None = None,
    nli_penalty: float = 0.0,
) -> dict:
    """ConvAI2 metrics of `model` on a canonical dialogs split: hits@k, ppl (token-level), ppl_word, lm_loss, f1,
    repetition and diversity of the generated and gold replies, turns; with an `NLIScorer`, persona consistency.

    `max_length` caps input lengths (default: the model's positions); `generation_options` go to
    `persona_generation.generate_replies` (default: persona-eval's, greedy). Candidates are ranked by `trainer` (a
    training run's own, with its batch size and processes) or by a fresh evaluation-only `PersonaTrainer` with
    `batch_size`.
    With `return_predictions`, the result also holds the generated replies under "predictions", in turn order: strings,
    or with `nli` a dict per turn (`reply`, `gold`, `persona`, `nli_labels`, `nli_labels_gold`: +1/0/-1 per persona
    sentence). With `nli_penalty` > 0 and `num_ranked` > 1 in `generation_options`, `nli` also re-ranks the sampled
    replies (`persona_ranking.nli_penalised`).
    """
    trainer = trainer or ranking_trainer(model, tokenizer, batch_size)
    batch_size = trainer.args.per_device_eval_batch_size
    dialogs, turns = flatten_turns(dialogs, max_turns)
    if not turns:
        raise UsageError("The evaluation split has no turns (no dialog with an utterance).")
    with trainer.args.main_process_first(desc="building evaluation features"):
        features = build_features(
            dialogs,
            tokenizer,
            num_candidates=None,
            max_history=max_history,
            max_length=input_budget(model, max_length),
            cache_dir=cache_dir,
            chat_format=chat_format_of(tokenizer),  # the checkpoint's own input format
        )
    features = features.select(range(len(turns)))

    stats = rank_candidates(trainer, features)
    ranking = ranking_metrics(stats, ks=HITS_KS)
    metrics = {key: value for key, value in ranking.items() if key.startswith("hits@")}
    columns = stat_columns(stats)
    words = sum(len(split_tokenize(t["gold"])) for t in turns)
    _, ppl_word = word_perplexity(columns["lm_nll"].sum() - columns["lm_end_nll"].sum(), words)
    metrics.update(ppl=ranking["ppl"], ppl_word=ppl_word, lm_loss=ranking["lm_loss"])
    golds, accelerator = [t["gold"] for t in turns], trainer.accelerator
    if nli is not None:
        nli.model.to(accelerator.device)
    predictions = labels = None
    if f1:
        options = {**EvalGenerationArguments().generation_options(), **(generation_options or {})}
        if nli is not None and nli_penalty > 0:
            options.update(nli_scorer=nli, nli_penalty=nli_penalty)
        predictions = generate_for_turns(
            model, tokenizer, turns, accelerator, max_history=max_history, batch_size=batch_size, **options
        )
        metrics["f1"] = mean_f1(predictions, golds)
        generated, labels = reply_metrics(turns, predictions, max_history=max_history, nli=nli, accelerator=accelerator)
        metrics.update(generated)
    gold, gold_labels = reply_metrics(
        turns, golds, max_history=max_history, nli=nli, accelerator=accelerator, suffix="_gold"
    )
    metrics.update(gold)
    metrics["turns"] = len(turns)
    if nli is not None:  # their C is 0: nothing to contradict
        metrics["turns_without_persona"] = sum(not t["persona"] for t in turns)
        if metrics["turns_without_persona"]:
            logger.warning("%d turns have no persona sentence: C-score 0.", metrics["turns_without_persona"])
    metrics["gold_reply_tokens"] = int(columns["lm_tokens"].sum())
    metrics["gold_reply_words"] = words
    metrics["candidates_per_turn"] = sorted(int(c) for c in np.unique(columns["num_candidates"]))
    if return_predictions and labels is not None:
        keys = ("reply", "gold", "persona", "nli_labels", "nli_labels_gold")
        rows = zip(predictions, golds, [t["persona"] for t in turns], labels, gold_labels)
        predictions = [dict(zip(keys, row)) for row in rows]
    if return_predictions:
        metrics["predictions"] = predictions
    return metrics


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
        metadata={"help": "Also store the generated replies in the JSON (with --nli_model, their NLI labels too)."},
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

    def __post_init__(self):
        check_positive(self, "max_turns", "batch_size", "nli_batch_size")
        check_positive(self, "max_length", minimum=MIN_INPUT_LENGTH)
        if self.save_predictions and not self.f1:
            raise UsageError("--save_predictions keeps the replies generated for F1; drop --no_f1 (or --f1 false).")
        if not (math.isfinite(self.nli_penalty) and self.nli_penalty >= 0):
            raise UsageError(f"--nli_penalty must be a finite number >= 0, got {self.nli_penalty}.")
        if self.nli_penalty > 0 and self.nli_model is None:
            raise UsageError(
                "--nli_penalty needs --nli_model: the penalty is lambda times an NLI model's contradictions."
            )
        if self.nli_model is not None:
            check_model_path(self.nli_model, "--nli_model")
            if not self.f1:
                raise UsageError("--nli_model scores the replies generated for F1; drop --no_f1 (or --f1 false).")
        if self.output_file is not None and os.path.isdir(self.output_file):
            raise UsageError(f"--output_file {self.output_file}: is a directory; pass a file name (results.json).")
        blocking = None if self.output_file is None else file_in_the_way(self.output_file)
        if blocking:
            raise UsageError(
                f"--output_file {self.output_file}: {blocking} is a file, not a folder; pass another path."
            )
        super().__post_init__()


@dataclass
class EvalGenerationArguments(GenerationArguments):
    """persona-chat's decoding options, greedy and seeded by default for a reproducible F1."""

    no_sample: bool = field(default=True, metadata={"help": "Greedy decoding; `--no_sample false` samples."})
    seed: int | None = field(default=0, metadata={"help": "Random seed for sampling (each process adds its rank)."})


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((EvalArguments, EvalGenerationArguments), prog="persona-eval", description=__doc__)


def default_output_file(args: EvalArguments, split: str | None = None) -> str:
    name = f"convai2_eval_{split or args.split}.json"
    if os.path.isdir(args.model_name_or_path):
        return os.path.join(args.model_name_or_path, name)
    return name


def format_table(metrics: dict) -> str:
    """Terminal table of the metrics, the two perplexities named by their unit."""
    labels = {
        "ppl": "perplexity (token-level)",
        "ppl_word": "perplexity (word-level, ParlAI words)",
        "lm_loss": "mean NLL per gold token",
    }
    rows = [(labels.get(k, k), f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 14)
    return "\n".join([rule, *(f"{name:<{width}}  {value:>12}" for name, value in rows), rule])


def main(args: EvalArguments, generation: EvalGenerationArguments | None = None) -> dict:
    """Evaluate a checkpoint; the main process prints the table and writes the JSON. Returns the results."""
    from persona_model import load_model_and_tokenizer

    generation = generation or EvalGenerationArguments()
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
    results = {
        "checkpoint": args.model_name_or_path,
        "dataset": args.dataset_path,
        "split": split,
        "turns": metrics["turns"],
        "metrics": metrics,
        "perplexity": "ppl: token-level, exp of the mean NLL over gold reply tokens (end token included); ppl_word: "
        "the same NLL without the end token over ParlAI split_tokenize words",
        "num_processes": trainer.accelerator.num_processes,
        "options": {**asdict(args), **asdict(generation)},
    }
    if predictions is not None:
        results["predictions"] = predictions
    if trainer.accelerator.is_main_process:
        output_file = args.output_file or default_output_file(args, split)
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"ConvAI2 metrics of {args.model_name_or_path} on {split} ({metrics['turns']} turns):")
        print(format_table({k: v for k, v in metrics.items() if k != "candidates_per_turn"}))
        print(f"Saved {output_file}")
    return results


def cli(argv: list[str] | None = None) -> int:
    """Console script `persona-eval`."""

    def evaluate(args: list[str]) -> None:
        main(*parse_args_with_config(make_parser(), args))

    return run_console_script("persona-eval", evaluate, argv)


if __name__ == "__main__":
    sys.exit(cli())
