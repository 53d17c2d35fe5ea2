"""Quality of generate-then-rank on held-out dialogs: F1, the multiple-choice score of the chosen reply and the
repetition metrics, for `num_ranked` 1, 4, 8, 16, with and without trigram blocking (and greedy decoding, persona-eval's
default, for reference).

Every setting answers the same turns (gold history, as persona-eval) with the same seed; metrics are persona-eval's
(`persona_metrics.mean_f1`, `repetition_metrics`). The MC score is the head's score of the reply each setting chose
(higher: the head finds it fits the persona and history better).

    python bench/ranked_quality.py --model_name_or_path runs/tiny --dataset_path data.json [--max_turns 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persona_convai2 import flatten_turns  # noqa: E402
from persona_data import find_split, load_dialogs  # noqa: E402
from persona_generation import generate_ranked, load_for_chat  # noqa: E402
from persona_metrics import mean_f1, repetition_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_path", required=True)
    parser.add_argument("--split", default=None)
    parser.add_argument("--max_turns", type=int, default=200)
    parser.add_argument("--ranked", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--blocking", type=int, nargs="+", default=[0, 3], help="no_repeat_ngram_size values.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_for_chat(args.model_name_or_path, device="cpu")
    dialogs = load_dialogs(args.dataset_path)
    split = find_split(dialogs, args.split, args.dataset_path)
    _, turns = flatten_turns(dialogs[split], args.max_turns)
    contexts = [(t["persona"], t["history"]) for t in turns]
    golds = [t["gold"] for t in turns]
    dialog_ids = [hash(tuple(t["persona"])) for t in turns]  # consecutive turns of a dialog share the persona
    print(f"{args.model_name_or_path} on {split}: {len(turns)} turns, seed {args.seed}")

    settings = [{"no_sample": True, "num_ranked": 1, "no_repeat_ngram_size": b} for b in args.blocking]
    settings += [{"num_ranked": n, "no_repeat_ngram_size": b} for b in args.blocking for n in args.ranked]
    header = f"{'decoding':<26} {'f1':>7} {'mc':>7} {'distinct_2':>10} {'rep_within':>10} {'rep_self':>9} {'s/turn':>7}"
    print(header)
    for options in settings:
        start = time.perf_counter()
        ranked = generate_ranked(
            model, tokenizer, contexts, batch_size=args.batch_size, seed=args.seed, **options
        )  # [(reply, score), ...] per turn, best first
        seconds = (time.perf_counter() - start) / len(turns)
        replies = [r[0][0] for r in ranked]
        mc = sum(r[0][1] for r in ranked) / len(ranked)
        rep = repetition_metrics(replies, [h for _, h in contexts], dialog_ids)
        name = ("greedy" if options.get("no_sample") else f"num_ranked {options['num_ranked']}") + (
            f", block {options['no_repeat_ngram_size']}" if options["no_repeat_ngram_size"] else ""
        )
        print(
            f"{name:<26} {mean_f1(replies, golds):>7.4f} {mc:>7.3f} {rep['distinct_2']:>10.4f}"
            f" {rep['repeat_within']:>10.4f} {rep['repeat_self']:>9.4f} {seconds:>7.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
