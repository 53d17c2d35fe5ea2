#!/usr/bin/env python
"""DPO step time: persona-chat's `--objective dpo` against TRL's `DPOTrainer` on the same triples, same backbone.

Each turn of k rejected replies is one row for persona-chat (its context encoded once, every candidate behind it,
the reference log-probabilities computed once before training) and k (prompt, chosen, rejected) triples for TRL
(each triple's prompt encoded twice, and twice more by the reference model, every step). Both train the same tiny
GPT-2 on the same token ids (no token types: TRL has none) with SGD, batches of the same triples; the figure is the
median optimizer-step time after a warm-up step, in one process, so the ratios come from one run.

    python bench/dpo_step.py                                   # synthetic dialogs
    python bench/dpo_step.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def step_times(trainer) -> list[float]:
    """Train and return the duration of each optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    return clock.times


def trl_triples(rows) -> list[dict]:
    """(prompt, chosen, rejected) ids of every (turn, rejected candidate): exactly the tokens persona-chat scores."""
    triples = []
    for row in rows:
        ids, ends, gold = row["input_ids"], row["mc_token_ids"], len(row["input_ids"]) - 1
        start = next(i for i, label in enumerate(row["labels"][gold]) if label != -100)
        chosen = ids[gold][start : ends[gold] + 1]
        for c in range(gold):
            rejected = ids[c][start : ends[c] + 1]
            triples.append({"prompt_ids": ids[gold][:start], "chosen_ids": chosen, "rejected_ids": rejected})
    return triples


def causal_lm(double_heads):
    """A plain GPT-2 causal LM holding the weights of a double-heads model (TRL trains causal LMs)."""
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel(double_heads.config)
    lm.load_state_dict(double_heads.state_dict(), strict=False)
    return lm


def trl_step_time(model, tokenizer, rows, k: int, precompute: bool, output_dir: str, turns: int, common: dict) -> float:
    """Median step time of TRL's DPOTrainer on the triples of `rows`: its reference model run each step (its
    default), or `precompute`: the reference log-probabilities of `rows` (ours, the same values) as its columns."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from persona_dpo import REF_COLUMN

    placeholder = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    trl_args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=turns * k, bf16=False, max_length=None,
        precompute_ref_log_probs=precompute, **common,
    )  # fmt: skip
    trl = DPOTrainer(
        model=causal_lm(model), ref_model=None if precompute else causal_lm(model), args=trl_args,
        train_dataset=placeholder, processing_class=tokenizer,
    )  # fmt: skip
    triples = trl_triples(rows)
    if precompute:
        refs = [(ref[-1], ref[c]) for ref in rows[REF_COLUMN] for c in range(len(ref) - 1)]
        for triple, (chosen, rejected) in zip(triples, refs, strict=True):
            triple.update(ref_chosen_logps=chosen, ref_rejected_logps=rejected)
    trl.train_dataset = Dataset.from_list(triples)
    return statistics.median(step_times(trl)[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="persona dialogs (default: synthetic)")
    parser.add_argument("--rejected", type=int, nargs="+", default=[1, 3], help="rejected replies per turn")
    parser.add_argument("--turns", type=int, default=4, help="turns per optimizer step")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer (the first is warm-up)")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import copy

    import torch
    from bench_data import bench_dialogs

    from persona_collator import PersonaCollator
    from persona_data import build_features
    from persona_dpo import PersonaDPOTrainer, add_reference_logps
    from persona_model import load_model_and_tokenizer
    from persona_synthetic import make_tiny_checkpoint
    from persona_trainer import PersonaTrainingArguments

    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="dpo-bench-")
    dialogs, texts = bench_dialogs(args.dataset_path, workdir, num_train=40)
    checkpoint = make_tiny_checkpoint(
        os.path.join(workdir, "tiny"), texts, n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_positions=512
    )
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    common = dict(
        max_steps=args.steps, learning_rate=1e-4, optim="sgd", lr_scheduler_type="constant", report_to="none",
        use_cpu=True, save_strategy="no", logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    print(f"tiny GPT-2 {args.n_layer} layers x {args.n_embd}, {args.turns} turns per step, {args.threads} thread(s)")
    for k in args.rejected:
        rows = build_features(dialogs, tokenizer, num_candidates=k + 1, max_history=2, max_length=512)
        rows = rows.remove_columns("token_type_ids").select(range(args.turns * args.steps))
        tokens = sum(len(ids) for r in rows for ids in r["input_ids"]) / rows.num_rows

        reference = copy.deepcopy(model)
        add_reference_logps(reference, rows.select(range(args.turns)), PersonaCollator(0), keep_in_memory=True)  # warm
        start = time.perf_counter()
        ours_rows = add_reference_logps(reference, rows, PersonaCollator(0), keep_in_memory=True)
        reference_s = time.perf_counter() - start
        ours_args = PersonaTrainingArguments(
            output_dir=os.path.join(workdir, f"ours{k}"), objective="dpo", per_device_train_batch_size=args.turns,
            gradient_accumulation_steps=1, do_eval=False, **common,
        )  # fmt: skip
        ours = PersonaDPOTrainer(
            model=copy.deepcopy(model), args=ours_args, train_dataset=ours_rows, data_collator=PersonaCollator(0)
        )
        ours_times = step_times(ours)[1:]

        trl = {
            pre: trl_step_time(
                model, tokenizer, ours_rows, k, pre, os.path.join(workdir, f"trl{k}{pre}"), args.turns, common
            )
            for pre in (False, True)
        }
        trl_s, trl_pre_s = trl[False], trl[True]
        ours_s = statistics.median(ours_times)
        print(
            f"{k} rejected/turn ({args.turns * k} pairs per step, {tokens:.0f} tokens per turn, all candidates): "
            f"persona-chat {ours_s * 1000:.0f} ms/step (+ reference pass {reference_s / rows.num_rows * 1000:.0f} ms "
            f"per turn, once), TRL DPOTrainer {trl_s * 1000:.0f} ms/step: {trl_s / ours_s:.2f}x faster (with the "
            f"reference pass spread over one epoch {trl_s / (ours_s + reference_s / args.steps):.2f}x); TRL with "
            f"precomputed reference log-probs {trl_pre_s * 1000:.0f} ms/step: {trl_pre_s / ours_s:.2f}x"
        )


if __name__ == "__main__":
    main()
