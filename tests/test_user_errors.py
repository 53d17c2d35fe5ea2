"""The four console scripts' error boundary: each class of user mistake gives exit status 2 and one stderr line that
names the flag, file or field, never a traceback. Flag and config mistakes are caught before anything is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, error_line, no_loading

import persona_chat
import persona_demo
import persona_eval
import run_persona
from persona_errors import UsageError


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--max_length", "-5"], "--max_length must be >= 5"),
        (["--max_history", "-1"], "--max_history must be >= 0"),
        (["--num_candidats", "3"], "unrecognized argument '--num_candidats'; did you mean --num_candidates?"),
        (["--on_bad_record", "maybe"], "invalid choice: 'maybe'"),
        (["--num_train_epochs", "x"], "--num_train_epochs"),
        (["--max_steps", "0"], "Nothing to train"),
        (["--model_name_or_path", "runs/nope"], "--model_name_or_path runs/nope: no such folder"),
        (["--model_name_or_path", "./x"], "--model_name_or_path ./x: no such folder"),
        (["--resume_from_checkpoint", "out/nope"], "--resume_from_checkpoint out/nope: no such checkpoint folder"),
        (["--nli_model", "org/nli"], "--nli_model scores the replies of --do_convai2_eval"),
        (["--nli_model", "./nli", "--do_convai2_eval"], "--nli_model ./nli: no such folder"),
    ],
)
def test_persona_train_bad_flags(flags, words, tmp_path, capsys, monkeypatch, personachat_json):
    no_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset_path", personachat_json, "--output_dir", str(tmp_path / "out"), *flags]
    assert words in error_line(run_persona.cli, argv, capsys)


def test_deepspeed_without_a_launcher(tmp_path, capsys, monkeypatch, personachat_json):
    no_loading(monkeypatch)
    for name in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = os.path.join(ROOT, "configs", "deepspeed", "zero2.json")
    argv = ["--dataset_path", personachat_json, "--output_dir", str(tmp_path / "out"), "--deepspeed", config]
    assert "--deepspeed needs a launcher" in error_line(run_persona.cli, argv, capsys)


def test_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    (tmp_path / "out").write_text("x")
    line = error_line(run_persona.cli, ["--output_dir", str(tmp_path / "out")], capsys)
    assert "--output_dir" in line and "is a file" in line


@pytest.mark.parametrize("script", ["train", "eval"])
def test_output_path_under_a_file(script, tmp_path, capsys, monkeypatch, tiny_checkpoint, personachat_json):
    # Found before loading, instead of "Not a directory" / "File exists" from makedirs after the work.
    no_loading(monkeypatch)
    (tmp_path / "plain").write_text("x")
    if script == "train":
        cli, flag, target = run_persona.cli, "--output_dir", tmp_path / "plain" / "sub" / "run"
    else:
        cli, flag, target = persona_eval.cli, "--output_file", tmp_path / "plain" / "r.json"
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, flag, str(target)]
    line = error_line(cli, argv, capsys)
    assert f"{flag} {target}: {tmp_path / 'plain'} is a file, not a folder" in line, line


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_persona_demo_bad_host(host, tiny_checkpoint, capsys, monkeypatch):
    no_loading(monkeypatch)
    line = error_line(persona_demo.cli, ["--model_name_or_path", tiny_checkpoint, "--host", host], capsys)
    assert line.startswith(f"persona-demo: error: --host {host}: not an address of this machine"), line


@pytest.mark.parametrize("host, words", [("", "--host is empty"), ("::1", "--host ::1: Gradio serves IPv4")])
def test_persona_demo_host_it_cannot_serve(host, words, tiny_checkpoint, capsys, monkeypatch):
    no_loading(monkeypatch)
    line = error_line(persona_demo.cli, ["--model_name_or_path", tiny_checkpoint, "--host", host], capsys)
    assert words in line, line


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("list.yaml", "- a\n- b\n", "not a list"),
        ("scalar.yaml", "42\n", "not a single value"),
        ("broken.yaml", "a: [1, 2\nb: 3\n", "not valid YAML (line"),
        ("typo.yaml", "model_name_or_pth: x\n", "unknown option(s) ['model_name_or_pth'] (did you mean"),
        ("twice.yaml", "seed: 1\nnum_candidates: 2\nseed: 3\n", "line 3, column 1: duplicate key 'seed'"),
        ("twice.json", '{"seed": 1, "seed": 2}', "line 1, column 1: duplicate key 'seed'"),
        ("broken.json", '{"seed": 1,', "not valid JSON (line 1"),
        ("latin1.yaml", b"output_dir: caf\xe9\n", "line 1: not UTF-8 (byte 15 of the file)"),
        ("text_for_int.yaml", 'seed: "two"\n', "option 'seed' must be a whole number, got 'two'"),
        ("list_for_int.yaml", "seed: [1]\n", "option 'seed' must be a whole number, got [1]"),
        ("fraction_for_int.yaml", "seed: 1.5\n", "option 'seed' must be a whole number, got 1.5"),
        ("bool_for_int.yaml", "seed: true\n", "option 'seed' must be a whole number, got True"),
        ("text_for_int.json", '{"seed": "x"}', "option 'seed' must be a whole number, got 'x'"),
    ],
)
def test_bad_config_files(name, text, words, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for cli in (run_persona.cli, persona_eval.cli, persona_chat.cli, persona_demo.cli):
        line = error_line(cli, [str(path)], capsys)
        assert str(path) in line and words in line, line


@pytest.mark.parametrize("value", ["null", "[1]", "'fast'"])
def test_config_values_are_checked_like_flags(value, tmp_path, capsys, monkeypatch):
    # Config values bypass argparse's conversion; a null would silently replace the default.
    no_loading(monkeypatch)
    path = tmp_path / "lr.yaml"
    path.write_text(f"learning_rate: {value}\n")
    line = error_line(run_persona.cli, [str(path), "--output_dir", str(tmp_path / "out")], capsys)
    assert str(path) in line and "option 'learning_rate'" in line, line


@pytest.mark.parametrize(
    "line, words",
    [
        ("dataset_path: [a.json, b.json]", "option 'dataset_path' takes one value, got a list"),
        ("dataset_path: true", "option 'dataset_path' must be text, got True"),
        ("lora_target_modules: [c_attn, [c_proj]]", "option 'lora_target_modules' must be text"),
    ],
)
def test_config_text_options_are_text(line, words, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    path = tmp_path / "run.yaml"
    path.write_text(line + "\n")
    assert words in error_line(run_persona.cli, [str(path), "--output_dir", str(tmp_path / "out")], capsys)


def test_config_text_options_take_numbers_and_single_items(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: 2024\nlora_target_modules: c_attn\nreport_to: [none]\n")
    model_args, _, training_args = run_persona.parse_args([str(path)])
    assert training_args.output_dir == "2024" and model_args.lora_target_modules == ["c_attn"]
    assert training_args.report_to == [] or training_args.report_to == ["none"]


def test_missing_config_and_directory(tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    line = error_line(run_persona.cli, [str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml: no such file; pass a YAML or JSON config file." in line
    (tmp_path / "dir.yaml").mkdir()
    assert "dir.yaml: is a folder" in error_line(run_persona.cli, [str(tmp_path / "dir.yaml")], capsys)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--num_beams", "0"], "--num_beams must be between 1 and 32"),
        (["--temperature", "0"], "--temperature must be a number > 0"),
        (["--temperature", "nan"], "--temperature must be a number > 0"),
        (["--min_length", "30", "--max_new_tokens", "5"], "--min_length must be between 0 and --max_new_tokens (5)"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
        (["--top_p", "2"], "--top_p must be in (0, 1]"),
        (["--top_k", "-1"], "--top_k must be >= 0"),
        (["--max_history", "-1"], "--max_history must be >= 0"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--device", "meta"], "--device meta: not a device to run a model on"),
        (["--device", "xla"], "--device xla: not a device to run a model on"),
        (["--dtype", "int3"], "invalid choice: 'int3'"),
        (["--num_candidats", "3"], "unrecognized argument '--num_candidats'"),
        (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
        (["--seed", str(2**32)], "--seed must be between 0 and 2**32 - 1"),
    ],
)
def test_persona_chat_bad_flags(flags, words, tiny_checkpoint, capsys, monkeypatch):
    no_loading(monkeypatch)
    line = error_line(persona_chat.cli, ["--model_name_or_path", tiny_checkpoint, "--stdin", *flags], capsys)
    assert line.startswith("persona-chat: error: ") and words in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_persona_chat_cuda_without_cuda(tiny_checkpoint, capsys, monkeypatch):
    no_loading(monkeypatch)
    line = error_line(persona_chat.cli, ["--model_name_or_path", tiny_checkpoint, "--device", "cuda"], capsys)
    assert "--device cuda: this machine has no CUDA" in line


@pytest.mark.parametrize("script", ["chat", "demo"])
def test_persona_sentences_in_a_config_file_must_be_text(script, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    cli = {"chat": persona_chat.cli, "demo": persona_demo.cli}[script]
    config = tmp_path / "chat.yaml"
    config.write_text(f"model_name_or_path: {tiny_checkpoint}\npersona: [i like tea., {{likes: tea}}]\n")
    assert "option 'persona' must be text" in error_line(cli, [str(config)], capsys)


def test_config_file_hints(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    no_loading(monkeypatch)
    path = tmp_path / "eval.yaml"
    path.write_text(f"model_name_or_path: {tiny_checkpoint}\ndataset_path: data.json\nno_f1: true\n")
    line = error_line(persona_eval.cli, [str(path)], capsys)
    assert "unknown option(s) ['no_f1'] (did you mean 'f1: false'?)" in line
    path.write_text("model_name_or_path: null\n")
    assert "option 'model_name_or_path' has no value" in error_line(persona_chat.cli, [str(path)], capsys)
    # A config file cut short to nothing (or only comments) would run every default: one line, before loading.
    for text in ("", "# model_name_or_path: gpt2\n", "{}\n"):
        path.write_text(text)
        line = error_line(run_persona.cli, [str(path), "--output_dir", str(tmp_path / "o")], capsys)
        assert f"{path}: the config file holds no options" in line


def test_persona_demo_persona_over_the_character_limit(tiny_checkpoint, capsys, monkeypatch):
    no_loading(monkeypatch)
    argv = ["--model_name_or_path", tiny_checkpoint, "--persona", "x" * 30, "--max_persona_chars", "20"]
    assert "--persona: 30 characters, over --max_persona_chars (20)" in error_line(persona_demo.cli, argv, capsys)


def test_a_single_persona_text_in_a_config_file_is_one_sentence(tiny_checkpoint, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(f"model_name_or_path: {tiny_checkpoint}\npersona: i like tea.\n")
    args, *_ = persona_chat.parse_args_with_config(persona_chat.make_parser(), [str(config)])
    assert args.persona == ["i like tea."]
    with pytest.raises(ValueError, match="--persona: 42 is not a sentence"):
        persona_chat.ChatArguments(model_name_or_path=tiny_checkpoint, persona=["i like tea.", 42])


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--max_turns", "0"], "--max_turns must be >= 1"),
        (["--max_turns", "-4"], "--max_turns must be >= 1"),
        (["--max_length", "3"], "--max_length must be >= 5"),
        (["--max_history", "-1"], "--max_history must be >= 0"),
        (["--num_beams", "0"], "--num_beams must be between 1 and 32"),
        (["--no_sample", "false", "--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--no_f1", "--save_predictions"], "--save_predictions keeps the replies generated for F1"),
        (["--dataset_cache", os.path.abspath(__file__)], "is a file; pass a folder"),
        (["--nli_model", "./no-such-nli"], "--nli_model ./no-such-nli: no such folder"),
        (["--nli_model", "org/nli", "--no_f1"], "--nli_model scores the replies generated for F1"),
        (["--nli_model", "org/nli", "--nli_pair_order", "backwards"], "invalid choice: 'backwards'"),
        (["--nli_model", "org/nli", "--nli_batch_size", "0"], "--nli_batch_size must be >= 1"),
    ],
)
def test_persona_eval_bad_flags(flags, words, tiny_checkpoint, personachat_json, capsys, monkeypatch):
    no_loading(monkeypatch)
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, *flags]
    assert words in error_line(persona_eval.cli, argv, capsys)


@pytest.mark.parametrize("script", ["chat", "eval", "demo", "train"])
def test_model_paths_that_are_not_checkpoints(script, tmp_path, capsys, monkeypatch, personachat_json):
    no_loading(monkeypatch)
    cli = {"chat": persona_chat.cli, "eval": persona_eval.cli, "demo": persona_demo.cli, "train": run_persona.cli}
    extra = {"chat": ["--stdin"], "eval": ["--dataset_path", personachat_json], "demo": [], "train": []}[script]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_text("x")
    for path, words in [
        ("runs/nope", "no such folder"),
        ("./x", "no such folder"),
        (str(tmp_path / "abs" / "nope"), "no such folder"),
        (str(tmp_path / "empty"), "no config.json in this folder"),
        (str(tmp_path / "file.bin"), "is a file"),
    ]:
        line = error_line(cli[script], ["--model_name_or_path", path, *extra], capsys)
        assert f"--model_name_or_path {path}: {words}" in line, line


@pytest.mark.parametrize("script", ["chat", "eval"])
def test_checkpoint_without_tokenizer_files(script, tiny_checkpoint, personachat_json, tmp_path, capsys):
    # transformers would otherwise build a tokenizer with a vocabulary of 1 and the bot would answer garbage.
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            os.remove(folder / name)
    if script == "chat":
        cli, argv = persona_chat.cli, ["--stdin", "--persona", "i like tea."]
    else:
        cli, argv = persona_eval.cli, ["--dataset_path", personachat_json, "--output_file", str(tmp_path / "r.json")]
    line = error_line(cli, ["--model_name_or_path", str(folder), *argv], capsys)
    assert f"{folder}: no tokenizer files" in line, line


def test_config_that_does_not_match_the_weights(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    argv = ["--model_name_or_path", str(folder), "--stdin", "--persona", "i like tea."]
    line = error_line(persona_chat.cli, argv, capsys)
    assert f"{folder}: the weights do not match its config.json" in line, line


def test_config_with_a_value_of_the_wrong_type(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = "big"
    (folder / "config.json").write_text(json.dumps(config))
    argv = ["--model_name_or_path", str(folder), "--stdin", "--persona", "i like tea."]
    line = error_line(persona_chat.cli, argv, capsys)
    assert f"{folder}: config.json is not valid" in line and "n_embd" in line, line


def test_truncated_weights_name_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = error_line(persona_chat.cli, ["--model_name_or_path", str(broken), "--stdin"], capsys)
    assert f"{broken}: a weights file is damaged or incomplete" in line


def test_persona_files(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    base = ["--model_name_or_path", tiny_checkpoint, "--stdin", "--persona_file"]
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes(b"i like caf\xe9.\n")
    (tmp_path / "blank.txt").write_text("\n \n")
    os.mkfifo(tmp_path / "fifo")
    for name, words in [
        ("missing.txt", "no such file"),
        ("fifo", "not a regular file"),
        ("binary.txt", "line 3: a NUL byte (byte 8 of the file): a binary file"),
        ("latin1.txt", "line 1: not UTF-8 (byte 10 of the file)"),
        ("blank.txt", "no persona sentence in it"),
        (".", "is a folder"),
    ]:
        line = error_line(persona_chat.cli, [*base, str(tmp_path / name)], capsys)
        assert f"--persona_file {tmp_path / name}" in line and words in line, line


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32"]
)  # "utf-16"/"utf-32": Python's, with the machine's byte-order mark
def test_persona_file_in_any_unicode_text_encoding(encoding, tmp_path):
    """Windows editors save "Unicode" text as UTF-16 with a byte-order mark: it is text, read like UTF-8."""
    import codecs

    text = "i like café.\r\n\r\nmy dog is named ß.\r\n"
    marks = {"utf-16-le-bom": codecs.BOM_UTF16_LE, "utf-16-be-bom": codecs.BOM_UTF16_BE}
    data = marks[encoding] + text.encode(encoding[:9]) if encoding in marks else text.encode(encoding)
    (tmp_path / "persona.txt").write_bytes(data)
    args = persona_chat.make_parser().parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--persona", "i sing.", "--persona_file", str(tmp_path / "persona.txt")]
    )[0]
    assert persona_chat._read_persona(args, seed=0, interactive=False) == [
        "i sing.",
        "i like café.",
        "my dog is named ß.",
    ]
    # A UTF-16 file broken after its mark (a lone surrogate) names the file and the line.
    (tmp_path / "broken.txt").write_bytes(codecs.BOM_UTF16_LE + "hi\n".encode("utf-16-le") + b"\x00\xd8a\x00")
    with pytest.raises(UsageError, match=r"--persona_file .*broken.txt: line 2: not valid UTF-16 text"):
        persona_chat.read_text_lines(str(tmp_path / "broken.txt"), "--persona_file")


@pytest.mark.parametrize(
    "bad_line, words",
    [(b"\xff\xfe oops\n", "stdin line 2: not UTF-8 text"), (b"hi\0there\n", "stdin line 2: NUL byte")],
)
def test_invalid_utf8_on_stdin_names_the_line(bad_line, words, tiny_checkpoint, capsys, monkeypatch):
    class Stdin:
        buffer = [b"hi\n", bad_line]

    monkeypatch.setattr(sys, "stdin", Stdin())
    argv = ["--model_name_or_path", tiny_checkpoint, "--stdin", "--persona", "i like tea.", "--no_sample"]
    assert words in error_line(persona_chat.cli, argv, capsys)


def test_named_split_never_falls_back(tiny_checkpoint, personachat_json, capsys, tmp_path):
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, "--split", "test"]
    line = error_line(persona_eval.cli, [*argv, "--output_file", str(tmp_path / "r.json")], capsys)
    assert "has no split 'test' (it has ['train', 'valid'])" in line


def test_one_split_file_with_default_evaluation(tiny_checkpoint, synthetic_data, tmp_path, capsys):
    data = tmp_path / "train_only.json"
    data.write_text(json.dumps({"train": synthetic_data["train"][:4]}))
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", str(data), "--output_dir", str(tmp_path / "o")]
    line = error_line(run_persona.cli, [*argv, "--dataset_cache", str(tmp_path / "cache")], capsys)
    assert "has no split 'valid' or 'validation' or 'test' (it has ['train'])" in line
    assert "pass --do_eval false to train without evaluating, or --eval_split NAME" in line


def test_corrupted_feature_cache_hints_overwrite_cache(tiny_checkpoint, personachat_json, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, "--dataset_cache", str(cache),
            "--output_dir", str(tmp_path / "o"), "--do_train", "false", "--max_eval_samples", "2",
            "--report_to", "none", "--use_cpu", "true"]  # fmt: skip
    run_persona.cli(argv)
    capsys.readouterr()
    arrows = [os.path.join(d, f) for d, _, files in os.walk(cache) for f in files if f.endswith(".arrow")]
    assert arrows
    for path in arrows:
        with open(path, "r+b") as f:
            f.truncate(100)
    line = error_line(run_persona.cli, argv, capsys)
    assert str(cache) in line and "--overwrite_cache true" in line


@pytest.mark.slow
def test_one_line_through_the_real_console_script_and_once_under_torchrun(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PERSONA_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    args = ["--output_dir", str(tmp_path / "o"), "--gradient_accumulation_steps", "0"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_persona.py"), *args], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "persona-train: error: --gradient_accumulation_steps must be >= 1, got 0."
    ], proc.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, os.path.join(ROOT, "run_persona.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("persona-train: error: --gradient_accumulation_steps") == 1, proc.stderr
    debug = subprocess.run([sys.executable, os.path.join(ROOT, "run_persona.py"), *args], capture_output=True,
                           text=True, cwd=tmp_path, env={**env, "PERSONA_DEBUG": "1"}, timeout=300)  # fmt: skip
    assert "Traceback" in debug.stderr


def test_an_internal_value_error_during_training_is_a_bug_with_its_traceback(
    tiny_checkpoint, personachat_json, tmp_path, capsys, monkeypatch
):
    """A ValueError raised inside the training loop (here: a failed unpacking in compute_loss) is not the user's
    mistake: the traceback stays, one line says it is a bug, exit status 1."""
    import persona_trainer

    def broken_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        first, _second = [model]  # the kind of slip a refactor makes
        return first

    monkeypatch.setattr(persona_trainer.PersonaTrainer, "compute_loss", broken_loss)
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, "--output_dir",
            str(tmp_path / "run"), "--max_steps", "1", "--num_candidates", "2", "--do_eval", "false",
            "--report_to", "none", "--use_cpu", "true", "--dataset_cache", str(tmp_path / "cache")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_persona.cli(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "Traceback" in err and "ValueError: not enough values to unpack" in err and "broken_loss" in err
    assert err.strip().splitlines()[-1].startswith("persona-train: internal error: this is a bug")
    assert ": error: " not in err


# --- issue 20: flags, outputs and messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cli, flags, words",
    [
        (persona_chat.cli, ["--stdin", "--no_sample", "--num_beams", "100000"], "--num_beams must be between 1 and 32"),
        (persona_chat.cli, ["--stdin", "--num_beams", "33"], "--num_beams must be between 1 and 32, got 33"),
        (persona_chat.cli, ["--stdin", "--no_sample", "--top_k", "-3"], "--top_k must be >= 0"),
        (persona_chat.cli, ["--stdin", "--no_sample", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (persona_chat.cli, ["--stdin", "--no_sample", "--temperature", "-1"], "--temperature must be a number > 0"),
        (persona_eval.cli, ["--dataset_path", "d.json", "--top_k", "-3"], "--top_k must be >= 0"),  # greedy default
        (persona_eval.cli, ["--dataset_path", "d.json", "--num_beams", "5000"], "--num_beams must be between 1 and 32"),
    ],
)
def test_decoding_options_are_bounded_and_checked_in_every_mode(
    cli, flags, words, tiny_checkpoint, capsys, monkeypatch
):
    no_loading(monkeypatch)
    line = error_line(cli, ["--model_name_or_path", tiny_checkpoint, *flags], capsys)
    assert words in line, line


def test_sampling_options_under_no_sample_are_said_ignored_once(capsys):
    from persona_decoding import EvalGenerationArguments, GenerationArguments

    GenerationArguments(no_sample=True, top_p=0.5, top_k=3)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "--top_k, --top_p" in warnings[0] and "--no_sample" in warnings[0], warnings
    GenerationArguments(top_p=0.5, top_k=3)  # sampling: they apply
    EvalGenerationArguments()  # greedy with the sampling defaults: nothing set, nothing to say
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "place, flag_of",
    [
        ("/proc/persona-run", "--output_dir"),  # nothing can be created in /proc
        ("{file}/run", "--output_dir"),  # a file among the folders above
        ("{file}", "--output_dir"),  # a file where the folder goes
    ],
)
def test_persona_train_output_dir_checked_before_loading(place, flag_of, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    (tmp_path / "f").write_text("x")
    output_dir = place.format(file=tmp_path / "f")
    line = error_line(run_persona.cli, ["--model_name_or_path", "gpt2", "--output_dir", output_dir], capsys)
    assert f"{flag_of} {output_dir}" in line, line


@pytest.mark.parametrize("output_file", ["/proc/r.json", "/proc/version", "/sys/r/x.json", "{file}/r.json", "{dir}"])
def test_persona_eval_output_file_checked_before_loading(output_file, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    (tmp_path / "f").write_text("x")
    output_file = output_file.format(file=tmp_path / "f", dir=tmp_path)
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", "d.json", "--output_file", output_file]
    line = error_line(persona_eval.cli, argv, capsys)
    assert f"--output_file {output_file}" in line, line


def test_check_writable_tries_the_place_and_leaves_nothing(tmp_path):
    from persona_locations import check_writable

    check_writable(str(tmp_path / "new" / "deeper"), "--output_dir", folder=True)
    check_writable(str(tmp_path / "results.json"), "--output_file")
    existing = tmp_path / "old.json"
    existing.write_text("kept")
    check_writable(str(existing), "--output_file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"] and existing.read_text() == "kept"


def test_quote_cuts_long_values():
    from persona_errors import quote

    assert quote("abc") == "'abc'" and quote([1, 2]) == "[1, 2]"
    long = quote("x" * 5000, limit=50)
    assert len(long) < 80 and long.startswith("'xxx") and long.endswith("... (5000 characters)")
    # A YAML alias bomb: 9**9 leaves, shared; its full repr would never finish.
    bomb = ["x"] * 9
    for _ in range(8):
        bomb = [bomb] * 9
    assert len(quote(bomb)) < 260 and quote(bomb).endswith("(9 items)")


@pytest.mark.parametrize(
    "cli, text, key",
    [
        (run_persona.cli, "num_candidates: " + "x" * 20_000, "num_candidates"),
        (run_persona.cli, "output_dir: [" + ", ".join(["ab"] * 5_000) + "]", "output_dir"),
        (persona_chat.cli, "top_k: {" + ", ".join(f"k{i}: {i}" for i in range(2_000)) + "}", "top_k"),
        (run_persona.cli, '{"' + "x" * 20_000 + '": 1}', "unknown option"),  # JSON: YAML keys stop at 1024
    ],
)
def test_errors_quote_huge_config_values_cut(cli, text, key, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    config = tmp_path / ("c.json" if text.startswith("{") else "c.yaml")
    config.write_text(text)
    line = error_line(cli, [str(config), "--model_name_or_path", "gpt2"], capsys)
    assert key in line and ("characters)" in line or "items)" in line or "..." in line) and len(line) < 600, line[:1000]


def test_the_boundary_cuts_any_huge_message(capsys):
    from persona_cli import run_console_script
    from persona_errors import UsageError

    def main(argv):
        raise UsageError("bad value " + "y" * 100_000 + " end")

    with pytest.raises(SystemExit):
        run_console_script("prog", main, [])
    err = capsys.readouterr().err
    assert err.startswith("prog: error: bad value yyy") and err.rstrip().endswith("y end") and len(err) < 2200


@pytest.mark.parametrize(
    "cli, text, words",
    [
        (run_persona.cli, "output_dir: {a: 1}\n", "option 'output_dir' takes text (a path, a name), not a mapping"),
        (persona_eval.cli, "dataset_path:\n  train: a.json\n", "option 'dataset_path' takes text"),
        (persona_chat.cli, "persona_file: {x: y}\n", "option 'persona_file' takes text"),
        (run_persona.cli, "lora_target_modules: {q: 1}\n", "option 'lora_target_modules' takes text"),
        (run_persona.cli, "model_name_or_path: [a, b]\n", "option 'model_name_or_path' takes one value"),
    ],
)
def test_a_mapping_where_text_goes_is_one_line(cli, text, words, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text(text)
    argv = [str(config)] + ([] if "model_name_or_path" in text else ["--model_name_or_path", tiny_checkpoint])
    line = error_line(cli, argv, capsys)
    assert words in line, line


def test_mapping_options_still_take_mappings(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("column_mapping: {persona: personality}\nlr_scheduler_kwargs: {power: 2.0}\n")
    _, data_args, training_args = run_persona.parse_args([str(config), "--output_dir", str(tmp_path / "out")])
    assert data_args.column_mapping == {"persona": "personality"} and training_args.lr_scheduler_kwargs == {
        "power": 2.0
    }


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning:" in line]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lora_r", "4", "--lora_alpha", "8"], ["--lora_r, --lora_alpha are ignored", "--use_peft true"]),
        (["--use_peft", "true", "--lora_r", "4"], None),
        (["--beta", "0.5"], ["--beta is ignored", "--objective dpo"]),
        (["--objective", "dpo", "--beta", "0.5"], None),
        (
            ["--num_candidates", "1", "--do_eval", "false", "--num_distractors", "5", "--mc_coef", "0"],
            ["--num_distractors is ignored", "ranks no candidates"],
        ),  # fmt: skip
        (["--num_candidates", "1", "--do_eval", "false"], ["--num_candidates 1", "--mc_coef 0"]),
        (["--num_candidates", "1", "--mc_coef", "0"], None),
        (["--num_candidates", "2", "--num_distractors", "5"], None),  # said after reading, if the data has candidates
    ],
)
def test_training_options_that_do_not_apply_are_said_once(flags, expected, tmp_path, capsys):
    run_persona.parse_args(["--model_name_or_path", "gpt2", "--output_dir", str(tmp_path / "out"), *flags])
    warnings = warning_lines(capsys.readouterr().err)
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and all(words in warnings[0] for words in expected), warnings


def test_num_distractors_on_data_with_candidates_is_said_once(capsys):
    from types import SimpleNamespace

    from persona_records import SplitReport
    from run_persona import warn_unused_distractors

    data_args = run_persona.DataArguments(dataset_path="d.json", num_distractors=5)
    training_args = SimpleNamespace(do_train=True, do_eval=True, eval_strategy="epoch")
    warn_unused_distractors(data_args, training_args, {"train": SplitReport(sampled=0), "valid": SplitReport()})
    warnings = warning_lines(capsys.readouterr().err)
    assert len(warnings) == 1 and "--num_distractors is ignored" in warnings[0] and "d.json" in warnings[0]
    warn_unused_distractors(data_args, training_args, {"train": SplitReport(sampled=3)})  # CSV: they were sampled
    data_args.num_distractors = 19  # the default: the user set nothing
    warn_unused_distractors(data_args, training_args, {"train": SplitReport(sampled=0)})
    assert capsys.readouterr().err == ""


def test_split_report_counts_replies_given_sampled_distractors(tmp_path):
    from persona_data import load_dialogs_with_report

    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"persona": ["i like tea."], "turns": ["hi", f"hello {i}", "how", f"fine {i}"]}) + "\n"
            for i in range(4)
        )
    )
    _, reports = load_dialogs_with_report(str(path), "chat_jsonl", num_distractors=2)
    assert reports["train"].sampled == 8  # 4 dialogs x 2 bot turns, none with candidates of its own


def test_persona_eval_nli_options_without_a_model_are_said(tiny_checkpoint, capsys):
    from persona_cli import parse_args_with_config

    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", "d.json", "--nli_batch_size", "8"]
    parse_args_with_config(persona_eval.make_parser(), argv)
    warnings = warning_lines(capsys.readouterr().err)
    assert len(warnings) == 1 and "--nli_batch_size is ignored" in warnings[0] and "--nli_model" in warnings[0]


def test_persona_chat_dataset_path_beside_a_persona_is_said(tiny_checkpoint, capsys):
    from persona_cli import parse_args_with_config

    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", "d.json", "--persona", "i like tea."]
    parse_args_with_config(persona_chat.make_parser(), argv)
    warnings = warning_lines(capsys.readouterr().err)
    assert len(warnings) == 1 and "--dataset_path is ignored" in warnings[0]


def test_demo_port_0_picks_a_free_port_and_exposed_host_is_said(tiny_checkpoint, capsys):
    import socket

    from persona_cli import parse_args_with_config

    port = persona_demo.check_port_free("127.0.0.1", 0)
    assert 0 < port < 65536
    with socket.socket() as sock:  # the port picked is free: it can be taken
        sock.bind(("127.0.0.1", port))
    parse_args_with_config(persona_demo.make_parser(), ["--model_name_or_path", tiny_checkpoint])
    assert capsys.readouterr().err == ""
    parse_args_with_config(persona_demo.make_parser(), ["--model_name_or_path", tiny_checkpoint, "--host", "0.0.0.0"])
    warnings = warning_lines(capsys.readouterr().err)
    assert len(warnings) == 1 and "--host 0.0.0.0" in warnings[0] and "network" in warnings[0]


def test_demo_serves_port_0_on_the_port_it_picked(tiny_checkpoint, monkeypatch):
    """persona-demo --port 0 hands Gradio a real port (Gradio would print a URL with port 0 and fail)."""
    launched = {}

    class FakeDemo:
        def queue(self):
            return self

        def launch(self, server_name, server_port, share):
            launched.update(host=server_name, port=server_port)

    fake_gradio = type(sys)("gradio")
    monkeypatch.setitem(sys.modules, "gradio", fake_gradio)
    import persona_generation

    monkeypatch.setattr(persona_generation, "load_for_chat", lambda *a, **k: (None, None))
    monkeypatch.setattr(persona_demo, "build_demo", lambda *a, **k: FakeDemo())
    assert persona_demo.cli(["--model_name_or_path", tiny_checkpoint, "--port", "0"]) == 0
    assert launched["host"] == "127.0.0.1" and 0 < launched["port"] < 65536


@pytest.mark.parametrize("cli", [persona_chat.cli, persona_eval.cli, run_persona.cli])
def test_dataset_cache_checked_before_loading(cli, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", "d.json", "--dataset_cache", "/proc/cache"]
    line = error_line(cli, argv + (["--output_dir", str(tmp_path / "o")] if cli is run_persona.cli else []), capsys)
    assert "--dataset_cache /proc/cache: cannot write in /proc" in line, line
