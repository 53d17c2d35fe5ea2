"""The shared-prefix dual-head forward equals the plain one: losses, logits, per-example statistics and gradients."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from transformers import GPT2Config, OpenAIGPTConfig

from persona_collator import PersonaCollator
from persona_data import SpeakerIds, build_features, build_inputs
from persona_model import (
    PersonaGPT2DoubleHeadsModel,
    PersonaOpenAIGPTDoubleHeadsModel,
    shared_prefix_lengths,
)

SPEAKERS = SpeakerIds(bos=1, eos=2, speaker1=3, speaker2=4)
PAD = 0
VOCAB = 64
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}


def tiny_gpt2(seed: int = 0, n_positions: int = 256, **overrides) -> PersonaGPT2DoubleHeadsModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4, **NO_DROPOUT)
    for key, value in overrides.items():
        setattr(config, key, value)
    return PersonaGPT2DoubleHeadsModel(config).eval()


def random_example(rng: random.Random, num_candidates: int, max_history: int, long: bool, shared_start: bool) -> dict:
    """One `build_features`-style row (built with the reference builder) with random lengths."""
    words = lambda n: [rng.randrange(5, VOCAB) for _ in range(n)]  # noqa: E731
    scale = 4 if long else 1
    persona = [words(rng.randint(1, 5 * scale)) for _ in range(rng.randint(0, 3))]
    history = [words(rng.randint(1, 6 * scale)) for _ in range(rng.choice([1, 3, 5, 7]))]
    history = history[-(2 * max_history + 1) :]
    start = words(2) if shared_start else []  # candidates sharing their first reply tokens
    replies = [start + words(rng.randint(1, 9)) for _ in range(num_candidates)]
    gold = num_candidates - 1
    rows = [build_inputs(persona, history, r, SPEAKERS, lm_labels=i == gold) for i, r in enumerate(replies)]
    row = {key: [r[key] for r in rows] for key in ("input_ids", "token_type_ids", "labels", "mc_token_ids")}
    row["mc_labels"] = num_candidates - 1
    return row


def random_batch(seed: int, batch_size: int, num_candidates: int, max_history: int = 2, mixed: bool = True) -> dict:
    rng = random.Random(seed)
    rows = [
        random_example(rng, num_candidates, max_history, long=mixed and b % 2 == 0, shared_start=b % 3 == 1)
        for b in range(batch_size)
    ]
    return PersonaCollator(pad_token_id=PAD)(rows)


def run(model, batch: dict, shared: bool, backward: bool = True) -> tuple:
    model.config.persona_shared_prefix = shared
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    if backward:
        (out.lm_loss + out.mc_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(model, batch: dict, atol: float = 1e-5) -> None:
    plain, plain_grads = run(model, batch, shared=False)
    shared, shared_grads = run(model, batch, shared=True)
    for key in ("lm_loss", "mc_loss", "mc_logits", "lm_nll", "lm_tokens", "mc_nll"):
        torch.testing.assert_close(getattr(shared, key), getattr(plain, key), atol=atol, rtol=1e-5, msg=key)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=atol, rtol=1e-4, msg=name)


class CallCounter:
    """Counts the backbone's forward calls and the tokens they encode."""

    def __init__(self, module):
        self.calls, self.tokens = 0, 0
        module.register_forward_hook(self)

    def __call__(self, module, args, kwargs_or_output, *rest):
        self.calls += 1


def test_prefix_length_is_the_reply_speaker_position():
    """On the DESIGN.md worked example the shared context ends right before the reply's <speaker1> (index 11)."""
    persona, history = [[10, 11], [12]], [[20], [21, 22], [23]]
    rows = [build_inputs(persona, history, r, SPEAKERS, lm_labels=i == 2) for i, r in enumerate([[30, 31], [40], [30]])]
    batch = PersonaCollator(pad_token_id=PAD)(
        [
            {
                **{key: [r[key] for r in rows] for key in ("input_ids", "token_type_ids", "labels", "mc_token_ids")},
                "mc_labels": 2,
            }
        ]
    )
    assert batch["input_ids"][0, 0, 11] == SPEAKERS.speaker1
    args = [batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids", "labels")]
    assert shared_prefix_lengths(*args).tolist() == [11]
    # Without LM labels the candidates still share [speaker1]: the prefix may include it (any common prefix is exact).
    assert shared_prefix_lengths(*args[:4]).tolist() == [12]
    # One candidate: everything before the reply.
    assert shared_prefix_lengths(*[a[:, 2:] for a in args]).tolist() == [11]


@pytest.mark.parametrize("num_candidates", [1, 2, 4, 20])
def test_equals_plain_path(num_candidates):
    model = tiny_gpt2()
    for seed in range(3):
        assert_same(model, random_batch(seed, batch_size=4, num_candidates=num_candidates))


@pytest.mark.parametrize("max_history", [0, 1, 3])
def test_equals_plain_path_history_cuts(max_history):
    model = tiny_gpt2(seed=1)
    assert_same(model, random_batch(7, batch_size=5, num_candidates=4, max_history=max_history))


def test_equals_plain_path_pad_to_multiple_and_one_example():
    model = tiny_gpt2(seed=2)
    rng = random.Random(3)
    rows = [random_example(rng, 3, 2, long=True, shared_start=False)]
    assert_same(model, PersonaCollator(pad_token_id=PAD, pad_to_multiple_of=8)(rows))


def test_shared_path_really_runs():
    """The backbone runs twice (prefix, then candidates) and never sees the full [B*C, T] batch."""
    model = tiny_gpt2()
    batch = random_batch(0, batch_size=3, num_candidates=4)
    shapes = []
    model.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: shapes.append(out.last_hidden_state.shape), with_kwargs=True
    )
    run(model, batch, shared=True, backward=False)
    b, c, t = batch["input_ids"].shape
    assert len(shapes) == 2
    assert shapes[0][0] == b and shapes[1][0] == b * c
    assert shapes[1][1] < t


@pytest.fixture(scope="module")
def persona_setup(tmp_path_factory):
    """Synthetic dialogs and a tiny checkpoint of our own (conftest's synthetic_data is too small for 20 candidates)."""
    from persona_model import load_model_and_tokenizer
    from persona_synthetic import corpus_texts, make_synthetic_personachat, make_tiny_checkpoint

    data = make_synthetic_personachat(num_train=16, num_valid=16, seed=0)
    out = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-gpt2-sp")), corpus_texts(data), n_embd=32, n_head=2)
    model, tokenizer = load_model_and_tokenizer(out)
    return data, model, tokenizer


def test_through_build_features(persona_setup):
    """Real rows from build_features (max_history and max_length cuts), the tiny checkpoint, eval mode."""
    from datasets import Dataset

    data, model, tokenizer = persona_setup
    model = copy.deepcopy(model).eval()
    dialogs = Dataset.from_list(data["valid"])
    for num_candidates, max_history, max_length in [(20, 2, None), (4, 1, 48)]:
        features = build_features(
            dialogs, tokenizer, num_candidates=num_candidates, max_history=max_history, max_length=max_length
        )
        rows = [features[i] for i in range(min(6, len(features)))]
        assert_same(model, PersonaCollator(pad_token_id=tokenizer.pad_token_id)(rows))


def test_openai_gpt_falls_back_with_a_message(caplog):
    torch.manual_seed(0)
    config = OpenAIGPTConfig(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4, **NO_DROPOUT)
    model = PersonaOpenAIGPTDoubleHeadsModel(config).eval()
    batch = random_batch(0, batch_size=2, num_candidates=4)
    with caplog.at_level(logging.WARNING, logger="persona_model"):
        assert_same(model, batch, atol=0)
    assert "no key/value cache" in caplog.text


def test_gradient_checkpointing_falls_back():
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    model.train()  # dropout is 0: train mode is deterministic
    assert_same(model, random_batch(1, batch_size=2, num_candidates=2), atol=0)
