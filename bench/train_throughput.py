#!/usr/bin/env python
"""Training throughput: persona-chat's pipeline vs the reference's, same data, same model, one run.

Reference method (transfer-learning-conv-ai train.py): every example padded to the longest of the whole dataset,
`GPT2DoubleHeadsModel` computing LM logits for every candidate and position. Ours: `PersonaCollator` pads per batch
and the double-heads loss runs the LM head only on labelled tokens. Each variant runs in its own process so that its
peak memory (max RSS) is its own. Also times the features map: first build and cached re-run.

    python bench/train_throughput.py                       # synthetic dialogs, GPT-2-vocab model
    python bench/train_throughput.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def prepare(args, workdir: str) -> dict:
    """Tokenizer, dialogs and features (timing the first and the cached map)."""
    from bench_data import bench_dialogs

    from persona_data import build_features
    from persona_model import add_special_tokens
    from persona_synthetic import train_tiny_tokenizer

    dialogs, texts = bench_dialogs(args.dataset_path, workdir, num_train=args.num_dialogs)
    tokenizer = train_tiny_tokenizer(texts, os.path.join(workdir, "tok"), vocab_size=2000)
    add_special_tokens(None, tokenizer)
    tokenizer.save_pretrained(os.path.join(workdir, "tok"))
    kw = dict(num_candidates=args.num_candidates, max_history=2, max_length=512, cache_dir=os.path.join(workdir, "c"))
    t0 = time.perf_counter()
    build_features(dialogs, tokenizer, **kw)
    t1 = time.perf_counter()
    feats = build_features(dialogs, tokenizer, **kw)
    t2 = time.perf_counter()
    feats = feats.select(range(min(args.num_examples, feats.num_rows)))
    feats.save_to_disk(os.path.join(workdir, "feats"))
    return {"map_first_s": t1 - t0, "map_cached_s": t2 - t1, "rows": feats.num_rows}


def run_variant(variant: str, args, workdir: str, queue) -> None:
    import datasets
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2DoubleHeadsModel

    from persona_backbone import PersonaGPT2DoubleHeadsModel
    from persona_collator import PersonaCollator

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "tok"))
    feats = datasets.load_from_disk(os.path.join(workdir, "feats"))
    config = GPT2Config(
        vocab_size=args.vocab_size, n_positions=512, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head
    )
    model_cls = PersonaGPT2DoubleHeadsModel if variant == "persona-chat" else GPT2DoubleHeadsModel
    model = model_cls(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pad_to = max(len(s) for row in feats["input_ids"] for s in row) if variant == "reference" else None

    collate = PersonaCollator(tokenizer.pad_token_id)
    rows = list(feats)
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    real_tokens, start = 0, None
    for step, rows_b in enumerate(batches):
        if step == args.warmup:
            start, real_tokens = time.perf_counter(), 0
        batch = collate(rows_b)
        if pad_to is not None:  # the reference pads everything to the dataset's longest example
            extra = pad_to - batch["input_ids"].shape[-1]
            for key, value in (("input_ids", tokenizer.pad_token_id), ("token_type_ids", tokenizer.pad_token_id),
                               ("labels", -100), ("attention_mask", 0)):  # fmt: skip
                batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
            batch.pop("attention_mask")  # the reference passes none
        out = model(**batch)
        (out.loss + out.mc_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real_tokens += int(sum(len(s) for r in rows_b for s in r["input_ids"]))
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"variant": variant, "tokens_per_s": real_tokens / elapsed, "peak_rss_mb": peak_mb, "pad_to": pad_to})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="Real data (any reader format); default: synthetic.")
    parser.add_argument("--num_dialogs", type=int, default=300)
    parser.add_argument("--num_examples", type=int, default=96)
    parser.add_argument("--num_candidates", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=50262, help="GPT-2's vocabulary + 5 persona tokens.")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        prep = prepare(args, workdir)
        ctx = mp.get_context("spawn")
        results = {}
        for variant in ("reference", "persona-chat"):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_variant, args=(variant, args, workdir, queue))
            proc.start()
            results[variant] = queue.get()
            proc.join()
    ref, ours = results["reference"], results["persona-chat"]
    print(f"features map: first {prep['map_first_s']:.2f}s, cached {prep['map_cached_s']:.2f}s "
          f"({prep['map_first_s'] / max(prep['map_cached_s'], 1e-9):.1f}x), {prep['rows']} rows")  # fmt: skip
    print(f"model: {args.n_layer} layers x {args.n_embd}, vocab {args.vocab_size}; batch {args.batch_size} x "
          f"{args.num_candidates} candidates; reference pads to {ref['pad_to']} tokens")  # fmt: skip
    for r in (ref, ours):
        print(f"{r['variant']:>13}: {r['tokens_per_s']:8.0f} real tokens/s, peak RSS {r['peak_rss_mb']:7.0f} MB")
    print(f"throughput ratio persona-chat / reference: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x; "
          f"peak memory ratio: {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
