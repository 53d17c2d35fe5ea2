"""Every recipe runs as written: each config in configs/ parses and trains one step (tiny offline model and data
swapped in by flags), the launcher configs point at files that exist, and the README's Python snippet runs."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml

import persona_checkpoints
import run_persona

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
LAUNCHERS = sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml")))


def test_every_recipe_is_covered():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"demo.yaml", "gpt2.yaml", "openai-gpt.yaml", "dialogpt-medium.yaml", "smollm2-360m.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_trains_one_step(recipe, tiny_checkpoint, personachat_json, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [recipe, "--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json,
            "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "1",
            "--max_train_samples", "4", "--max_eval_samples", "2", "--use_cpu", "true", "--report_to", "none",
            "--do_convai2_eval", "false", "--disable_tqdm", "true"]  # fmt: skip
    metrics = run_persona.main(*run_persona.parse_args(argv))
    assert json.load(open(out / "trainer_state.json"))["global_step"] == 1
    assert metrics["train_samples"] == 4 and "eval_hits@1" in metrics
    # The recipe's own values survive the swap (a recipe the parser ignored would not show here).
    config = yaml.safe_load(open(recipe))
    written = yaml.safe_load(open(out / persona_checkpoints.TRAINING_CONFIG_NAME))
    for key in ("num_candidates", "learning_rate", "lm_coef", "warmup_steps"):
        if key in config and key in written:
            assert written[key] == config[key], key


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=os.path.basename)
def test_launcher_configs_are_consistent(launcher):
    config = yaml.safe_load(open(launcher))
    assert config["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED"}
    if config["distributed_type"] == "DEEPSPEED":
        path = config["deepspeed_config"]["deepspeed_config_file"]
        assert os.path.isfile(os.path.join(ROOT, path)), path
        stage = json.load(open(os.path.join(ROOT, path)))["zero_optimization"]["stage"]
        assert config["deepspeed_config"]["zero3_init_flag"] == (stage == 3)
    for line in open(launcher):  # the commands in the comments name files that exist
        for file in re.findall(r"configs/[\w/.-]+\.(?:yaml|json)", line):
            assert os.path.isfile(os.path.join(ROOT, file)), file


def readme_python_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_training_snippet_runs(tiny_checkpoint, personachat_json, tmp_path, monkeypatch):
    (snippet,) = [b for b in readme_python_blocks() if "PersonaTrainingArguments(" in b]
    assert '"openai-community/gpt2"' in snippet and '"personachat_self_original.json"' in snippet
    code = snippet.replace('"openai-community/gpt2"', repr(tiny_checkpoint)).replace(
        '"personachat_self_original.json"', repr(personachat_json)
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert namespace["trainer"].state.global_step > 0 and (tmp_path / "out").is_dir()


def test_every_module_is_packaged():
    """A module missing from setup.cfg's py_modules imports from a checkout but not from an installed project."""
    import configparser

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = configparser.ConfigParser()
    config.read(os.path.join(root, "setup.cfg"))
    packaged = set(config["options"]["py_modules"].split())
    on_disk = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "*.py"))}
    assert on_disk == packaged


@pytest.mark.slow
def test_recipe_resumes_by_rerunning_its_command(tiny_checkpoint, personachat_json, tmp_path):
    """`run_persona.py configs/gpt2.yaml` as the README writes it, killed (SIGKILL) right after its checkpoint of step
    2: the same command again resumes in the recipe's own run folder from that checkpoint and ends at step 4."""
    import shutil
    import signal
    import subprocess
    import sys

    from helpers import PROBE

    recipe = yaml.safe_load(open(os.path.join(ROOT, "configs", "gpt2.yaml")))
    assert recipe["output_dir"] == "runs/gpt2"
    (tmp_path / "configs").mkdir()
    shutil.copy(os.path.join(ROOT, "configs", "gpt2.yaml"), tmp_path / "configs" / "gpt2.yaml")
    # The command as written, the tiny model and data swapped in, few steps; no --output_dir.
    command = [sys.executable, PROBE, "configs/gpt2.yaml", "--model_name_or_path", tiny_checkpoint,
               "--dataset_path", personachat_json, "--dataset_cache", str(tmp_path / "cache"), "--max_steps", "4",
               "--save_steps", "2", "--logging_steps", "1", "--max_train_samples", "16", "--do_eval", "false",
               "--use_cpu", "true", "--report_to", "tensorboard", "--disable_tqdm", "true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    killed = subprocess.run(
        command, cwd=tmp_path, env={**env, "PROBE_KILL_AT_STEP": "2"}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "runs" / "gpt2"
    assert sorted(os.listdir(run / "checkpoint-2"))  # the checkpoint it was killed after, in the recipe's folder
    # The rerun keeps the kill at step 2: a run that started again from step 0 would be killed there again.
    rerun = subprocess.run(
        command, cwd=tmp_path, env={**env, "PROBE_KILL_AT_STEP": "2"}, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "persona-train: resuming from runs/gpt2/checkpoint-2" in rerun.stderr
    assert os.listdir(tmp_path / "runs") == ["gpt2"]  # no second, timestamped folder
    # The end says where the run went and where its TensorBoard logs are (an events file there).
    said = re.search(r"persona-train: saved the model, tokenizer and metrics to (\S+); TensorBoard logs: tensorboard "
                     r"--logdir (\S+)\n", rerun.stderr)  # fmt: skip
    assert said and said.group(1) == "runs/gpt2" and said.group(2).startswith("runs/gpt2/runs/"), rerun.stderr[-2000:]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / said.group(2)))
    # The project's own lines show at the default log level: what was loaded and which candidate encoding runs.
    for line in ("INFO - persona_data - Loaded ", "INFO - persona_model - Loaded ", "INFO - persona_encoding - Cand"):
        assert line in rerun.stdout, rerun.stdout[-2000:]
    state = json.load(open(run / "trainer_state.json"))
    assert state["global_step"] == 4
    killed_losses = [e["loss"] for e in json.load(open(run / "checkpoint-2" / "trainer_state.json"))["log_history"]]
    assert [e["loss"] for e in state["log_history"] if "loss" in e][: len(killed_losses)] == killed_losses


@pytest.mark.slow
def test_bf16_recipe_runs_on_a_cpu_machine_without_use_cpu(tiny_checkpoint, personachat_json, tmp_path):
    """`accelerate launch run_persona.py configs/dialogpt-medium.yaml` (its `bf16: true`) on a machine without a GPU,
    no --use_cpu: the script runs on the CPU by itself (bf16 autocast) instead of failing the Trainer's bf16 check."""
    import subprocess
    import sys

    from persona_trainer import has_accelerator

    if has_accelerator():
        pytest.skip("the machine has an accelerator: --use_cpu is not implied")
    assert yaml.safe_load(open(os.path.join(ROOT, "configs", "dialogpt-medium.yaml")))["bf16"] is True
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "run_persona.py", "configs/dialogpt-medium.yaml",
               "--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json,
               "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
               "--max_train_samples", "4", "--do_eval", "false", "--report_to", "none"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = yaml.safe_load(open(tmp_path / "out" / persona_checkpoints.TRAINING_CONFIG_NAME))
    assert written["bf16"] is True and json.load(open(tmp_path / "out" / "trainer_state.json"))["global_step"] == 1


def test_fp16_on_the_cpu_is_one_line(capsys, tmp_path):
    from persona_trainer import has_accelerator

    if has_accelerator():
        pytest.skip("fp16 runs on the machine's accelerator")
    argv = ["--model_name_or_path", "openai-community/gpt2", "--output_dir", str(tmp_path / "out"), "--fp16", "true"]
    with pytest.raises(SystemExit) as exit_info:
        run_persona.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "persona-train: error: --fp16 true: fp16 mixed precision needs a GPU and this run is on the CPU; pass --bf16 "
        "true (bfloat16 autocast runs on CPUs) or leave --fp16 out."
    )


def test_demo_script_keeps_its_progress_bars():
    """demo.sh trains for minutes on a busy machine: it must not turn the Trainer's progress bars off."""
    commands = [line for line in open(os.path.join(ROOT, "demo.sh")) if line.startswith("python run_persona.py")]
    assert len(commands) == 1 and "disable_tqdm" not in commands[0]
    assert "disable_tqdm" not in open(os.path.join(ROOT, "configs", "demo.yaml")).read()
