"""Reply latency: persona_chat's KV-cached `generate()` vs the reference's full re-encode per token.

Same model (a GPT-2-small-sized config, random weights), same context (persona + 5 history turns), 40 new tokens
forced in both paths (`min_length = max_new_tokens = 40`), greedy, so both produce the same tokens (checked). The two
methods alternate within one run and the script prints the median of each and their ratio, because the machine is
shared and absolute times are noisy.

    python bench/chat_latency.py [--repeats 5] [--new_tokens 40] [--device cpu] [--threads 1]
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

from persona_backbone import PersonaGPT2DoubleHeadsModel
from persona_decoding import stop_token_ids  # noqa: E402
from persona_generation import build_context, generate_reply_ids
from persona_model import add_special_tokens  # noqa: E402
from persona_synthetic import corpus_texts, make_dialog, make_synthetic_personachat, train_tiny_tokenizer  # noqa: E402


@torch.inference_mode()
def reference_reply(model, tokenizer, persona, history, max_history, new_tokens):
    """The reference interact.py loop: rebuild and re-encode the whole sequence for every token (no cache)."""
    specials = sorted(stop_token_ids(tokenizer))
    reply = []
    for _ in range(new_tokens):
        ctx = build_context(tokenizer, persona, history, max_history)
        input_ids = torch.cat([ctx["input_ids"], torch.tensor([reply], dtype=torch.long)], dim=1).to(model.device)
        token_types = torch.cat([ctx["token_type_ids"], ctx["token_type_ids"][:, -1:].repeat(1, len(reply))], 1)
        logits = model(input_ids=input_ids, token_type_ids=token_types.to(model.device)).logits[0, -1]
        logits[specials] = -float("inf")  # min_length = new_tokens: no special token may end the reply early
        reply.append(int(logits.argmax()))
    return reply


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=40)
    parser.add_argument("--history_turns", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)."
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = make_synthetic_personachat(num_train=40, num_valid=12, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(corpus_texts(data), tmp, vocab_size=2000)
    add_special_tokens(None, tokenizer)
    # GPT-2 small: 12 layers, 768 wide, 12 heads, GPT-2's vocabulary size (+5 persona tokens), 1024 positions.
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257 + 5, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    model = PersonaGPT2DoubleHeadsModel(config).to(device).eval()
    add_special_tokens(model, tokenizer)

    persona, turns, _ = make_dialog(random.Random(1))
    history = turns[: args.history_turns]
    max_history = (args.history_turns - 1) // 2 + 1  # keep all the turns: 2*max_history+1 >= history_turns
    context_len = build_context(tokenizer, persona, history, max_history)["input_ids"].size(1)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"device={device} threads={torch.get_num_threads()} params={params:.0f}M"
        f" context={context_len} tokens ({len(persona)} persona sentences + {len(history)} turns),"
        f" new tokens={args.new_tokens}"
    )

    options = {"no_sample": True, "max_new_tokens": args.new_tokens, "min_length": args.new_tokens}
    cached = lambda: generate_reply_ids(model, tokenizer, [(persona, history)], max_history=max_history, **options)[0]  # noqa: E731
    full = lambda: reference_reply(model, tokenizer, persona, history, max_history, args.new_tokens)  # noqa: E731
    cached(), full()  # warm-up (allocator, kernels)
    times = {"kv_cache": [], "re_encode": []}
    for _ in range(args.repeats):
        t, cached_ids = timed(cached, device)
        times["kv_cache"].append(t)
        t, full_ids = timed(full, device)
        times["re_encode"].append(t)
        if cached_ids != full_ids:
            raise SystemExit(f"The two methods disagree:\n{cached_ids}\n{full_ids}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        runs = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"{name:>10}: median {t:.3f} s/reply ({1000 * t / args.new_tokens:.1f} ms/token)  runs [{runs}]")
    print(f"speed-up (re_encode / kv_cache): {med['re_encode'] / med['kv_cache']:.1f}x  (goal >= 5x); same tokens: yes")


if __name__ == "__main__":
    main()
