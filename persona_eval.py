#!/usr/bin/env python
"""ConvAI2 evaluation without ParlAI: Hits@k over every candidate, token-level perplexity and F1 of generated replies.

    persona-eval --model_name_or_path runs/my-run --dataset_path personachat_self_original.json
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --max_turns 200 --no_f1
    accelerate launch persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json
    torchrun --nproc_per_node 8 persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json

Definitions (ParlAI's; `persona_metrics`): Hits@k ranks each turn's candidates (20 in PERSONA-CHAT) by the
multiple-choice head, a tie counting against the gold; perplexity is exp of the mean NLL over gold reply tokens
(token-level, not ParlAI's word-level); F1 compares the greedy reply with the gold after ParlAI's normalisation. The
history always holds the gold replies. Candidates are scored by `PersonaTrainer`'s own evaluation step, so these
numbers and the Trainer's `eval_*` metrics come from one piece of code. The same F1 and Hits@k ship as an `evaluate`
metric: `evaluate.load("metrics/convai2")` (config "f1" or "hits").
"""

from __future__ import annotations

import json
import logging
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
)
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_files import file_in_the_way
from persona_generation import GenerationArguments, generate_replies
from persona_metrics import HITS_KS, f1_score, mean_f1, ranking_metrics
from persona_trainer import PersonaTrainer, PersonaTrainingArguments, has_accelerator

logger = logging.getLogger(__name__)

# The `evaluate` module with the same F1 and Hits@k (valid in a source checkout).
CONVAI2_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "convai2")
__all__ = ["evaluate_convai2", "f1_score", "main", "cli"]


def flatten_turns(dialogs: datasets.Dataset, max_turns: int | None = None) -> tuple[datasets.Dataset, list[dict]]:
    """The dialogs holding the first `max_turns` turns, and those turns as `{persona, history, gold}` in row order."""
    turns, num_dialogs = [], 0
    for dialog in dialogs:
        if max_turns is not None and len(turns) >= max_turns:
            break
        num_dialogs += 1
        for utterance in dialog["utterances"]:
            turns.append(
                {"persona": dialog["personality"], "history": utterance["history"], "gold": utterance["candidates"][-1]}
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
    """Per-turn `persona_metrics.STAT_COLUMNS` of `features` ([N, 5], in `features` order) from the Trainer's
    evaluation step.

    Turns are ordered by candidate count, longest first within a count, so each batch pads little and memory runs out
    (if it does) at once; the result is put back in `features` order.
    """
    last_tokens = features["mc_token_ids"]  # [N][C]: each candidate's length - 1
    counts = np.array([len(ids) for ids in last_tokens])
    longest = np.array([max(ids) for ids in last_tokens])
    order = np.lexsort((-longest, counts))  # by count, then longest first (stable)
    stats = trainer.predict(features.select(order)).predictions  # [N, 5]
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
) -> dict:
    """ConvAI2 metrics of `model` on a canonical dialogs split: hits@k, ppl (token-level), lm_loss, f1, turns.

    `max_length` caps input lengths (default: the model's positions); `generation_options` go to
    `persona_generation.generate_replies` (default: persona-eval's, greedy). Candidates are ranked by `trainer` (a
    training run's own, with its batch size and processes) or by a fresh evaluation-only `PersonaTrainer` with
    `batch_size`.
    With `return_predictions`, the result also holds the generated replies under "predictions".
    """
    trainer = trainer or ranking_trainer(model, tokenizer, batch_size)
    batch_size = trainer.args.per_device_eval_batch_size
    dialogs, turns = flatten_turns(dialogs, max_turns)
    if not turns:
        raise ValueError("The evaluation split has no turns (no dialog with an utterance).")
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
    metrics.update(ppl=ranking["ppl"], lm_loss=ranking["lm_loss"])
    predictions = None
    if f1:
        options = {**EvalGenerationArguments().generation_options(), **(generation_options or {})}
        predictions = generate_for_turns(
            model, tokenizer, turns, trainer.accelerator, max_history=max_history, batch_size=batch_size, **options
        )
        metrics["f1"] = mean_f1(predictions, [t["gold"] for t in turns])
    metrics["turns"] = len(turns)
    metrics["gold_reply_tokens"] = int(stats[:, 2].sum())
    metrics["candidates_per_turn"] = sorted(int(c) for c in np.unique(stats[:, 4]))
    if return_predictions:
        metrics["predictions"] = predictions
    return metrics


@dataclass
class EvalArguments:
    """Options of `persona-eval` besides decoding (`EvalGenerationArguments`)."""

    model_name_or_path: str = field(metadata={"help": "Checkpoint to evaluate: a local folder or a Hub id."})
    dataset_path: str = field(metadata={"help": "Local path, http(s) URL or Hub id of the persona dialogs."})
    dataset_format: str | None = field(default=None, metadata={"help": "Reader to use (default: detected)."})
    split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate (default: the first of valid, validation, test the data has)."},
    )
    dataset_cache: str | None = field(default=None, metadata={"help": "Folder caching downloads and features."})
    on_bad_record: str = field(
        default="error",
        metadata={
            "help": "On a malformed record: 'error' stops, 'skip' counts and reports it.",
            "choices": ["error", "skip"],
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the checkpoint's own."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    max_history: int = field(default=2, metadata={"help": "Previous exchanges kept: the last 2*max_history+1 turns."})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest input in tokens (default: the model's maximum positions), as in training.",
            "aliases": ["--max_input_length"],
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Turns per batch and process (each turn has ~20 candidates)."})
    max_turns: int | None = field(default=None, metadata={"help": "Score only the first N turns (quick looks)."})
    f1: bool = field(default=True, metadata={"help": "Generate replies and score F1 (the slow part); --no_f1 skips."})
    output_file: str | None = field(
        default=None,
        metadata={"help": "JSON results (default: convai2_eval_<split>.json in the checkpoint folder, or here)."},
    )
    save_predictions: bool = field(default=False, metadata={"help": "Also store the generated replies in the JSON."})

    def __post_init__(self):
        check_positive(self, "max_turns", "batch_size")
        check_positive(self, "max_length", minimum=MIN_INPUT_LENGTH)
        check_positive(self, "max_history", minimum=0)
        check_model_path(self.model_name_or_path)
        if self.tokenizer_name is not None:
            check_model_path(self.tokenizer_name, "--tokenizer_name")
        if self.dataset_cache is not None and os.path.isfile(self.dataset_cache):
            raise UsageError(f"--dataset_cache {self.dataset_cache}: is a file; pass a folder.")
        if self.save_predictions and not self.f1:
            raise UsageError("--save_predictions keeps the replies generated for F1; drop --no_f1 (or --f1 false).")
        if self.output_file is not None and os.path.isdir(self.output_file):
            raise UsageError(f"--output_file {self.output_file}: is a directory; pass a file name (results.json).")
        blocking = None if self.output_file is None else file_in_the_way(self.output_file)
        if blocking:
            raise UsageError(
                f"--output_file {self.output_file}: {blocking} is a file, not a folder; pass another path."
            )


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
    """Terminal table of the metrics, perplexity marked token-level."""
    labels = {"ppl": "perplexity (token-level)", "lm_loss": "mean NLL per gold token"}
    rows = [(labels.get(k, k), f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 14)
    return "\n".join([rule, *(f"{name:<{width}}  {value:>12}" for name, value in rows), rule])


def main(args: EvalArguments, generation: EvalGenerationArguments | None = None) -> dict:
    """Evaluate a checkpoint; the main process prints the table and writes the JSON. Returns the results."""
    from persona_model import load_model_and_tokenizer

    generation = generation or EvalGenerationArguments()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO if is_rank_zero() else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # Seeded before loading: a checkpoint without the persona tokens gets new embeddings, the same on every process.
    set_seed(generation.seed or 0)
    model, tokenizer = load_model_and_tokenizer(
        args.model_name_or_path, tokenizer_name_or_path=args.tokenizer_name, dtype=args.dtype
    )
    trainer = ranking_trainer(model, tokenizer, args.batch_size)
    with trainer.args.main_process_first(desc="loading persona dialogs"):
        options = {"cache_dir": args.dataset_cache} if args.dataset_cache else {}
        dialogs = load_dialogs(args.dataset_path, args.dataset_format, on_bad_record=args.on_bad_record, **options)
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
    )
    predictions = metrics.pop("predictions", None)
    results = {
        "checkpoint": args.model_name_or_path,
        "dataset": args.dataset_path,
        "split": split,
        "turns": metrics["turns"],
        "metrics": metrics,
        "perplexity": "token-level: exp of the mean NLL over gold reply tokens (eos included), not ParlAI's word-level",
        "num_processes": trainer.accelerator.num_processes,
        "options": {**asdict(args), **asdict(generation)},
    }
    if predictions is not None:
        results["predictions"] = predictions
    if trainer.accelerator.is_main_process:
        output_file = args.output_file or default_output_file(args, split)
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        replaced = os.path.exists(output_file)
        with open(output_file, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"ConvAI2 metrics of {args.model_name_or_path} on {split} ({metrics['turns']} turns):")
        print(format_table({k: v for k, v in metrics.items() if k != "candidates_per_turn"}))
        print(f"Saved {output_file}" + (" (it replaces the earlier results that file held)" if replaced else ""))
    return results


def cli(argv: list[str] | None = None) -> int:
    """Console script `persona-eval`."""

    def evaluate(args: list[str]) -> None:
        main(*parse_args_with_config(make_parser(), args))

    return run_console_script("persona-eval", evaluate, argv)


if __name__ == "__main__":
    sys.exit(cli())
