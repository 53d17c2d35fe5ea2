#!/usr/bin/env python
"""Benchmark: the three candidate encodings (plain, cache-broadcast shared prefix, packed) on the same batches.

    python bench/shared_prefix.py                           # tiny GPT-2, 2/4/20 candidates, 1 and 2 threads
    python bench/shared_prefix.py --candidates 20 --threads 2 --phases eval --eval_batches 20
    python bench/shared_prefix.py --model gpt2-small --candidates 4 20 --eval_batches 2 --train_steps 2

For each thread count, candidate count and phase (eval: no-grad forward; train: forward + backward + SGD step),
every path runs the same batches through the model's own forward, interleaved batch by batch (plain, shared, packed,
...), each batch `--repeats` times with the fastest run counted, so that load from other processes on a shared CPU
hits all paths alike: read the ratios. Paths: `plain` (every candidate in full), `shared_prefix` (context encoded
once, its key/value cache broadcast to the candidates), `packed` (what `auto` runs; on CPU the whole batch in one
row under the per-example tree attention), `packed-dense` (one dense tree mask per row, several examples per row,
first fit into rows no longer than the longest example), `packed-dense-1ex` (dense, one example per row),
`packed-tree` (the per-example tree attention forced: `packed` on CPU, so not run by default). Random weights,
dropout 0; synthetic PERSONA-CHAT dialogs with a tokenizer trained on them, contexts cut to `--max_history`.
Also checks that every path gives the plain path's losses and mc_logits along the whole run.
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

from persona_backbone import PersonaGPT2DoubleHeadsModel
from persona_collator import PersonaCollator  # noqa: E402
from persona_data import build_features  # noqa: E402
from persona_encoding import set_candidate_encoding, set_packed_layout  # noqa: E402
from persona_model import add_special_tokens  # noqa: E402
from persona_synthetic import corpus_texts, make_synthetic_personachat, train_tiny_tokenizer  # noqa: E402

MODELS = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4},
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}
# path -> (encoding asked for, packed row budget, packed attention)
PATHS = {
    "plain": ("plain", None, None),
    "shared_prefix": ("shared_prefix", None, None),
    "packed": ("packed", "auto", "auto"),
    "packed-dense": ("packed", "longest", "dense"),
    "packed-dense-1ex": ("packed", None, "dense"),
    "packed-tree": ("packed", "auto", "tree"),  # what `auto` runs on CPU; forced elsewhere (bench/gpu_check.py)
}


def make_batches(tokenizer, dialogs, num_candidates: int, batch_size: int, count: int, max_history: int) -> list[dict]:
    from datasets import Dataset

    features = build_features(
        Dataset.from_list(dialogs), tokenizer, num_candidates=num_candidates, max_history=max_history
    )
    collate = PersonaCollator(pad_token_id=tokenizer.pad_token_id)
    rows = [features[i % len(features)] for i in range(batch_size * count)]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def forward(model, path: str, batch: dict):
    _, row_tokens, attention = PATHS[path]
    set_packed_layout(model, attention or "auto", row_tokens)
    return model(**batch)


def time_paths(model, paths: list[str], batches: list[dict], train: bool, repeats: int = 1, lr: float = 1e-3) -> dict:
    """Seconds per path over `batches` (paths interleaved; per batch the fastest of `repeats` runs), and the largest
    output difference from `plain` (first run of each batch)."""
    models = {path: copy.deepcopy(model).train(train) for path in paths}
    for path, m in models.items():
        set_candidate_encoding(m, PATHS[path][0])
    seconds = dict.fromkeys(paths, 0.0)
    outputs = {path: [] for path in paths}
    for batch in batches:
        best = dict.fromkeys(paths, float("inf"))
        for repeat in range(repeats):
            for path, m in models.items():
                start = time.perf_counter()
                if train:
                    out = forward(m, path, batch)
                    (out.lm_loss + out.mc_loss).backward()
                    if repeat == 0:  # the update once per batch: every path follows the same trajectory
                        with torch.no_grad():
                            for p in m.parameters():
                                p -= lr * p.grad
                    m.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        out = forward(m, path, batch)
                best[path] = min(best[path], time.perf_counter() - start)
                if repeat == 0:
                    values = (out.lm_loss.view(1), out.mc_loss.view(1), out.mc_logits.flatten())
                    outputs[path].append(torch.cat(values).detach())
        for path in paths:
            seconds[path] += best[path]
    diff = {p: max((a - b).abs().max().item() for a, b in zip(outputs[p], outputs["plain"])) for p in paths}
    return {"seconds": seconds, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=list(MODELS))
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 20])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--phases", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--paths", nargs="+", default=[p for p in PATHS if p != "packed-tree"], choices=list(PATHS))
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--eval_batches", type=int, default=12)
    parser.add_argument("--train_steps", type=int, default=12)
    parser.add_argument("--max_history", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="Runs per batch and path; the fastest counts (other jobs share the CPU)."
    )
    args = parser.parse_args(argv)
    if args.paths[0] != "plain":
        parser.error("--paths must start with plain (the reference of every ratio)")

    data = make_synthetic_personachat(num_train=60, num_valid=40, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(corpus_texts(data), tmp, vocab_size=400)
    add_special_tokens(None, tokenizer)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        summary_first_dropout=0.0, **MODELS[args.model],
    )  # fmt: skip
    model = PersonaGPT2DoubleHeadsModel(config)
    others = args.paths[1:]
    print(f"model {args.model} ({config.n_layer} layers, {config.n_embd} wide), batch {args.batch_size} examples")
    print("speed-up over plain:")
    header = f"{'thr':>3} {'C':>3} {'phase':<5} {'[B, C, T]':<14} {'plain ex/s':>10} "
    print(header + " ".join(f"{p:>13}" for p in others))
    for num_candidates in args.candidates:
        split = "valid" if num_candidates > 4 else "train"
        count = max(args.eval_batches, args.train_steps)
        batches = make_batches(tokenizer, data[split], num_candidates, args.batch_size, count, args.max_history)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for phase in args.phases:
                train = phase == "train"
                use = batches[: args.train_steps if train else args.eval_batches]
                time_paths(model, args.paths, [{k: v[:1] for k, v in use[0].items()}], train)  # warm-up
                result = time_paths(model, args.paths, use, train, args.repeats)
                examples = len(use) * args.batch_size
                plain = examples / result["seconds"]["plain"]
                ratios = " ".join(f"{result['seconds']['plain'] / result['seconds'][p]:>12.2f}x" for p in others)
                shape = str(list(use[0]["input_ids"].shape))
                print(f"{threads:>3} {num_candidates:>3} {phase:<5} {shape:<14} {plain:>10.3g} {ratios}", flush=True)
                worst = max(result["max_abs_diff"].values())
                if worst > 1e-4:
                    print(f"    outputs differ from plain: {result['max_abs_diff']}", flush=True)


if __name__ == "__main__":
    main()
