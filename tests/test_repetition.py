"""Repetition control that spares the persona: the processors against hand-computed logits, n-gram blocking over a
10-turn greedy `--stdin` session of an untrained (looping) model, and a persona 3-gram the bot may restate (where the
library's own `no_repeat_ngram_size` forbids it) but not repeat from its own earlier turn."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from persona_chat import PersonaBot
from persona_decoding import generation_config_from_options
from persona_generation import build_context
from persona_repetition import (
    OwnTurnsNoRepeatNGramLogitsProcessor,
    OwnTurnsNoRepeatWordNGramLogitsProcessor,
    OwnTurnsRepetitionPenaltyLogitsProcessor,
    repetition_processors,
)
from persona_text import decode_reply

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


def word_ngrams(text: str, n: int = 3) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated(replies: list[str], n: int = 3) -> list[int]:
    """The replies (indices) that hold a word n-gram twice or one of an earlier reply's, counted as a reader would."""
    earlier: set[tuple[str, ...]] = set()
    bad = []
    for i, reply in enumerate(replies):
        grams = word_ngrams(reply, n)
        if len(set(grams)) < len(grams) or set(grams) & earlier:
            bad.append(i)
        earlier |= set(grams)
    return bad


TURNS = [f"turn {i} : what do you like ?" for i in range(10)]


def chat_stdin(checkpoint: str, *flags: str) -> list[str]:
    """The printed replies of a 10-turn greedy `persona-chat --stdin` session."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "persona_chat.py"), "--model_name_or_path", checkpoint,
         *[a for p in PERSONA for a in ("--persona", p)], "--stdin", "--device", "cpu", "--no_sample",
         "--max_new_tokens", "40", *flags],
        input="\n".join(TURNS) + "\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")[:-1]
    assert len(replies) == len(TURNS)
    return replies


@pytest.mark.slow
def test_ten_turn_stdin_session_repeats_no_printed_word_trigram(persona_checkpoint, model, tokenizer):
    # Untrained and greedy, the model loops: without the flag its printed replies repeat word 3-grams.
    assert repeated(chat_stdin(persona_checkpoint))
    replies = chat_stdin(persona_checkpoint, "--no_repeat_ngram_size", "3")
    assert repeated(replies) == []  # none inside a reply, none from an earlier reply
    assert sum(len(word_ngrams(r)) for r in replies) >= 10, replies  # the check had 3-grams to count
    # PersonaBot, in this process, prints the same.
    bot = PersonaBot(model, tokenizer, PERSONA, no_sample=True, max_new_tokens=40, no_repeat_ngram_size=3)
    assert [" ".join(bot.reply(t).split()) for t in TURNS] == replies


def done_words(tokenizer, ids: list[int]) -> list[str]:
    """The printed words of a reply so far that no continuation changes: the common start of its words before a
    fresh word, with and without a letter glued on first."""
    one, two = (decode_reply(tokenizer, ids + tokenizer(after)["input_ids"]).split()[:-1] for after in (" zq", "q zq"))
    return [a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(one, two))]


def has_repeat(words: list[str], own: list[str]) -> bool:
    grams = word_ngrams(" ".join(words))
    return len(set(grams)) < len(grams) or bool(set(grams) & {g for turn in own for g in word_ngrams(turn)})


def reference_bans(tokenizer, own: list[str], reply: list[int], finishing: bool, stops: list[int]) -> set[int]:
    """The tokens after `reply` that make the printed reply repeat a word 3-gram, by decoding continuations: at the
    last step (or a stop token) the reply as it ends there, else the words no continuation changes."""
    bans = set()
    for t in range(len(tokenizer)):
        if finishing or t in stops:
            words = decode_reply(tokenizer, reply + [t]).split()
        else:
            words = done_words(tokenizer, reply + [t])
        if has_repeat(words, own):
            bans.add(t)
    return bans


@pytest.mark.slow
def test_word_ngram_bans_match_decoding_every_continuation(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    own = ["i love cats . i am a nurse", "a b c"]
    # Lead bytes of a character that never comes (printed as nothing), a separator and a form feed (word breaks).
    broken = tokenizer.convert_tokens_to_ids([bytes_to_unicode()[b] for b in (0xEF, 0xC3, 0x1C, 0x0C)])
    rng = random.Random(0)
    pool = encode(" i love cats . i am a nurse a b c") + broken + encode("cat")
    prefixes = [
        encode("i love"),
        encode("i love cats"),
        encode("i love cat"),
        encode("a b d a b"),
        encode("i") + [broken[0]] + encode(" love cats"),
        encode("i love") + [broken[2]] + encode("cats"),
        [],
    ]
    prefixes += [[rng.choice(pool) for _ in range(rng.randrange(1, 10))] for _ in range(40)]  # fmt: skip
    stops = [tokenizer.eos_token_id]
    prompt = encode("the prompt is not counted : i love cats")
    checked = 0
    for reply in prefixes:
        if has_repeat(done_words(tokenizer, reply), own):
            continue  # the processor keeps a reply free of repeats from its start; begin from one that is
        for finishing in (False, True):
            max_new = len(reply) + 1 if finishing else len(reply) + 5
            processor = OwnTurnsNoRepeatWordNGramLogitsProcessor(3, len(prompt), [own], tokenizer, max_new, stops)
            scores = processor(torch.tensor([prompt + reply]), torch.zeros(1, len(tokenizer)))
            got = set(torch.nonzero(scores[0] == -float("inf")).flatten().tolist())
            assert got == reference_bans(tokenizer, own, reply, finishing, stops), (reply, finishing)
            checked += bool(got)
    assert checked >= 8  # cases that ban something


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
    # Its own earlier turn is counted: the second reply cannot say a word 3-gram of it again.
    assert word_ngrams(first) and not set(word_ngrams(second)) & set(word_ngrams(first)), (first, second)
