"""bench/gpu_check.py, the first GPU's check: its --smoke run (every part on CPU, as the README gives the command),
its comparisons able to fail, and the offline wheel set it travels with."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
WHEELS_SCRIPT = os.path.join(ROOT, "bench", "gpu_wheels.sh")
PARTS = ["environment", "peak_matmul", "correctness_gpt2", "correctness_llama", "fp16_trainer", "generation",
         "train_gpt2-small", "train_gpt2-medium", "eval_gpt2-small", "eval_gpt2-medium", "chat",
         "deepspeed_zero2"]  # fmt: skip
ENCODINGS = {"shared_prefix", "packed-dense", "packed-dense-1ex", "packed-tree"}


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_gpu_check_section() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return text.split("### GPU check", 1)[1].split("\n## ", 1)[0]


def readme_command(fragment: str) -> str:
    """The one command line of the README's GPU check section that holds `fragment` (its comment cut off)."""
    blocks = re.findall(r"```bash\n(.*?)```", readme_gpu_check_section(), flags=re.S)
    (line,) = [line for block in blocks for line in block.splitlines() if fragment in line]
    return line.split(" #", 1)[0].strip()


@pytest.mark.slow
def test_smoke_run_as_the_readme_gives_it(tmp_path):
    argv = shlex.split(readme_command("gpu_check.py --smoke"))
    assert argv[:3] == ["python", "bench/gpu_check.py", "--smoke"]
    output = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, *argv[1:], "--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    parts = results["parts"]
    assert list(parts) == PARTS and results["meta"]["smoke"] is True
    for name, record in parts.items():
        assert record["status"] in ("ok", "skipped"), (name, record.get("reason"), record.get("traceback"))
    # On CPU only these two may skip, and then with a reason: no GradScaler; DeepSpeed's op compile.
    skipped = {name: record["reason"] for name, record in parts.items() if record["status"] == "skipped"}
    assert set(skipped) <= {"fp16_trainer", "deepspeed_zero2"} and all(skipped.values())
    assert "GradScaler" in skipped.get("fp16_trainer", "GradScaler")
    # The table comes last: one line per part, in order, then where the figures are.
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"full figures: {output}"
    assert [line.split()[0] for line in lines[-len(PARTS) - 1 : -1]] == PARTS

    for name in ("correctness_gpt2", "correctness_llama"):
        floor = parts[name]["bf16_plain_vs_fp32"]  # plain's own bf16 error
        assert set(floor) == set(parts[name]["bf16_vs_fp32"]["packed-tree"]) and max(floor.values()) > 1e-5
        for dtype, tolerance in (("fp32", 1e-4), ("bf16", 1e-2), ("bf16_vs_fp32", None)):
            errors = parts[name][dtype]
            assert set(errors) == ENCODINGS
            for path, es in errors.items():
                assert set(es) == {f"{key}_4c" for key in ("lm_loss", "mc_loss", "mc_logits", "grads")} | {
                    f"{key}_20c" for key in ("lm_loss", "mc_loss", "mc_logits")
                }
                # against fp32, bf16 may reach 1e-2 or 1.5x plain's own bf16 error
                limits = {key: tolerance or max(1e-2, 1.5 * floor[key]) for key in es}
                assert all(0 <= e <= limits[key] for key, e in es.items()), (name, dtype, path, es)
        # fp32 agrees to float rounding; bf16 differs by far more (so it did run in bf16) and still within 1e-2.
        assert parts[name]["fp32_worst"] < 1e-5 < parts[name]["bf16_worst"]
    fp16 = parts["fp16_trainer"]["fp16_vs_fp32"]
    assert len(fp16["losses"]) == len(fp16["reference_losses"]) == 2 and max(fp16["relative_errors"]) <= 1e-2
    for shape in ("gpt2-small", "llama-gqa"):
        replies = parts["generation"][shape]
        assert replies["kv_cache"] == replies["no_cache"] and len(replies["kv_cache"]) == 6  # --new_tokens 6
    for name in ("train_gpt2-small", "train_gpt2-medium", "eval_gpt2-small", "eval_gpt2-medium"):
        record = parts[name]
        for path in ("plain", "shared_prefix", "packed", "packed-tree"):
            figures = record[path]
            assert figures["tokens_per_s"] > 0
            assert figures["speedup"] == pytest.approx(record["plain"]["seconds"] / figures["seconds"])
            # the shared context runs once: fewer tokens through the model than the candidates hold
            assert figures["model_tokens_per_s"] < figures["tokens_per_s"] or path == "plain"
            assert ("mfu" in figures) == name.startswith("train")
    sizes = [parts[f"train_gpt2-{size}"]["non_embedding_parameters"] for size in ("small", "medium")]
    assert sizes[0] < sizes[1]
    chat = parts["chat"]
    assert chat["tokens_per_s"] == pytest.approx(1000 / chat["ms_per_token"])


def test_comparisons_fail_on_a_perturbed_input():
    bench = load_bench()
    torch.manual_seed(0)
    reference = {"lm_loss": torch.tensor(2.5), "grads": torch.randn(1000, dtype=torch.float64)}
    assert bench.relative_errors(reference, {k: v.clone() for k, v in reference.items()}) == {
        "lm_loss": 0.0,
        "grads": 0.0,
    }
    perturbed = {"lm_loss": torch.tensor(2.5), "grads": reference["grads"].clone()}
    perturbed["grads"][7] += 1e-3 * reference["grads"].norm()  # one gradient off by 1e-3 of the whole norm
    errors = bench.relative_errors(reference, perturbed)
    assert errors == {"lm_loss": 0.0, "grads": pytest.approx(1e-3, rel=1e-6)}
    with pytest.raises(bench.CheckFailed, match=r"fp32: beyond 0.0001 relative: packed-tree grads 1.00e-03"):
        bench.check_close({"shared_prefix": {"grads": 0.0}, "packed-tree": errors}, 1e-4, "fp32")
    bench.check_close({"packed-tree": errors}, 1e-2, "bf16")  # within the bf16 tolerance
    # bf16 is judged against fp32 with plain's own bf16 error as a floor: 1.5 x 0.02 allowed, not more.
    bench.check_close({"packed": {"grads_4c": 0.025}}, 1e-2, "bf16 vs fp32", floor={"grads_4c": 0.02})
    with pytest.raises(bench.CheckFailed, match=r"packed grads_4c 3.10e-02 \(plain's own 2.00e-02\)"):
        bench.check_close({"packed": {"grads_4c": 0.031}}, 1e-2, "bf16 vs fp32", floor={"grads_4c": 0.02})
    with pytest.raises(bench.CheckFailed, match="nan"):
        bench.check_close({"packed": {"lm_loss": float("nan")}}, 1e-2, "bf16")
    with pytest.raises(bench.CheckFailed, match="losses"):
        bench.compare_losses({}, "zero2_fp32", [7.0, 6.9], [7.0, 6.8], 1e-4)
    record = {}
    bench.compare_losses(record, "fp16_vs_fp32", [7.0, 6.8], [7.0, 6.8], 1e-4)
    assert record["fp16_vs_fp32"]["relative_errors"] == [0.0, 0.0]
    bench.compare_losses(record, "fp16_vs_fp32", [7.0, 6.9], [7.0, 6.8], 1e-4, compared=1)  # only the first compared
    with pytest.raises(bench.CheckFailed):  # but every loss must be finite
        bench.compare_losses(record, "fp16_vs_fp32", [7.0, float("inf")], [7.0, 6.8], 1e-4, compared=1)


def two_candidates() -> dict:
    """One example, two candidates (the second padded), the gold's reply starting at position 3 (shared_prefix_lengths'
    doctest): the context both share is [1, 5]."""
    ids = torch.tensor([[[1, 5, 6, 7, 2], [1, 5, 6, 8, 0]]])
    return {
        "input_ids": ids,
        "token_type_ids": torch.ones_like(ids),
        "attention_mask": ids.ne(0).long(),
        "mc_token_ids": torch.tensor([[4, 3]]),
        "labels": torch.tensor([[[-100] * 5, [-100, -100, -100, 8, -100]]]),
        "mc_labels": torch.tensor([1]),
    }


def test_tokens_run_counts_the_shared_context_once():
    bench = load_bench()
    # 9 real tokens; the context [1, 5] once, then [6, 7, 2] and [6, 8]: 7 through the model.
    assert bench.tokens_run(two_candidates(), "plain") == (9, 9)
    assert bench.tokens_run(two_candidates(), "packed") == (9, 7)


def test_wheel_script_and_the_device_command_agree():
    """gpu_wheels.sh parses, writes the folder the README's offline install reads, and git ignores that folder."""
    subprocess.run(["bash", "-n", WHEELS_SCRIPT], check=True)
    folder = re.search(r"^WHEELS=(\S+)$", open(WHEELS_SCRIPT).read(), flags=re.M).group(1).strip('"')
    install = readme_command("--no-index")
    assert f"{folder}/*.whl" in install and "--target /tmp/site" in install and "PYTHONPATH=/tmp/site" in install
    assert "bench/gpu_check.py" in install
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, f"{folder} is not git-ignored"


def test_an_encoding_that_fell_back_is_caught():
    """An encoding that cannot apply falls back to the next one; compared with plain it would pass for nothing."""
    from helpers import backbone_config

    from persona_backbone import PersonaGPT2DoubleHeadsModel

    bench = load_bench()
    batch = two_candidates()
    model = PersonaGPT2DoubleHeadsModel(backbone_config("gpt2", 20, n_layer=1, n_embd=16, n_head=2)).train()
    ran = {}
    bench.forward_on(model, "shared_prefix", batch, ran)
    bench.forward_on(model, "packed-dense", batch, ran)
    assert ran == {
        "shared_prefix": "Candidate encoding: shared_prefix (asked for shared_prefix).",
        "packed-dense": "Candidate encoding: packed (asked for packed). Packed attention: dense.",
    }
    model.activation_checkpointing_enable()  # the cache broadcast cannot train under it: plain runs instead
    with pytest.raises(bench.CheckFailed, match="shared_prefix did not run as asked"):
        bench.forward_on(model, "shared_prefix", batch)
