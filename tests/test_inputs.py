"""The model inputs of one candidate: the reference's segments, token types and labels, and fitting a context into
the model's window (docs/architecture.md, the data contract)."""

from __future__ import annotations

import random
import time

import pytest

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


def test_fit_to_length_keeps_the_persona_longest():
    persona, history = [[1, 1], [2, 2], [3, 3]], [[4], [5, 5], [6, 6, 6]]
    # full length: 1 + 6 + (2 + 3 + 4) + reply 2 + 2 = 20
    assert fit_to_length(persona, history, 2, 20) == (persona, history, 2, False)
    p, h, budget, cut = fit_to_length(persona, history, 2, 18)  # 1. the oldest turn [4] goes (2 tokens)
    assert (p, h, budget, cut) == (persona, [[5, 5], [6, 6, 6]], 2, True)
    # 15 with the last turn alone; the persona (6) is under half of 14, so 3. the last turn loses its oldest token.
    p, h, budget, cut = fit_to_length(persona, history, 2, 14)
    assert (p, h, budget) == (persona, [[6, 6]], 2)
    # max_length 10: the persona (6) is over half (5): 2. one sentence goes (4 <= 5), leaving 1 + 4 + 4 + 4 = 13;
    # 3. the last turn loses all 3 tokens (10); done, the rest of the persona stays.
    p, h, budget, cut = fit_to_length(persona, history, 2, 10)
    assert (p, h, budget) == ([[1, 1], [2, 2]], [[]], 2)
    # max_length 7, a 5-token reply: 2. one sentence is left (2 <= 3); 3. the last turn empties; 4. the last sentence
    # goes (1 + 1 + 5 + 2 = 9); then the reply keeps 3 of its 5 tokens (1 + 1 + 3 + 2 = 7).
    p, h, budget, cut = fit_to_length(persona, history, 5, 7)
    assert (p, h, budget) == ([], [[]], 3) and 1 + 1 + budget + 2 <= 7


def _fit_reference(persona, history, longest_reply, max_length):
    """The plain version of the rule: one turn, sentence or token at a time, the whole length recomputed (quadratic)."""
    if max_length is None:
        return persona, history, longest_reply, False

    def length(reply=longest_reply):
        return 1 + sum(map(len, persona)) + sum(len(h) + 1 for h in history) + reply + 2

    if length() <= max_length:
        return persona, history, longest_reply, False
    persona, history = list(persona), list(history)
    while length() > max_length and len(history) > 1:
        history.pop(0)
    while length() > max_length and persona and sum(map(len, persona)) > max_length // 2:
        persona.pop()
    while length() > max_length and history and history[-1]:
        history[-1] = history[-1][1:]
    while length() > max_length and persona:
        persona.pop()
    budget = longest_reply
    while length(budget) > max_length and budget > 1:
        budget -= 1
    if length(budget) > max_length:
        raise ValueError("too small")
    return persona, history, budget, True


def test_fit_to_length_matches_the_plain_version_on_random_cases():
    rng = random.Random(0)
    for _ in range(3000):
        persona = [[rng.randrange(50)] * rng.randrange(0, 6) for _ in range(rng.randrange(0, 5))]
        history = [[rng.randrange(50)] * rng.randrange(0, 8) for _ in range(rng.randrange(0, 6))]
        reply = rng.randrange(0, 10)
        max_length = rng.choice([None, rng.randrange(1, 60)])
        try:
            expected = _fit_reference(persona, history, reply, max_length)
        except ValueError:
            with pytest.raises(ValueError, match="max_length"):
                fit_to_length(persona, history, reply, max_length)
            continue
        got = fit_to_length(persona, history, reply, max_length)
        assert got == expected, (persona, history, reply, max_length)
        p, h, budget, _ = got
        # The contract: the training input of a reply cut to the budget fits, eos included.
        assert len(build_inputs(p, h, [7] * min(reply, budget), IDS)["input_ids"]) <= (max_length or 10**9)


def test_fit_to_length_is_linear():
    persona = [[5, 6, 7]] * 30_000  # a 30k-sentence persona
    history = [[8, 9]] * 30_000
    started = time.perf_counter()
    p, h, budget, cut = fit_to_length(persona, history, 10, 1024)
    assert time.perf_counter() - started < 0.5
    assert cut and h == [[8, 9]] and len(p) == (1024 - 1 - 3 - 10 - 2) // 3 and budget == 10
