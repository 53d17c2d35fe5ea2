"""persona_cli: the config-file rule, the split look-up, and the one error boundary of the console scripts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from persona_cli import run_console_script
from persona_data import find_split
from persona_errors import UsageError
from persona_locations import looks_local
from persona_model import input_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_find_split_falls_back_only_when_no_split_is_named():
    assert find_split({"train": 0, "validation": 0}, None, "data.json") == "validation"
    assert find_split({"train": 0, "test": 0, "valid": 0}, None, "data.json") == "valid"
    assert find_split({"train": 0, "test": 0}, None, "data.json") == "test"
    assert find_split({"train": 0, "test": 0}, "test", "data.json") == "test"
    with pytest.raises(UsageError, match=r"data.json has no split 'valid' \(it has \['train', 'validation'\]\)"):
        find_split({"train": 0, "validation": 0}, "valid", "data.json")
    with pytest.raises(UsageError, match=r"no split 'valid' or 'validation' or 'test' \(it has \['train'\]\)"):
        find_split({"train": 0}, None, "data.json")


def test_local_looking_model_paths():
    for path in ("runs/nope", "./x", "/abs/path", "~/model", "a/b/c", "out/", "..\\x"):
        assert looks_local(path), path
    for hub_id in ("gpt2", "openai-community/gpt2", "microsoft/DialoGPT-medium"):
        assert not looks_local(hub_id), hub_id


def test_input_budget_is_capped_by_the_window():
    class Model:
        class config:  # noqa: N801
            n_positions = 64

    assert input_budget(Model, None) == 64 and input_budget(Model, 32) == 32 and input_budget(Model, 100) == 64


def test_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("PERSONA_DEBUG", raising=False)

    def main(argv):
        raise UsageError("data.json: dialog 3: missing field\n'utterances'.")

    with pytest.raises(SystemExit) as exit_info:
        run_console_script("persona-x", main, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "persona-x: error: data.json: dialog 3: missing field 'utterances'.\n"

    def missing(argv):
        open("no/such/file.txt")

    with pytest.raises(SystemExit):
        run_console_script("persona-x", missing, [])
    assert capsys.readouterr().err == "persona-x: error: no/such/file.txt: No such file or directory\n"


def test_debug_shows_the_traceback(monkeypatch):
    seen = []

    def main(argv):
        seen.append(argv)
        raise UsageError("bad")

    monkeypatch.setenv("PERSONA_DEBUG", "1")
    with pytest.raises(UsageError):
        run_console_script("persona-x", main, ["--debug", "underflow_overflow"])
    assert seen == [["--debug", "underflow_overflow"]]  # the Trainer's --debug is not ours to take


@pytest.mark.parametrize(
    "bug",
    [ValueError("not enough values to unpack (expected 2, got 1)"), KeyError("a bug"), OSError("no file named")],
)
def test_a_bug_keeps_its_traceback_and_says_it_is_one(bug, capsys, monkeypatch):
    """Only the project's own errors (and file errors naming their file) are one line: a ValueError raised inside
    the code or a library is a bug, shown with its traceback and exit status 1."""
    monkeypatch.delenv("PERSONA_DEBUG", raising=False)

    def main(argv):
        raise bug

    with pytest.raises(SystemExit) as exit_info:
        run_console_script("persona-x", main, [])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" in err and repr(bug)[: repr(bug).index("(")] in err
    assert err.strip().splitlines()[-1].startswith("persona-x: internal error: this is a bug")


@pytest.mark.parametrize(
    "script, args",
    [
        ("run_persona.py", ["--num_candidates", "0", "--output_dir", "x"]),
        ("persona_eval.py", ["--model_name_or_path", "m", "--dataset_path", "d", "--batch_size", "0"]),
        ("persona_chat.py", ["--model_name_or_path", "m", "--persona_file", "no/such/persona.txt"]),
    ],
)
def test_console_scripts_share_the_boundary(script, args, tmp_path, capsys, monkeypatch):
    """Each script's console entry point, called in-process (test_user_errors.py runs one as a real process): exit
    status 2 and one line on stderr, nothing else."""
    import importlib

    monkeypatch.setenv("PERSONA_DEBUG", "0")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script[:-3]).cli(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and ": error: " in err


@pytest.mark.parametrize("script", ["run_persona.py", "persona_chat.py", "persona_eval.py", "persona_demo.py"])
def test_every_script_takes_the_shared_model_and_dialog_options(script):
    """One declaration of the loading and data options: the four parsers take the same flags with the same help."""
    import importlib

    from persona_arguments import DialogArguments, ModelArguments

    parser = importlib.import_module(script[:-3]).make_parser()
    actions = {a.dest: a for a in parser._actions}
    for dataclass_type in (ModelArguments, DialogArguments):
        for field in dataclasses.fields(dataclass_type):
            assert field.name in actions, (script, field.name)
            if field.name not in ("model_name_or_path", "dataset_path", "dataset_cache"):  # script defaults differ
                assert actions[field.name].help.startswith(field.metadata["help"]), (script, field.name)


def test_persona_train_help_lists_the_persona_options_first():
    import run_persona

    help_text = run_persona.make_parser().format_help()
    persona = [help_text.index(f"  --{name} ") for name in ("model_name_or_path", "num_candidates", "lm_coef")]
    trainer = [help_text.index(f"  --{name} ") for name in ("output_dir", "learning_rate", "seed")]
    assert max(persona) < min(trainer)


def test_help_and_flag_mistakes_come_before_the_heavy_stack():
    """--help and a flag mistake are answered before torch, datasets or gradio is imported (start-up in well under a
    second on an idle machine instead of seconds); the persona-train help parser has the real parser's flags."""
    code = """
import sys
import persona_chat, persona_demo, persona_eval, run_persona
from persona_cli import UsageError, parse_args_with_config
for module, argv in ((persona_chat, ["--model_name_or_path", "org/m", "--top_k", "-3"]),
                     (persona_eval, ["--model_name_or_path", "org/m", "--dataset_path", "d", "--batch_size", "0"]),
                     (persona_demo, ["--model_name_or_path", "org/m", "--port", "99999"])):
    try:
        parse_args_with_config(module.make_parser(), argv)
        raise SystemExit(f"{module.__name__}: no error")
    except UsageError:
        pass
run_persona.help_parser().format_help()
import os, tempfile
config = os.path.join(tempfile.mkdtemp(), "run.yaml")
with open(config, "w") as f:
    f.write("learning_rat: 0.001\\n")
for argv in (["--num_candidatez", "3"], [config], ["--num_candidates", "x"]):  # persona-train, its console entry
    try:
        run_persona.cli(argv)
        raise SystemExit(f"persona-train {argv}: no error")
    except SystemExit as err:
        if err.code != 2:
            raise
heavy = [m for m in ("torch", "datasets", "gradio", "deepspeed", "peft") if m in sys.modules]
print(heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_persona_train_help_parser_has_the_real_flags():
    import run_persona
    from persona_encoding import ENCODINGS

    flags = lambda parser: {a.dest for a in parser._actions}  # noqa: E731
    assert flags(run_persona.help_parser()) == flags(run_persona.make_parser())
    help_text = run_persona.help_parser().format_help()
    assert "--per_device_train_batch_size" in help_text and "(default: 4)" in help_text  # persona-train's default
    assert help_text.index("--lm_coef") < help_text.index("--learning_rate")
    assert tuple(run_persona.CANDIDATE_ENCODINGS) == ENCODINGS


def test_persona_eval_help_has_no_double_negative():
    import persona_eval

    parser = persona_eval.make_parser()
    help_text = parser.format_help()
    assert "--no_no_sample" not in help_text and "--no_f1" in help_text
    assert parser.parse_args_into_dataclasses(["--model_name_or_path", "org/m", "--dataset_path", "d",
                                               "--no_sample", "false"])[1].no_sample is False  # fmt: skip


@pytest.mark.parametrize("script", ["persona_chat", "persona_demo", "persona_eval", "run_persona"])
def test_bytes_that_are_not_utf8_on_the_command_line_name_the_flag(script):
    """A shell passes `--persona $'caf\\xe9'` (Latin-1) as bytes; Python hands them over as lone surrogates, which a
    tokenizer later refuses with a TypeError traceback."""
    import importlib

    from persona_cli import parse_args_with_config

    module = importlib.import_module(script)
    latin1 = os.fsdecode(b"caf\xe9")  # what sys.argv holds for those bytes
    flag = "--persona" if script in ("persona_chat", "persona_demo") else "--dataset_path"
    argv = ["--model_name_or_path", "m", *(["--output_dir", "o"] if script == "run_persona" else [])]
    with pytest.raises(UsageError, match=rf"^{flag}: 'caf\\udce9' is not UTF-8 text"):
        parse_args_with_config(module.make_parser(), [*argv, flag, latin1])
    with pytest.raises(UsageError, match=rf"^{flag}: '{flag}=caf\\udce9' is not UTF-8 text"):
        parse_args_with_config(module.make_parser(), [*argv, f"{flag}={latin1}"])


def test_training_config_holds_what_the_user_set_and_reads_back(tmp_path):
    """training_config.yaml: the options of the config file and the flags, plus the model and data, never every
    default (`debug: []`, ...); persona-train reads it back to the same options."""
    import yaml

    import run_persona
    from persona_checkpoints import write_training_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_candidates: 3\nlearning_rate: 0.001\nreport_to: none\n")
    argv = [str(recipe), "--output_dir", str(tmp_path / "out"), "--max_ste", "5", "--lm_coef=2.0"]  # a prefix too
    args = run_persona.parse_args(argv)
    path = tmp_path / "training_config.yaml"
    written = write_training_config(path, run_persona.make_parser(), *args, given=args[2].given_options)
    assert set(written) == {"model_name_or_path", "dataset_path", "num_candidates", "learning_rate", "report_to",
                            "max_steps", "lm_coef"}  # fmt: skip
    assert written["model_name_or_path"] == "openai-community/openai-gpt"  # the default, kept: it reproduces the run
    assert (written["num_candidates"], written["learning_rate"], written["lm_coef"]) == (3, 0.001, 2.0)
    assert yaml.safe_load(path.read_text()) == written
    again = run_persona.parse_args([str(path), "--output_dir", str(tmp_path / "again")])
    for first, second in zip(args, again):
        for name in written:
            if hasattr(first, name):
                assert getattr(second, name) == getattr(first, name), name


def test_readme_says_where_the_benchmark_data_comes_from():
    """The benchmark commands name Synthetic-Persona-Chat_valid.csv: the README says where that file comes from
    before the first of them (the Hub dataset and its file), and every bench script that takes it says so too."""
    import glob
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    first_command = text.index("--dataset_path Synthetic-Persona-Chat_valid.csv")
    note = text.index("google/Synthetic-Persona-Chat")
    assert note < first_command
    url = re.search(r"https://huggingface\.co/datasets/google/Synthetic-Persona-Chat/resolve/main/(\S+?\.csv)", text)
    assert url and url.group(1) == "data/Synthetic-Persona-Chat_valid.csv"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in re.findall(r"python (bench/\w+\.py) --dataset_path Synthetic-Persona-Chat_valid\.csv", text):
        assert script in [os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "bench", "*.py"))], script
