#!/usr/bin/env python
"""ConvAI2 evaluation without ParlAI: Hits@k over every candidate, token-level perplexity and F1 of generated replies.

    persona-eval --model_name_or_path runs/my-run --dataset_path personachat_self_original.json
    persona-eval --model_name_or_path runs/my-run --dataset_path data.json --max_turns 200 --no_f1
    accelerate launch persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json
    torchrun --nproc_per_node 8 persona_eval.py --model_name_or_path runs/my-run --dataset_path data.json

Definitions (ParlAI's, DESIGN.md): Hits@k ranks each turn's candidates (20 in PERSONA-CHAT) by the multiple-choice
head; perplexity is exp of the mean NLL over gold reply tokens (token-level, not ParlAI's word-level); F1 compares the
greedy reply with the gold after ParlAI's normalisation. The history always holds the gold replies.
The same F1 and Hits@k ship as an `evaluate` metric: `evaluate.load("metrics/convai2")` (config "f1" or "hits").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from persona_chat import DEFAULT_OPTIONS, generate_replies
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs

logger = logging.getLogger(__name__)

# The `evaluate` module with the same F1 and Hits@k (valid in a source checkout).
CONVAI2_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "convai2")
HITS_KS = (1, 5, 10)

# ParlAI's `normalize_answer`: punctuation (string.punctuation, the apostrophe included) and articles become spaces.
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, replace punctuation and the articles a/an/the with spaces, collapse whitespace (ParlAI).

    >>> normalize_answer("The cat's  hat, (an) A-ha!")
    'cat s hat ha'
    """
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """The ConvAI2 F1 of one pair: unigram overlap (multiset) of the normalised strings; 0 when nothing is shared.

    >>> round(f1_score("I love the dogs!", "i love cats"), 4)
    0.6667
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_rank(mc_logits: torch.Tensor, mc_labels: torch.Tensor) -> torch.Tensor:
    """Candidates scored strictly above the gold, per turn (0 = gold ranked first; ties go the gold's way).

    mc_logits: [N, C], mc_labels: [N] → [N].
    """
    gold_logit = mc_logits.gather(1, mc_labels[:, None])
    return (mc_logits > gold_logit).sum(dim=1)


def hits_at_k(ranks: Sequence[int], num_candidates: Sequence[int], ks: Sequence[int] = HITS_KS) -> dict[str, float]:
    """`hits@k` = fraction of turns whose gold rank is below k, for each k smaller than every turn's candidate count.

    A k as large as the candidate count would be 1 by construction, so it is left out.

    >>> hits_at_k([0, 1, 6, 12], [20, 20, 20, 20])
    {'hits@1': 0.25, 'hits@5': 0.5, 'hits@10': 0.75}
    >>> hits_at_k([0, 1], [2, 2])
    {'hits@1': 0.5}
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {}
    fewest = int(np.min(num_candidates))
    return {f"hits@{k}": float((ranks < k).mean()) for k in ks if k < fewest}


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


@torch.no_grad()
def rank_candidates(
    model: PreTrainedModel,
    features: datasets.Dataset,
    collator: PersonaCollator,
    accelerator: Accelerator,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Per-turn gold rank, summed gold-reply NLL, gold-reply tokens and candidate count, in `features` order.

    Turns are batched with others of the same candidate count (the collator needs one count per batch), longest
    first so each batch pads little and memory runs out (if it does) at once; every process takes a share of the
    batches and `gather_for_metrics` drops the tail padding of uneven shards.
    """
    last_tokens = features["mc_token_ids"]  # [N][C]: each candidate's length - 1
    counts = np.array([len(ids) for ids in last_tokens])
    longest = np.array([max(ids) for ids in last_tokens])
    out = {key: np.zeros(len(counts)) for key in ("gold_rank", "lm_nll", "lm_tokens")}
    out["num_candidates"] = counts
    model.eval()
    for count in np.unique(counts):
        rows = np.flatnonzero(counts == count)
        rows = rows[np.argsort(-longest[rows], kind="stable")]
        loader = accelerator.prepare_data_loader(
            DataLoader(features.select(rows), batch_size=batch_size, collate_fn=collator)
        )
        stats = []
        for batch in tqdm(loader, desc=f"Ranking {count} candidates", disable=not accelerator.is_local_main_process):
            with accelerator.autocast():
                output = model(**batch)  # DualHeadOutput: mc_logits [B, C], lm_nll [B], lm_tokens [B]
            ranks = gold_rank(output.mc_logits.float(), batch["mc_labels"])
            step = torch.stack([ranks.double(), output.lm_nll.double(), output.lm_tokens.double()], dim=1)  # [B, 3]
            stats.append(accelerator.gather_for_metrics(step).cpu())
        stats = torch.cat(stats).numpy()
        for column, key in enumerate(("gold_rank", "lm_nll", "lm_tokens")):
            out[key][rows] = stats[:, column]
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
    """Replies of `persona_chat.generate_replies` to every turn's gold history, spread over the processes."""
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
    accelerator: Accelerator | None = None,
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
    `persona_chat.generate_replies` (default greedy). Works on one process or many (pass the run's `Accelerator`).
    With `return_predictions`, the result also holds the generated replies under "predictions".
    """
    accelerator = accelerator or Accelerator()
    max_positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    max_length = min(max_length or max_positions, max_positions)
    dialogs, turns = flatten_turns(dialogs, max_turns)
    if not turns:
        raise ValueError("The evaluation split has no turns (no dialog with an utterance).")
    with accelerator.main_process_first():
        features = build_features(
            dialogs, tokenizer, num_candidates=None, max_history=max_history, max_length=max_length, cache_dir=cache_dir
        )
    features = features.select(range(len(turns)))

    stats = rank_candidates(model, features, PersonaCollator(tokenizer.pad_token_id), accelerator, batch_size)
    tokens = stats["lm_tokens"].sum()
    lm_loss = stats["lm_nll"].sum() / tokens if tokens else float("nan")
    metrics = {
        **hits_at_k(stats["gold_rank"], stats["num_candidates"]),
        "ppl": math.exp(lm_loss) if tokens else float("nan"),
        "lm_loss": float(lm_loss),
    }
    predictions = None
    if f1:
        options = {"no_sample": True, **(generation_options or {})}
        predictions = generate_for_turns(
            model, tokenizer, turns, accelerator, max_history=max_history, batch_size=batch_size, **options
        )
        metrics["f1"] = float(np.mean([f1_score(p, t["gold"]) for p, t in zip(predictions, turns)]))
    metrics["turns"] = len(turns)
    metrics["gold_reply_tokens"] = int(tokens)
    metrics["candidates_per_turn"] = sorted(int(c) for c in np.unique(stats["num_candidates"]))
    if return_predictions:
        metrics["predictions"] = predictions
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint to evaluate: a local folder or a Hub id."})
    dataset_path: str = field(metadata={"help": "Local path, http(s) URL or Hub id of the persona dialogs."})
    dataset_format: str | None = field(default=None, metadata={"help": "Reader to use (default: detected)."})
    split: str = field(default="valid", metadata={"help": "Split to evaluate ('validation' is also tried)."})
    dataset_cache: str | None = field(default=None, metadata={"help": "Folder caching downloads and features."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the checkpoint's own."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    max_history: int = field(default=2, metadata={"help": "Previous exchanges kept: the last 2*max_history+1 turns."})
    max_input_length: int | None = field(
        default=None, metadata={"help": "Longest input in tokens (default: the model's maximum positions)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Turns per batch and process (each turn has ~20 candidates)."})
    max_turns: int | None = field(default=None, metadata={"help": "Score only the first N turns (quick looks)."})
    f1: bool = field(default=True, metadata={"help": "Generate replies and score F1 (the slow part); --no_f1 skips."})
    output_file: str | None = field(
        default=None,
        metadata={"help": "JSON results (default: convai2_eval_<split>.json in the checkpoint folder, or here)."},
    )
    save_predictions: bool = field(default=False, metadata={"help": "Also store the generated replies in the JSON."})
    # --- decoding, as persona-chat (default greedy, for reproducible F1)
    no_sample: bool = field(default=True, metadata={"help": "Greedy decoding; `--no_sample false` samples."})
    max_length: int = field(
        default=DEFAULT_OPTIONS["max_length"], metadata={"help": "Longest generated reply, in tokens."}
    )
    min_length: int = field(
        default=DEFAULT_OPTIONS["min_length"], metadata={"help": "Shortest generated reply, in tokens."}
    )
    temperature: float = field(default=DEFAULT_OPTIONS["temperature"], metadata={"help": "Sampling temperature."})
    top_k: int = field(
        default=DEFAULT_OPTIONS["top_k"], metadata={"help": "Sample among the k most likely tokens (0: no limit)."}
    )
    top_p: float = field(default=DEFAULT_OPTIONS["top_p"], metadata={"help": "Nucleus sampling mass (1.0: off)."})
    num_beams: int = field(default=DEFAULT_OPTIONS["num_beams"], metadata={"help": "Beam search width (1: none)."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling (each process adds its rank)."})

    def __post_init__(self):
        for name in ("max_turns", "batch_size", "max_input_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")
        if self.max_history < 0:
            raise ValueError(f"--max_history must be >= 0, got {self.max_history}.")

    def generation_options(self) -> dict:
        names = ("no_sample", "max_length", "min_length", "temperature", "top_k", "top_p", "num_beams", "seed")
        return {name: getattr(self, name) for name in names}


def default_output_file(args: EvalArguments) -> str:
    name = f"convai2_eval_{args.split}.json"
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


def main(args: EvalArguments) -> dict:
    """Evaluate a checkpoint; the main process prints the table and writes the JSON. Returns the results."""
    from persona_model import load_model_and_tokenizer

    # Without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no accelerator (no gloo group).
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(cpu=not has_accelerator)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # Seeded before loading: a checkpoint without the persona tokens gets new embeddings, the same on every process.
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(
        args.model_name_or_path, tokenizer_name_or_path=args.tokenizer_name, dtype=args.dtype
    )
    model.to(accelerator.device)
    with accelerator.main_process_first():
        options = {"cache_dir": args.dataset_cache} if args.dataset_cache else {}
        dialogs = load_dialogs(args.dataset_path, args.dataset_format, **options)
    split = next((s for s in (args.split, "validation", "valid") if s in dialogs), None)
    if split is None:
        raise ValueError(f"{args.dataset_path} has no split {args.split!r} (it has {list(dialogs)}); pass --split.")

    metrics = evaluate_convai2(
        model,
        tokenizer,
        dialogs[split],
        accelerator=accelerator,
        max_history=args.max_history,
        max_length=args.max_input_length,
        batch_size=args.batch_size,
        max_turns=args.max_turns,
        f1=args.f1,
        generation_options=args.generation_options(),
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
        "num_processes": accelerator.num_processes,
        "options": asdict(args),
    }
    if predictions is not None:
        results["predictions"] = predictions
    if accelerator.is_main_process:
        output_file = args.output_file or default_output_file(args)
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"ConvAI2 metrics of {args.model_name_or_path} on {split} ({metrics['turns']} turns):")
        print(format_table({k: v for k, v in metrics.items() if k != "candidates_per_turn"}))
        print(f"Saved {output_file}")
    return results


def cli(argv: list[str] | None = None) -> None:
    """Console script `persona-eval`."""
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    try:
        main(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli()
