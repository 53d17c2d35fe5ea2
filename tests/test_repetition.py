"""Repetition control that spares the persona: the processors against hand-computed logits, n-gram blocking over a
10-turn greedy `--stdin` session of an untrained (looping) model, and a persona 3-gram the bot may restate (where the
library's own `no_repeat_ngram_size` forbids it) but not repeat from its own earlier turn."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor

import persona_generation
from persona_chat import PersonaBot
from persona_decoding import generation_config_from_options
from persona_generation import build_context
from persona_repetition import (
    OwnTurnsNoRepeatNGramLogitsProcessor,
    OwnTurnsRepetitionPenaltyLogitsProcessor,
    repetition_processors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONA = ["i love cats.", "i am a nurse."]


def ngrams(ids: list[int], n: int = 3) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def test_no_repeat_ngram_counts_the_reply_and_own_turns_only():
    # Both rows: the prompt [9, 1, 2], then the reply so far; row 0's context has the earlier bot turns [5, 6], [7, 4].
    processor = OwnTurnsNoRepeatNGramLogitsProcessor(2, 3, [[[5, 6], [7, 4]], [[]]])
    input_ids = torch.tensor([[9, 1, 2, 7, 3, 7], [9, 1, 2, 8, 4, 9]])
    out = processor(input_ids, torch.zeros(2, 10))
    # Row 0 ends with 7: the reply's (7, 3) and the own turn's (7, 4) are blocked. Row 1 ends with 9: the prompt's
    # (9, 1) is not counted, so nothing is blocked; the library's processor blocks 1 there.
    expected = torch.zeros(2, 10)
    expected[0, [3, 4]] = -float("inf")
    assert torch.equal(out, expected)
    library = NoRepeatNGramLogitsProcessor(2)(input_ids, torch.zeros(2, 10))
    assert library[1, 1] == -float("inf")
    # Beam/sample rows: each context's row repeated in place.
    repeated = processor(input_ids.repeat_interleave(2, 0), torch.zeros(4, 10))
    assert torch.equal(repeated, expected.repeat_interleave(2, 0))


def test_repetition_penalty_counts_the_reply_and_own_turns_only():
    processor = OwnTurnsRepetitionPenaltyLogitsProcessor(2.0, 2, [[[5]], [[]]])
    input_ids = torch.tensor([[5, 6, 7], [5, 6, 8]])  # prompt [5, 6] (never counted), replies [7] and [8]
    scores = torch.tensor([[1.0, 1, 1, 1, 1, 4.0, 6.0, -3.0, 2.0, 1], [1.0, 1, 1, 1, 1, 4.0, 6.0, -3.0, 2.0, 1]])
    out = processor(input_ids, scores.clone())
    expected = scores.clone()
    expected[0, 5] = 2.0  # own turn token: 4 / 2
    expected[0, 7] = -6.0  # reply token with a negative logit: -3 * 2
    expected[1, 8] = 1.0  # reply token: 2 / 2; the prompt's 5 and 6 untouched in both rows
    assert torch.equal(out, expected)
    assert len(repetition_processors(3, [[]])) == 0  # off by default


@pytest.fixture(scope="module")
def model(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[0].eval()


def recorded_replies(monkeypatch) -> list[list[int]]:
    """Record the token ids of every reply generated (the bot returns text)."""
    seen = []
    original = persona_generation.generate_candidate_ids

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.extend(candidates[0] for candidates in out)
        return out

    monkeypatch.setattr(persona_generation, "generate_candidate_ids", spy)
    return seen


TURNS = [f"turn {i} : what do you like ?" for i in range(10)]


@pytest.mark.slow
def test_ten_turn_greedy_session_repeats_no_trigram(model, tokenizer, tiny_model_and_tokenizer, monkeypatch, tmp_path):
    options = {"no_sample": True, "max_new_tokens": 16, "min_length": 16}
    looping = PersonaBot(model, tokenizer, PERSONA, **options)
    loops = recorded_replies(monkeypatch)
    for turn in TURNS[:2]:
        looping.reply(turn)
    assert any(len(set(ngrams(ids))) < len(ngrams(ids)) for ids in loops)  # untrained and greedy: it loops
    loops.clear()
    bot = PersonaBot(model, tokenizer, PERSONA, no_repeat_ngram_size=3, **options)
    replies = [bot.reply(turn) for turn in TURNS]
    assert len(loops) == 10 and all(len(ids) == 16 for ids in loops)
    earlier: set[tuple[int, ...]] = set()
    for ids, text in zip(loops, replies):
        assert len(set(ngrams(ids))) == len(ngrams(ids))  # no 3-gram twice in a reply
        assert not set(ngrams(ids)) & earlier  # none from the bot's earlier replies (as their text encodes)
        earlier |= set(ngrams(tokenizer(text, add_special_tokens=False)["input_ids"]))
    # The console script with the flag gives the same 10 replies.
    checkpoint = tmp_path / "ckpt"
    tiny_model_and_tokenizer[0].save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    flags = ["--no_sample", "--max_new_tokens", "16", "--min_length", "16", "--no_repeat_ngram_size", "3"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "persona_chat.py"), "--model_name_or_path", str(checkpoint),
         *[a for p in PERSONA for a in ("--persona", p)], "--stdin", "--device", "cpu", *flags],
        input="\n".join(TURNS) + "\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [" ".join(r.split()) for r in replies]


def force_sequence(model, sequence: list[int], after: int):
    """Bias the LM head so that `sequence` follows the token `after`, token by token (a model that wants to quote)."""
    following = {after: sequence[0], **dict(zip(sequence, sequence[1:]))}

    def hook(module, args, kwargs, output):
        for row, last in enumerate(kwargs["input_ids"][:, -1].tolist()):
            if last in following:
                output.logits[row, -1, following[last]] += 1e4
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_the_persona_may_be_restated_but_not_the_bots_own_turn(model, tokenizer):
    from persona_tokens import SpecialTokenIds

    sentence = tokenizer("i love cats.", add_special_tokens=False)["input_ids"]
    assert len(sentence) >= 3 and len(set(sentence)) == len(sentence)
    options = {"no_sample": True, "max_new_tokens": 8, "min_length": 8}
    handle = force_sequence(model, sentence, SpecialTokenIds.from_tokenizer(tokenizer).speaker1)
    try:
        bot = PersonaBot(model, tokenizer, PERSONA, no_repeat_ngram_size=3, **options)
        first = bot.reply("do you have pets ?")
        second = bot.reply("tell me again ?")
        # The library's processor counts the prompt, persona included: it forbids the quote.
        context = build_context(tokenizer, PERSONA, ["do you have pets ?"])
        context["position_ids"] = torch.arange(context["input_ids"].size(1))[None]
        config = generation_config_from_options(tokenizer, **options)
        with torch.no_grad():
            library = model.generate(**context, generation_config=config, no_repeat_ngram_size=3)
    finally:
        handle.remove()
    first_ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    assert first_ids[: len(sentence)] == sentence  # a persona 3-gram (the whole sentence) restated
    assert tuple(sentence[:3]) not in ngrams(library[0, context["input_ids"].size(1) :].tolist())
    # Its own earlier turn is counted: the second reply cannot say it again.
    assert not set(ngrams(tokenizer(second, add_special_tokens=False)["input_ids"])) & set(ngrams(first_ids))
