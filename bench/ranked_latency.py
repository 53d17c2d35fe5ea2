"""Reply latency with generate-then-rank: `num_ranked` N sampled replies scored by the multiple-choice head against one
sampled reply.

Same model (a GPT-2-small-sized config with random weights, unless `--small` or `--model_name_or_path`), same context
(persona + 5 history turns), `--new_tokens` forced in every sample (`min_length = max_new_tokens`) so every run does
the same work. The context is encoded once for the N samples (its key/value cache repeated); the ranking forward runs
each distinct candidate's last tokens on that cache. The settings alternate within one run; the script prints the
median of each and the ratios, of wall time and of this process's CPU time (steadier when other jobs share the cores:
time spent waiting for a core is not counted), because the machine is shared and absolute times are noisy.

    python bench/ranked_latency.py [--ranked 8] [--repeats 5] [--new_tokens 20] [--threads 1] [--small]
    python bench/ranked_latency.py --tokenizer_vocab --threads 1
    python bench/ranked_latency.py --model_name_or_path runs/tiny --threads 1
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch
from transformers import GPT2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persona_backbone import PersonaGPT2DoubleHeadsModel  # noqa: E402
from persona_generation import build_context, generate_ranked, generate_replies, load_for_chat  # noqa: E402
from persona_model import add_special_tokens  # noqa: E402
from persona_synthetic import corpus_texts, make_dialog, make_synthetic_personachat, train_tiny_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranked", type=int, nargs="+", default=[8], help="num_ranked values to compare with 1.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--history_turns", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="A 4-layer, 256-wide GPT-2 instead of GPT-2 small.")
    parser.add_argument(
        "--tokenizer_vocab",
        action="store_true",
        help="A model vocabulary the size of the tiny tokenizer's (2k) instead of GPT-2's 50k: the samples decode to "
        "text of about --new_tokens tokens (with 50k, most sampled ids lie outside the tokenizer: nothing to decode).",
    )
    parser.add_argument("--model_name_or_path", default=None, help="A trained checkpoint instead of random weights.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)."
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model_name_or_path:
        model, tokenizer = load_for_chat(args.model_name_or_path, device=device)
    else:
        data = make_synthetic_personachat(num_train=40, num_valid=12, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_tiny_tokenizer(corpus_texts(data), tmp, vocab_size=2000)
        add_special_tokens(None, tokenizer)
        torch.manual_seed(0)
        size = dict(n_embd=256, n_layer=4, n_head=4) if args.small else dict(n_embd=768, n_layer=12, n_head=12)
        vocab_size = len(tokenizer) if args.tokenizer_vocab else 50257 + 5  # GPT-2's vocabulary (+5 persona tokens)
        config = GPT2Config(vocab_size=vocab_size, n_positions=1024, **size)
        model = PersonaGPT2DoubleHeadsModel(config).to(device).eval()
        add_special_tokens(model, tokenizer)

    persona, turns, _ = make_dialog(random.Random(1))
    history = turns[: args.history_turns]
    max_history = (args.history_turns - 1) // 2 + 1  # keep all the turns
    context_len = build_context(tokenizer, persona, history, max_history)["input_ids"].size(1)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"device={device} threads={torch.get_num_threads()} params={params:.0f}M context={context_len} tokens,"
        f" new tokens={args.new_tokens} per sample"
    )

    options = {"max_new_tokens": args.new_tokens, "min_length": args.new_tokens, "temperature": 1.0}
    settings = [1, *args.ranked]

    def reply(n: int):
        return generate_replies(
            model, tokenizer, [(persona, history)], max_history=max_history, num_ranked=n, **options
        )

    for n in settings:
        reply(n)  # warm-up (allocator, kernels)
    if args.tokenizer_vocab:  # what the head ranks (with 50k, sampled ids outside the tokenizer decode to nothing)
        most = max(settings)
        (ranked,) = generate_ranked(
            model, tokenizer, [(persona, history)], max_history=max_history, num_ranked=most, **options
        )
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text, _ in ranked]
        print(f"num_ranked={most}: {len(ranked)} distinct candidates, {statistics.mean(lengths):.1f} tokens on average")
    times = {n: [] for n in settings}
    cpu_times = {n: [] for n in settings}
    for _ in range(args.repeats):
        for n in settings:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            reply(n)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - start)
            cpu_times[n].append(time.process_time() - cpu_start)
    med = {n: statistics.median(v) for n, v in times.items()}
    cpu = {n: statistics.median(v) for n, v in cpu_times.items()}
    for n in settings:
        runs = ", ".join(f"{x:.3f}" for x in times[n])
        print(f"num_ranked={n:>2}: median {med[n]:.3f} s/reply (CPU {cpu[n]:.3f} s)  runs [{runs}]")
    for n in args.ranked:
        print(
            f"num_ranked {n} / num_ranked 1: {med[n] / med[1]:.2f}x wall, {cpu[n] / cpu[1]:.2f}x CPU"
            "  (goal for 8: <= 2.5x)"
        )


if __name__ == "__main__":
    main()
