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

import persona_chat
import persona_demo
import persona_eval
import run_persona

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("PERSONA_DEBUG", raising=False)


def error_line(cli, argv, capsys) -> str:
    """Run a console script's `cli(argv)` in-process; assert status 2 and exactly one `prog: error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def no_loading(monkeypatch):
    """Fail the test if a model gets loaded: flag checks come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    for module in (persona_chat, persona_demo, run_persona):
        monkeypatch.setattr(module, "load_model_and_tokenizer", refuse, raising=False)
    monkeypatch.setattr(persona_chat, "load_for_chat", refuse)
    monkeypatch.setattr(persona_demo, "load_for_chat", refuse)
    import persona_model

    monkeypatch.setattr(persona_model, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--max_train_samples", "0"], "--max_train_samples must be >= 1"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--max_length", "-5"], "--max_length must be >= 8"),
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
        ("twice.yaml", "seed: 1\nnum_candidates: 2\nseed: 3\n", "line 3: option 'seed' is given twice"),
        ("twice.json", '{"seed": 1, "seed": 2}', "option 'seed' is given twice"),
        ("broken.json", '{"seed": 1,', "not valid JSON (line 1"),
        ("latin1.yaml", b"output_dir: caf\xe9\n", "not UTF-8 text"),
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
    assert "nope.yaml: No such file or directory" in line
    (tmp_path / "dir.yaml").mkdir()
    assert "is a directory" in error_line(run_persona.cli, [str(tmp_path / "dir.yaml")], capsys)


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
        (["--max_length", "3"], "--max_length must be >= 8"),
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
        ("binary.txt", "a binary file, not text"),
        ("latin1.txt", "line 1 is not UTF-8 text"),
        ("blank.txt", "no persona sentence in it"),
        (".", "is a directory"),
    ]:
        line = error_line(persona_chat.cli, [*base, str(tmp_path / name)], capsys)
        assert f"--persona_file {tmp_path / name}" in line and words in line, line


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
