"""The shared-prefix double-heads forward equals the plain one: losses, logits, per-example statistics and gradients."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from helpers import (
    PAD,
    SPEAKERS,
    VOCAB,
    backbone_config,
    count_backbone_calls,
    encodings_run,
    random_batch,
    random_example,
    tiny_double_heads,
    tiny_gpt2,
    tiny_openai_gpt,
)

from persona_collator import PersonaCollator
from persona_data import build_features
from persona_encoding import set_candidate_encoding
from persona_inputs import build_inputs
from persona_shared_prefix import encode_shared_prefix, shared_prefix_lengths, shared_prefix_unsupported_reason


def run(model, batch: dict, shared: bool, backward: bool = True, expect: str | None = None) -> tuple:
    """Forward (and backward) with the shared prefix or the plain encoding asked for; asserts that `expect` (default:
    the one asked for) ran."""
    asked = "shared_prefix" if shared else "plain"
    set_candidate_encoding(model, asked)
    model.zero_grad(set_to_none=True)
    with encodings_run() as ran:
        out = model(**batch)
    assert ran == [expect or asked], f"asked for {asked}, expected {expect or asked} to run, ran {ran}"
    if backward:
        (out.lm_loss + out.mc_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(model, batch: dict, atol: float = 1e-5, shared_runs: str = "shared_prefix") -> None:
    """The shared-prefix forward and backward equal the plain ones; `shared_runs` is the encoding that must run when
    shared_prefix is asked for ("plain" where it falls back)."""
    plain, plain_grads = run(model, batch, shared=False)
    shared, shared_grads = run(model, batch, shared=True, expect=shared_runs)
    for key in ("lm_loss", "mc_loss", "mc_logits", "lm_nll", "lm_tokens", "mc_nll", "lm_end_nll"):
        torch.testing.assert_close(getattr(shared, key), getattr(plain, key), atol=atol, rtol=1e-5, msg=key)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=atol, rtol=1e-4, msg=name)


def test_prefix_length_is_the_reply_speaker_position():
    """On the worked example of the input format (docs/architecture.md) the shared context ends right before the
    reply's <speaker1> (index 11)."""
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
    model = tiny_openai_gpt()
    batch = random_batch(0, batch_size=2, num_candidates=4)
    with caplog.at_level(logging.WARNING, logger="persona_encoding"):
        assert_same(model, batch, atol=0, shared_runs="plain")
    assert "no key/value cache" in caplog.text


def test_gradient_checkpointing_falls_back():
    model = tiny_gpt2()
    model.activation_checkpointing_enable()
    model.train()  # dropout is 0: train mode is deterministic
    assert_same(model, random_batch(1, batch_size=2, num_candidates=2), atol=0, shared_runs="plain")


def _rows(seed: int, n: int, num_candidates: int) -> list[dict]:
    rng = random.Random(seed)
    return [random_example(rng, num_candidates, 2, long=i % 3 == 0, shared_start=i % 4 == 1) for i in range(n)]


def _train_and_evaluate(tmp_path, shared: bool) -> tuple[dict, dict]:
    from datasets import Dataset

    from persona_trainer import PersonaTrainer, PersonaTrainingArguments

    model = tiny_gpt2(seed=5)
    set_candidate_encoding(model, "shared_prefix" if shared else "plain")
    args = PersonaTrainingArguments(
        output_dir=str(tmp_path / f"out-{shared}"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=3,
        # SGD: Adam would turn the rounding noise of exactly-zero gradients (attention key biases) into full steps.
        optim="sgd",
        learning_rate=0.5,
        num_train_epochs=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        use_cpu=True,
    )
    trainer = PersonaTrainer(
        model=model,
        args=args,
        data_collator=PersonaCollator(pad_token_id=PAD),
        train_dataset=Dataset.from_list(_rows(0, 12, num_candidates=4)),
        eval_dataset=Dataset.from_list(_rows(1, 7, num_candidates=20)),
    )
    with encodings_run() as ran:
        trainer.train()
        metrics = trainer.evaluate()
    assert set(ran) == {"shared_prefix" if shared else "plain"}, ran
    return {n: p.detach().clone() for n, p in model.named_parameters()}, metrics


@pytest.mark.slow
def test_trainer_with_gradient_accumulation_matches_plain_path(tmp_path):
    """3 optimizer steps of GA=2 x batch 2 (4 candidates), then a 20-candidate evaluation: same weights and metrics."""
    plain_weights, plain_metrics = _train_and_evaluate(tmp_path, shared=False)
    shared_weights, shared_metrics = _train_and_evaluate(tmp_path, shared=True)
    moved = max((w - tiny_gpt2(seed=5).state_dict()[n]).abs().max().item() for n, w in plain_weights.items())
    assert moved > 1e-3  # the training did something
    for name, weight in plain_weights.items():
        torch.testing.assert_close(shared_weights[name], weight, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("eval_hits@1", "eval_lm_loss", "eval_mc_loss", "eval_ppl"):
        assert shared_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-5, abs=1e-6), key


def _tiny_backbone(model_type: str):
    from transformers import AutoModel

    torch.manual_seed(0)
    unprojected = {"word_embed_proj_dim": 32} if model_type == "opt" else {}  # hidden states of hidden_size
    return AutoModel.from_config(backbone_config(model_type, VOCAB, **unprojected)).eval()


@pytest.mark.parametrize(
    "model_type, use_embeds", [("gpt2", False), ("llama", False), ("llama", True), ("qwen2", True), ("opt", False)]
)
def test_encode_shared_prefix_generic_backbones(model_type, use_embeds):
    """The candidate-frame hidden states equal the full forward's for the backbones of the generic double-heads model
    (RoPE and learned positions, input ids or embeddings), gradients included."""
    backbone = _tiny_backbone(model_type)
    assert shared_prefix_unsupported_reason(backbone) is None
    batch = random_batch(4, batch_size=3, num_candidates=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, c, t = ids.shape
    lengths = shared_prefix_lengths(ids, batch["token_type_ids"], mask, batch["mc_token_ids"], batch["labels"])
    weights = torch.randn(b, c, t, backbone.config.hidden_size)  # a random linear read-out of every position

    def read_out(hidden_full):  # hidden [B, C, T, H] at real, non-prefix positions
        keep = mask.bool() & (torch.arange(t) >= lengths[:, None, None])
        return (hidden_full * weights * keep[..., None]).sum() / keep.sum()  # a mean, like a loss

    embed = backbone.get_input_embeddings()
    backbone.zero_grad()
    inputs = {"inputs_embeds": embed(ids.flatten(0, 1))} if use_embeds else {"input_ids": ids.flatten(0, 1)}
    full = backbone(**inputs, attention_mask=mask.flatten(0, 1)).last_hidden_state.view(b, c, t, -1)
    read_out(full).backward()
    full_grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}

    backbone.zero_grad()
    kwargs = {"inputs_embeds": embed(ids)} if use_embeds else {"input_ids": ids}
    enc = encode_shared_prefix(backbone, attention_mask=mask, prefix_lengths=lengths, **kwargs)
    # Scatter the candidate frame back to full positions to compare position by position.
    scattered = torch.zeros_like(full).scatter_add(
        2, enc.index[..., None].expand_as(enc.hidden), enc.hidden * enc.valid[..., None]
    )
    read_out(scattered).backward()
    keep = mask.bool() & (torch.arange(t) >= lengths[:, None, None])
    torch.testing.assert_close(scattered[keep], full[keep].detach(), atol=1e-5, rtol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(backbone.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)


def test_without_attention_mask_and_token_types():
    model = tiny_gpt2(seed=3)
    batch = random_batch(5, batch_size=3, num_candidates=4, mixed=False)
    assert_same(model, {k: v for k, v in batch.items() if k not in ("attention_mask", "token_type_ids")})


def test_bf16_autocast_close_to_plain_path():
    model = tiny_gpt2(seed=4)
    batch = random_batch(6, batch_size=3, num_candidates=4)
    outs = {}
    for shared in (False, True):
        set_candidate_encoding(model, "shared_prefix" if shared else "plain")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[shared] = model(**batch)
    torch.testing.assert_close(outs[True].mc_logits.float(), outs[False].mc_logits.float(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(outs[True].lm_loss, outs[False].lm_loss, atol=0.05, rtol=0.02)


def test_run_persona_flag():
    import run_persona

    def encoding(*flags):
        return run_persona.parse_args([*flags, "--output_dir", "out"])[0].candidate_encoding

    assert encoding() == "auto"
    assert encoding("--candidate_encoding", "shared_prefix") == "shared_prefix"
    with pytest.raises(ValueError, match="unrecognized argument '--shared_prefix'"):
        encoding("--shared_prefix", "false")


# The generic double-heads model (any causal LM backbone): the same shared-prefix path through `inputs_embeds`.


GENERIC_FAMILIES = ["llama", "qwen2", "opt"]


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
@pytest.mark.parametrize("num_candidates", [1, 4, 20])
def test_generic_double_heads_equals_plain_path(family, num_candidates):
    """Losses, mc_logits, per-example sums and every gradient (speaker embeddings, tied/untied heads) agree."""
    model = tiny_double_heads(family, seed=num_candidates)
    calls = count_backbone_calls(model.decoder)
    for seed in range(2):
        batch = random_batch(10 + seed, batch_size=4, num_candidates=num_candidates)
        b, c, t = batch["input_ids"].shape
        calls.clear()
        assert_same(model, batch)
        # Plain path: one [B*C, T] pass; shared path: a [B, P] prefix pass, then [B*C, S] candidate segments.
        assert calls[0] == (b * c, t) and len(calls) == 3
        keys = ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids", "labels")
        lengths = shared_prefix_lengths(*[batch[k] for k in keys])
        segment = int((batch["attention_mask"].sum(-1) - lengths[:, None]).max())
        assert calls[1] == (b, int(lengths.max())) and calls[2] == (b * c, segment) and segment < t


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_generic_double_heads_loss_only_and_mc_only(family):
    """labels without mc_labels and mc_labels without labels: each half of the output matches on its own."""
    model = tiny_double_heads(family, seed=7)
    batch = random_batch(20, batch_size=3, num_candidates=5)
    for drop, keys in (("mc_labels", ("lm_loss", "lm_nll", "lm_tokens", "mc_logits")), ("labels", ("mc_loss",))):
        inputs = {k: v for k, v in batch.items() if k != drop}
        outs = {}
        for shared in (False, True):
            set_candidate_encoding(model, "shared_prefix" if shared else "plain")
            with torch.no_grad():
                outs[shared] = model(**inputs)
        for key in keys:
            torch.testing.assert_close(getattr(outs[True], key), getattr(outs[False], key), atol=1e-5, rtol=1e-5)


def test_generic_double_heads_falls_back_with_gradient_checkpointing_and_sliding_window(caplog):
    batch = random_batch(3, batch_size=2, num_candidates=3)
    model = tiny_double_heads("llama", seed=1)
    model.activation_checkpointing_enable()
    model.train()  # dropout is 0: train mode is deterministic
    calls = count_backbone_calls(model.decoder)
    with caplog.at_level(logging.WARNING, logger="persona_encoding"):
        assert_same(model, batch, atol=0, shared_runs="plain")
    assert "gradient checkpointing" in caplog.text
    assert len(calls) == 2  # one full pass per path

    caplog.clear()
    model = tiny_double_heads("qwen2", seed=1, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert any(t != "full_attention" for t in model.config.text_config.layer_types)
    with caplog.at_level(logging.WARNING, logger="persona_encoding"):
        assert_same(model, batch, atol=0, shared_runs="plain")
    assert "non-full attention" in caplog.text
