#!/usr/bin/env python
"""Benchmark: plain double-heads forward vs shared-prefix forward, same model, same data, one run.

    python bench/shared_prefix.py                      # tiny model and GPT-2-small-sized config
    python bench/shared_prefix.py --models tiny --train_steps 20 --eval_batches 10

Training: forward + backward + SGD step on batches of `--train_batch_size` examples x 4 candidates. Evaluation:
no-grad forward on `--eval_batch_size` examples x 20 candidates. Both paths run the same batches, interleaved
(plain, shared, plain, ...) so that load from other processes on a shared CPU hits both alike; the figures to
read are the ratios. Random weights; synthetic PERSONA-CHAT dialogs with a tokenizer trained on them, contexts
cut to `--max_history` like the reference. One torch thread by default (see `--threads`). Also checks that both
paths give the same losses and mc_logits.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import GPT2Config  # noqa: E402

from persona_collator import PersonaCollator  # noqa: E402
from persona_data import build_features  # noqa: E402
from persona_model import PersonaGPT2DoubleHeadsModel, add_special_tokens  # noqa: E402
from persona_synthetic import corpus_texts, make_synthetic_personachat, train_tiny_tokenizer  # noqa: E402

MODELS = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4},
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}


def make_batches(tokenizer, dialogs, num_candidates: int, batch_size: int, count: int, max_history: int) -> list[dict]:
    from datasets import Dataset

    features = build_features(
        Dataset.from_list(dialogs), tokenizer, num_candidates=num_candidates, max_history=max_history
    )
    collate = PersonaCollator(pad_token_id=tokenizer.pad_token_id)
    rows = [features[i % len(features)] for i in range(batch_size * count)]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def time_paths(model, batches: list[dict], train: bool, lr: float = 1e-3) -> dict:
    """Seconds per path and the outputs of the first batch, both paths interleaved batch by batch."""
    models = {"plain": model, "shared": copy.deepcopy(model)}
    models["plain"].config.persona_shared_prefix = False
    models["shared"].config.persona_shared_prefix = True
    seconds = {name: 0.0 for name in models}
    outputs = {name: [] for name in models}
    for batch in batches:
        for name, m in models.items():
            m.train(train)
            start = time.perf_counter()
            if train:
                out = m(**batch)
                (out.lm_loss + out.mc_loss).backward()
                with torch.no_grad():
                    for p in m.parameters():
                        p -= lr * p.grad
                        p.grad = None
            else:
                with torch.no_grad():
                    out = m(**batch)
            seconds[name] += time.perf_counter() - start
            outputs[name].append((out.lm_loss.detach(), out.mc_loss.detach(), out.mc_logits.detach()))
    # Same batches, same (deterministic: dropout 0) updates: every loss along the run must agree.
    diff = max(
        (a - b).abs().max().item() for pa, pb in zip(outputs["plain"], outputs["shared"]) for a, b in zip(pa, pb)
    )
    return {"seconds": seconds, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--eval_batch_size", type=int, default=4)
    parser.add_argument("--train_steps", type=int, default=None, help="Default: 12 (tiny), 2 (gpt2-small).")
    parser.add_argument("--eval_batches", type=int, default=None, help="Default: 8 (tiny), 1 (gpt2-small).")
    parser.add_argument("--max_history", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a CPU shared with other jobs, OpenMP threads spin-wait on each other and "
        "drown the difference between the paths; 0 = torch's choice).",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = make_synthetic_personachat(num_train=60, num_valid=20, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(corpus_texts(data), tmp, vocab_size=400)
    add_special_tokens(None, tokenizer)
    train_batches_all = make_batches(tokenizer, data["train"], 4, args.train_batch_size, 24, args.max_history)
    eval_batches_all = make_batches(tokenizer, data["valid"], 20, args.eval_batch_size, 12, args.max_history)
    sample = train_batches_all[0]
    print(
        f"data: train batches [B, C, T] like {list(sample['input_ids'].shape)}, "
        f"eval like {list(eval_batches_all[0]['input_ids'].shape)}; mean tokens per candidate "
        f"{eval_batches_all[0]['attention_mask'].sum(-1).float().mean():.0f}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'model':<11} {'phase':<24} {'plain ex/s':>10} {'shared ex/s':>11} {'speed-up':>9} {'max |diff|':>10}")
    for name in args.models:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            summary_first_dropout=0.0, **MODELS[name],
        )  # fmt: skip
        model = PersonaGPT2DoubleHeadsModel(config)
        small = name != "tiny"
        train_steps = args.train_steps or (2 if small else 12)
        eval_batches = args.eval_batches or (1 if small else 8)
        for phase, batches, train, batch_size in [
            ("train (4 candidates)", train_batches_all[:train_steps], True, args.train_batch_size),
            ("eval (20 candidates)", eval_batches_all[:eval_batches], False, args.eval_batch_size),
        ]:
            time_paths(model, [{k: v[:1] for k, v in batches[0].items()}], train)  # warm-up: first-call overheads
            result = time_paths(model, batches, train)
            examples = len(batches) * batch_size
            plain, shared = (examples / result["seconds"][k] for k in ("plain", "shared"))
            print(
                f"{name:<11} {phase:<24} {plain:>10.3g} {shared:>11.3g} {shared / plain:>8.2f}x "
                f"{result['max_abs_diff']:>10.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
