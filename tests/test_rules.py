"""One home per rule: each rule that several layers apply is one function, and every caller gives the same answer."""

from __future__ import annotations

import json
import random

import datasets
import pytest

from persona_data import build_features, dataset_personas, random_persona
from persona_errors import CheckpointError, PersonaDataError, UsageError
from persona_inputs import MIN_INPUT_LENGTH, history_window
from persona_locations import TOKENIZER_FILES, check_model_path, is_tokenizer_folder, looks_like_hub_id, looks_local
from persona_process import check_device, check_device_name
from persona_sources import is_datasets_source


@pytest.mark.parametrize(
    "name, local",
    [
        ("gpt2", False),
        ("openai-community/gpt2", False),
        ("Qwen/Qwen2.5-0.5B-Instruct", False),  # dots of a Hub id are not a file suffix
        ("runs/base", True),  # where persona-train writes runs: a path even before it exists
        ("./model", True),
        ("~/model", True),
        ("/abs/model", True),
        ("a/b/c", True),
        ("model.gguf", True),
        ("data.json", True),
        ("out/", True),
        ("..\\x", True),
    ],
)
def test_local_path_or_hub_id_is_one_rule(name, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of these names exists here
    assert looks_local(name) is local
    assert looks_like_hub_id(name) is (not local)
    # The data sources read a name that can only be a Hub id through `datasets`, everything else as a local file.
    assert is_datasets_source(name) is (not local)


def test_an_existing_folder_makes_org_name_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("models/bot")
    (tmp_path / "models").mkdir()
    assert looks_local("models/bot")
    with pytest.raises(UsageError, match=r"--model_name_or_path models/bot: no such folder"):
        check_model_path("models/bot")


def test_a_lora_adapter_base_follows_the_same_rule(tmp_path, monkeypatch):
    """`runs/base` is a local path for the flag check and for a LoRA adapter's base alike: a missing one is one line
    naming the field, not a Hub look-up."""
    from persona_model import load_model_and_tokenizer

    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "runs/base", "peft_type": "LORA"}), encoding="utf-8"
    )
    with pytest.raises(UsageError, match="runs/base: no such folder"):
        check_model_path("runs/base")
    with pytest.raises(CheckpointError, match=r"base_model_name_or_path 'runs/base': no such folder"):
        load_model_and_tokenizer(str(adapter))


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_each_tokenizer_file_makes_a_tokenizer_folder_for_the_flag_check(name, tmp_path):
    (tmp_path / name).write_text("{}", encoding="utf-8")
    assert is_tokenizer_folder(str(tmp_path))
    check_model_path(str(tmp_path), "--tokenizer_name")  # accepted, as the loader accepts it
    with pytest.raises(UsageError, match="no config.json"):
        check_model_path(str(tmp_path))  # a tokenizer is not a model


def test_the_shortest_max_length_is_one_number_for_the_flags_and_the_data(tmp_path, tokenizer, synthetic_data):
    import run_persona

    dialogs = datasets.Dataset.from_list(synthetic_data["valid"][:2])
    build_features(dialogs, tokenizer, num_candidates=2, max_history=2, max_length=MIN_INPUT_LENGTH)
    with pytest.raises(PersonaDataError, match=rf"\({MIN_INPUT_LENGTH} tokens\)"):
        build_features(dialogs, tokenizer, num_candidates=2, max_history=2, max_length=MIN_INPUT_LENGTH - 1)
    argv = ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", "org/m", "--max_length"]
    run_persona.parse_args([*argv, str(MIN_INPUT_LENGTH)])
    with pytest.raises(UsageError, match=rf"--max_length must be >= {MIN_INPUT_LENGTH}"):
        run_persona.parse_args([*argv, str(MIN_INPUT_LENGTH - 1)])


def test_the_history_window_keeps_the_last_2k_plus_1_turns():
    turns = [f"t{i}" for i in range(9)]
    for k in range(6):
        assert history_window(turns, k) == turns[max(0, 9 - (2 * k + 1)) :]


def test_the_random_persona_is_drawn_from_the_validation_split():
    dialogs = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"personality": ["train persona."]}]),
            "valid": datasets.Dataset.from_list([{"personality": []}, {"personality": ["a.", "b."]}]),
        }
    )
    personas = dataset_personas(dialogs)
    assert personas == [["a.", "b."]]  # the validation split, empty personas left out
    assert random_persona(personas, random.Random(0)) == ["a.", "b."]
    assert random_persona([], random.Random(0)) == []


def test_one_device_check_for_parsing_and_loading():
    for device in ("gpu", "cuda:x", "meta"):
        with pytest.raises(UsageError) as parsed:
            check_device_name(device)
        with pytest.raises(UsageError) as loaded:
            check_device(device)
        assert str(parsed.value) == str(loaded.value)
    import torch

    if not torch.cuda.is_available():
        check_device_name("cuda")  # a device a model runs on: whether this machine has one is said at load time
        with pytest.raises(UsageError, match="--device cuda: this machine has no CUDA"):
            check_device("cuda")
