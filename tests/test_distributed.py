"""Scale-out proofs on CPU: torchrun/DDP (gloo), DeepSpeed ZeRO-2/3, resume after SIGKILL, LoRA, checkpointing, Hub."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import LR, ROOT, STEP_ARGS, assert_same_weights, backbone_config, launch, load_weights, run_args

DEEPSPEED_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "deepspeed", "*.json")))


@pytest.fixture(scope="module")
def expected_step(assets) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Initial weights (as run_persona seeds them) and their SGD update over all 8 rows of STEP_ARGS, computed from
    the model's own batch-mean losses on one batch: `2.0 · lm_loss + mc_loss`."""
    from transformers import set_seed

    from persona_collator import PersonaCollator
    from persona_data import build_features, load_dialogs
    from persona_model import load_model_and_tokenizer

    set_seed(0)  # the new special-token rows are drawn at load time, after run_persona's set_seed(--seed)
    model, tokenizer = load_model_and_tokenizer(assets["model"])
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rows = build_features(load_dialogs(assets["data"])["train"], tokenizer, num_candidates=2, max_history=2)
    batch = PersonaCollator(tokenizer.pad_token_id)([rows[i] for i in range(8)])
    model.train()
    out = model(**batch)
    (2.0 * out.lm_loss + out.mc_loss).backward()
    with torch.no_grad():
        for param in model.parameters():  # tied LM head and embedding: one parameter, stepped once
            param -= LR * param.grad
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert max(float((expected[k] - init[k]).abs().max()) for k in init) > 1e-3  # a step the tests can tell apart
    return init, expected


@pytest.mark.slow
def test_one_step_same_update_in_1_and_2_processes_and_ranks_agree(assets, expected_step, tmp_path):
    single = tmp_path / "single"
    launch(run_args(assets, single, *STEP_ARGS, "--gradient_accumulation_steps", "4"))
    ddp = tmp_path / "ddp"
    launch(run_args(assets, ddp, *STEP_ARGS, "--gradient_accumulation_steps", "2"), nproc=2)

    init, expected = expected_step
    assert_same_weights(torch.load(single / "weights_init_rank0.pt"), init, atol=0)
    assert_same_weights(torch.load(ddp / "weights_init_rank1.pt"), init, atol=0)
    assert_same_weights(torch.load(single / "weights_final_rank0.pt"), expected)
    rank0, rank1 = torch.load(ddp / "weights_final_rank0.pt"), torch.load(ddp / "weights_final_rank1.pt")
    assert_same_weights(rank0, rank1, atol=0)  # DDP all-reduces gradients: replicas stay bit-identical
    assert_same_weights(rank0, expected)
    assert_same_weights(load_weights(ddp), expected)  # what rank 0 saved


@pytest.mark.slow
def test_torchrun_two_processes_trains_with_identical_ranks(assets, tmp_path):
    """The README's CPU recipe as written (no --use_cpu): one data-parallel run, not two independent ones."""
    from persona_data import build_features, load_dialogs
    from persona_model import load_model_and_tokenizer

    out = tmp_path / "ddp"
    args = ["--max_steps", "6", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    proc = launch([a for a in run_args(assets, out, *args, "--logging_steps", "3") if a != "--use_cpu"], nproc=2)
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 6
    # 6 steps of 2 rows x 2 accumulation x 2 processes: the epoch count shows both processes shared the data.
    rows = build_features(load_dialogs(assets["data"])["train"], load_model_and_tokenizer(assets["model"])[1],
                          num_candidates=2, max_history=2).num_rows  # fmt: skip
    assert state["log_history"][-1]["epoch"] == pytest.approx(6 / math.ceil(rows / 8), rel=1e-3)
    losses = [log["loss"] for log in state["log_history"] if "loss" in log]
    assert len(losses) == 2 and losses[1] < losses[0], proc.stdout[-2000:]
    rank0, rank1 = torch.load(out / "weights_final_rank0.pt"), torch.load(out / "weights_final_rank1.pt")
    assert_same_weights(rank0, rank1, atol=0)
    assert not torch.equal(rank0["multiple_choice_head.summary.weight"], torch.load(out / "weights_init_rank0.pt")[
        "multiple_choice_head.summary.weight"])  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(assets, tmp_path):
    # 16 rows, 4 per step: step 3 is mid-epoch and the run crosses an epoch boundary after the resume. Adam
    # (the default) makes the optimizer state matter; the scheduler decays the LR over the 6 steps.
    args = ["--max_train_samples", "16", "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--save_strategy", "steps", "--save_steps", "3",
            "--learning_rate", "1e-2", "--warmup_steps", "2"]  # fmt: skip
    full = tmp_path / "full"
    launch(run_args(assets, full, *args))
    killed = tmp_path / "killed"
    proc = launch(run_args(assets, killed, *args), env={"PROBE_KILL_AT_STEP": "3"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (killed / "model.safetensors").exists() and (killed / "checkpoint-3").is_dir()
    launch(run_args(assets, killed, *args, "--resume_from_checkpoint", str(killed / "checkpoint-3")))
    assert json.load(open(killed / "trainer_state.json"))["global_step"] == 6
    assert_same_weights(load_weights(killed), load_weights(full))
    # and the run really moved past the checkpoint
    with pytest.raises(AssertionError):
        assert_same_weights(load_weights(killed), load_weights(killed / "checkpoint-3"))


@pytest.mark.slow
def test_rerun_after_a_kill_mid_save_resumes_from_the_last_complete_checkpoint(assets, tmp_path):
    args = ["--max_train_samples", "16", "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
            "--learning_rate", "1e-2", "--warmup_steps", "2"]  # fmt: skip
    full = tmp_path / "full"
    launch(run_args(assets, full, *args))
    killed = tmp_path / "killed"
    proc = launch(run_args(assets, killed, *args), env={"PROBE_KILL_DURING_SAVE": "4"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (killed / "checkpoint-4").is_dir() and not (killed / "checkpoint-4" / "trainer_state.json").exists()
    # The same command again: no --resume_from_checkpoint.
    proc = launch(run_args(assets, killed, *args))
    messages = [line for line in proc.stderr.splitlines() if line.startswith("persona-train:")]
    assert any("skipping the incomplete checkpoint" in m and "checkpoint-4" in m for m in messages), proc.stderr
    assert any("resuming from" in m and m.endswith("checkpoint-2 (pass --overwrite_output_dir true to start afresh).")
               for m in messages), messages  # fmt: skip
    assert json.load(open(killed / "trainer_state.json"))["global_step"] == 6
    assert_same_weights(load_weights(killed), load_weights(full))
    # A third run finds the finished run: it says so, exits 0 and leaves the metrics alone.
    results = (killed / "all_results.json").read_text()
    proc = launch(run_args(assets, killed, *args))
    assert "already holds a finished run (step 6)" in proc.stderr and "--overwrite_output_dir true" in proc.stderr
    assert (killed / "all_results.json").read_text() == results
    # Asked for more steps, the finished run trains on from its last checkpoint.
    longer = [value if value != "6" else "8" for value in args]
    proc = launch(run_args(assets, killed, *longer))
    assert f"persona-train: {killed} holds a run finished at step 6; training on." in proc.stderr, proc.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoint-6'}" in proc.stderr
    assert json.load(open(killed / "trainer_state.json"))["global_step"] == 8


def finished_folder(path, step: int, epochs: float, checkpoint: bool):
    """A run folder as the Trainer leaves it when training ended at `step` (`checkpoint-<step>` if `checkpoint`)."""
    path.mkdir()
    (path / "train_results.json").write_text("{}")
    state = json.dumps({"global_step": step, "max_steps": step, "num_train_epochs": epochs})
    (path / "trainer_state.json").write_text(state)
    if checkpoint:
        (path / f"checkpoint-{step}").mkdir()
        (path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
        (path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return str(path)


@pytest.mark.parametrize(
    "max_steps, epochs, finished",
    [(-1, 3.0, True), (-1, 2.0, True), (-1, 4.0, False), (6, 3.0, True), (4, 3.0, True), (7, 3.0, False)],
)
def test_a_finished_run_trains_on_only_when_asked_for_more(tmp_path, max_steps, epochs, finished):
    from persona_checkpoints import inspect_run_folder

    path = finished_folder(tmp_path / "run", step=6, epochs=3.0, checkpoint=True)
    folder = inspect_run_folder(path, max_steps=max_steps, num_train_epochs=epochs)
    assert (folder.finished_step, folder.continued_from) == ((6, None) if finished else (None, 6))
    assert folder.resume_from == (None if finished else os.path.join(path, "checkpoint-6"))


def test_a_finished_run_without_checkpoints_asked_for_more_is_one_line(tmp_path):
    from persona_checkpoints import inspect_run_folder
    from persona_errors import UsageError

    path = finished_folder(tmp_path / "run", step=6, epochs=3.0, checkpoint=False)
    with pytest.raises(UsageError, match=r"finished at step 6 and no checkpoint .* --overwrite_output_dir true"):
        inspect_run_folder(path, max_steps=10)


VALIDATE_DEEPSPEED_CONFIGS = """
import json, sys
from transformers import GPT2Config, GPT2DoubleHeadsModel
from persona_trainer import PersonaTrainingArguments

model = GPT2DoubleHeadsModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
results = {}
for path in sys.argv[1:]:
    try:
        args = PersonaTrainingArguments(
            output_dir=sys.argv[0], deepspeed=path, use_cpu=True, report_to="none", bf16=True, warmup_steps=10,
            per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5, learning_rate=3e-4,
            adam_beta2=0.98, weight_decay=0.01,
        )
        args.hf_deepspeed_config.trainer_config_finalize(args, model, num_training_steps=100)
        results[path] = args.hf_deepspeed_config.config
    except ValueError as error:
        results[path] = str(error)
print("RESULTS" + json.dumps(results))
"""


def find_auto(config, prefix=""):
    if isinstance(config, dict):
        return [p for key, value in config.items() for p in find_auto(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == "auto" else []


@pytest.mark.slow
def test_shipped_deepspeed_configs_pass_the_trainers_own_checks(tmp_path):
    """The Trainer fills every "auto" from TrainingArguments with no mismatch; a conflicting fixed value fails."""
    assert {os.path.basename(p) for p in DEEPSPEED_CONFIGS} == {"zero2.json", "zero3.json", "zero3_offload.json"}
    conflicting = tmp_path / "conflicting.json"
    config = json.load(open(DEEPSPEED_CONFIGS[0]))
    conflicting.write_text(json.dumps({**config, "gradient_accumulation_steps": 3, "gradient_clipping": 1.0}))
    for path in DEEPSPEED_CONFIGS:
        assert find_auto(json.load(open(path)))  # they do defer to TrainingArguments
    proc = subprocess.run(
        [sys.executable, "-c", VALIDATE_DEEPSPEED_CONFIGS, str(tmp_path / "out"), *DEEPSPEED_CONFIGS, str(conflicting)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for path in DEEPSPEED_CONFIGS:
        filled = results[path]
        assert isinstance(filled, dict), f"{path}: {filled}"
        assert find_auto(filled) == [], path
        assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["gradient_accumulation_steps"] == 4
        assert filled["train_batch_size"] == 8 and filled["gradient_clipping"] == 0.5
        assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
        assert filled["zero_optimization"]["reduce_bucket_size"] == 32 * 32
        if "optimizer" in filled:
            assert filled["optimizer"]["params"] == {
                "lr": 3e-4,
                "betas": [0.9, 0.98],
                "eps": 1e-8,
                "weight_decay": 0.01,
            }
    assert "mismatch" in results[str(conflicting)]
    assert "gradient_accumulation_steps=3 vs hf gradient_accumulation_steps=4" in results[str(conflicting)]
    assert "gradient_clipping=1.0 vs hf max_grad_norm=0.5" in results[str(conflicting)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_two_processes_same_update_and_loadable_checkpoint(assets, expected_step, tmp_path, stage):
    """ZeRO on the CPU accelerator (gloo): the STEP_ARGS step equals the hand-computed one; the saved model loads.

    The first run JIT-compiles DeepSpeed's shared-memory communication op into $TORCH_EXTENSIONS_DIR (about a minute).
    """
    pytest.importorskip("deepspeed")
    out = tmp_path / stage
    config = os.path.join(ROOT, "configs", "deepspeed", f"{stage}.json")
    args = [*STEP_ARGS, "--gradient_accumulation_steps", "2", "--deepspeed", config]
    launch(run_args(assets, out, *args, "--save_strategy", "steps", "--save_steps", "1"), nproc=2)
    _, expected = expected_step
    assert_same_weights(load_weights(out), expected)  # ZeRO-3: the consolidated weights of stage3_gather_16bit...
    assert_same_weights(load_weights(out / "checkpoint-1"), expected)
    assert os.path.isdir(out / "checkpoint-1" / "global_step1")  # DeepSpeed's own sharded states, for resuming
    if stage == "zero2":
        assert_same_weights(torch.load(out / "weights_final_rank0.pt"), torch.load(out / "weights_final_rank1.pt"))


@pytest.mark.slow
def test_lora_adapter_trains_saves_heads_and_tokens_and_loads_back_for_eval(assets, expected_step, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file

    from persona_backbone import PersonaGPT2DoubleHeadsModel
    from persona_collator import PersonaCollator
    from persona_data import build_features, load_dialogs
    from persona_model import SPECIAL_TOKENS, load_model_and_tokenizer

    out = tmp_path / "lora"
    eval_args = ["--do_eval", "true", "--max_eval_samples", "8", "--per_device_eval_batch_size", "4"]
    lora_args = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "c_attn", "c_fc"]
    train_args = ["--max_steps", "4", "--learning_rate", "1e-2", "--per_device_train_batch_size", "2",
                  "--gradient_accumulation_steps", "1", "--save_strategy", "no",
                  "--gradient_checkpointing"]  # fmt: skip
    launch(run_args(assets, out, *lora_args, *train_args, *eval_args))
    assert not (out / "model.safetensors").exists()
    adapter_config = json.load(open(out / "adapter_config.json"))
    assert sorted(adapter_config["target_modules"]) == ["c_attn", "c_fc"] and adapter_config["r"] == 4
    saved = load_file(out / "adapter_model.safetensors")
    assert any("multiple_choice_head" in k for k in saved), sorted(saved)
    assert any("trainable_tokens" in k for k in saved), sorted(saved)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 2 and all(v.abs().max() > 0 for v in lora_b)  # B starts at 0: it was trained

    # Merged (the default, as chat and eval load it) and unmerged adapters give the same outputs.
    merged, tokenizer = load_model_and_tokenizer(str(out))
    unmerged, _ = load_model_and_tokenizer(str(out), merge_adapter=False)
    assert type(merged) is PersonaGPT2DoubleHeadsModel and isinstance(unmerged, PeftModel)
    rows = build_features(load_dialogs(assets["data"])["valid"], tokenizer, num_candidates=None, max_history=2)
    batch = PersonaCollator(tokenizer.pad_token_id)([rows[i] for i in range(4)])
    merged.eval(), unmerged.eval()
    with torch.no_grad():
        a, b = merged(**batch), unmerged(**batch)
    torch.testing.assert_close(a.mc_logits, b.mc_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.lm_nll, b.lm_nll, rtol=1e-4, atol=1e-4)

    # Frozen: the ordinary token rows and the layer norms; trained: the persona-token rows and the MC head.
    init, _ = expected_step
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    weights = merged.state_dict()
    wte = "transformer.wte.weight"
    torch.testing.assert_close(weights[wte][ordinary], init[wte][ordinary], rtol=0, atol=0)
    torch.testing.assert_close(weights["transformer.ln_f.weight"], init["transformer.ln_f.weight"], rtol=0, atol=0)
    assert (weights[wte][special] - init[wte][special]).abs().amax(dim=1).min() > 1e-4
    assert (
        weights["multiple_choice_head.summary.weight"] - init["multiple_choice_head.summary.weight"]
    ).abs().max() > 1e-4

    # run_persona evaluates the adapter folder (merged on load) exactly as the end of training did.
    again = tmp_path / "eval"
    launch(run_args(assets, again, *eval_args, "--do_train", "false") + ["--model_name_or_path", str(out)])
    trained, reloaded = json.load(open(out / "eval_results.json")), json.load(open(again / "eval_results.json"))
    for key in ("eval_hits@1", "eval_lm_loss", "eval_mc_loss"):
        assert reloaded[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), key


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(assets):
    import copy

    from persona_collator import PersonaCollator
    from persona_data import build_features, load_dialogs
    from persona_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(assets["model"])  # dropout already 0
    # One encoder pass per forward, so that block calls count recomputation only (checkpointing turns the
    # shared-prefix forward off anyway).
    model.config.persona_shared_prefix = False
    rows = build_features(load_dialogs(assets["data"])["train"], tokenizer, num_candidates=2, max_history=2)
    batch = PersonaCollator(tokenizer.pad_token_id)([rows[i] for i in range(4)])

    def grads_and_block_calls(checkpointing: bool):
        m = copy.deepcopy(model)
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        calls = []
        mlp = m.transformer.h[0].mlp  # inside the checkpointed block; torch runs no module hooks on recompute
        mlp.forward = lambda *args, forward=mlp.forward, **kwargs: calls.append(1) or forward(*args, **kwargs)
        out = m(**batch)
        (out.lm_loss + out.mc_loss).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}, len(calls)

    plain, plain_calls = grads_and_block_calls(False)
    checkpointed, checkpointed_calls = grads_and_block_calls(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block ran again in backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_unsupported_backbone_is_a_clear_error():

    from persona_backbone import PersonaGPT2DoubleHeadsModel, PersonaOpenAIGPTDoubleHeadsModel
    from persona_lora import check_gradient_checkpointing

    check_gradient_checkpointing(
        PersonaGPT2DoubleHeadsModel(backbone_config("gpt2", 20, n_layer=1, n_embd=8, n_head=2))
    )
    gpt = PersonaOpenAIGPTDoubleHeadsModel(backbone_config("openai-gpt", 20, n_layer=1, n_embd=8, n_head=2))
    with pytest.raises(
        ValueError, match=r"--activation_checkpointing: PersonaOpenAIGPTDoubleHeadsModel .*'openai-gpt'"
    ):
        check_gradient_checkpointing(gpt)


@pytest.mark.parametrize("flag", ["--activation_checkpointing", "--gradient_checkpointing"])
def test_checkpointing_an_unsupported_backbone_is_one_line_before_training(
    flag, tmp_path, capsys, tiny_checkpoint, personachat_json
):
    """Both names of the flag reach the check (transformers folds the old one into the new one)."""
    from transformers import AutoTokenizer

    from persona_backbone import PersonaOpenAIGPTDoubleHeadsModel

    checkpoint = tmp_path / "gpt"
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.save_pretrained(checkpoint)
    config = backbone_config("openai-gpt", len(tokenizer), n_layer=1, n_embd=8, n_head=2, n_positions=64)
    PersonaOpenAIGPTDoubleHeadsModel(config).save_pretrained(checkpoint)
    argv = ["--model_name_or_path", str(checkpoint), "--dataset_path", personachat_json,
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu", "true",
            "--report_to", "none", flag, "true"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        __import__("run_persona").cli(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert "--activation_checkpointing: PersonaOpenAIGPTDoubleHeadsModel" in err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")


def test_push_to_hub_uploads_weights_tokenizer_config_and_project_model_card(assets, tmp_path, monkeypatch):
    import fnmatch

    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    from persona_model import SPECIAL_TOKENS, load_model_and_tokenizer
    from run_persona import main, parse_args

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    calls = {"create_repo": [], "create_commit": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"].append(repo_id)
        raise AssertionError("the Trainer uploads with upload_folder")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
        files = {}
        for dirpath, _, names in os.walk(folder_path):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), folder_path)
                if not any(fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel.split(os.sep)[0], pattern)
                           for pattern in ignore_patterns):  # fmt: skip
                    files[rel] = open(os.path.join(dirpath, name), "rb").read()
        calls["upload_folder"].append({"repo_id": repo_id, "files": files, **kwargs})
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/1", "End of training", "", "1" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    out = tmp_path / "run"
    argv = run_args(assets, out, "--max_steps", "2", "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--do_eval", "true",
                    "--max_eval_samples", "4", "--lm_coef", "2.0", "--push_to_hub",
                    "--hub_model_id", "someone/persona-tiny")  # fmt: skip
    metrics = main(*parse_args(argv))

    assert calls["create_repo"] == ["someone/persona-tiny"] and calls["create_commit"] == []
    # Trainer.save_model pushes after training ("Model save"), then the final push carries the eval metrics.
    assert [c["commit_message"] for c in calls["upload_folder"]] == ["Model save", "End of training"]
    first, push = calls["upload_folder"]
    assert "| loss | 2.0 × LM loss" in first["files"]["README.md"].decode() and "training_config.yaml" in first["files"]
    assert push["repo_id"] == "someone/persona-tiny"
    assert set(push["files"]) == {
        "README.md", "training_config.yaml", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "training_args.bin",
        "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
    }  # fmt: skip
    # What was pushed is what was uploaded (the folder on disk), and it loads as a persona model.
    model, tokenizer = load_model_and_tokenizer(str(out))
    assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings
    # The training config reproduces the run's options through the CLI parser.
    config_path = tmp_path / "pushed_config.yaml"
    config_path.write_bytes(push["files"]["training_config.yaml"])
    model_args, data_args, training_args = parse_args([str(config_path), "--output_dir", str(tmp_path / "again")])
    assert (data_args.num_candidates, training_args.lm_coef, training_args.max_steps) == (2, 2.0, 2)
    assert model_args.model_name_or_path == assets["model"] and data_args.dataset_path == assets["data"]
    assert "hub_token" not in push["files"]["training_config.yaml"].decode()

    card = push["files"]["README.md"].decode()
    assert card.startswith("---\n") and "library_name: transformers\n" in card and "- persona-chat\n" in card
    assert "pipeline_tag: text-generation" in card
    assert "# persona-tiny\n" in card
    assert 'model, tokenizer = load_model_and_tokenizer("someone/persona-tiny")' in card
    assert "from persona_chat import PersonaBot" in card and "bot.reply(" in card
    assert f"`{assets['data']}`" in card
    assert "| loss | 2.0 × LM loss + 1.0 × multiple-choice loss |" in card
    assert "| candidates per example | 2 |" in card and "| history turns kept | 5 |" in card
    assert "| batch | 2 per device × 1 accumulation × 1 processes = 2 |" in card
    assert f"| Hits@1 | {metrics['eval_hits@1']:.4f} |" in card
    assert f"| Perplexity (token-level) | {metrics['eval_ppl']:.2f} |" in card
    assert "| F1 |" not in card  # not computed by this run


def test_model_card_lists_f1_and_adapter_when_available():
    from transformers import TrainingArguments

    from persona_card import persona_model_card
    from persona_trainer import PersonaTrainingArguments

    args = PersonaTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", lm_coef=2.0)
    assert isinstance(args, TrainingArguments)
    card = persona_model_card(
        model_id="someone/lora",
        base_model="microsoft/DialoGPT-medium",
        dataset="bavard/personachat_truecased",
        recipe={"num_candidates": 4, "max_history": 2, "personality_permutations": 2},
        args=args,
        metrics={
            "eval_hits@1": 0.8125,
            "eval_ppl": 17.123,
            "convai2_f1": 0.1934,
            "convai2_ppl_word": 27.456,
            "convai2_c_score": 0.2345,
            "convai2_distinct_2": 0.31,
            "convai2_distinct_2_gold": 0.52,
            "convai2_repeat_self": 0.125,
        },
        is_adapter=True,
    )
    assert "library_name: peft" in card and "base_model: microsoft/DialoGPT-medium" in card
    assert "- bavard/personachat_truecased" in card and "- lora" in card
    assert (
        "| Hits@1 | 0.8125 |" in card
        and "| Perplexity (token-level) | 17.12 |" in card
        and "| Perplexity (word-level: ParlAI words, end token excluded) | 27.46 |" in card
        and "| F1 (greedy, ConvAI2 normalisation) | 0.1934 |" in card
        and "| C-score (NLI persona consistency, per reply) | 0.234 |" in card
        and "| Distinct-2 (generated / gold) | 0.3100 / 0.5200 |" in card
    )
    assert "C-score of the gold" not in card and "repeating an own" not in card  # not in the metrics
    assert "| personality permutations | 2 |" in card and "| LoRA | yes" in card
