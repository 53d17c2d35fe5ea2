"""Every reader into the canonical record: hand-written fixtures with hand-written expectations, the real SPC file."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import datasets
import pytest

from persona_data import (
    SILENCE,
    PersonaDataError,
    build_features,
    detect_format,
    load_dialogs,
    load_dialogs_with_report,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONVAI2_TXT = (
    "1 your persona: i like cats.\n"
    "2 your persona: i am tall.\n"
    "3 hi there\thello !\t\tbye|hello !|nope\n"
    "4 how are you ?\tfine .\t\tfine .|bad\n"
    "1 your persona: i swim.\n"
    "2 __SILENCE__\they\t\tyo|hey\n"
)
CONVAI2_EXPECTED = [
    {
        "personality": ["i like cats.", "i am tall."],
        "utterances": [
            {"history": ["hi there"], "candidates": ["bye", "nope", "hello !"]},
            {"history": ["hi there", "hello !", "how are you ?"], "candidates": ["bad", "fine ."]},
        ],
    },
    {"personality": ["i swim."], "utterances": [{"history": ["__SILENCE__"], "candidates": ["yo", "hey"]}]},
]
CONVAI2_BOTH_TXT = (
    "1 partner's persona: i hate cats.\n"
    "2 your persona: i like cats.\n"
    "3 partner's persona: i am short.\n"
    "4 hi\thello\t\thello|bye\n"
)
NO_CANDS_TXT = (
    "1 your persona: i like cats.\n2 hi\thello\n3 cats ?\tyes , cats .\n"
    "1 your persona: i like dogs.\n2 hey\tyo\n3 dogs ?\tdogs rule .\n"
    "1 your persona: i like fish.\n2 good day\tgreetings\n"
    "1 your persona: i like birds.\n2 morning\tmorning !\n"
)
SPC_CSV = (
    "user 1 personas,user 2 personas,Best Generated Conversation\n"
    '"I bake.\nI knit.","I am a boy.\nI run.","User 1: Hi!\nUser 2: Hello!\nUser 1: Do you bake?\n'
    'User 2: No, I run.\nEvery day.\n[A few minutes later]\n* User 1: Nice.\nUser 2: Bye."\n'
    '"I swim.","I sing.\n","User 2: Hey there.\nUser 1: Hi, I swim.\nUser 1: A lot.\nUser 2: I sing."\n'
    '"I ski.","I paint.","User 1: Snow!\nUser 2: Paint!"\n'
)
# Hand-parsed: the turns of each conversation (continuation lines joined, stage directions dropped, one speaker's
# consecutive turns merged) and who speaks first.
SPC_TURNS = [
    (["Hi!", "Hello!", "Do you bake?", "No, I run. Every day.", "Nice.", "Bye."], "1"),
    (["Hey there.", "Hi, I swim. A lot.", "I sing."], "2"),
    (["Snow!", "Paint!"], "1"),
]
SPC_PERSONAS = {
    "1": [["I bake.", "I knit."], ["I swim."], ["I ski."]],
    "2": [["I am a boy.", "I run."], ["I sing."], ["I paint."]],
}


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def rows(dialogs: datasets.Dataset) -> list[dict]:
    return [dict(d) for d in dialogs]


def split_distractors(dialog: dict) -> list[tuple[list[str], str]]:
    return [(u["candidates"][:-1], u["candidates"][-1]) for u in dialog["utterances"]]


def dialog_texts(dialog: dict) -> set[str]:
    return {t for u in dialog["utterances"] for t in [*u["history"], u["candidates"][-1]]}


# ----------------------------------------------------------------------------------------------------------------------
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


def test_convai2_no_cands_samples_distractors_from_other_dialogs(tmp_path):
    path = write(tmp_path, "train_self_original_no_cands.txt", NO_CANDS_TXT)
    dialogs = rows(load_dialogs(path, num_distractors=3)["train"])
    assert [d["personality"] for d in dialogs] == [
        ["i like cats."],
        ["i like dogs."],
        ["i like fish."],
        ["i like birds."],
    ]
    assert [[u["history"] for u in d["utterances"]] for d in dialogs] == [
        [["hi"], ["hi", "hello", "cats ?"]],
        [["hey"], ["hey", "yo", "dogs ?"]],
        [["good day"]],
        [["morning"]],
    ]
    golds = [[gold for _, gold in split_distractors(d)] for d in dialogs]
    assert golds == [["hello", "yes , cats ."], ["yo", "dogs rule ."], ["greetings"], ["morning !"]]
    every_turn = set().union(*(dialog_texts(d) for d in dialogs))
    for d in dialogs:
        for distractors, _ in split_distractors(d):
            assert len(distractors) == 3 == len(set(distractors))
            assert not set(distractors) & dialog_texts(d)  # never a turn of the same dialog
            assert set(distractors) <= every_turn  # only real turns of other dialogs


def test_distractors_are_seeded(tmp_path):
    path = write(tmp_path, "train_no_cands.txt", NO_CANDS_TXT)
    first = rows(load_dialogs(path, num_distractors=3)["train"])
    assert rows(load_dialogs(path, num_distractors=3)["train"]) == first
    assert rows(load_dialogs(path, num_distractors=3, distractor_seed=1)["train"]) != first
    assert all(
        len(u["candidates"]) == 1 for d in load_dialogs(path, num_distractors=0)["train"] for u in d["utterances"]
    )


DIGEST = """
import hashlib, json, sys
sys.path.insert(0, {root!r})
from persona_data import load_dialogs
for path, options in {jobs!r}:
    ds = load_dialogs(path, **options)
    print(hashlib.sha256(json.dumps({{s: d.to_list() for s, d in ds.items()}}, sort_keys=True).encode()).hexdigest())
"""


def test_distractors_same_across_processes(tmp_path):
    jobs = [
        (write(tmp_path, "train_no_cands.txt", NO_CANDS_TXT), {"num_distractors": 3}),
        (write(tmp_path, "spc.csv", SPC_CSV), {"spc_bot_role": "both"}),
    ]
    expected = []
    for path, options in jobs:
        dialogs = load_dialogs(path, **options)
        text = json.dumps({s: d.to_list() for s, d in dialogs.items()}, sort_keys=True)
        expected.append(hashlib.sha256(text.encode()).hexdigest())
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        code = DIGEST.format(root=ROOT, jobs=jobs)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected


# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
# JSON, JSONL, chat JSONL


SMALL = {
    "train": [
        {"personality": ["i like tea."], "utterances": [{"history": ["hi"], "candidates": ["no", "hello"]}]},
        {"personality": [], "utterances": [{"history": ["a", "b", "c"], "candidates": ["d"]}]},
    ],
    "valid": [{"personality": ["x."], "utterances": [{"history": [], "candidates": ["e", "f"]}]}],
}


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


# ----------------------------------------------------------------------------------------------------------------------
# datasets folders (the Hub path, offline) and column mapping


def test_saved_dataset_folder_with_column_mapping(tmp_path):
    chat = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"who": ["i like tea."], "dialog": ["hi", "hello"]}, {"who": [], "dialog": ["hey", "yo"]}]
            ),
            "test": datasets.Dataset.from_list([{"who": ["x."], "dialog": ["a", "b", "c", "d"]}]),
        }
    )
    chat.save_to_disk(str(tmp_path / "chat"))
    dialogs = load_dialogs(str(tmp_path / "chat"), column_mapping="who=persona, dialog=turns", num_distractors=1)
    assert sorted(dialogs) == ["test", "train"]
    assert [d["personality"] for d in dialogs["train"]] == [["i like tea."], []]
    (first,), (second,) = ([u["candidates"] for u in d["utterances"]] for d in dialogs["train"])
    assert first[-1] == "hello" and first[0] in ("hey", "yo") and second[-1] == "yo" and second[0] in ("hi", "hello")
    assert [u["history"] for u in dialogs["test"][0]["utterances"]] == [["a"], ["a", "b", "c"]]
    with pytest.raises(PersonaDataError, match="match no known layout"):
        load_dialogs(str(tmp_path / "chat"))
    with pytest.raises(PersonaDataError, match=r"column_mapping names column\(s\) \['nope'\]"):
        load_dialogs(str(tmp_path / "chat"), column_mapping={"nope": "persona"})


def test_utterance_rows_layout(tmp_path):
    """One row per utterance with a dialog id, as bavard/personachat_truecased on the Hub."""
    table = [
        {"persona": ["i like tea."], "hist": ["hi"], "cands": ["no", "hello"], "dialog_id": 7},
        {"persona": ["i like tea."], "hist": ["hi", "hello", "tea?"], "cands": ["no", "yes"], "dialog_id": 7},
        {"persona": [], "hist": ["a"], "cands": ["b"], "dialog_id": 8},
    ]
    datasets.Dataset.from_list(table).save_to_disk(str(tmp_path / "rows"))
    mapping = {"persona": "personality", "hist": "history", "cands": "candidates", "dialog_id": "conv_id"}
    dialogs, reports = load_dialogs_with_report(str(tmp_path / "rows"), column_mapping=mapping, split="valid")
    assert rows(dialogs["valid"]) == [
        {
            "personality": ["i like tea."],
            "utterances": [
                {"history": ["hi"], "candidates": ["no", "hello"]},
                {"history": ["hi", "hello", "tea?"], "candidates": ["no", "yes"]},
            ],
        },
        {"personality": [], "utterances": [{"history": ["a"], "candidates": ["b"]}]},
    ]
    assert reports["valid"].records == 2


def test_data_files_folder(tmp_path):
    folder = tmp_path / "canonical"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(d) for d in SMALL["train"]))
    dialogs = load_dialogs(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(dialogs) == ["train", "validation"]
    assert rows(dialogs["validation"]) == SMALL["train"]
    spc = tmp_path / "spc"
    spc.mkdir()
    (spc / "train.csv").write_text(SPC_CSV)
    spc_dialogs = load_dialogs(str(spc), "hub", cache_dir=str(tmp_path / "cache"), num_distractors=1)
    assert [d["personality"] for d in spc_dialogs["train"]] == SPC_PERSONAS["2"]


def test_hub_errors_are_one_clear_line(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"personality": [1, 2], "utterances": 3}\n{"oops": ')
    with pytest.raises(PersonaDataError, match=r"broken: could not load it as a datasets dataset"):
        load_dialogs(str(folder), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------------------------------
# URLs over a loopback server


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_loading(tmp_path, http_root):
    root, url = http_root
    (root / "personachat.json").write_text(json.dumps(SMALL))
    (root / "train_self_original.txt").write_text(CONVAI2_TXT)
    cache = str(tmp_path / "cache")
    dialogs = load_dialogs(f"{url}/personachat.json", cache_dir=cache)
    assert {split: rows(ds) for split, ds in dialogs.items()} == SMALL
    assert rows(load_dialogs(f"{url}/train_self_original.txt?raw=1", cache_dir=cache)["train"]) == CONVAI2_EXPECTED
    (root / "personachat.json").unlink()  # a second load reads the cached copy
    assert rows(load_dialogs(f"{url}/personachat.json", cache_dir=cache)["valid"]) == SMALL["valid"]
    with pytest.raises(PersonaDataError, match=r"missing.json: download failed"):
        load_dialogs(f"{url}/missing.json", cache_dir=cache)


# ----------------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------------
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

    monkeypatch.setattr(run_persona, "load_dialogs", fake_load_dialogs)
    monkeypatch.setattr(run_persona, "load_model_and_tokenizer", lambda *a, **k: (FakeModel(), None))
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
    with pytest.raises(SystemExit):
        run_persona.parse_args(["--spc_bot_role", "bot", "--output_dir", str(tmp_path)])


def test_dialogs_to_dataset_dict_keeps_its_contract(caplog):
    from persona_data import dialogs_to_dataset_dict

    data = {"train": [SMALL["train"][0], {"personality": []}], "valid": []}
    with pytest.raises(PersonaDataError, match=r"^mem: split 'train', dialog 1: missing field 'utterances'"):
        dialogs_to_dataset_dict(data, "mem")
    with caplog.at_level("WARNING", logger="persona_data"):
        out = dialogs_to_dataset_dict(data, "mem", "skip")
    assert rows(out["train"]) == [SMALL["train"][0]] and out["valid"].num_rows == 0
    assert "skipped 1 bad ones" in caplog.text
    with pytest.raises(PersonaDataError, match="must be a list of dialogs"):
        dialogs_to_dataset_dict({"train": {"a": 1}}, "mem")
