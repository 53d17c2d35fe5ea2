"""Every file reader into the canonical record: hand-written files with hand-written expectations, the real SPC file."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from format_samples import (
    CONVAI2_BOTH_TXT,
    CONVAI2_EXPECTED,
    CONVAI2_TXT,
    SMALL,
    SPC_CSV,
    SPC_PERSONAS,
    SPC_TURNS,
    rows,
    split_distractors,
    write,
)

from persona_data import build_features, load_dialogs, load_dialogs_with_report
from persona_errors import PersonaDataError
from persona_readers import SPC_COLUMNS, detect_format
from persona_records import SILENCE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ConvAI2 / ParlAI text


def test_convai2_txt(tmp_path):
    path = write(tmp_path, "train_self_original.txt", CONVAI2_TXT)
    assert detect_format(path) == "convai2_txt"
    dialogs = load_dialogs(path)
    assert list(dialogs) == ["train"]
    assert rows(dialogs["train"]) == CONVAI2_EXPECTED


def to_convai2_txt(dialogs: list[dict], with_cands: bool = True) -> str:
    """A second implementation, the other way: canonical dialogs → ParlAI text (the candidates keep their order)."""
    lines = []
    for dialog in dialogs:
        number = 1
        for sentence in dialog["personality"]:
            lines.append(f"{number} your persona: {sentence}")
            number += 1
        for u in dialog["utterances"]:
            gold = u["candidates"][-1]
            cands = "\t\t" + "|".join(u["candidates"]) if with_cands else ""
            lines.append(f"{number} {u['history'][-1]}\t{gold}{cands}")
            number += 1
    return "\n".join(lines) + "\n"


def test_convai2_txt_round_trip(tmp_path, synthetic_data):
    train = synthetic_data["train"]
    path = write(tmp_path, "train_self_original.txt", to_convai2_txt(train))
    assert rows(load_dialogs(path)["train"]) == train
    no_cands = load_dialogs(write(tmp_path, "train_no_cands.txt", to_convai2_txt(train, with_cands=False)))["train"]
    assert no_cands.num_rows == len(train)
    for read, original in zip(no_cands, train):
        assert [u["history"] for u in read["utterances"]] == [u["history"] for u in original["utterances"]]
        assert [u["candidates"][-1] for u in read["utterances"]] == [
            u["candidates"][-1] for u in original["utterances"]
        ]
        assert all(len(u["candidates"]) == 20 for u in read["utterances"])


def test_convai2_both_keeps_only_your_persona(tmp_path):
    dialogs = load_dialogs(write(tmp_path, "valid_both_original.txt", CONVAI2_BOTH_TXT))
    assert rows(dialogs["valid"]) == [
        {"personality": ["i like cats."], "utterances": [{"history": ["hi"], "candidates": ["bye", "hello"]}]}
    ]


# Synthetic-Persona-Chat CSV


@pytest.mark.parametrize("role", ["user2", "user1"])
def test_spc_csv_roles(tmp_path, role):
    path = write(tmp_path, "spc_valid.csv", SPC_CSV)
    dialogs = rows(load_dialogs(path, spc_bot_role=role, num_distractors=2)["valid"])
    bot = role[-1]
    assert [d["personality"] for d in dialogs] == SPC_PERSONAS[bot]
    for dialog, (turns, first) in zip(dialogs, SPC_TURNS):
        if first == bot:  # the bot opens: ParlAI's silence keeps the partner first
            turns = [SILENCE, *turns]
        assert [u["history"] for u in dialog["utterances"]] == [turns[:i] for i in range(1, len(turns), 2)]
        assert [gold for _, gold in split_distractors(dialog)] == turns[1::2]
        for distractors, _ in split_distractors(dialog):
            assert len(distractors) == 2 and not set(distractors) & set(turns)


def test_spc_csv_both_roles(tmp_path):
    path = write(tmp_path, "spc.csv", SPC_CSV)
    dialogs, reports = load_dialogs_with_report(path, spc_bot_role="both", num_distractors=4)
    train = rows(dialogs["train"])
    assert reports["train"].records == 3 and reports["train"].dialogs == 6 == len(train)
    assert [d["personality"] for d in train] == [p for pair in zip(SPC_PERSONAS["2"], SPC_PERSONAS["1"]) for p in pair]
    for i, dialog in enumerate(train):
        # Both dialogs of a conversation are one group: neither borrows the other's turns.
        for distractors, _ in split_distractors(dialog):
            assert len(distractors) == 4 and not set(distractors) & set(SPC_TURNS[i // 2][0])


def test_spc_features_gold_last(tmp_path, tokenizer):
    dialogs = load_dialogs(write(tmp_path, "spc.csv", SPC_CSV), num_distractors=3)["train"]
    features = build_features(dialogs, tokenizer, num_candidates=4, max_history=2)
    assert features.num_rows == 3 + 2 + 1 and set(features["mc_labels"]) == {3}  # User 2's replies
    gold = tokenizer("Bye.", add_special_tokens=False)["input_ids"]
    row = features[2]  # conversation 0, User 2's third reply
    assert [t for t in row["labels"][3] if t != -100] == [*gold, tokenizer.eos_token_id]


# JSON, JSONL, chat JSONL


def test_personachat_json_round_trip(tmp_path):
    dialogs = load_dialogs(write(tmp_path, "pc.json", json.dumps(SMALL)))
    assert {split: rows(ds) for split, ds in dialogs.items()} == SMALL
    bare = load_dialogs(write(tmp_path, "valid_set.json", json.dumps(SMALL["train"])))  # a bare list: one split
    assert {split: rows(ds) for split, ds in bare.items()} == {"valid": SMALL["train"]}


def test_jsonl_round_trip(tmp_path):
    path = write(tmp_path, "dialogs.jsonl", "\n".join(json.dumps(d) for d in SMALL["train"]) + "\n")
    assert detect_format(path) == "jsonl"
    assert rows(load_dialogs(path)["train"]) == SMALL["train"]
    assert list(load_dialogs(path, split="test")) == ["test"]


def test_chat_jsonl(tmp_path):
    lines = [
        {"persona": ["i like tea."], "turns": ["hi", "hello", "tea?", "yes!"]},
        {"persona": [], "turns": ["hey", "yo", "bye"]},
        {"persona": ["i open."], "turns": ["i speak first", "ok"], "bot_first": True},
    ]
    path = write(tmp_path, "chat.jsonl", "\n".join(map(json.dumps, lines)))
    assert detect_format(path) == "chat_jsonl"
    dialogs = rows(load_dialogs(path, num_distractors=1)["train"])
    assert [d["personality"] for d in dialogs] == [["i like tea."], [], ["i open."]]
    assert [[(u["history"], u["candidates"][-1]) for u in d["utterances"]] for d in dialogs] == [
        [(["hi"], "hello"), (["hi", "hello", "tea?"], "yes!")],
        [(["hey"], "yo")],  # the partner's last turn has no bot reply
        [([SILENCE], "i speak first")],
    ]
    assert all(len(u["candidates"]) == 2 for d in dialogs for u in d["utterances"])


# The real Synthetic-Persona-Chat validation file (../shared/data)


def _raw_spc(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_shared_spc_csv(shared_spc_csv):
    raw = _raw_spc(shared_spc_csv)
    dialogs, reports = load_dialogs_with_report(shared_spc_csv, spc_bot_role="both")
    valid = dialogs["valid"]
    assert reports["valid"].records == len(raw) == 1000
    assert valid.num_rows + 2 * reports["valid"].skipped == 2 * len(raw) and reports["valid"].skipped == 0
    for i, dialog in enumerate(valid):
        row = raw[i // 2]
        bot = "2" if i % 2 == 0 else "1"
        # Independent parse: the text after every "User N:" of the raw conversation, by speaker.
        said = {"1": [], "2": []}
        for line in row["Best Generated Conversation"].splitlines():
            match = re.match(r"^\W*User ([12])\W*:\s*(.*)$", line.strip())
            if match:
                said[match.group(1)].append(match.group(2).strip().lstrip("*").strip())
        everything = said["1"] + said["2"]
        assert dialog["personality"] == [s.strip() for s in row[f"user {bot} personas"].splitlines() if s.strip()]
        for u in dialog["utterances"]:
            *distractors, gold = u["candidates"]
            assert len(distractors) == 19
            assert any(gold.startswith(s) for s in said[bot] if s), (i, gold)
            assert not any(d in everything for d in distractors), i  # never a turn of the same conversation


def test_shared_spc_csv_user2_counts(shared_spc_csv):
    raw = _raw_spc(shared_spc_csv)
    valid = load_dialogs(shared_spc_csv, num_distractors=1)["valid"]
    assert valid.num_rows == len(raw)
    for row, dialog in zip(raw[:50], valid):
        speakers = [
            m.group(1)
            for line in row["Best Generated Conversation"].splitlines()
            if (m := re.match(r"^\W*User ([12])\W*:", line.strip()))
        ]
        merged = [s for j, s in enumerate(speakers) if j == 0 or s != speakers[j - 1]]
        assert len(dialog["utterances"]) == merged.count("2")
        assert all(len(u["history"]) % 2 == 1 for u in dialog["utterances"])  # odd: the reference token types


# run_persona wiring


def test_run_persona_passes_reader_options(tmp_path, monkeypatch):
    import run_persona

    seen = {}

    class Stop(Exception):
        pass

    def fake_load_dialogs(source, dataset_format=None, **options):
        seen.update(source=source, dataset_format=dataset_format, **options)
        raise Stop

    class FakeConfig:
        n_positions = 64

    class FakeModel:
        config = FakeConfig()

    import persona_data
    import persona_model

    monkeypatch.setattr(persona_data, "load_dialogs_with_report", fake_load_dialogs)  # main imports both when it runs
    monkeypatch.setattr(persona_model, "load_model_and_tokenizer", lambda *a, **k: (FakeModel(), None))
    args = run_persona.parse_args(
        [
            "--dataset_path", "spc.csv", "--dataset_format", "spc_csv", "--on_bad_record", "skip",
            "--num_distractors", "7", "--spc_bot_role", "both", "--column_mapping", "a=b",
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--seed", "5",
        ]
    )  # fmt: skip
    with pytest.raises(Stop):
        run_persona.main(*args)
    assert seen["source"] == "spc.csv" and seen["dataset_format"] == "spc_csv"
    assert {k: seen[k] for k in ("on_bad_record", "num_distractors", "spc_bot_role", "column_mapping")} == {
        "on_bad_record": "skip",
        "num_distractors": 7,
        "spc_bot_role": "both",
        "column_mapping": "a=b",
    }
    assert seen["distractor_seed"] == 5
    assert "max_turn_chars" not in seen  # the readers' default
    argv = ["--max_turn_chars", "0", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    args = run_persona.parse_args(argv)
    with pytest.raises(Stop):
        run_persona.main(*args)
    assert seen["max_turn_chars"] == 0
    with pytest.raises(ValueError, match=r"--max_turn_chars must be >= 0, got -1"):
        run_persona.parse_args(["--max_turn_chars", "-1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="invalid choice: 'bot'"):  # the CLI layer's one-line UsageError
        run_persona.parse_args(["--spc_bot_role", "bot", "--output_dir", str(tmp_path)])


# Own files that are valid or nearly so


def test_spc_csv_extra_columns_are_read_and_named_once(tmp_path, caplog):
    """Users keep ids and notes beside the three Synthetic-Persona-Chat columns: read past them, and say so once."""
    path = tmp_path / "mine.csv"
    rows_ = [
        ["id", "user 1 personas", "Best Generated Conversation", "user 2 personas", "notes"],
        ["1", "I bake.", "User 1: Hi!\nUser 2: Hello!", "I run.", "ok"],
        ["2", "I swim.", "User 1: Hey\nUser 2: Hi, I sing.", "I sing.", ""],
    ]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows_)
    with caplog.at_level("WARNING", logger="persona_readers"):
        dialogs = load_dialogs(str(path), num_distractors=0)
    assert [d["personality"] for d in dialogs["train"]] == [["I run."], ["I sing."]]
    assert [d["utterances"] for d in dialogs["train"]] == [
        [{"history": ["Hi!"], "candidates": ["Hello!"]}],
        [{"history": ["Hey"], "candidates": ["Hi, I sing."]}],
    ]
    warnings = [r.getMessage() for r in caplog.records if "ignoring the column" in r.getMessage()]
    expected = f"{path}: ignoring the column(s) ['id', 'notes']; the dialogs are read from {list(SPC_COLUMNS)}."
    assert warnings == [expected]


def test_long_turns_are_read_and_cut_like_any_long_context(tmp_path, tokenizer, caplog):
    """A turn of 15,000 characters is data (a pasted text), not a mis-parsed file: read, then cut to the window and
    counted. `max_turn_chars` (a flag of every script) is the guard against a whole file in one field."""
    long_turn = "tell me more about cats . " * 577  # 15,002 characters
    path = write(tmp_path, "long.jsonl", json.dumps({"persona": ["i like cats ."], "turns": [long_turn, "sure !"]}))
    dialogs = load_dialogs(path, num_distractors=0)
    assert dialogs["train"][0]["utterances"][0]["history"] == [long_turn]
    with caplog.at_level("WARNING", logger="persona_data"):
        rows_ = build_features(dialogs["train"], tokenizer, num_candidates=1, max_history=2, max_length=64)
    assert max(len(seq) for seq in rows_[0]["input_ids"]) == 64
    assert "--max_length 64: 1 of 1 rows lost their oldest history turns or persona sentences" in caplog.text
    with pytest.raises(PersonaDataError, match=r"line 1, utterance 0: field 'history' has a text of 15002 characters"):
        load_dialogs(path, max_turn_chars=15_000)
    assert load_dialogs(path, max_turn_chars=0)["train"].num_rows == 1  # 0: no limit
    with pytest.raises(ValueError, match="max_turn_chars must be an integer >= 0"):
        load_dialogs(path, max_turn_chars=-5)


@pytest.mark.parametrize("script", ["persona_chat", "persona_eval", "persona_demo"])
def test_max_turn_chars_reaches_the_readers_of_every_script(script):
    import importlib

    module = importlib.import_module(script)
    args = module.make_parser().parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--dataset_path", "d.json", "--max_turn_chars", "20000"]
    )[0]
    assert args.read_options()["max_turn_chars"] == 20_000


# The README's own-data section, as written


def _readme_own_data_blocks() -> tuple[str, str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("### Your own data") :]
    section = section[: section.index("\n## ")]
    (bash,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (table,) = re.findall(r"```csv\n(.*?)```", section, flags=re.S)
    return bash, table


@pytest.mark.slow
def test_readme_own_data_folder_trains_as_written(tiny_checkpoint, tmp_path):
    """The folder of train.jsonl + valid.jsonl, made and trained on by the README's commands (tiny model, one step)."""
    bash, _ = _readme_own_data_blocks()
    assert bash.count("persona-train ") == 1 and "openai-community/gpt2" in bash
    script = bash.replace("persona-train ", f"{shlex.quote(sys.executable)} {shlex.quote(ROOT)}/run_persona.py ")
    script = script.replace("openai-community/gpt2", shlex.quote(tiny_checkpoint)).rstrip("\n")
    script += " --max_steps 1 --use_cpu true --report_to none --dataset_cache cache --disable_tqdm true\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "my-bot" / "all_results.json").read_text())
    assert results["train_samples"] == 3 and results["eval_samples"] == 2  # bot turns: 2 + 1 train, 1 + 1 valid
    dialogs = load_dialogs(str(tmp_path / "my_data"), cache_dir=str(tmp_path / "cache2"))
    assert sorted(dialogs) == ["train", "validation"]
    assert dialogs["validation"][1]["utterances"][0]["history"] == ["good morning!"]


def test_readme_spc_csv_example_reads(tmp_path, caplog):
    _, table = _readme_own_data_blocks()
    (tmp_path / "my_data.csv").write_text(table)
    with caplog.at_level("WARNING", logger="persona_readers"):
        dialogs = load_dialogs(str(tmp_path / "my_data.csv"), num_distractors=1)["train"]
    assert [d["personality"] for d in dialogs] == [["I run every morning.", "I work at a bakery."], ["I love the sea."]]
    assert [u["history"] for u in dialogs[0]["utterances"]] == [
        ["Hi! Do you like tea?"],
        ["Hi! Do you like tea?", "Sometimes, after my morning run.", "I drink it with my cat."],
    ]
    assert dialogs[1]["utterances"][0]["candidates"][-1] == "No, I sail on the sea every weekend."
    assert "ignoring the column(s) ['id']" in caplog.text
