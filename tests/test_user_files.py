"""A user's text files, all read by one rule (`persona_files.read_text`): data files, `--persona_file`, config files and
`--chat_template` files take UTF-8 (a byte-order mark dropped) and UTF-16/UTF-32 with a byte-order mark, give the
same one-line errors naming the file for a missing / folder / special / binary / non-UTF-8 file, and refuse a JSON
(or YAML config) key given twice. Also: the recipes and the `evaluate` metric work from a wheel, outside a checkout."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import yaml

import persona_chat
from persona_chat_options import load_chat_template
from persona_cli import read_config_file
from persona_data import load_dialogs
from persona_errors import ChatTemplateError, PersonaDataError, PersonaError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIALOG = {"personality": ["i like café."], "utterances": [{"history": ["hi ß"], "candidates": ["no", "yes é"]}]}


def _data(path):
    return load_dialogs(path, "personachat_json")["train"][0]


# name: (file name, UTF-8 text, read(path) -> value, error type, message prefix)
READERS = {
    "data": ("d.json", json.dumps({"train": [DIALOG]}, ensure_ascii=False), _data, PersonaDataError, "{path}"),
    "config": ("c.yaml", "seed: 7\noutput_dir: café ß\n", read_config_file, UsageError, "{path}"),
    "json_config": ("c.json", '{"seed": 7, "output_dir": "café"}', read_config_file, UsageError, "{path}"),
    "chat_template": (
        "t.jinja",
        "{{ messages[0]['content'] }} é\n",
        load_chat_template,
        ChatTemplateError,
        "--chat_template {path}",
    ),
    "persona_file": (
        "p.txt",
        "i like café.\r\n\r\nmy dog is ß.\n",
        lambda path: persona_chat.read_text_lines(path, "--persona_file"),
        UsageError,
        "--persona_file {path}",
    ),
}
# The value each reader gives for its text, written here by hand.
EXPECTED = {
    "data": None,  # compared field by field below
    "config": {"seed": 7, "output_dir": "café ß"},
    "json_config": {"seed": 7, "output_dir": "café"},
    "chat_template": "{{ messages[0]['content'] }} é\n",
    "persona_file": ["i like café.", "my dog is ß."],
}
ENCODINGS = {
    "utf-8": lambda text: text.encode("utf-8"),
    "utf-8 with BOM": lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
    "utf-16-le with BOM": lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    "utf-16-be with BOM": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    "utf-32-le with BOM": lambda text: codecs.BOM_UTF32_LE + text.encode("utf-32-le"),
    "utf-32-be with BOM": lambda text: codecs.BOM_UTF32_BE + text.encode("utf-32-be"),
}


def _check_value(reader, value):
    if reader == "data":
        assert value["personality"] == DIALOG["personality"]
        assert value["utterances"][0]["history"] == ["hi ß"]
        assert value["utterances"][0]["candidates"] == ["no", "yes é"]
    else:
        assert value == EXPECTED[reader]


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_user_file_is_read_in_every_unicode_encoding(reader, encoding, tmp_path):
    name, text, read, *_ = READERS[reader]
    path = tmp_path / name
    path.write_bytes(ENCODINGS[encoding](text))
    _check_value(reader, read(str(path)))


def _bad_files(tmp_path, name: str) -> dict[str, tuple[str, str]]:
    """case -> (path, the words every reader's line holds after the file's name)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / f"fifo-{name}"
    os.mkfifo(fifo)
    loop = tmp_path / f"loop-{name}"
    loop.symlink_to(loop)
    latin1 = tmp_path / f"latin1-{name}"
    latin1.write_bytes(b"seed: 1\ncaf\xe9\n")
    binary = tmp_path / f"binary-{name}"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    wide = tmp_path / f"utf16-no-bom-{name}"
    wide.write_bytes("seed: 1\n".encode("utf-16-le"))
    broken = tmp_path / f"broken-utf16-{name}"
    broken.write_bytes(codecs.BOM_UTF16_LE + "a\n".encode("utf-16-le") + b"\x00\xd8b\x00")
    return {
        "missing": (str(tmp_path / f"nowhere-{name}"), "no such file; pass "),
        "folder": (str(folder), "is a folder; pass "),
        "fifo": (str(fifo), "not a regular file; pass "),
        "link loop": (str(loop), "cannot be opened ("),
        "latin-1": (str(latin1), "line 2: not UTF-8 (byte 11 of the file); re-encode the file as UTF-8."),
        "binary": (str(binary), "line 3: a NUL byte (byte 8 of the file): a binary file, or UTF-16/UTF-32 text"),
        "UTF-16 without BOM": (str(wide), "line 1: a NUL byte (byte 1 of the file)"),
        "broken UTF-16": (str(broken), "line 2: not valid UTF-16 text (byte 6 of the file"),
    }


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_user_file_gives_the_same_one_line_errors(reader, tmp_path):
    name, _, read, error, prefix = READERS[reader]
    for case, (path, words) in _bad_files(tmp_path, name).items():
        with pytest.raises(PersonaError) as info:
            read(path)
        message = str(info.value)
        assert type(info.value) is error, (case, type(info.value))
        assert message.startswith(f"{prefix.format(path=path)}: {words}"), (case, message)
        assert "\n" not in message, (case, message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_unreadable_user_file_is_one_line(reader, tmp_path):
    name, text, read, error, prefix = READERS[reader]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0)
    with pytest.raises(error, match=f"^{prefix.format(path=path)}: permission denied"):
        read(str(path))


@pytest.mark.parametrize(
    "reader, text, where, key",
    [
        ("data", '{"train": [], "train": []}', "line 1, column 1", "train"),
        ("data", '{"train": [{"personality": [],\n  "personality": []}]}', "line 1, column 12", "personality"),
        ("json_config", '{"seed": 1, "output_dir": "o", "seed": 2}', "line 1, column 1", "seed"),
        ("json_config", '{"column_mapping": {"a": "persona", "a": "turns"}}', "line 1, column 20", "a"),
        ("config", "seed: 1\nnum_candidates: 2\nseed: 3\n", "line 3, column 1", "seed"),
        ("config", "column_mapping:\n  a: persona\n  a: turns\n", "line 3, column 3", "a"),
        (
            "chat_template",
            '{"chat_template": "{{ x }}", "chat_template": "{{ y }}"}',
            "line 1, column 1",
            "chat_template",
        ),
    ],
)
def test_a_key_given_twice_is_refused_in_every_json_and_yaml_file(reader, text, where, key, tmp_path):
    name, _, read, error, prefix = READERS[reader]
    path = tmp_path / (name.rsplit(".", 1)[0] + (".json" if text.startswith("{") else ".yaml"))
    path.write_text(text, encoding="utf-16")  # any encoding: the check comes after the one reader
    with pytest.raises(error) as info:
        read(str(path))
    message = str(info.value)
    assert message.startswith(f"{prefix.format(path=path)}: {where}: duplicate key {key!r} in this "), message
    assert message.endswith("; remove one.") and "\n" not in message, message


def test_the_same_keys_once_are_read(tmp_path):
    path = tmp_path / "tc.json"
    path.write_text(json.dumps({"chat_template": "{{ x }}", "other": {"chat_template": 1}}))
    assert load_chat_template(str(path)) == "{{ x }}"  # one key per object: nested objects may repeat a name


def test_a_bad_persona_file_is_refused_while_parsing(tmp_path):
    """The checks of --persona_file come with the flags: before any model loads (`persona_chat.cli` reads it later)."""
    with pytest.raises(UsageError, match=f"^--persona_file {tmp_path}: is a folder; pass a text file, one sentence"):
        persona_chat.make_parser().parse_args_into_dataclasses(
            ["--model_name_or_path", "m", "--persona_file", str(tmp_path)]
        )


def test_reading_a_config_file_loads_no_heavy_library(tmp_path):
    """Config files and --persona_file are read while the flags are parsed: the reader imports neither datasets nor
    torch, so a mistake in them is one line in well under a second."""
    (tmp_path / "persona.txt").write_text("i like tea.\n", encoding="utf-16")
    (tmp_path / "chat.json").write_text(json.dumps({"model_name_or_path": "m", "persona_file": "persona.txt"}))
    (tmp_path / "twice.yaml").write_text("model_name_or_path: m\nmodel_name_or_path: n\n")
    code = """
import sys
import persona_chat
from persona_cli import UsageError, parse_args_with_config
args = parse_args_with_config(persona_chat.make_parser(), ["chat.json"])[0]
assert persona_chat.read_text_lines(args.persona_file, "--persona_file") == ["i like tea."]
try:
    parse_args_with_config(persona_chat.make_parser(), ["twice.yaml"])
    raise SystemExit("no error")
except UsageError as err:
    assert "duplicate key 'model_name_or_path'" in str(err), err
print([m for m in ("torch", "datasets") if m in sys.modules])
"""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_configs_path_not_here_is_the_shipped_recipe(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "configs", "gpt2.yaml"), encoding="utf-8") as f:
        shipped = yaml.safe_load(f)
    monkeypatch.chdir(tmp_path)
    assert read_config_file("configs/gpt2.yaml") == shipped
    with pytest.raises(UsageError, match=r"^configs/gtp2.yaml: no such file; pass a YAML or JSON config file\.$"):
        read_config_file("configs/gtp2.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "gpt2.yaml").write_text("seed: 3\n")
    assert read_config_file("configs/gpt2.yaml") == {"seed": 3}  # a file that is here is always the one read


# Files a wheel is built from (setup.cfg names the modules and the data folders).
WHEEL_SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "configs", "metrics")


@pytest.mark.slow
def test_a_wheel_works_outside_a_checkout(tmp_path):
    """`pip install .` (not editable): the shipped recipe and the ConvAI2 `evaluate` metric are found and work from a
    folder outside the checkout, with only the installed files and the dependencies on the path."""
    source = tmp_path / "source"
    source.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py") and os.path.isfile(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), source)
    for name in WHEEL_SOURCES:
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        cwd=source,
    )
    (wheel,) = (tmp_path / "dist").iterdir()
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # -S: no site-packages .pth files (the development venv's editable install); the dependencies come from
    # site-packages on PYTHONPATH, after the installed wheel.
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    code = f"""
import json, sys
import evaluate
import persona_eval, persona_metrics, run_persona
site = {str(site)!r}
assert all(m.__file__.startswith(site) for m in (persona_eval, persona_metrics, run_persona)), "not the wheel's modules"
f1 = evaluate.load(persona_eval.CONVAI2_METRIC_PATH, cache_dir="cache")
hits = evaluate.load(persona_eval.CONVAI2_METRIC_PATH, "hits", cache_dir="cache")
model_args, data_args, training_args = run_persona.parse_args(["configs/gpt2.yaml", "--output_dir", "out"])
print(json.dumps({{
    "metric": persona_eval.CONVAI2_METRIC_PATH,
    "f1": f1.compute(predictions=["i love the dogs!"], references=["i love cats"]),
    "hits": hits.compute(predictions=[[0.1, 2.0, 0.3], [0.5, 0.1, 0.2]], references=[1, 2], ks=[1, 2]),
    "model": model_args.model_name_or_path, "num_candidates": data_args.num_candidates,
}}))
"""
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=outside, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["metric"] == str(site / "persona_assets_data" / "metrics" / "convai2")
    # "i love dogs" against "i love cats" after normalisation: 2 shared words of 3 each, P = R = F1 = 2/3.
    assert result["f1"] == {"f1": pytest.approx(2 / 3)}
    # Turn 1: the gold (index 1) is first; turn 2: the gold (0.2) is second after 0.5.
    assert result["hits"] == {"hits@1": 0.5, "hits@2": 1.0}
    with open(os.path.join(ROOT, "configs", "gpt2.yaml"), encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    assert (result["model"], result["num_candidates"]) == (recipe["model_name_or_path"], recipe["num_candidates"])

    # The README's line that prints where the recipes are, run as written with only the install.
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    command = readme.split('`python -c "', 1)[1].split('"`', 1)[0]
    proc = subprocess.run([sys.executable, "-S", "-c", command], capture_output=True, text=True, cwd=outside, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site / "persona_assets_data" / "configs")
    assert os.path.isfile(os.path.join(proc.stdout.strip(), "deepspeed", "zero2.json"))
