#!/usr/bin/env python
"""A tiny double-heads model before and after a DPO stage, on held-out dialogs: LM Hits@1 (the gold ranked first
among its turn's candidates by sequence log-probability), MC Hits@1 (by the multiple-choice head) and the gold
reply's token perplexity.

The dialogs are split by dialog into a training part and a held-out part; a random tiny GPT-2 (tokenizer trained on
the training part) gets a double-heads run, then `--objective dpo` from that folder on the same training dialogs,
both through `run_persona.main`. Ties count against the gold (`persona_metrics.gold_rank`).

    python bench/dpo_heldout.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def heldout_scores(folder: str, dialogs, batch_size: int = 4) -> dict[str, float]:
    """LM Hits@1, MC Hits@1 and gold perplexity of the model in `folder` over every turn of `dialogs`."""
    import torch

    from persona_collator import PersonaCollator
    from persona_data import build_features
    from persona_dpo import candidate_logps
    from persona_metrics import gold_rank
    from persona_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(folder)
    model.eval()
    rows = build_features(dialogs, tokenizer, num_candidates=None, max_history=2, max_length=512)
    collator = PersonaCollator(tokenizer.pad_token_id)
    lm_hits = mc_hits = nll = tokens = 0.0
    with torch.no_grad():
        for start in range(0, rows.num_rows, batch_size):
            batch = collator(list(rows.select(range(start, min(start + batch_size, rows.num_rows)))))
            logps, outputs = candidate_logps(model, batch)
            gold = batch["mc_labels"]
            lm_hits += float((gold_rank(logps, gold) == 0).sum())
            mc_hits += float((gold_rank(outputs.mc_logits.float(), gold) == 0).sum())
            nll += float(outputs.lm_candidate_nll.gather(1, gold[:, None]).sum())
            tokens += float(outputs.lm_candidate_tokens.gather(1, gold[:, None]).sum())
    return {"lm_hits@1": lm_hits / rows.num_rows, "mc_hits@1": mc_hits / rows.num_rows, "ppl": math.exp(nll / tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="persona dialogs (e.g. Synthetic-Persona-Chat CSV)")
    parser.add_argument("--train_dialogs", type=int, default=300)
    parser.add_argument("--heldout_dialogs", type=int, default=40)
    parser.add_argument("--double_heads_steps", type=int, default=300)
    parser.add_argument("--dpo_steps", type=int, default=100)
    parser.add_argument("--dpo_learning_rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["pairwise:0", "pairwise:1", "listwise:0"],
        help="DPO stages to train from the same double-heads run, each LOSS:LM_COEF (--dpo_loss, --lm_coef)",
    )
    args = parser.parse_args()

    import torch

    from persona_data import load_dialogs
    from persona_synthetic import make_tiny_checkpoint
    from run_persona import main as train
    from run_persona import parse_args

    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="dpo-heldout-")
    splits = load_dialogs(args.dataset_path)
    dialogs = next(iter(splits.values())).shuffle(seed=0)
    train_part = dialogs.select(range(args.train_dialogs))
    heldout = dialogs.select(range(args.train_dialogs, args.train_dialogs + args.heldout_dialogs))
    data = os.path.join(workdir, "dialogs.json")
    with open(data, "w") as f:
        json.dump({"train": train_part.to_list(), "valid": heldout.to_list()}, f)
    texts = [s for d in train_part for s in d["personality"] + [c for u in d["utterances"] for c in u["candidates"]]]
    checkpoint = make_tiny_checkpoint(
        os.path.join(workdir, "tiny"), texts, n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=1000
    )
    common = ["--dataset_path", data, "--dataset_cache", os.path.join(workdir, "cache"), "--use_cpu", "true",
              "--report_to", "none", "--do_eval", "false", "--save_strategy", "no", "--num_candidates", "4",
              "--max_length", "512", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
              "--logging_steps", "25", "--disable_tqdm", "true", "--seed", "0"]  # fmt: skip
    double_heads = os.path.join(workdir, "double-heads")
    train(*parse_args([*common, "--model_name_or_path", checkpoint, "--output_dir", double_heads,
                       "--max_steps", str(args.double_heads_steps), "--learning_rate", "1e-3"]))  # fmt: skip
    scores = {"double heads": heldout_scores(double_heads, heldout)}
    for variant in args.variants:
        dpo_loss, lm_coef = variant.split(":")
        dpo = os.path.join(workdir, f"dpo-{dpo_loss}-{lm_coef}")
        stage = ["--objective", "dpo", "--beta", str(args.beta), "--dpo_loss", dpo_loss, "--lm_coef", lm_coef,
                 "--max_steps", str(args.dpo_steps), "--learning_rate", str(args.dpo_learning_rate)]  # fmt: skip
        train(*parse_args([*common, "--model_name_or_path", double_heads, "--output_dir", dpo, *stage]))
        scores[f"DPO {dpo_loss}, lm_coef {lm_coef}"] = heldout_scores(dpo, heldout)
    turns = sum(len(d["utterances"]) for d in heldout)
    print(
        f"held-out: {args.heldout_dialogs} dialogs, {turns} turns, all candidates of each turn (double heads "
        f"{args.double_heads_steps} steps, then DPO {args.dpo_steps} steps, beta {args.beta})"
    )
    print(f"{'model':28s} {'LM Hits@1':>10s} {'MC Hits@1':>10s} {'gold ppl':>10s}")
    for name, score in scores.items():
        print(f"{name:28s} {score['lm_hits@1']:10.4f} {score['mc_hits@1']:10.4f} {score['ppl']:10.2f}")


if __name__ == "__main__":
    main()
