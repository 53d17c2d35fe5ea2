"""Assembling canonical records: distractors sampled from other dialogs only, seeded, the same in every process;
`dialogs_to_dataset_dict` validating in-memory dialogs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from format_samples import NO_CANDS_TXT, SMALL, SPC_CSV, dialog_texts, rows, split_distractors, write

from persona_data import load_dialogs
from persona_errors import PersonaDataError
from persona_records import dialogs_to_dataset_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distractors_are_turns_of_other_dialogs(tmp_path):
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


@pytest.mark.slow
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


def test_dialogs_to_dataset_dict_keeps_its_contract(caplog):
    data = {"train": [SMALL["train"][0], {"personality": []}], "valid": []}
    with pytest.raises(PersonaDataError, match=r"^mem: split 'train', dialog 1: missing field 'utterances'"):
        dialogs_to_dataset_dict(data, "mem")
    with caplog.at_level("WARNING", logger="persona_records"):
        out = dialogs_to_dataset_dict(data, "mem", "skip")
    assert rows(out["train"]) == [SMALL["train"][0]] and out["valid"].num_rows == 0
    assert "skipped 1 bad ones" in caplog.text
    with pytest.raises(PersonaDataError, match="must be a list of dialogs"):
        dialogs_to_dataset_dict({"train": {"a": 1}}, "mem")
