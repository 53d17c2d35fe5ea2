"""build_features: the cached map from canonical dialogs to rows of model inputs (candidates, history window,
persona permutations, truncation, errors)."""

from __future__ import annotations

import re
import shutil

import datasets
import pytest

from persona_data import build_features
from persona_errors import PersonaDataError
from persona_inputs import build_inputs
from persona_tokens import SpecialTokenIds


def _dialogs():
    """One dialog of two utterances with three candidates each; the second has five history turns."""
    persona = ["i like cats .", "i am a nurse .", "i live in paris ."]
    utterances = [
        {"history": ["hello"], "candidates": ["no way", "maybe so", "hi there"]},
        {
            "history": ["hello", "hi there", "what do you do ?", "i am a nurse", "cool"],
            "candidates": ["ok", "yes", "thanks"],
        },
    ]
    return datasets.Dataset.from_list([{"personality": persona, "utterances": utterances}])


def test_build_features_candidates_permutations_history(tokenizer):
    dialogs = _dialogs()
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
    dialogs = _dialogs()
    full = build_features(dialogs, tokenizer, num_candidates=3, max_history=2)
    longest = max(len(seq) for row in full["input_ids"] for seq in row)
    with caplog.at_level("WARNING"):
        cut = build_features(dialogs, tokenizer, num_candidates=3, max_history=2, max_length=longest - 3)
    assert max(len(seq) for row in cut["input_ids"] for seq in row) <= longest - 3
    assert f"--max_length {longest - 3}: 1 of 2 rows lost their oldest history turns" in caplog.text
    # All candidates of a turn keep one shared context: everything before the reply's speaker token.
    speaker1 = SpecialTokenIds.from_tokenizer(tokenizer).speaker1
    for row in cut["input_ids"]:
        contexts = {tuple(seq[: len(seq) - seq[::-1].index(speaker1) - 1]) for seq in row}
        assert len(contexts) == 1


def test_build_features_cache_hit_and_miss(tokenizer, tmp_path):
    dialogs = _dialogs()
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

    dialogs = _dialogs()
    kw = dict(num_candidates=2, max_history=2, cache_dir=str(tmp_path))
    build_features(dialogs, tokenizer, **kw)
    calls = []
    original = persona_data._build_batch
    monkeypatch.setattr(persona_data, "_build_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    build_features(dialogs, tokenizer, **kw)
    assert calls == []  # cache hit: the map function never ran


def test_too_few_candidates_names_dialog(tokenizer):
    with pytest.raises(PersonaDataError, match=r"data.json: split 'train': dialog 0, utterance 0: field 'candidates'"):
        build_features(_dialogs(), tokenizer, num_candidates=4, max_history=2, source="data.json: split 'train'")


def test_cut_gold_replies_are_counted_apart(tokenizer, caplog):
    dialogs = _dialogs()
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # The smallest context: bos + the last turn's speaker token (the turn itself emptied before the reply is cut);
    # the gold "hi there" needs all its tokens.
    gold_len = len(enc("hi there"))
    assert gold_len >= 2
    max_length = 1 + 1 + 1 + gold_len + 1 - 1  # one token short for utterance 0's gold
    with caplog.at_level("WARNING", logger="persona_data"):
        feats = build_features(dialogs, tokenizer, num_candidates=3, max_history=2, max_length=max_length)
    gold_rows = [row[-1] for row in feats["input_ids"]]
    assert all(len(seq) <= max_length for row in feats["input_ids"] for seq in row)
    # Independently: with nothing of the context left, a reply keeps what remains of max_length (bos, two speaker
    # tokens, eos), so a row's budget is that or its longest candidate, whichever is shorter.
    candidates = (["no way", "maybe so", "hi there"], ["ok", "yes", "thanks"])
    budgets = [min(max(len(enc(c)) for c in cands), max_length - 4) for cands in candidates]
    cut = [len(enc(cands[-1])) > b for cands, b in zip(candidates, budgets)]
    shortest = min(b for b, c in zip(budgets, cut) if c)
    assert cut[0] and f"{sum(cut)} rows had their gold reply cut (to as few as {shortest} tokens" in caplog.text
    assert f"--max_length {max_length}: 2 of 2 rows lost their oldest history turns or persona sentences" in caplog.text
    eos = SpecialTokenIds.from_tokenizer(tokenizer).eos
    assert gold_rows[0][-1] == eos


def test_max_length_too_small_names_the_flag(tokenizer):
    for max_length in (0, 1, 4):
        with pytest.raises(PersonaDataError, match=rf"--max_length {max_length} cannot hold .*raise --max_length"):
            build_features(_dialogs(), tokenizer, num_candidates=2, max_history=2, max_length=max_length)
    feats = build_features(_dialogs(), tokenizer, num_candidates=2, max_history=2, max_length=5)
    assert all(len(seq) == 5 for row in feats["input_ids"] for seq in row)


def test_permutations_are_capped_at_the_persona_sentences(tokenizer, caplog):
    """k rotations of a persona of n < k sentences would repeat rotations: each dialog is used min(k, max(n, 1))
    times, and one warning counts the dialogs capped."""
    one_turn = [{"history": ["hello"], "candidates": ["no way", "hi there"]}]
    dialogs = datasets.Dataset.from_list(
        [
            {"personality": ["i like cats .", "i am a nurse .", "i live in paris ."], "utterances": one_turn},
            {"personality": ["i like dogs .", "i swim ."], "utterances": one_turn * 2},
            {"personality": [], "utterances": one_turn},
        ]
    )
    with caplog.at_level("WARNING", logger="persona_data"):
        rows = build_features(dialogs, tokenizer, num_candidates=2, max_history=1, personality_permutations=3)
    assert rows.num_rows == 3 * 1 + 2 * 2 + 1 * 1  # 3 rotations, 2 rotations x 2 utterances, the empty persona once
    assert "--personality_permutations 3: 2 of 3 dialogs have fewer persona sentences" in caplog.text
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    gold = enc("hi there")
    # The two-sentence dialog: its persona, then rotated once, for each utterance; never a third (repeated) rotation.
    dogs, swim = enc("i like dogs ."), enc("i swim .")
    expected = [[dogs, swim], [dogs, swim], [swim, dogs], [swim, dogs]]
    got = [row[1] for row in rows["input_ids"][3:7]]
    assert got == [build_inputs(p, [enc("hello")], gold, ids, lm_labels=True)["input_ids"] for p in expected]
    caplog.clear()
    with caplog.at_level("WARNING", logger="persona_data"):
        build_features(dialogs.select([0]), tokenizer, num_candidates=2, max_history=1, personality_permutations=3)
    assert "personality_permutations" not in caplog.text


def test_a_damaged_feature_cache_is_named_with_the_way_out(tokenizer, tmp_path):
    """A cache file cut short (a killed run, a full disk) fails in pyarrow with a plain OSError naming nothing."""
    kw = dict(num_candidates=2, max_history=2, cache_dir=str(tmp_path / "cache"))
    build_features(_dialogs(), tokenizer, **kw)
    (arrow,) = (tmp_path / "cache").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(PersonaDataError) as info:
        build_features(_dialogs(), tokenizer, **kw)
    message = str(info.value)
    assert message.startswith(f"{arrow}: the cached features cannot be read (")
    assert f"Delete the folder {tmp_path / 'cache'} (or pass a fresh --dataset_cache)" in message
    assert isinstance(info.value.__cause__, OSError)
    arrow.unlink()
    arrow.mkdir()  # a folder where the file was: IsADirectoryError inside pyarrow
    with pytest.raises(PersonaDataError, match=re.escape(f"{arrow}: the cached features cannot be read")):
        build_features(_dialogs(), tokenizer, **kw)
    shutil.rmtree(tmp_path / "cache")  # the way out the message gives works
    assert build_features(_dialogs(), tokenizer, **kw).num_rows == 2
