"""persona_data: the reference input builder, the features map and the canonical JSON reader."""

from __future__ import annotations

import json

import datasets
import pytest

from persona_data import PersonaDataError, build_features, build_inputs, fit_to_length, load_dialogs
from persona_tokens import SpecialTokenIds

IDS = SpecialTokenIds(bos=1, eos=2, speaker1=3, speaker2=4)


def test_design_worked_example():
    out = build_inputs([[10, 11], [12]], [[20], [21, 22], [23]], [30, 31], IDS, lm_labels=True)
    assert out["input_ids"] == [1, 10, 11, 12, 4, 20, 3, 21, 22, 4, 23, 3, 30, 31, 2]
    assert out["token_type_ids"] == [3, 3, 3, 3, 4, 4, 3, 3, 3, 4, 4, 3, 3, 3, 3]
    assert out["mc_token_ids"] == 14
    assert out["labels"] == [-100] * 12 + [30, 31, 2]


def test_distractor_has_no_labels_and_generation_context_has_no_eos():
    out = build_inputs([[10]], [[20]], [30], IDS, lm_labels=False)
    assert out["labels"] == [-100] * 7
    ctx = build_inputs([[10]], [[20]], [], IDS, with_eos=False)
    # The context ends with the bot's speaker token, whose token type is the bot's.
    assert ctx["input_ids"] == [1, 10, 4, 20, 3]
    assert ctx["token_type_ids"][-1] == IDS.speaker1


def test_no_persona_and_even_history():
    # Segment 0 is just bos; with two history turns the parities follow DESIGN.md rules 2 and 3.
    out = build_inputs([], [[20], [21]], [30], IDS)
    assert out["input_ids"] == [1, 3, 20, 4, 21, 3, 30, 2]
    assert out["token_type_ids"] == [3, 4, 4, 3, 3, 4, 4, 4]


def test_fit_to_length_drops_oldest_history_then_persona():
    persona, history = [[1, 1], [2, 2], [3, 3]], [[4], [5, 5], [6, 6, 6]]
    # full length: 1 + 6 + (2 + 3 + 4) + reply 2 + 2 = 20
    assert fit_to_length(persona, history, 2, 20) == (persona, history, 2, False)
    p, h, budget, cut = fit_to_length(persona, history, 2, 18)  # drop [4] (2 tokens)
    assert (p, h, budget, cut) == (persona, [[5, 5], [6, 6, 6]], 2, True)
    p, h, budget, cut = fit_to_length(persona, history, 2, 14)  # all history but the last turn, then 1 sentence
    assert (p, h, budget) == ([[1, 1], [2, 2]], [[6, 6, 6]], 2)
    p, h, budget, cut = fit_to_length(persona, history, 5, 8)  # nothing but the last turn, reply cut
    assert (p, h) == ([], [[6, 6, 6]]) and 1 + 4 + budget + 2 <= 8 and budget == 1


def _dialogs(tokenizer_words):
    persona = ["i like cats .", "i am a nurse .", "i live in paris ."]
    utterances = [
        {"history": ["hello"], "candidates": ["no way", "maybe so", "hi there"]},
        {
            "history": ["hello", "hi there", "what do you do ?", "i am a nurse", "cool"],
            "candidates": ["ok", "yes", "thanks"],
        },
    ]
    return datasets.Dataset.from_list([{"personality": persona, "utterances": utterances}])


def _decode(tokenizer, ids):
    return tokenizer.decode(ids)


def test_build_features_candidates_permutations_history(tokenizer):
    dialogs = _dialogs(tokenizer)
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    feats = build_features(dialogs, tokenizer, num_candidates=2, max_history=1, personality_permutations=2)
    assert feats.num_rows == 4  # 2 permutations x 2 utterances
    assert set(feats.column_names) == {"input_ids", "token_type_ids", "labels", "mc_token_ids", "mc_labels"}
    row = feats[1]  # permutation 0, utterance 1
    assert len(row["input_ids"]) == 2 and row["mc_labels"] == 1
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    persona = [enc(s) for s in ["i like cats .", "i am a nurse .", "i live in paris ."]]
    history = [enc(s) for s in ["what do you do ?", "i am a nurse", "cool"]]  # last 2*1+1 turns
    ids = special
    expected_gold = build_inputs(persona, history, enc("thanks"), ids, lm_labels=True)
    expected_distractor = build_inputs(persona, history, enc("yes"), ids)
    assert row["input_ids"] == [expected_distractor["input_ids"], expected_gold["input_ids"]]
    assert row["labels"] == [expected_distractor["labels"], expected_gold["labels"]]
    assert row["token_type_ids"][1] == expected_gold["token_type_ids"]
    assert row["mc_token_ids"] == [len(expected_distractor["input_ids"]) - 1, len(expected_gold["input_ids"]) - 1]
    # Permutation 1: the last persona sentence moved to the front.
    rotated = [persona[2], persona[0], persona[1]]
    assert feats[3]["input_ids"][1] == build_inputs(rotated, history, enc("thanks"), ids, lm_labels=True)["input_ids"]
    # num_candidates=None keeps every candidate.
    all_cands = build_features(dialogs, tokenizer, num_candidates=None, max_history=2)
    assert [len(r) for r in all_cands["input_ids"]] == [3, 3] and all_cands["mc_labels"] == [2, 2]


def test_build_features_truncates_to_max_length(tokenizer, caplog):
    dialogs = _dialogs(tokenizer)
    full = build_features(dialogs, tokenizer, num_candidates=3, max_history=2)
    longest = max(len(seq) for row in full["input_ids"] for seq in row)
    with caplog.at_level("WARNING"):
        cut = build_features(dialogs, tokenizer, num_candidates=3, max_history=2, max_length=longest - 3)
    assert max(len(seq) for row in cut["input_ids"] for seq in row) <= longest - 3
    assert "longer than max_length" in caplog.text
    # All candidates of a turn keep one shared context: everything before the reply's speaker token.
    speaker1 = SpecialTokenIds.from_tokenizer(tokenizer).speaker1
    for row in cut["input_ids"]:
        contexts = {tuple(seq[: len(seq) - seq[::-1].index(speaker1) - 1]) for seq in row}
        assert len(contexts) == 1


def test_build_features_cache_hit_and_miss(tokenizer, tmp_path):
    dialogs = _dialogs(tokenizer)
    kw = dict(num_candidates=2, max_history=2, cache_dir=str(tmp_path))
    first = build_features(dialogs, tokenizer, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    again = build_features(dialogs, tokenizer, **kw)
    assert again._fingerprint == first._fingerprint and sorted(p.name for p in tmp_path.iterdir()) == files
    assert again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    other = build_features(dialogs, tokenizer, **{**kw, "max_history": 1})
    assert other._fingerprint != first._fingerprint
    assert other.cache_files[0]["filename"] != first.cache_files[0]["filename"]


def test_cache_is_really_reused(tokenizer, tmp_path, monkeypatch):
    import persona_data

    dialogs = _dialogs(tokenizer)
    kw = dict(num_candidates=2, max_history=2, cache_dir=str(tmp_path))
    build_features(dialogs, tokenizer, **kw)
    calls = []
    original = persona_data._build_batch
    monkeypatch.setattr(persona_data, "_build_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    build_features(dialogs, tokenizer, **kw)
    assert calls == []  # cache hit: the map function never ran


def test_too_few_candidates_names_dialog(tokenizer):
    with pytest.raises(PersonaDataError, match=r"data.json: split 'train': dialog 0, utterance 0: field 'candidates'"):
        build_features(
            _dialogs(tokenizer), tokenizer, num_candidates=4, max_history=2, source="data.json: split 'train'"
        )


def test_load_personachat_json(personachat_json, synthetic_data):
    dialogs = load_dialogs(personachat_json)
    assert set(dialogs) == {"train", "valid"}
    assert dialogs["train"].num_rows == len(synthetic_data["train"])
    assert dialogs["valid"][0] == synthetic_data["valid"][0]


def test_bad_json_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_dialogs(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": [')
    with pytest.raises(PersonaDataError, match=r"bad.json: not valid JSON \(line 1"):
        load_dialogs(str(bad))
    no_utt = tmp_path / "no_utt.json"
    no_utt.write_text(json.dumps({"train": [{"personality": ["a"], "utterances": []}, {"personality": ["b"]}]}))
    with pytest.raises(PersonaDataError, match=r"no_utt.json: split 'train', dialog 0: field 'utterances'"):
        load_dialogs(str(no_utt))
    skipped = load_dialogs(str(no_utt), on_bad_record="skip")
    assert skipped["train"].num_rows == 0
