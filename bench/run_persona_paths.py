#!/usr/bin/env python
"""End-to-end: `run_persona.py` evaluation (20 candidates) and training (4 candidates) per candidate encoding.

    python bench/run_persona_paths.py                                   # synthetic dialogs
    python bench/run_persona_paths.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv

What the encoding targets are defined on: the real entry point, each run a fresh `run_persona.py` process (torch
threads from OMP_NUM_THREADS) on a tiny random GPT-2 (2 layers, 64 wide) with a BPE tokenizer trained on the dialogs.
Evaluation: `--do_train false --do_eval` on `--eval_dialogs` held-out dialogs, every candidate ranked, batch 4; the
time is the Trainer's `eval_runtime` and every metric must agree with the plain run's to 1e-4. Training: one epoch
over `--train_rows` rows of `--train_candidates` candidates, batch 4, dropout 0; the time is `train_runtime` and
the training loss must agree. Runs of one setting follow each other (plain, then the others), so that a load from
other jobs hits them alike; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def prepare(args, workdir: str) -> tuple[str, str]:
    """A PERSONA-CHAT JSON (train / valid dialogs) and a tiny GPT-2 checkpoint trained-tokenizer on its text."""
    from persona_data import load_dialogs
    from persona_synthetic import corpus_texts, make_synthetic_personachat, make_tiny_checkpoint

    if args.dataset_path:
        split = next(iter(load_dialogs(args.dataset_path).values()))
        rows = [split[i] for i in range(min(split.num_rows, args.eval_dialogs + args.train_dialogs))]
        data = {"valid": rows[: args.eval_dialogs], "train": rows[args.eval_dialogs :]}
    else:
        data = make_synthetic_personachat(num_train=args.train_dialogs, num_valid=args.eval_dialogs, seed=0)
    keep = ("personality", "utterances")
    data = {split: [{k: d[k] for k in keep} for d in dialogs] for split, dialogs in data.items()}
    data_path = os.path.join(workdir, "dialogs.json")
    with open(data_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    model_path = make_tiny_checkpoint(os.path.join(workdir, "tiny"), corpus_texts(data), vocab_size=2000)
    # Dropout 0: the training runs of every encoding then take the same steps (dropout masks differ in shape).
    config_path = os.path.join(model_path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update({k: 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")})
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return data_path, model_path


def run(args, workdir: str, data_path: str, model_path: str, phase: str, encoding: str, threads: int) -> dict:
    """One run_persona.py process; its saved metrics."""
    out = os.path.join(workdir, f"{phase}-{encoding}-{threads}")
    common = ["--model_name_or_path", model_path, "--dataset_path", data_path, "--output_dir", out]
    common += ["--candidate_encoding", encoding, "--report_to", "none", "--use_cpu", "true", "--seed", "0"]
    common += ["--dataset_cache", os.path.join(workdir, "cache"), "--disable_tqdm", "true"]
    if phase == "eval":
        flags = ["--do_train", "false", "--do_eval", "true", "--per_device_eval_batch_size", str(args.batch_size)]
    else:
        flags = ["--do_train", "true", "--do_eval", "false", "--num_candidates", str(args.train_candidates)]
        flags += ["--max_train_samples", str(args.train_rows), "--per_device_train_batch_size", str(args.batch_size)]
        flags += ["--num_train_epochs", "1", "--save_strategy", "no", "--logging_strategy", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_persona.py"), *common, *flags],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=None if args.verbose else subprocess.DEVNULL,
    )
    with open(os.path.join(out, f"{phase}_results.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="Dialogs to use (default: synthetic ones).")
    parser.add_argument("--eval_dialogs", type=int, default=100)
    parser.add_argument("--train_dialogs", type=int, default=200)
    parser.add_argument("--train_rows", type=int, default=400)
    parser.add_argument("--train_candidates", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--phases", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--encodings", nargs="+", default=["plain", "packed"])
    parser.add_argument("--verbose", action="store_true", help="Show the runs' logs.")
    args = parser.parse_args(argv)
    if args.encodings[0] != "plain":
        parser.error("--encodings must start with plain (the reference of every ratio)")

    with tempfile.TemporaryDirectory() as workdir:
        data_path, model_path = prepare(args, workdir)
        # The features map once, outside the timed runs (every later run reads the cache).
        run(args, workdir, data_path, model_path, "eval", "plain", 2) if "eval" in args.phases else None
        for phase in args.phases:
            key = "eval_runtime" if phase == "eval" else "train_runtime"
            for threads in args.threads:
                results = {e: run(args, workdir, data_path, model_path, phase, e, threads) for e in args.encodings}
                plain = results["plain"]
                cells = []
                for encoding, metrics in results.items():
                    ratio = plain[key] / metrics[key]
                    cells.append(f"{encoding} {metrics[key]:.1f} s ({ratio:.2f}x)")
                    checked = [k for k in plain if k.startswith(("eval_", "train_loss")) and "runtime" not in k]
                    checked = [k for k in checked if "per_second" not in k and "preparation" not in k]
                    diff = max(abs(metrics[k] - plain[k]) for k in checked)
                    if diff > 1e-4:
                        cells[-1] += f" METRICS DIFFER by {diff:.1e}"
                rows = f"{results['plain'].get('eval_samples', results['plain'].get('train_samples'))} rows"
                print(f"{phase:<5} threads {threads}  {rows}:  " + "  ".join(cells), flush=True)
                if phase == "eval" and threads == args.threads[0]:
                    print("      metrics:", {k: round(v, 4) for k, v in plain.items() if k in checked}, flush=True)


if __name__ == "__main__":
    main()
