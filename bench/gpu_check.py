#!/usr/bin/env python
"""The first GPU check: the CUDA paths proved correct and the throughput measured, in one run of under 8 minutes.

    python bench/gpu_check.py                        # one CUDA GPU (H100 / H200 sizes); JSON under bench/results/
    python bench/gpu_check.py --smoke                # every part on CPU with tiny shapes, under a minute
    python bench/gpu_check.py --parts correctness_gpt2 train_gpt2-medium --output figures.json

Random-init models built from configs (no downloads), synthetic PERSONA-CHAT dialogs of realistic lengths
(`persona_synthetic`, ~100 tokens per candidate sequence with the 400-token BPE trained on them) or
`--dataset_path`. Every part runs in its own try block: a failure is recorded with its traceback and the run goes
on; the JSON is rewritten after each part, so a run cut short keeps what it measured. Parts:

- environment, peak_matmul: versions and the card; the bf16 peak, measured by a large matrix product (the MFU base).
- correctness_gpt2 / correctness_llama (GPT-2-small shape; a Llama shape with grouped-query attention): the same
  4-candidate batch through every candidate encoding (plain, cache broadcast, packed under the dense tree mask with
  several examples per row and with one, packed under the per-example tree attention), losses, mc_logits and every
  gradient against plain's, fp32 (relative error <= 1e-4) and bf16 autocast (against fp32: <= 1e-2, or <= 1.5x
  plain's own bf16 error, since two bf16 runs of a real-size model differ by about 1e-2); a 20-candidate forward too.
  Every forward (here and in the throughput parts) checks that the encoding asked for is the one that ran: one that
  does not apply falls back silently, and a fallback to plain would pass every comparison for nothing.
- fp16_trainer: `PersonaTrainer` with fp16=True (its GradScaler) against the same steps in fp32.
- generation: a KV-cached greedy reply (`persona_generation`; GPT-2 and Llama shapes, fp32) equal to the no-cache
  re-encoding one.
- train_<model> (GPT-2-small 124M, GPT-2-medium 355M; 4 candidates, bf16 autocast, AdamW): real tokens/s (every
  candidate's unpadded tokens), model FLOPs utilisation (6 * non-embedding parameters * the tokens the path actually
  runs through the model / time / the measured bf16 peak; packed runs each context once) and peak memory, per encoding.
- eval_<model>: 20-candidate ranking forward (no grad, bf16), turns/s and peak memory per encoding. Encodings timed:
  plain, shared_prefix, packed (what `auto` runs on the device: the dense tree mask on CUDA) and packed-tree.
- chat: GPT-2-small in bf16, milliseconds per generated token (`--new_tokens` forced greedy tokens, one reply).
- deepspeed_zero2: `PersonaTrainer` under configs/deepspeed/zero2.json on one device against the same steps without
  DeepSpeed (fp32 <= 1e-4, bf16 <= 1e-2), last, in a child process (a hang or crash costs only this part).

--smoke times in fp32 on one thread (CPU bf16 matrix products are slow; threads of a shared CPU wait on each other).
Goals (reported, not enforced): packed >= 2x plain training tokens/s at 4 candidates, >= 4x 20-candidate evaluation,
GPT-2-medium packed training >= 40% MFU, chat >= 100 tokens/s on GPT-2-small.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CHILD_ENV = "PERSONA_GPU_CHECK_CHILD"  # set in the child process that runs one part on its own
GPT2_VOCAB = 50257 + 5  # GPT-2's vocabulary plus the five persona tokens


def gpt2(layers: int, width: int, heads: int) -> dict:
    return {"n_layer": layers, "n_embd": width, "n_head": heads}


def llama(layers: int, width: int, heads: int, kv_heads: int, intermediate: int) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": intermediate}  # fmt: skip


# model -> (its size, the --smoke size)
SHAPES = {
    "gpt2-small": (gpt2(12, 768, 12), gpt2(2, 64, 4)),
    "gpt2-medium": (gpt2(24, 1024, 16), gpt2(3, 96, 4)),
    "llama-gqa": (llama(8, 1024, 16, 4, 2816), llama(2, 64, 4, 2, 128)),  # grouped queries: 4 (2) per kv head
}
TOLERANCES = {"fp32": 1e-4, "bf16": 1e-2}
FLOOR_FACTOR = 1.5  # bf16: an encoding may be this much further from fp32 than plain in bf16 is (`check_close`)
CORRECTNESS_PATHS = ["plain", "shared_prefix", "packed-dense", "packed-dense-1ex", "packed-tree"]
THROUGHPUT_PATHS = ["plain", "shared_prefix", "packed", "packed-tree"]  # packed: what `auto` runs on this device
GOALS = {"train_speedup": 2.0, "eval_speedup": 4.0, "mfu_gpt2-medium": 0.40, "chat_tokens_per_s": 100.0}
PARTS = ["environment", "peak_matmul", "correctness_gpt2", "correctness_llama", "fp16_trainer", "generation",
         "train_gpt2-small", "train_gpt2-medium", "eval_gpt2-small", "eval_gpt2-medium", "chat",
         "deepspeed_zero2"]  # fmt: skip


class Skipped(Exception):
    """A part that cannot run here; its message is the reason recorded."""


class CheckFailed(Exception):
    """A comparison beyond its tolerance."""


def relative_errors(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per key: |other - reference| / |reference| (Euclidean norms, in float64)."""
    errors = {}
    for key, ref in reference.items():
        ref, value = ref.detach().double().flatten(), other[key].detach().double().flatten()
        errors[key] = float((value - ref).norm() / ref.norm().clamp_min(1e-30))
    return errors


def check_close(
    errors: dict[str, dict[str, float]], tolerance: float, what: str, floor: dict[str, float] | None = None
) -> None:
    """Raise CheckFailed naming every (path, quantity) whose relative error exceeds `tolerance` (NaN fails too).

    With `floor` (per quantity: plain's own bf16 error against fp32), a quantity may also reach FLOOR_FACTOR times
    its floor. Two bf16 computations of a real-size model differ by about bf16's own error (~1e-2 on the gradients
    of GPT-2-small and of an 8 x 1024 Llama), so an encoding is judged against fp32, as close as plain in bf16 is.
    """
    bad = []
    for path, es in errors.items():
        for key, e in es.items():
            limit = max(tolerance, FLOOR_FACTOR * floor[key]) if floor else tolerance
            if not e <= limit:
                bad.append(f"{path} {key} {e:.2e}" + (f" (plain's own {floor[key]:.2e})" if floor else ""))
    if bad:
        raise CheckFailed(f"{what}: beyond {tolerance:g} relative: " + ", ".join(bad))


class Check:
    """What every part shares: the device, the tokenizer and dialogs, the sizes, and the results written as JSON."""

    def __init__(self, args):
        from persona_model import add_special_tokens
        from persona_synthetic import corpus_texts, make_synthetic_personachat, train_tiny_tokenizer

        self.args = args
        self.device = torch.device(args.device)
        self.shapes = {name: sizes[args.smoke] for name, sizes in SHAPES.items()}
        if args.dataset_path:
            from persona_data import load_dialogs

            splits = load_dialogs(args.dataset_path)
            rows = list(next(iter(splits.values())))[: args.max_dialogs]
            cut = max(1, len(rows) // 5)
            self.dialogs = {"valid": rows[:cut], "train": rows[cut:] or rows}
        else:
            self.dialogs = make_synthetic_personachat(num_train=args.max_dialogs, num_valid=args.max_dialogs // 4)
        with tempfile.TemporaryDirectory() as tmp:
            # 400 BPE tokens on this text give PERSONA-CHAT's lengths under GPT-2's tokenizer (~100-130 tokens).
            self.tokenizer = train_tiny_tokenizer(corpus_texts(self.dialogs), tmp, vocab_size=400)
        add_special_tokens(None, self.tokenizer)
        self.vocab_size = len(self.tokenizer) if args.smoke else GPT2_VOCAB
        self.results = {"meta": {"argv": sys.argv[1:], "device": str(self.device), "smoke": args.smoke,
                                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                 "goals": GOALS, "tolerances": TOLERANCES}, "parts": {}}  # fmt: skip
        self.started = time.perf_counter()
        self._features = None

    def model(self, shape: str) -> torch.nn.Module:
        """A random-init double-heads model of `shape` (dropout 0, so every encoding computes the same thing)."""
        from transformers import GPT2Config, LlamaConfig

        from persona_backbone import PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel, PersonaGPT2DoubleHeadsModel

        torch.manual_seed(0)
        vocab = {"vocab_size": self.vocab_size}
        ids = {"bos_token_id": self.tokenizer.bos_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        if shape.startswith("gpt2"):
            dropout = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"), 0.0)
            config = GPT2Config(**vocab, **ids, n_positions=1024, **dropout, **self.shapes[shape])
            return PersonaGPT2DoubleHeadsModel(config)
        shape_config = {"max_position_embeddings": 1024, "tie_word_embeddings": True, **self.shapes[shape]}
        config = LlamaConfig(**vocab, **ids, **shape_config)
        return PersonaDoubleHeadsModel(PersonaDoubleHeadsConfig.from_backbone(config, summary_first_dropout=0.0))

    def batches(self, num_candidates: int, batch_size: int, count: int) -> list[dict]:
        """`count` collated [B, C, T] batches on the device (`bench/shared_prefix.make_batches`)."""
        from shared_prefix import make_batches

        split = "valid" if num_candidates > 4 else "train"
        batches = make_batches(self.tokenizer, self.dialogs[split], num_candidates, batch_size, count, max_history=2)
        return [{k: v.to(self.device) for k, v in b.items()} for b in batches]

    def features(self):
        """The training rows (4 candidates) the Trainer parts read, built once."""
        if self._features is None:
            from datasets import Dataset

            from persona_data import build_features

            dialogs = Dataset.from_list(self.dialogs["train"])
            self._features = build_features(dialogs, self.tokenizer, num_candidates=4, max_history=2)
        return self._features

    def autocast(self, dtype: str):
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def run(self, name: str, part) -> None:
        """Run one part in its own try block; record its status, figures, time (and traceback) and rewrite the JSON."""
        record = self.results["parts"][name] = {"status": "running"}
        start = time.perf_counter()
        try:
            if time.perf_counter() - self.started > self.args.deadline_s:
                raise Skipped(f"out of time: the run passed --deadline_s {self.args.deadline_s}")
            part(self, record)
            record["status"] = "ok"
        except Skipped as skip:
            record.update(status="skipped", reason=str(skip))
        except CheckFailed as failure:
            record.update(status="failed", reason=str(failure))
        except Exception as error:  # noqa: BLE001 (any failure is a finding; the next part still runs)
            record.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.reset_memory()
        self.write()
        print(f"[{time.perf_counter() - self.started:6.1f}s] {name}: {record['status']}", flush=True)

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.output)), exist_ok=True)
        with open(self.args.output, "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters of the per-token matrix work: without the embedding tables (the LM head runs on labelled tokens
    only, so its tied table is no per-token cost either)."""
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def tokens_run(batch: dict, path: str) -> tuple[int, int]:
    """(real tokens of every candidate, tokens the path runs through the model: the context once if shared)."""
    from persona_shared_prefix import shared_prefix_lengths

    real = int(batch["attention_mask"].sum())
    if path == "plain":
        return real, real
    keys = ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids", "labels")
    prefix = shared_prefix_lengths(*(batch[k] for k in keys))  # [B]
    num_candidates = batch["input_ids"].size(1)
    return real, real - int(prefix.sum()) * (num_candidates - 1)


# --- parts -------------------------------------------------------------------------------------------------------


def part_environment(check: Check, record: dict) -> None:
    names = ["torch", "transformers", "accelerate", "datasets", "evaluate", "deepspeed", "peft", "pyarrow", "fsspec",
             "tokenizers", "numpy", "persona-chat"]  # fmt: skip
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    record.update(python=platform.python_version(), versions=versions, cuda=torch.version.cuda)
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        record.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1))
        record.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    lengths = [n for b in check.batches(4, 8, 4) for n in b["attention_mask"].sum(-1).flatten().tolist()]
    record["tokens_per_candidate"] = {"mean": round(statistics.mean(lengths), 1), "max": max(lengths)}
    card, mean = record.get("card", platform.processor() or "cpu"), record["tokens_per_candidate"]["mean"]
    record["summary"] = (
        f"{card}, torch {versions['torch']}, transformers {versions['transformers']}, ~{mean:.0f} tokens/candidate"
    )


def part_peak_matmul(check: Check, record: dict) -> None:
    n = 8192 if check.device.type == "cuda" else 512  # a CPU only runs it to keep the part working
    a, b = (torch.randn(n, n, device=check.device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    check.synchronize()
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    check.synchronize()
    record["bf16_tflops"] = 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    record["size"] = n
    record["summary"] = f"bf16 {n}^3 matrix product: {record['bf16_tflops']:.3g} TFLOP/s"


def forward_on(model, path: str, batch: dict, ran: dict | None = None):
    """The double-heads forward on `path` (`bench/shared_prefix.PATHS`). An encoding that does not apply falls back
    silently to the next one, which would make every comparison trivially pass: CheckFailed unless the encoding
    `persona_encoding` logged for this call is the one asked for (and the packed attention, where one is forced).
    `ran[path]` gets that log line."""
    from shared_prefix import PATHS, forward

    from persona_encoding import set_candidate_encoding

    encoding, _, attention = PATHS[path]
    set_candidate_encoding(model, encoding)
    logged = model.__dict__.setdefault("_persona_encoding_logged", set())  # persona_encoding logs each line once
    logged.clear()
    out = forward(model, path, batch)
    message = " | ".join(sorted(logged)) or "nothing logged"
    expected = f"Candidate encoding: {encoding} (asked for {encoding})."
    if attention not in (None, "auto"):
        expected += f" Packed attention: {attention}."
    if not message.startswith(expected) or (attention not in (None, "auto") and message != expected):
        raise CheckFailed(f"{path} did not run as asked ({expected}): {message}")
    if ran is not None:
        ran[path] = message
    return out


def encoding_outputs(model, path: str, batch: dict, autocast, grads: bool, ran: dict) -> dict[str, torch.Tensor]:
    """Losses, mc_logits and (with `grads`) every parameter gradient concatenated, of one forward on `path`."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads), autocast:
        out = forward_on(model, path, batch, ran)
    result = {"lm_loss": out.lm_loss.float(), "mc_loss": out.mc_loss.float(), "mc_logits": out.mc_logits.float()}
    if grads:
        (out.lm_loss + out.mc_loss).backward()
        result["grads"] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return {k: v.detach() for k, v in result.items()}


def correctness(shape: str):
    def part(check: Check, record: dict) -> None:
        model = check.model(shape).to(check.device).train()
        batches = ((check.batches(4, 4, 1)[0], True, "4c"), (check.batches(20, 2, 1)[0], False, "20c"))
        ran = record.setdefault("encodings", {})
        errors = {name: {} for name in ("fp32", "bf16", "bf16_vs_fp32")}
        floor = {}  # plain's own bf16 error against fp32
        for batch, grads, tag in batches:

            def outputs(path: str, dtype: str, batch=batch, grads=grads) -> dict[str, torch.Tensor]:
                return encoding_outputs(model, path, batch, check.autocast(dtype), grads, ran)

            def tagged(reference: dict, other: dict, tag=tag) -> dict[str, float]:
                return {f"{key}_{tag}": e for key, e in relative_errors(reference, other).items()}

            fp32, bf16 = outputs("plain", "fp32"), outputs("plain", "bf16")
            floor.update(tagged(fp32, bf16))
            for path in CORRECTNESS_PATHS[1:]:
                errors["fp32"].setdefault(path, {}).update(tagged(fp32, outputs(path, "fp32")))
                other = outputs(path, "bf16")
                errors["bf16"].setdefault(path, {}).update(tagged(bf16, other))
                errors["bf16_vs_fp32"].setdefault(path, {}).update(tagged(fp32, other))
        record.update(errors, bf16_plain_vs_fp32=floor)
        for name, es in errors.items():
            record[f"{name}_worst"] = max(e for path_errors in es.values() for e in path_errors.values())
        record["summary"] = (
            f"vs plain: fp32 worst {record['fp32_worst']:.1e} (tol 1e-4), bf16 {record['bf16_worst']:.1e}; bf16 vs "
            f"fp32 {record['bf16_vs_fp32_worst']:.1e} (plain's own {max(floor.values()):.1e})"
        )
        failures = []
        for what, es, tolerance, limits in (
            ("fp32", errors["fp32"], TOLERANCES["fp32"], None),
            ("bf16 vs fp32", errors["bf16_vs_fp32"], TOLERANCES["bf16"], floor),
        ):
            try:
                check_close(es, tolerance, what, floor=limits)
            except CheckFailed as failure:
                failures.append(str(failure))
        if failures:
            raise CheckFailed("; ".join(failures))

    return part


def trainer_losses(check: Check, shape: str, steps: int, **training_args) -> tuple[list[float], object]:
    """Losses of `steps` PersonaTrainer steps (batch 4, 4 candidates) on a fresh model of `shape`, and the trainer."""
    from transformers import PrinterCallback

    from persona_collator import PersonaCollator
    from persona_trainer import PersonaTrainer, PersonaTrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = PersonaTrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            logging_steps=1, save_strategy="no", report_to="none", do_eval=False, disable_tqdm=True, seed=0,
            use_cpu=check.device.type == "cpu", **training_args,
        )  # fmt: skip
        trainer = PersonaTrainer(
            model=check.model(shape),
            args=args,
            train_dataset=check.features(),
            data_collator=PersonaCollator(pad_token_id=check.tokenizer.pad_token_id),
            processing_class=check.tokenizer,
        )
        trainer.remove_callback(PrinterCallback)  # the losses go to the JSON, not to the terminal
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def compare_losses(
    record: dict, name: str, losses: list[float], reference: list[float], tolerance: float, compared: int | None = None
) -> None:
    """Record both runs' losses; CheckFailed unless every loss is finite and the first `compared` (default all) are
    within `tolerance` (relative) of the reference's."""
    errors = [abs(a - b) / abs(b) for a, b in zip(losses, reference)]
    record[name] = {"losses": losses, "reference_losses": reference, "relative_errors": errors}
    finite = all(math.isfinite(x) for x in losses) and len(losses) == len(reference)
    if not finite or not all(e <= tolerance for e in errors[:compared]):
        raise CheckFailed(f"{name}: losses {losses} vs {reference} (tolerance {tolerance:g} relative)")


def part_fp16_trainer(check: Check, record: dict) -> None:
    steps = check.args.trainer_steps
    reference, _ = trainer_losses(check, "gpt2-small", steps)
    losses, trainer = trainer_losses(check, "gpt2-small", steps, fp16=True)
    scaler = trainer.accelerator.scaler
    record["loss_scale"] = scaler.get_scale() if scaler is not None else None
    # The first step only: the scaler may skip an update on overflow (its job), after which the runs part ways.
    compare_losses(record, "fp16_vs_fp32", losses, reference, 1e-2, compared=1)
    record["summary"] = f"{steps} steps, losses {losses[0]:.4f}.. vs fp32 {reference[0]:.4f}.."
    record["summary"] += f", loss scale {record['loss_scale']}"
    if scaler is None:
        raise Skipped(f"no GradScaler on {check.device.type} (accelerate scales fp16 losses on accelerators only); "
                      f"the fp16 steps ran: {record['summary']}")  # fmt: skip


def part_deepspeed_zero2(check: Check, record: dict) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skipped("deepspeed is not importable (pip install deepspeed, or carry its wheel: bench/gpu_wheels.sh)")
    if check.device.type == "cpu" and not check.args.deepspeed_on_cpu:
        raise Skipped("on CPU DeepSpeed first JIT-compiles its shared-memory op (minutes); tests/test_distributed.py "
                      "runs ZeRO on CPU. --deepspeed_on_cpu runs it here anyway")  # fmt: skip
    if os.environ.get(CHILD_ENV):  # the child: run it in this process
        config = os.path.join(ROOT, "configs", "deepspeed", "zero2.json")
        precisions = [("fp32", {}, TOLERANCES["fp32"])]
        if check.device.type == "cuda" and torch.cuda.is_bf16_supported():
            precisions.append(("bf16", {"bf16": True}, TOLERANCES["bf16"]))
        steps = check.args.trainer_steps
        for name, precision, tolerance in precisions:
            reference, _ = trainer_losses(check, "gpt2-small", steps, **precision)
            losses, trainer = trainer_losses(check, "gpt2-small", steps, deepspeed=config, **precision)
            if not trainer.is_deepspeed_enabled:
                raise CheckFailed("the Trainer did not run DeepSpeed")
            compare_losses(record, f"zero2_{name}", losses, reference, tolerance)
        record["summary"] = ", ".join(f"{p} losses match ({record[f'zero2_{p}']['relative_errors'][-1]:.1e})"
                                      for p, _, _ in precisions)  # fmt: skip
        return
    with socket.socket() as s:  # a free port for the single-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, CHILD_ENV: "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "child.json")
        argv = [sys.executable, os.path.abspath(__file__), *_keep_options(sys.argv[1:]), "--parts", "deepspeed_zero2"]
        # Last in the run, so that a hang costs only this part; it ends with the run's time (--deadline_s + 60 s).
        left = check.args.deadline_s + 60 - (time.perf_counter() - check.started)
        timeout = max(30.0, min(check.args.deepspeed_timeout_s, left))
        proc = subprocess.run([*argv, "--output", output], env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(output):
            raise RuntimeError(f"the child process exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        with open(output, encoding="utf-8") as f:
            child = json.load(f)["parts"]["deepspeed_zero2"]
    record.update({k: v for k, v in child.items() if k not in ("status", "seconds")})
    if child["status"] == "skipped":
        raise Skipped(child["reason"])
    if child["status"] == "failed":
        raise CheckFailed(child["reason"] + ("\n" + child["traceback"] if "traceback" in child else ""))


def _keep_options(argv: list[str]) -> list[str]:
    """The command line without the values of --parts and --output (the child gets its own)."""
    kept, skip = [], False
    for arg in argv:
        if arg.startswith("--"):
            skip = arg.split("=", 1)[0] in ("--parts", "--output")
        if not skip:
            kept.append(arg)
    return kept


def part_generation(check: Check, record: dict) -> None:
    from chat_latency import reference_reply

    from persona_generation import generate_reply_ids
    from persona_synthetic import make_dialog

    persona, turns, _ = make_dialog(random.Random(1))
    history, new_tokens = turns[:5], check.args.new_tokens
    for shape in ("gpt2-small", "llama-gqa"):
        model = check.model(shape).to(check.device).eval()
        options = {"no_sample": True, "max_new_tokens": new_tokens, "min_length": new_tokens}
        cached = generate_reply_ids(model, check.tokenizer, [(persona, history)], max_history=2, **options)[0]
        full = reference_reply(model, check.tokenizer, persona, history, 2, new_tokens)
        record[shape] = {"kv_cache": cached, "no_cache": full}
        if cached != full:
            first = next(i for i, (a, b) in enumerate(zip(cached, full)) if a != b)
            raise CheckFailed(f"{shape}: the cached greedy reply leaves the no-cache one at token {first}")
    record["summary"] = f"{new_tokens} greedy tokens, fp32, GPT-2 and Llama shapes: KV-cached == no cache"


def throughput(shape: str, phase: str):
    def part(check: Check, record: dict) -> None:
        args = check.args
        train = phase == "train"
        num_candidates, batch_size = (4, args.train_batch_size) if train else (20, args.eval_batch_size)
        batches = check.batches(num_candidates, batch_size, args.warmup + args.steps)
        base = check.model(shape)
        params = non_embedding_parameters(base)
        peak = check.results["parts"].get("peak_matmul", {}).get("bf16_tflops")
        record.update(dtype=args.dtype, parameters=sum(p.numel() for p in base.parameters()))
        ran = record["encodings"] = {}
        record.update(non_embedding_parameters=params, shape=list(batches[0]["input_ids"].shape), steps=args.steps)
        for path in THROUGHPUT_PATHS:
            check.reset_memory()
            model = copy.deepcopy(base).to(check.device).train(train)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if train else None

            def step(batch, model=model, optimizer=optimizer, path=path):
                with torch.set_grad_enabled(train), check.autocast(args.dtype):
                    out = forward_on(model, path, batch, ran)
                if train:
                    (out.lm_loss + out.mc_loss).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            for batch in batches[: args.warmup]:
                step(batch)
            check.synchronize()
            start = time.perf_counter()
            for batch in batches[args.warmup :]:
                step(batch)
            check.synchronize()
            seconds = time.perf_counter() - start
            real, run = map(sum, zip(*(tokens_run(b, path) for b in batches[args.warmup :])))
            figures = {
                "seconds": seconds,
                "tokens_per_s": real / seconds,
                "model_tokens_per_s": run / seconds,
                "turns_per_s": args.steps * batch_size / seconds,
                "peak_memory_gib": check.peak_memory_gib(),
            }
            if train and peak:
                figures["mfu"] = 6 * params * run / seconds / (peak * 1e12)
            record[path] = figures
            del model, optimizer, step  # before the next path's peak memory is measured
        for path in THROUGHPUT_PATHS:
            record[path]["speedup"] = record["plain"]["seconds"] / record[path]["seconds"]
        goal = GOALS["train_speedup" if train else "eval_speedup"]
        record["goal_speedup"] = goal
        record["goal_met"] = record["packed"]["speedup"] >= goal
        unit = "tokens/s" if train else "turns/s"
        key = "tokens_per_s" if train else "turns_per_s"
        packed, plain = record["packed"], record["plain"]
        summary = f"packed {packed[key]:.4g} vs plain {plain[key]:.4g} {unit}: {packed['speedup']:.2f}x"
        summary += f" (goal >= {goal:g}x), tree {record['packed-tree']['speedup']:.2f}x"
        if train and "mfu" in record["packed"]:
            summary += f"; MFU packed {record['packed']['mfu']:.1%}, plain {record['plain']['mfu']:.1%}"
            if shape == "gpt2-medium":
                record["mfu_goal_met"] = record["packed"]["mfu"] >= GOALS["mfu_gpt2-medium"]
                summary += f" (goal >= {GOALS['mfu_gpt2-medium']:.0%})"
        if check.device.type == "cuda":
            summary += f"; peak memory {plain['peak_memory_gib']:.1f} / {packed['peak_memory_gib']:.1f} GiB"
        record["summary"] = summary

    return part


def part_chat(check: Check, record: dict) -> None:
    from persona_generation import generate_reply_ids
    from persona_synthetic import make_dialog

    persona, turns, _ = make_dialog(random.Random(1))
    new_tokens = check.args.new_tokens
    dtype = check.args.dtype
    model = check.model("gpt2-small").to(check.device, torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    options = {"no_sample": True, "max_new_tokens": new_tokens, "min_length": new_tokens}
    check.reset_memory()
    times = []
    for _ in range(1 + check.args.chat_repeats):  # the first one warms up
        start = time.perf_counter()
        generate_reply_ids(model, check.tokenizer, [(persona, turns[:5])], max_history=2, **options)
        check.synchronize()
        times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times[1:]) / new_tokens
    record.update(
        dtype=dtype, ms_per_token=ms, tokens_per_s=1000 / ms, runs_s=times, peak_memory_gib=check.peak_memory_gib()
    )
    record["goal_met"] = record["tokens_per_s"] >= GOALS["chat_tokens_per_s"]
    record["summary"] = (
        f"{ms:.2f} ms/token = {1000 / ms:.0f} tokens/s (goal >= {GOALS['chat_tokens_per_s']:g}), {dtype}"
    )


PART_FUNCTIONS = {
    "environment": part_environment,
    "peak_matmul": part_peak_matmul,
    "correctness_gpt2": correctness("gpt2-small"),
    "correctness_llama": correctness("llama-gqa"),
    "fp16_trainer": part_fp16_trainer,
    "deepspeed_zero2": part_deepspeed_zero2,
    "generation": part_generation,
    "train_gpt2-small": throughput("gpt2-small", "train"),
    "train_gpt2-medium": throughput("gpt2-medium", "train"),
    "eval_gpt2-small": throughput("gpt2-small", "eval"),
    "eval_gpt2-medium": throughput("gpt2-medium", "eval"),
    "chat": part_chat,
}


def table(results: dict) -> str:
    parts = results["parts"]
    width = max(map(len, parts))
    lines = [f"{'part':<{width}}  {'status':<7}  {'s':>6}  figures"]
    for name, record in parts.items():
        text = record.get("summary", "") if record["status"] == "ok" else record.get("reason", "").splitlines()[0]
        lines.append(f"{name:<{width}}  {record['status']:<7}  {record.get('seconds', 0):>6.1f}  {text}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Every part on CPU with tiny shapes (under a minute).")
    parser.add_argument("--output", default=None, help="JSON of every figure (default bench/results/gpu_check-*.json).")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--device", default=None, help="Default: cuda when available (cpu with --smoke).")
    parser.add_argument("--dataset_path", default=None, help="Real dialogs (any persona-train format); else synthetic.")
    parser.add_argument("--max_dialogs", type=int, default=None, help="Dialogs to use (default 200; 24 with --smoke).")
    parser.add_argument("--train_batch_size", type=int, default=None, help="Examples per training step (default 32).")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="Turns per evaluation step (default 32).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per encoding (default 10).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3).")
    parser.add_argument("--chat_repeats", type=int, default=None, help="Timed replies (default 5).")
    parser.add_argument("--new_tokens", type=int, default=None, help="Tokens per generated reply (default 40).")
    parser.add_argument("--trainer_steps", type=int, default=None, help="Steps of each Trainer run (default 3).")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp32"],
        help="Throughput parts' precision (default bf16; fp32 with --smoke, where CPU bf16 matrix products are slow).",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)."
    )
    parser.add_argument("--deadline_s", type=float, default=420.0, help="Parts not started by then are skipped.")
    parser.add_argument("--deepspeed_timeout_s", type=float, default=240.0, help="The DeepSpeed child's time limit.")
    parser.add_argument("--deepspeed_on_cpu", action="store_true", help="Run the DeepSpeed part on CPU too (slow).")
    args = parser.parse_args(argv)
    smoke = {"max_dialogs": 24, "train_batch_size": 2, "eval_batch_size": 2, "steps": 1, "warmup": 1, "chat_repeats": 1,
             "new_tokens": 6, "trainer_steps": 2, "dtype": "fp32", "threads": 1}  # fmt: skip
    full = {"max_dialogs": 200, "train_batch_size": 32, "eval_batch_size": 32, "steps": 10, "warmup": 3,
            "chat_repeats": 5, "new_tokens": 40, "trainer_steps": 3, "dtype": "bf16"}  # fmt: skip
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        if not args.smoke and not torch.cuda.is_available():
            parser.error("no CUDA GPU here: --smoke runs every part on CPU with tiny shapes (--device cpu: full sizes)")
        args.device = "cuda" if not args.smoke else "cpu"
    if args.output is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.output = os.path.join(BENCH, "results", f"gpu_check-{stamp}{'-smoke' if args.smoke else ''}.json")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:  # on a shared CPU, threads waiting on each other cost more than one thread's work
        torch.set_num_threads(args.threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    check = Check(args)
    for name in args.parts:
        check.run(name, PART_FUNCTIONS[name])
    check.results["meta"]["seconds"] = round(time.perf_counter() - check.started, 1)
    check.write()
    print(f"\n{table(check.results)}\nfull figures: {args.output}")
    return check.results


if __name__ == "__main__":
    main()
