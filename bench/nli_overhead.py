#!/usr/bin/env python
"""What `--nli_model` adds to persona-eval: the 20-candidate evaluation of a tiny GPT-2 with and without the C-score
of a tiny BERT NLI model (as large as the GPT-2), on CPU, in one run.

Both runs rank every candidate, generate a greedy reply per turn and compute every other metric; the NLI run also
scores each generated and each gold reply against each persona sentence. The two are timed alternately (after a
warm-up of each) and the best of `--repeats` is kept, as wall-clock time and as the process's CPU time (all threads;
steadier than wall-clock time on a shared machine).

    python bench/nli_overhead.py
    python bench/nli_overhead.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv --turns 60
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="Persona dialogs (default: synthetic, 20 candidates).")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from persona_convai2 import evaluate_convai2
    from persona_data import load_dialogs
    from persona_model import load_model_and_tokenizer
    from persona_nli import NLIScorer
    from persona_records import dialogs_to_dataset_dict
    from persona_synthetic import (
        corpus_texts,
        make_synthetic_personachat,
        make_tiny_checkpoint,
        make_tiny_nli_checkpoint,
    )

    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="nli-bench-")
    data = make_synthetic_personachat(num_train=40, num_valid=40, seed=0)
    if args.dataset_path:
        dialogs = next(iter(load_dialogs(args.dataset_path).values()))
    else:
        dialogs = dialogs_to_dataset_dict(data, "synthetic")["valid"]
    texts = list(corpus_texts(data))
    model, tokenizer = load_model_and_tokenizer(make_tiny_checkpoint(os.path.join(workdir, "gpt2"), texts))
    nli_path = make_tiny_nli_checkpoint(os.path.join(workdir, "nli"), texts, hidden_size=64)
    nli = NLIScorer.from_pretrained(nli_path, device="cpu")

    def run(with_nli: bool) -> tuple[float, float, dict]:
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = evaluate_convai2(
            model, tokenizer, dialogs, batch_size=8, max_turns=args.turns, nli=nli if with_nli else None
        )
        return time.perf_counter() - wall, time.process_time() - cpu, metrics

    run(False), run(True)  # warm-up: feature cache, first-call costs
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for with_nli in (False, True):
            wall, cpu, metrics = run(with_nli)
            times[with_nli].append((wall, cpu))
    print(f"turns: {metrics['turns']}, candidates per turn: {metrics['candidates_per_turn']}, threads: {args.threads}")
    for i, clock in enumerate(("wall-clock", "CPU")):
        base, with_c = (min(t[i] for t in times[flag]) for flag in (False, True))
        print(
            f"{clock}: without --nli_model {base:.2f} s, with {with_c:.2f} s: the C-score adds "
            f"{100 * (with_c / base - 1):.0f}%"
        )


if __name__ == "__main__":
    main()
