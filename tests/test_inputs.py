"""The model inputs of one candidate: the reference's segments, token types and labels, and fitting a context into
the model's window (docs/architecture.md, the data contract)."""

from __future__ import annotations

from persona_inputs import build_inputs, fit_to_length
from persona_tokens import SpecialTokenIds

IDS = SpecialTokenIds(bos=1, eos=2, speaker1=3, speaker2=4)


def test_worked_example_of_the_data_contract():
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
    # Segment 0 is just bos; with two history turns the speaker prefixes and the token types differ (parity rules).
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
