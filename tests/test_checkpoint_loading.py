"""Checkpoints that are unsafe, inconsistent or out of reach: a refused pickle, a tokenizer larger than the embeddings,
a LoRA adapter whose base is gone, a Hub id offline or unreachable, a merged LoRA folder without its tokenizer; each is
one line naming the file, field or id. And the library noise a load used to print (load reports, resize notices,
DeepSpeed's CPU notice, tied weights "missing" at a resume) is gone or one line of ours."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import error_line
from safetensors import safe_open
from safetensors.torch import load_file

import persona_chat
import persona_eval
from persona_errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_ARGS = ["--stdin", "--persona", "i like tea.", "--max_new_tokens", "3", "--no_sample"]


def load_error_line(script: str, folder, personachat_json: str, tmp_path, capsys) -> str:
    """The one error line of persona-chat or persona-eval loading the checkpoint `folder`."""
    if script == "chat":
        return error_line(persona_chat.cli, ["--model_name_or_path", str(folder), *CHAT_ARGS], capsys)
    argv = ["--model_name_or_path", str(folder), "--dataset_path", personachat_json]
    return error_line(persona_eval.cli, [*argv, "--output_file", str(tmp_path / "r.json")], capsys)


def embedding_rows(folder) -> int:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return f.get_slice("transformer.wte.weight").get_shape()[0]


class RunsCode:
    """A pickled object whose unpickling would create `marker` (torch's restricted loader must refuse it)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def pickled_copy(src: str, dst, marker: str) -> None:
    """`src` with its weights as a pytorch_model.bin that holds, beside the tensors, an object that runs code."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors"))
    tensors["extra"] = RunsCode(marker)
    torch.save(tensors, os.path.join(dst, "pytorch_model.bin"))


# --- 1. a pickled checkpoint torch's restricted loader refuses


@pytest.mark.parametrize("script", ["chat", "eval"])
def test_refused_pickle_is_one_line_naming_the_file(script, persona_checkpoint, personachat_json, tmp_path, capsys):
    folder, marker = tmp_path / "pickled", str(tmp_path / "code-ran")
    pickled_copy(persona_checkpoint, folder, marker)
    line = load_error_line(script, folder, personachat_json, tmp_path, capsys)
    assert f"{folder / 'pytorch_model.bin'}: this pickled weights file refers to os.makedirs" in line
    assert "safetensors" in line and "weights_only" not in line and "trusted" not in line
    assert not os.path.exists(marker)


def test_refused_pickle_keeps_no_advice_in_the_chain(persona_checkpoint, tmp_path):
    from persona_model import load_model_and_tokenizer

    pickled_copy(persona_checkpoint, tmp_path / "pickled", str(tmp_path / "code-ran"))
    with pytest.raises(CheckpointError) as info:
        load_model_and_tokenizer(str(tmp_path / "pickled"))
    # torch's message (which advises weights_only=False) is not even in the traceback with PERSONA_DEBUG.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_resume_from_a_refused_pickle_names_the_checkpoint_file(persona_checkpoint, tmp_path):
    from persona_model import load_model_and_tokenizer
    from persona_trainer import PersonaTrainer, PersonaTrainingArguments

    checkpoint = tmp_path / "out" / "checkpoint-1"
    pickled_copy(persona_checkpoint, checkpoint, str(tmp_path / "code-ran"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    model, _ = load_model_and_tokenizer(persona_checkpoint)
    args = PersonaTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, use_cpu=True, report_to=[])
    trainer = PersonaTrainer(model=model, args=args, train_dataset=[{"input_ids": [1]}])
    with pytest.raises(CheckpointError, match=re.escape(f"{checkpoint / 'pytorch_model.bin'}: this pickled")):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not (tmp_path / "code-ran").exists()


# --- 2. a tokenizer with more tokens than the embedding matrix


def grown_tokenizer_copy(src: str, dst, extra: int = 7) -> None:
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    tokenizer.add_tokens([f"newword{i}" for i in range(extra)])
    tokenizer.save_pretrained(dst)


@pytest.mark.parametrize("script", ["chat", "eval"])
def test_tokenizer_larger_than_the_embeddings_is_refused_at_load(
    script, persona_checkpoint, personachat_json, tmp_path, capsys
):
    folder = tmp_path / "grown"
    grown_tokenizer_copy(persona_checkpoint, folder)
    rows = embedding_rows(persona_checkpoint)
    line = load_error_line(script, folder, personachat_json, tmp_path, capsys)
    assert f"{folder}: the tokenizer has {rows + 7} tokens but the embedding matrix has {rows} rows" in line


def test_a_larger_tokenizer_of_its_own_is_named_with_the_checkpoint(persona_checkpoint, tmp_path, capsys):
    grown_tokenizer_copy(persona_checkpoint, tmp_path / "grown", extra=2)
    argv = ["--model_name_or_path", persona_checkpoint, "--tokenizer_name", str(tmp_path / "grown"), *CHAT_ARGS]
    line = error_line(persona_chat.cli, argv, capsys)
    rows = embedding_rows(persona_checkpoint)
    assert f"{persona_checkpoint} with the tokenizer of {tmp_path / 'grown'}: the tokenizer has {rows + 2}" in line


def test_training_grows_the_embeddings_to_a_larger_tokenizer(persona_checkpoint, tmp_path, caplog):
    from persona_model import load_model_and_tokenizer

    grown_tokenizer_copy(persona_checkpoint, tmp_path / "grown", extra=3)
    rows = embedding_rows(persona_checkpoint)
    with caplog.at_level(logging.INFO, logger="persona_model"):
        model, tokenizer = load_model_and_tokenizer(str(tmp_path / "grown"), grow_embeddings=True)
    assert len(tokenizer) == rows + 3 and model.get_input_embeddings().num_embeddings == rows + 3
    old = load_file(os.path.join(persona_checkpoint, "model.safetensors"))["transformer.wte.weight"]
    torch.testing.assert_close(model.get_input_embeddings().weight[:rows], old, rtol=0, atol=0)
    assert f"embeddings resized from {rows} to {rows + 3} rows" in caplog.text


# --- 3. a LoRA adapter whose base model does not exist


@pytest.fixture
def adapter(persona_checkpoint, tmp_path) -> str:
    peft = pytest.importorskip("peft")
    from persona_lora import lora_settings
    from persona_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(persona_checkpoint)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, **lora_settings(model, tokenizer)))
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


def set_base(adapter: str, base: str) -> str:
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    config["base_model_name_or_path"] = base
    json.dump(config, open(path, "w"))
    return path


@pytest.mark.parametrize("base", ["/no/such/base", "../gone/base"])
def test_adapter_whose_base_folder_is_gone_names_the_config_field(adapter, base, capsys):
    config = set_base(adapter, base)
    line = error_line(persona_chat.cli, ["--model_name_or_path", adapter, *CHAT_ARGS], capsys)
    assert f"{config}: base_model_name_or_path {base!r}: no such folder" in line
    assert "edit that field" in line


def test_adapter_whose_base_hub_id_is_not_cached_offline(adapter, capsys):
    config = set_base(adapter, "someone/base-model")
    line = error_line(persona_chat.cli, ["--model_name_or_path", adapter, *CHAT_ARGS], capsys)
    assert f"{config}: base_model_name_or_path 'someone/base-model'" in line and "offline" in line


# --- 4. Hub ids offline and without a network


@pytest.mark.parametrize("script", ["chat", "eval"])
def test_hub_id_offline_names_the_id(script, personachat_json, tmp_path, capsys):
    cli, extra = (
        (persona_chat.cli, CHAT_ARGS) if script == "chat" else (persona_eval.cli, ["--dataset_path", personachat_json])
    )
    line = error_line(cli, ["--model_name_or_path", "someone/persona-bot", *extra], capsys)
    assert "someone/persona-bot: not a local folder and not in the Hub cache, and the Hub is offline" in line


def run_without_network(argv: list[str], cwd) -> tuple[subprocess.CompletedProcess, float]:
    """A console script with HF_HUB_OFFLINE unset and the Hub at a closed local port (no network), timed."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, name",
    [
        (["persona_chat.py", "--model_name_or_path", "someone/persona-bot", *CHAT_ARGS], "someone/persona-bot"),
        (["run_persona.py", "--model_name_or_path", "someone/persona-bot"], "someone/persona-bot"),
        (["persona_eval.py", "--model_name_or_path", "{ckpt}", "--nli_model", "someone/nli"], "NLI model someone/nli"),
    ],
    ids=["chat", "train", "eval-nli"],
)
def test_hub_unreachable_fails_within_seconds_naming_the_id(argv, name, persona_checkpoint, personachat_json, tmp_path):
    argv = [os.path.join(ROOT, argv[0]), *(a.replace("{ckpt}", persona_checkpoint) for a in argv[1:])]
    argv += ["--dataset_path", personachat_json] if "chat" not in argv[0] else []
    argv += ["--output_dir", str(tmp_path / "out")] if "run_persona" in argv[0] else []
    proc, seconds = run_without_network(argv, tmp_path)
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{name}: the Hub (http://127.0.0.1:9) cannot be reached" in errors[0]
    # huggingface_hub's own retries (logged as "Retrying in 8s [Retry 5/5]") took over a minute per file; what is
    # left is start-up, which takes tens of seconds on a busy 2-core machine.
    assert "Retry" not in proc.stderr and seconds < 90, proc.stderr


# --- 5. a merged LoRA folder without its tokenizer


def chat_replies(argv, monkeypatch) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi there\n")))
    return persona_chat.cli([*argv, *CHAT_ARGS])


def test_readme_merged_lora_snippet_and_its_hint(adapter, tmp_path, capsys, monkeypatch):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S) if '"merged"' in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace('"out"', repr(adapter)), "README.md", "exec"), {})  # noqa: S102
    assert chat_replies(["--model_name_or_path", "merged"], monkeypatch) == 0

    # Saved as before (weights only): the error's hint is a flag persona-chat has, and following it works.
    for name in os.listdir("merged"):
        if name.startswith("tokenizer") or name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(os.path.join("merged", name))
    capsys.readouterr()
    line = error_line(persona_chat.cli, ["--model_name_or_path", "merged", *CHAT_ARGS], capsys)
    assert "merged: no tokenizer files" in line and "--tokenizer_name" in line
    assert "--tokenizer_name" in persona_chat.make_parser().format_help()
    assert chat_replies(["--model_name_or_path", "merged", "--tokenizer_name", adapter], monkeypatch) == 0


# --- 6. noise


@pytest.mark.slow
def test_loading_a_plain_lm_says_what_happened_in_lines_of_its_own(tiny_checkpoint, personachat_json, tmp_path):
    """A GPT-2 LM-head checkpoint (no multiple-choice head, no persona tokens), evaluated: no load report table, no
    colour codes, no resize notice, no DeepSpeed notice; our lines say what happened."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path / "lm")
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path / "lm")
    rows = embedding_rows(tmp_path / "lm")
    argv = [os.path.join(ROOT, "persona_eval.py"), "--model_name_or_path", str(tmp_path / "lm")]
    argv += ["--dataset_path", personachat_json, "--max_turns", "2", "--output_file", str(tmp_path / "r.json")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for noise in ("LOAD REPORT", "\x1b[", "multivariate normal", "Setting accelerator to CPU", "missing keys"):
        assert noise not in out, noise
    assert f"5 persona special tokens added, embeddings resized from {rows} to {rows + 5} rows" in out
    assert "no multiple-choice head in its weights (it starts untrained)" in out


def trainer_warnings(trainer, folder) -> list[str]:
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers.trainer")
    library_logger.addHandler(handler)
    try:
        trainer._load_from_checkpoint(str(folder))
    finally:
        library_logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_resume_reports_no_tied_weights_missing_but_real_ones(persona_checkpoint, tmp_path):
    from persona_model import load_model_and_tokenizer
    from persona_trainer import PersonaTrainer, PersonaTrainingArguments

    model, _ = load_model_and_tokenizer(persona_checkpoint)
    assert model.config.tie_word_embeddings  # lm_head.weight is not in model.safetensors
    args = PersonaTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = PersonaTrainer(model=model, args=args)
    assert trainer_warnings(trainer, persona_checkpoint) == []

    # A tensor that is really missing is still reported (and only it).
    damaged = tmp_path / "damaged"
    shutil.copytree(persona_checkpoint, damaged)
    tensors = load_file(damaged / "model.safetensors")
    del tensors["transformer.h.0.ln_1.weight"]
    from safetensors.torch import save_file

    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    (warning,) = trainer_warnings(trainer, damaged)
    assert "['transformer.h.0.ln_1.weight']" in warning and "lm_head" not in warning


def test_a_load_reports_really_missing_weights_in_one_line_of_ours(persona_checkpoint, tmp_path, caplog):
    from safetensors.torch import save_file

    from persona_model import load_model_and_tokenizer

    damaged = tmp_path / "damaged"
    shutil.copytree(persona_checkpoint, damaged)
    tensors = load_file(damaged / "model.safetensors")
    del tensors["transformer.h.0.ln_1.weight"]
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="persona_model"):
        load_model_and_tokenizer(str(damaged))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"{damaged}: 1 weights not in the checkpoint, initialised at random (transformer.h.0.ln_1.weight)."
    ]


def test_a_tokenizer_folder_without_config_is_a_tokenizer_name(persona_checkpoint, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(persona_checkpoint).save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    assert (
        chat_replies(
            ["--model_name_or_path", persona_checkpoint, "--tokenizer_name", str(tmp_path / "tok")], monkeypatch
        )
        == 0
    )
    (tmp_path / "empty").mkdir()
    argv = ["--model_name_or_path", persona_checkpoint, "--tokenizer_name", str(tmp_path / "empty"), *CHAT_ARGS]
    assert f"--tokenizer_name {tmp_path / 'empty'}: no config.json" in error_line(persona_chat.cli, argv, capsys)
