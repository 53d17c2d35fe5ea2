"""Generate, then rank: the chosen reply is the best of the samples by the multiple-choice head scored independently
(training rows through the plain forward, one candidate at a time); the scores on the sampling cache equal the
two-pass reference (`rank_replies`: the rows' own double-heads forward) to 1e-5, the reference taking over where a
row does not continue the generation context; the context is encoded once and the replies are not fed again; N=1 is
the plain reply; the NLI penalty follows Welleck et al.'s formula; chat-template and LoRA checkpoints; a checkpoint
without a trained head refuses to rank."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import error_line, no_loading
from transformers import AutoTokenizer, GPT2LMHeadModel, set_seed

import persona_chat
import persona_convai2
import persona_eval
import persona_generation
from persona_chat import PersonaBot
from persona_data import build_features
from persona_decoding import generation_config_from_options
from persona_errors import UsageError
from persona_generation import (
    build_context,
    generate_candidate_ids,
    generate_ranked,
    generate_ranked_replies,
    generate_replies,
    generate_reply_ids,
)
from persona_model import load_model_and_tokenizer, multiple_choice_head_loaded
from persona_ranking import rank_replies
from persona_records import dialogs_to_dataset_dict
from persona_text import decode_reply

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONA = ["i love cats.", "i am a nurse.", "my favorite color is purple."]
HISTORY = ["hi , how are you ?", "good , i just got home from work .", "what do you do ?"]
CONTEXTS = [(PERSONA, HISTORY), (PERSONA[:1], ["hello"])]


@pytest.fixture(scope="module")
def model(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[0].eval()


def independent_scores(model, tokenizer, persona, history, replies, max_history=2, input_format=None) -> list[float]:
    """Each reply's multiple-choice score through `build_features` (the training rows) and the model's plain forward,
    one candidate at a time (no padding, no shared context)."""
    dialogs = dialogs_to_dataset_dict(
        {"valid": [{"personality": persona, "utterances": [{"history": history, "candidates": list(replies)}]}]},
        source="test",
    )["valid"]
    row = build_features(dialogs, tokenizer, num_candidates=None, max_history=max_history, input_format=input_format)[0]
    scores = []
    for i, input_ids in enumerate(row["input_ids"]):
        inputs = {"input_ids": torch.tensor([[input_ids]]), "mc_token_ids": torch.tensor([[row["mc_token_ids"][i]]])}
        if "token_type_ids" in row:
            inputs["token_type_ids"] = torch.tensor([[row["token_type_ids"][i]]])
        with torch.no_grad():
            scores.append(float(model(**inputs).mc_logits[0, 0]))
    return scores


def test_ranked_reply_is_the_best_sample_by_independent_scores(model, tokenizer):
    options = {"num_ranked": 6, "seed": 3, "temperature": 1.5, "max_new_tokens": 8}
    ranked = generate_ranked(model, tokenizer, CONTEXTS, **options)
    replies = generate_replies(model, tokenizer, CONTEXTS, **options)
    for (persona, history), candidates, reply in zip(CONTEXTS, ranked, replies):
        texts = [text for text, _ in candidates]
        assert len(texts) == len(set(texts)) and 2 <= len(texts) <= 6  # distinct samples, each once
        expected = independent_scores(model, tokenizer, persona, history, texts)
        assert [score for _, score in candidates] == pytest.approx(expected, abs=1e-4)
        assert reply == texts[max(range(len(texts)), key=expected.__getitem__)]
        assert expected == sorted(expected, reverse=True)  # best first
    # generate_reply_ids picks the same reply (its token ids), decoded by the one rule (no broken characters).
    ids = generate_reply_ids(model, tokenizer, CONTEXTS, **options)
    assert [decode_reply(tokenizer, r) for r in ids] == replies


def test_samples_equal_generates_own_num_return_sequences(model, tokenizer):
    """The context's cache computed once and repeated gives the library's own N samples, token for token."""
    options = {"num_ranked": 5, "temperature": 1.2, "max_new_tokens": 10, "min_length": 10}
    samples = generate_candidate_ids(model, tokenizer, CONTEXTS[:1], seed=7, **options)[0]
    config = generation_config_from_options(tokenizer, temperature=1.2, max_new_tokens=10, min_length=10)
    context = build_context(tokenizer, *CONTEXTS[0])
    context["position_ids"] = torch.arange(context["input_ids"].size(1))[None]
    set_seed(7)
    with torch.no_grad():
        out = model.generate(**context, generation_config=config, num_return_sequences=5)
    assert samples == out[:, context["input_ids"].size(1) :].tolist()


def test_the_context_is_encoded_once_and_the_replies_are_not_fed_again(model, tokenizer):
    seen = []

    def record(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        seen.append(tuple(ids.shape) if ids is not None else tuple(embeds.shape[:-1]))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ranked = generate_ranked_replies(model, tokenizer, CONTEXTS[:1], num_ranked=8, seed=0, max_new_tokens=6)[0]
    finally:
        handle.remove()
    context_len = build_context(tokenizer, *CONTEXTS[0])["input_ids"].size(1)
    prefill, *steps, ranking = seen
    assert prefill == (1, context_len - 1)  # the context once, for all 8 samples
    assert 1 <= len(steps) <= 6 and all(s == (8, 1) for s in steps)  # then one token per sample and step
    # The candidates in one forward on the sampling cache: each row's tokens from where its sample's fed ones end
    # (at most the reply and its end token), never the context.
    assert ranking[:2] == (1, len(ranked)) and ranking[2] <= 6 + 1 < context_len


class Spy:
    """Records the calls of `function` (its keyword or positional argument `name`)."""

    def __init__(self, function, name=None, index=None):
        self.function, self.name, self.index, self.calls = function, name, index, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[self.index] if self.index is not None else kwargs.get(self.name))
        return self.function(*args, **kwargs)


def no_fallback(*args, **kwargs):
    raise AssertionError("the reference forward ran: a row did not continue the sampling cache")


RANKED_OPTIONS = [
    {"num_ranked": 8, "seed": 0, "temperature": 1.5, "max_new_tokens": 8},
    {"num_ranked": 5, "seed": 4, "max_new_tokens": 10, "min_length": 10},  # no sample stops: none fed its last token
    {"num_ranked": 4, "seed": 1, "top_k": 3, "top_p": 1.0, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
    {"num_ranked": 1, "seed": 2},
    {"num_ranked": 1, "no_sample": True},
]


def test_cached_scores_equal_the_two_pass_reference(model, tokenizer, monkeypatch):
    """The same replies, order and scores (1e-5) as ranking the decoded samples by the reference forward of their
    training rows; two contexts of different lengths in one batch (left padding); ids, text and score together."""
    cached = Spy(persona_generation.score_on_cache, index=4)
    monkeypatch.setattr(persona_generation, "score_on_cache", cached)
    monkeypatch.setattr(persona_generation, "score_replies", no_fallback)
    for options in RANKED_OPTIONS:
        ranked = generate_ranked_replies(model, tokenizer, CONTEXTS, **options)
        samples = generate_candidate_ids(model, tokenizer, CONTEXTS, **options)  # the same draws
        for (persona, history), candidates, ids_list in zip(CONTEXTS, ranked, samples):
            texts = [decode_reply(tokenizer, ids) for ids in ids_list]
            reference = rank_replies(model, tokenizer, persona, history, texts)
            assert [c.reply for c in candidates] == [r for r, _ in reference]
            assert [c.score for c in candidates] == pytest.approx([s for _, s in reference], abs=1e-5)
            for c in candidates:  # the ids of the first sample that decoded to the reply
                assert list(c.ids) == ids_list[texts.index(c.reply)]
        assert generate_replies(model, tokenizer, CONTEXTS, **options) == [c[0].reply for c in ranked]
        assert generate_reply_ids(model, tokenizer, CONTEXTS, **options) == [list(c[0].ids) for c in ranked]
    continuations = [c for call in cached.calls for c in call]
    # Both cases ran: rows continuing after every reply token their sample fed (the end token alone left), and rows
    # whose re-encoded text parts from the sampled tokens earlier (fed from there).
    assert any(c.keep > 0 and len(c.input_ids) == 1 for c in continuations)
    assert any(len(c.input_ids) > 1 for c in continuations)


def test_rows_that_do_not_continue_the_generation_context_are_scored_by_the_reference(model, tokenizer, monkeypatch):
    """Rows whose context is not the one sampling encoded (here: built with another history length) and beam search
    (the cache holds the last step's beams) go through the reference forward; a context the window cuts is scored
    as the reference scores it."""
    reference = Spy(persona_generation.score_replies, name="rows")
    monkeypatch.setattr(persona_generation, "score_replies", reference)
    options = {"num_ranked": 6, "seed": 0, "max_new_tokens": 8, "temperature": 1.5}
    (samples,) = generate_candidate_ids(model, tokenizer, CONTEXTS[:1], **options)
    texts = [decode_reply(tokenizer, ids) for ids in samples]
    with pytest.MonkeyPatch.context() as patch:
        rows = persona_generation.reply_rows
        patch.setattr(persona_generation, "reply_rows", lambda *a, **k: rows(*a, **{**k, "max_history": 0}))
        (ranked,) = generate_ranked(model, tokenizer, CONTEXTS[:1], **options)
    assert len(reference.calls) == 1
    assert ranked == rank_replies(model, tokenizer, *CONTEXTS[0], texts, max_history=0)
    beams = PersonaBot(model, tokenizer, PERSONA, no_sample=True, num_beams=3, max_new_tokens=6)
    (reply, score), *rest = beams.reply("hi", return_ranked=True)
    assert len(reference.calls) == 2 and not rest
    assert score == pytest.approx(rank_replies(model, tokenizer, PERSONA, ["hi"], [reply])[0][1], abs=1e-6)
    # A context cut to the window (the last turn loses its oldest tokens), samples that never stop.
    history = ["hi , tell me about your things , all of them ? " * 30]
    options = {"num_ranked": 6, "seed": 0, "max_new_tokens": 20, "min_length": 20, "temperature": 1.5}
    (ranked,) = generate_ranked_replies(model, tokenizer, [(PERSONA, history)], **options)
    (samples,) = generate_candidate_ids(model, tokenizer, [(PERSONA, history)], **options)
    expected = rank_replies(model, tokenizer, PERSONA, history, [decode_reply(tokenizer, ids) for ids in samples])
    assert [r.reply for r in ranked] == [r for r, _ in expected]
    assert [r.score for r in ranked] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_num_ranked_1_is_the_plain_reply(model, tokenizer):
    for options in ({"seed": 5}, {"no_sample": True}, {"seed": 2, "top_k": 5, "top_p": 1.0}):
        plain = generate_reply_ids(model, tokenizer, CONTEXTS, **options)
        assert generate_reply_ids(model, tokenizer, CONTEXTS, num_ranked=1, **options) == plain
        # Independent: the library's generate on the training builder's context with the same random stream.
        config = generation_config_from_options(tokenizer, **{k: v for k, v in options.items() if k != "seed"})
        context = build_context(tokenizer, *CONTEXTS[0])
        context["position_ids"] = torch.arange(context["input_ids"].size(1))[None]
        set_seed(options.get("seed", 0))
        with torch.no_grad():
            out = model.generate(**context, generation_config=config)[0, context["input_ids"].size(1) :].tolist()
        first = generate_reply_ids(model, tokenizer, CONTEXTS[:1], **options)[0]
        assert out[: len(first)] == first and (len(out) == len(first) or out[len(first)] in config.eos_token_id)


class StubNLI:
    """An NLI scorer that finds the replies in `contradicting` contradicting the persona's second sentence."""

    def __init__(self, contradicting: dict[str, float]):
        self.contradicting = contradicting
        self.calls = []

    def probabilities(self, replies, persona):
        self.calls.append((list(replies), list(persona)))
        out = torch.zeros(len(replies), len(persona), 3)
        out[..., 1] = 1.0  # neutral
        for i, reply in enumerate(replies):
            c = self.contradicting.get(reply, 0.0)
            out[i, 1] = torch.tensor([0.0, 1.0 - c, c])
        return out


def test_nli_penalty_follows_the_formula(model, tokenizer):
    replies = ["i love cats too .", "i hate cats .", "hello there .", "i hate cats ."]
    plain = dict(rank_replies(model, tokenizer, PERSONA, HISTORY, replies))
    assert len(plain) == 3  # the duplicate scored once
    best = max(plain, key=plain.get)
    stub = StubNLI({best: 0.9, "hello there .": 0.2})
    penalty = 2.0
    ranked = rank_replies(model, tokenizer, PERSONA, HISTORY, replies, nli_scorer=stub, nli_penalty=penalty)
    spread = max(plain.values()) - min(plain.values())
    contradiction = {best: 0.9, "hello there .": 0.2}
    expected = {r: s - penalty * spread * contradiction.get(r, 0.0) for r, s in plain.items()}
    assert dict(ranked) == pytest.approx(expected, abs=1e-5)
    assert [r for r, _ in ranked] == sorted(expected, key=expected.get, reverse=True)
    assert ranked[-1][0] == best  # 0.9 of the spread twice over: the former best drops to last
    assert stub.calls == [(list(dict.fromkeys(replies)), PERSONA)]  # each distinct reply once, in sample order
    # Through the bot: the stub's penalty is applied to the sampled candidates.
    bot = PersonaBot(model, tokenizer, PERSONA, num_ranked=4, seed=0, nli_scorer=StubNLI({}), nli_penalty=1.0)
    assert bot.reply("hi", return_ranked=True)[0][0] == bot.history[-1]
    # Through generation (scored on the sampling cache): the reference's penalised ranking of the same samples.
    options = {"num_ranked": 6, "seed": 3, "temperature": 1.5, "max_new_tokens": 8}
    (samples,) = generate_candidate_ids(model, tokenizer, [(PERSONA, HISTORY)], **options)
    texts = list(dict.fromkeys(decode_reply(tokenizer, ids) for ids in samples))
    best = rank_replies(model, tokenizer, PERSONA, HISTORY, texts)[0][0]
    stubs = [StubNLI({best: 1.0, texts[-1]: 0.3}) for _ in range(2)]
    (ranked,) = generate_ranked(model, tokenizer, [(PERSONA, HISTORY)], nli_scorer=stubs[0], nli_penalty=0.7, **options)
    expected = rank_replies(model, tokenizer, PERSONA, HISTORY, texts, nli_scorer=stubs[1], nli_penalty=0.7)
    assert [r for r, _ in ranked] == [r for r, _ in expected] and ranked[0][0] != best
    assert [s for _, s in ranked] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_return_ranked_lists_every_candidate_best_first(model, tokenizer):
    bot = PersonaBot(model, tokenizer, PERSONA, num_ranked=5, seed=1, temperature=1.5)
    ranked = bot.reply("hi , how are you ?", return_ranked=True)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and bot.history[-1] == ranked[0][0]
    assert scores == pytest.approx(
        independent_scores(model, tokenizer, PERSONA, ["hi , how are you ?"], [r for r, _ in ranked]), abs=1e-4
    )
    assert isinstance(bot.reply("and you ?"), str) and bot.own_replies[-1] == bot.history[-1]


@pytest.fixture(scope="module")
def plain_lm_checkpoint(tmp_path_factory, tiny_checkpoint):
    """The tiny GPT-2 saved as a plain causal LM (no multiple-choice head), as a Hub GPT-2 is."""
    out = tmp_path_factory.mktemp("plain-lm")
    GPT2LMHeadModel.from_pretrained(tiny_checkpoint).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    return str(out)


def test_a_checkpoint_without_a_trained_head_refuses_to_rank(plain_lm_checkpoint, tiny_checkpoint, tmp_path):
    model, tokenizer = load_model_and_tokenizer(plain_lm_checkpoint)
    assert not multiple_choice_head_loaded(model)
    assert multiple_choice_head_loaded(load_model_and_tokenizer(tiny_checkpoint)[0])
    with pytest.raises(UsageError, match="no trained multiple-choice head|has none"):
        PersonaBot(model, tokenizer, PERSONA, num_ranked=4)
    with pytest.raises(UsageError, match="has none"):
        generate_replies(model, tokenizer, CONTEXTS, num_ranked=2)
    assert generate_replies(model, tokenizer, CONTEXTS, no_sample=True)  # one reply needs no head
    # LoRA trains the head in full (modules_to_save): the adapter folder ranks, merged or not.
    from persona_lora import apply_lora

    lora = apply_lora(model, tokenizer, r=2)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name or "multiple_choice_head" in name:
                param.add_(0.05 * torch.randn_like(param))
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    for merge in (True, False):
        loaded, tok = load_model_and_tokenizer(str(tmp_path / "adapter"), merge_adapter=merge)
        loaded.eval()
        assert multiple_choice_head_loaded(loaded)
        ranked = generate_ranked(loaded, tok, CONTEXTS[:1], num_ranked=4, seed=0, max_new_tokens=6)[0]
        if merge:
            expected = independent_scores(loaded, tok, *CONTEXTS[0], [r for r, _ in ranked])
            assert [s for _, s in ranked] == pytest.approx(expected, abs=1e-4)


def test_chat_template_checkpoint_ranks_on_the_end_of_turn_token(tokenizers, tmp_path):  # noqa: F811
    from helpers import backbone_config
    from transformers import AutoModelForCausalLM

    from persona_formats import input_format_of

    tokenizer = tokenizers["chatml"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(backbone_config("qwen2", len(tokenizer))).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    plain, _ = load_model_and_tokenizer(str(tmp_path / "plain"))
    assert not multiple_choice_head_loaded(plain)  # an instruct model from the Hub: no head yet
    plain.save_pretrained(tmp_path / "run")  # as persona-train saves it: the head beside the backbone
    tokenizer.save_pretrained(tmp_path / "run")
    model, tok = load_model_and_tokenizer(str(tmp_path / "run"))
    model.eval()
    chat_format = input_format_of(tok)
    assert chat_format.kind == "chat_template" and multiple_choice_head_loaded(model)
    with pytest.MonkeyPatch.context() as patch:  # scored on the sampling cache, as the reference scores the rows
        patch.setattr(persona_generation, "score_replies", no_fallback)
        ranked = generate_ranked(model, tok, CONTEXTS, num_ranked=4, seed=0, max_new_tokens=6)
        samples = generate_candidate_ids(model, tok, CONTEXTS, num_ranked=4, seed=0, max_new_tokens=6)
    for context, candidates, ids_list in zip(CONTEXTS, ranked, samples):
        reference = rank_replies(model, tok, *context, [decode_reply(tok, ids) for ids in ids_list])
        assert [r for r, _ in candidates] == [r for r, _ in reference]
        assert [s for _, s in candidates] == pytest.approx([s for _, s in reference], abs=1e-5)
    ranked = ranked[0]
    texts = [r for r, _ in ranked]
    expected = independent_scores(model, tok, *CONTEXTS[0], texts, input_format=chat_format)
    assert [s for _, s in ranked] == pytest.approx(expected, abs=1e-4)
    rows = build_features(
        dialogs_to_dataset_dict(
            {"valid": [{"personality": PERSONA, "utterances": [{"history": HISTORY, "candidates": texts}]}]}, source="t"
        )["valid"],
        tok,
        num_candidates=None,
        max_history=2,
        input_format=chat_format,
    )[0]
    # The head reads each candidate's end-of-turn token.
    assert all(ids[m] in chat_format.stop_ids for ids, m in zip(rows["input_ids"], rows["mc_token_ids"]))


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--num_ranked", "0"], "--num_ranked must be between 1 and 64, got 0"),
        (["--num_ranked", "-3"], "--num_ranked must be between 1 and 64, got -3"),
        (["--num_ranked", "65"], "--num_ranked must be between 1 and 64, got 65"),
        (["--num_ranked", "4", "--no_sample"], "--num_ranked 4 ranks sampled replies; greedy decoding"),
        (["--num_ranked", "4", "--num_beams", "2"], "--num_ranked 4 ranks sampled replies"),
        (["--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be >= 0"),
        (["--repetition_penalty", "0"], "--repetition_penalty must be a number > 0"),
        (["--repetition_penalty", "nan"], "--repetition_penalty must be a number > 0"),
        (["--nli_penalty", "1"], "--nli_penalty needs --nli_model"),
        (["--nli_model", "some/nli"], "--nli_model needs --nli_penalty > 0"),
        (["--nli_model", "some/nli", "--nli_penalty", "-1"], "--nli_penalty must be a finite number >= 0"),
        (["--nli_model", "some/nli", "--nli_penalty", "1"], "--nli_model re-ranks sampled replies; set --num_ranked"),
    ],
)
def test_bad_ranking_and_repetition_flags_are_one_line(flags, words, tiny_checkpoint, capsys, monkeypatch):
    no_loading(monkeypatch)
    line = error_line(persona_chat.cli, ["--model_name_or_path", tiny_checkpoint, "--stdin", *flags], capsys)
    assert line.startswith("persona-chat: error: ") and words in line, line


def test_eval_and_a_headless_checkpoint_are_one_line(plain_lm_checkpoint, personachat_json, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    line = error_line(
        persona_chat.cli, ["--model_name_or_path", plain_lm_checkpoint, "--stdin", "--num_ranked", "4"], capsys
    )
    assert "this checkpoint has none (a plain causal LM" in line
    argv = ["--model_name_or_path", plain_lm_checkpoint, "--dataset_path", personachat_json, "--num_ranked", "4"]
    assert "--num_ranked 4 ranks sampled replies; greedy decoding" in error_line(persona_eval.cli, argv, capsys)
    argv[-2:] = ["--nli_penalty", "1"]
    assert "--nli_penalty needs --nli_model" in error_line(persona_eval.cli, argv, capsys)


@pytest.mark.slow
def test_eval_reranks_with_the_nli_penalty(tiny_checkpoint, personachat_json, tiny_nli_checkpoints, monkeypatch):
    from persona_convai2 import flatten_turns
    from persona_data import load_dialogs
    from persona_nli import NLIScorer

    model, tokenizer = load_model_and_tokenizer(tiny_checkpoint)
    dialogs = load_dialogs(personachat_json)["valid"]
    nli = NLIScorer.from_pretrained(tiny_nli_checkpoints["deberta-style"], device="cpu")
    seen = []

    def spy(model, tokenizer, contexts, **kwargs):
        ranked = generate_ranked(model, tokenizer, contexts, **kwargs)
        seen.append((kwargs, ranked))
        return [r[0][0] for r in ranked]

    monkeypatch.setattr(persona_convai2, "generate_replies", spy)
    options = {"no_sample": False, "num_ranked": 4, "max_new_tokens": 6}
    result = persona_eval.evaluate_convai2(
        model.eval(), tokenizer, dialogs, max_turns=3, generation_options=options, return_predictions=True,
        nli=nli, nli_penalty=50.0,
    )  # fmt: skip
    ((kwargs, ranked),) = seen
    assert kwargs["nli_scorer"] is nli and kwargs["nli_penalty"] == 50.0 and kwargs["num_ranked"] == 4
    assert [p["reply"] for p in result["predictions"]] == [r[0][0] for r in ranked]
    # The penalty as the formula says, on the turn's own candidates.
    _, turns = flatten_turns(dialogs, 3)
    turn, candidates = turns[0], ranked[0]
    plain = dict(rank_replies(model, tokenizer, turn["persona"], turn["history"], [r for r, _ in candidates]))
    contradiction = nli.probabilities(list(plain), turn["persona"])[..., 2].amax(dim=1).tolist()
    spread = max(plain.values()) - min(plain.values())
    expected = {r: s - 50.0 * spread * c for (r, s), c in zip(plain.items(), contradiction)}
    assert dict(candidates) == pytest.approx(expected, abs=1e-4)


def readme_section() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return text.split("### Generate, then rank")[1].split("## Browser demo")[0]


@pytest.mark.slow
def test_readme_ranking_commands_run(tiny_checkpoint, personachat_json, tiny_nli_checkpoints, tmp_path):
    (bash,) = re.findall(r"```bash\n(.*?)```", readme_section(), flags=re.S)
    swaps = {
        "demo_assets/run": tiny_checkpoint,
        "demo_assets/personachat.json": personachat_json,
        "MoritzLaurer/DeBERTa-v3-base-mnli-fever-anli": tiny_nli_checkpoints["deberta-style"],
    }
    scripts = {"persona-chat": "persona_chat.py", "persona-eval": "persona_eval.py"}
    lines = bash.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        for old, new in swaps.items():
            line = line.replace(old, new)
        stdin = None
        if line.startswith("echo "):
            echo, line = line.split(" | ", 1)
            stdin = shlex.split(echo)[1] + "\n"
        argv = shlex.split(line)
        extra = ["--output_file", str(tmp_path / "eval.json")] if argv[0] == "persona-eval" else []
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, scripts[argv[0]]), *argv[1:], *extra],
            input=stdin, capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        if argv[0] == "persona-chat":
            assert len(result.stdout.splitlines()) == 1 and result.stdout.strip()
        else:
            assert json.load(open(tmp_path / "eval.json"))["options"]["num_ranked"] == 8


def test_readme_ranking_snippet_runs(tiny_checkpoint, capsys):
    (snippet,) = re.findall(r"```python\n(.*?)```", readme_section(), flags=re.S)
    exec(compile(snippet.replace('"demo_assets/run"', repr(tiny_checkpoint)), "README.md", "exec"), {})  # noqa: S102
    # An untrained model's reply may hold a newline: read the score at the start of each printed candidate.
    scores = [float(score) for score in re.findall(r"^([+-]\d+\.\d{3})  ", capsys.readouterr().out, flags=re.M)]
    assert 1 <= len(scores) <= 8 and scores == sorted(scores, reverse=True)


def test_the_real_nli_scorer_penalises_as_the_formula_says(model, tokenizer, tiny_nli_checkpoints):
    from persona_decoding import NLIRankingArguments

    scorer = NLIRankingArguments(nli_model=tiny_nli_checkpoints["mnli-style"], nli_penalty=1.5).load_scorer("cpu")
    replies = ["i love cats too .", "i hate cats .", "hello there ."]
    plain = dict(rank_replies(model, tokenizer, PERSONA, HISTORY, replies))
    contradiction = scorer.probabilities(replies, PERSONA)[..., 2].amax(dim=1).tolist()
    spread = max(plain.values()) - min(plain.values())
    expected = {r: plain[r] - 1.5 * spread * c for r, c in zip(replies, contradiction)}
    ranked = rank_replies(model, tokenizer, PERSONA, HISTORY, replies, nli_scorer=scorer, nli_penalty=1.5)
    assert dict(ranked) == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_ranked_latency_bench_runs(tmp_path):
    """bench/ranked_latency.py as the README gives it (`--tokenizer_vocab`), on the small model and a short reply."""
    argv = ["--tokenizer_vocab", "--threads", "1", "--small", "--repeats", "1", "--new_tokens", "3", "--ranked", "4"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "ranked_latency.py"), *argv],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"num_ranked=4: [1-4] distinct candidates", result.stdout), result.stdout
    assert re.search(r"num_ranked 4 / num_ranked 1: \d+\.\d\dx wall, \d+\.\d\dx CPU", result.stdout), result.stdout
