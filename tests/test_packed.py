"""The packed encoding equals the plain one (losses, logits, per-example sums and gradients); the choice among the
three encodings; padding-free packed batches through PersonaTrainer."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from datasets import Dataset
from helpers import (
    PAD,
    SPEAKERS,
    count_backbone_calls,
    encodings_run,
    random_batch,
    random_example,
    tiny_double_heads,
    tiny_gpt2,
    tiny_openai_gpt,
)
from sgd_step import one_sgd_step
from transformers import AttentionInterface

from persona_backbone import PersonaGPT2DoubleHeadsModel
from persona_collator import PersonaCollator
from persona_data import build_features
from persona_encoding import requested_encoding, set_candidate_encoding, set_packed_layout
from persona_inputs import build_inputs
from persona_packed import (
    TREE_ATTENTION,
    TreeLayoutLost,
    assign_rows,
    packed_layout,
    packed_unsupported_reason,
    tree_attention,
    tree_attention_unsupported_reason,
)
from persona_shared_prefix import shared_prefix_lengths

KEYS = ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids", "labels")
ONE_ROW = 1 << 30  # a budget every batch fits in: the whole batch in one row
ONE_EXAMPLE_PER_ROW = None


def forward(model, batch: dict, encoding: str, row_tokens="longest", attention="auto"):
    """The model's own forward with `encoding` asked for, packed rows of `row_tokens` and `attention`."""
    set_candidate_encoding(model, encoding)
    set_packed_layout(model, attention, row_tokens)
    return model(**batch)


def run(
    model, batch: dict, packed: bool, row_tokens="longest", backward: bool = True, attention="auto", expect=None
) -> tuple:
    """Forward (and backward) with the packed or the plain encoding asked for; asserts that `expect` ran (default:
    the one asked for; for packed, with `attention` where it names one)."""
    model.zero_grad(set_to_none=True)
    with encodings_run() as ran:
        out = forward(model, batch, "packed" if packed else "plain", row_tokens, attention)
    if expect is None:  # "packed" (either attention) when the attention is left to "auto"
        expect = ("packed" if attention == "auto" else f"packed-{attention}") if packed else "plain"
    ran_as_expected = ran == [expect] or (expect == "packed" and len(ran) == 1 and ran[0].startswith("packed-"))
    assert ran_as_expected, f"expected {expect} to run, ran {ran}"
    if backward:
        (out.lm_loss + out.mc_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(
    model, batch: dict, row_tokens="longest", atol: float = 1e-5, attention="auto", packed_runs=None
) -> None:
    """The packed forward and backward equal the plain ones; `packed_runs` is the encoding that must run when packed is
    asked for (default packed, with `attention`; "plain" where it falls back)."""
    plain, plain_grads = run(model, batch, packed=False)
    packed, packed_grads = run(model, batch, True, row_tokens, attention=attention, expect=packed_runs)
    for key in ("lm_loss", "mc_loss", "mc_logits", "lm_nll", "lm_tokens", "mc_nll", "lm_end_nll"):
        torch.testing.assert_close(getattr(packed, key), getattr(plain, key), atol=atol, rtol=1e-5, msg=key)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=atol, rtol=1e-4, msg=name)


def worked_example_batch() -> dict:
    """The data contract's worked example (docs/architecture.md) with three candidates (gold last): replies [30, 31],
    [40], [30]."""
    persona, history = [[10, 11], [12]], [[20], [21, 22], [23]]
    rows = [build_inputs(persona, history, r, SPEAKERS, lm_labels=i == 2) for i, r in enumerate([[30, 31], [40], [30]])]
    row = {key: [r[key] for r in rows] for key in KEYS if key != "attention_mask"}
    return PersonaCollator(pad_token_id=PAD)([{**row, "mc_labels": 2}])


def test_layout_of_the_worked_example():
    """Context (11 tokens) once, then each candidate's reply segment with positions continuing at 11; the mask is a
    tree: a candidate sees the context and its own earlier tokens, the context sees only itself, causally."""
    batch = worked_example_batch()
    lengths = shared_prefix_lengths(*[batch[k] for k in KEYS])
    layout = packed_layout(lengths, batch["attention_mask"].sum(-1), batch["input_ids"].size(-1))
    assert (layout.num_rows, layout.row_len) == (1, 11 + 4 + 3 + 3)
    assert layout.position_ids.tolist() == [list(range(11)) + [11, 12, 13, 14] + [11, 12, 13] + [11, 12, 13]]
    assert layout.segment_ids.tolist() == [[0] * 11 + [1] * 4 + [2] * 3 + [3] * 3]
    ids = layout.pack(batch["input_ids"])[0].tolist()
    assert ids == [1, 10, 11, 12, 4, 20, 3, 21, 22, 4, 23] + [3, 30, 31, 2] + [3, 40, 2] + [3, 30, 2]
    mask = layout.attention_mask()[0, 0]
    assert mask[5].tolist() == [True] * 6 + [False] * 15  # a context token: causal over the context
    assert mask[16].tolist() == [True] * 11 + [False] * 4 + [True, True] + [False] * 4  # candidate 1, 2nd token
    assert mask[20].tolist() == [True] * 11 + [False] * 7 + [True] * 3  # candidate 2, last token
    # The candidate frame: each candidate's segment from position 11, mc token (its last) at frame index 3 / 2 / 2.
    assert layout.index[0, :, 0].tolist() == [11, 11, 11]
    assert layout.valid[0].sum(-1).tolist() == [4, 3, 3]
    assert layout.frame[0, :, 0].tolist() == [11, 15, 18]
    # The additive float form (eager attention): 0 where True, the dtype's minimum elsewhere.
    additive = layout.attention_mask(torch.float32)[0, 0]
    assert additive[16, 11] == torch.finfo(torch.float32).min and additive[16, 15] == 0


def test_assign_rows():
    assert assign_rows([5, 3, 4], None) == ([0, 1, 2], [0, 0, 0])
    # First fit, longest first: 9 -> row 0; 6 -> row 1; 4 -> row 1 (6 + 4 = 10); 3 -> row 2 (row 0: 9 + 3 > 10).
    assert assign_rows([4, 9, 3, 6], 10) == ([1, 0, 2, 1], [6, 0, 0, 0])
    # Budget 9 (the longest): 9 -> row 0; 6 -> row 1; 4 -> row 2 (6 + 4 > 9); 3 -> row 1 (6 + 3 = 9).
    assert assign_rows([4, 9, 3, 6], "longest") == ([2, 0, 1, 1], [0, 0, 6, 0])
    assert assign_rows([12, 2], 10) == ([0, 1], [0, 0])  # longer than the budget: a row of its own


@pytest.mark.parametrize("attention", ["tree", "dense"])
@pytest.mark.parametrize("row_tokens", [ONE_EXAMPLE_PER_ROW, "longest", ONE_ROW])
@pytest.mark.parametrize("num_candidates", [1, 2, 4, 20])
def test_equals_plain_path(num_candidates, row_tokens, attention):
    model = tiny_gpt2()
    for seed in range(2):
        batch = random_batch(seed, batch_size=4, num_candidates=num_candidates)
        assert_same(model, batch, row_tokens, attention=attention)


@pytest.mark.parametrize("attention", ["tree", "dense"])
def test_equals_plain_path_worked_example_history_cuts_and_padding(attention):
    model = tiny_gpt2(seed=1)
    assert_same(model, worked_example_batch(), attention=attention)
    for max_history in (0, 1, 3):
        batch = random_batch(7, batch_size=5, num_candidates=4, max_history=max_history)
        assert_same(model, batch, "auto", attention=attention)
    rows = [random_example(random.Random(3), 3, 2, long=True, shared_start=False)]
    assert_same(model, PersonaCollator(pad_token_id=PAD, pad_to_multiple_of=8)(rows), attention=attention)


def test_without_attention_mask_and_token_types():
    model = tiny_gpt2(seed=3)
    batch = random_batch(5, batch_size=3, num_candidates=4, mixed=False)
    assert_same(model, {k: v for k, v in batch.items() if k not in ("attention_mask", "token_type_ids")}, ONE_ROW)


def test_eager_attention_gets_an_additive_mask():
    model = tiny_gpt2(seed=2)
    model.set_attn_implementation("eager")
    assert_same(model, random_batch(2, batch_size=3, num_candidates=5), "longest")


def test_packed_path_really_runs():
    """One backbone pass over [R, N] rows holding each context once: far fewer positions than B*C*T."""
    model = tiny_gpt2()
    batch = random_batch(0, batch_size=4, num_candidates=20)
    calls = count_backbone_calls(model.transformer)
    run(model, batch, packed=True, row_tokens=ONE_EXAMPLE_PER_ROW, backward=False)
    assert len(calls) == 1 and calls[0][0] == 4
    run(model, batch, packed=True, row_tokens=ONE_ROW, backward=False)
    lengths = shared_prefix_lengths(*[batch[k] for k in KEYS])
    real = batch["attention_mask"].sum(-1)
    assert calls[1] == (1, int(lengths.sum() + (real - lengths[:, None]).sum()))  # no padding at all
    assert calls[1][1] < batch["attention_mask"].sum() / 4


def test_examples_in_one_row_do_not_see_each_other():
    """Per-example sums of a whole batch packed in one row equal those of each example run on its own (plain)."""
    model = tiny_gpt2(seed=6)
    rng = random.Random(11)
    rows = [random_example(rng, 4, 2, long=i % 2 == 0, shared_start=False) for i in range(3)]
    collate = PersonaCollator(pad_token_id=PAD)
    with torch.no_grad():
        packed = forward(model, collate(rows), "packed", row_tokens=ONE_ROW)
        alone = [forward(model, collate([row]), "plain") for row in rows]
    for key in ("lm_nll", "lm_tokens", "mc_nll", "mc_logits", "lm_end_nll"):
        torch.testing.assert_close(getattr(packed, key), torch.cat([getattr(a, key) for a in alone]), msg=key)


def test_through_build_features(persona_setup):
    """Real rows from build_features (max_history and max_length cuts), a tiny checkpoint, eval mode."""
    data, model, tokenizer = persona_setup
    model = copy.deepcopy(model).eval()
    dialogs = Dataset.from_list(data["valid"])
    for num_candidates, max_history, max_length in [(20, 2, None), (4, 1, 48)]:
        features = build_features(
            dialogs, tokenizer, num_candidates=num_candidates, max_history=max_history, max_length=max_length
        )
        rows = [features[i] for i in range(min(6, len(features)))]
        assert_same(model, PersonaCollator(pad_token_id=tokenizer.pad_token_id)(rows), "longest")


def test_gradient_checkpointing_keeps_the_packed_path():
    """No fallback needed: the packed forward is one pass without a cache, which checkpointed blocks recompute."""
    model = tiny_gpt2()
    model.activation_checkpointing_enable()
    model.train()  # dropout is 0: train mode is deterministic
    assert packed_unsupported_reason(model.transformer) is None
    calls = count_backbone_calls(model.transformer)
    assert_same(model, random_batch(1, batch_size=2, num_candidates=4), ONE_ROW)
    assert calls[-1][0] == 1  # the packed call (the plain one came first)


def test_bf16_autocast_close_to_plain_path():
    model = tiny_gpt2(seed=4)
    batch = random_batch(6, batch_size=3, num_candidates=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, packed = forward(model, batch, "plain"), forward(model, batch, "packed")
    torch.testing.assert_close(packed.mc_logits.float(), plain.mc_logits.float(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(packed.lm_loss, plain.lm_loss, atol=0.05, rtol=0.02)


# The generic double-heads model: Llama/Qwen2 (RoPE, GQA) and OPT (learned positions, projected embeddings), with the
# speaker embeddings added to the packed input embeddings.

GENERIC_FAMILIES = ["llama", "qwen2", "opt"]


@pytest.mark.parametrize("attention", ["tree", "dense"])
@pytest.mark.parametrize("family", GENERIC_FAMILIES)
@pytest.mark.parametrize("num_candidates", [1, 4, 20])
def test_generic_double_heads_equals_plain_path(family, num_candidates, attention):
    model = tiny_double_heads(family, seed=num_candidates)
    calls = count_backbone_calls(model.decoder)
    for seed, row_tokens in enumerate([ONE_EXAMPLE_PER_ROW, ONE_ROW]):
        batch = random_batch(10 + seed, batch_size=4, num_candidates=num_candidates)
        calls.clear()
        assert_same(model, batch, row_tokens, attention=attention)
        assert len(calls) == 2 and calls[1][0] == (4 if row_tokens is None else 1)  # plain pass, then one packed


@pytest.mark.parametrize("family", GENERIC_FAMILIES)
def test_generic_double_heads_loss_only_and_mc_only(family):
    """labels without mc_labels and mc_labels without labels: each half of the output matches on its own."""
    model = tiny_double_heads(family, seed=7)
    batch = random_batch(20, batch_size=3, num_candidates=5)
    for drop, keys in (("mc_labels", ("lm_loss", "lm_nll", "lm_tokens", "mc_logits")), ("labels", ("mc_loss",))):
        inputs = {k: v for k, v in batch.items() if k != drop}
        with torch.no_grad():
            plain, packed = forward(model, inputs, "plain"), forward(model, inputs, "packed")
        for key in keys:
            torch.testing.assert_close(getattr(packed, key), getattr(plain, key), atol=1e-5, rtol=1e-5)


# The tree attention: what "auto" runs on CPU, and where the dense mask takes over.


def tree_calls() -> list:
    """Calls of the registered tree attention from now on (a spy in its place)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["packed_tree"])
        return tree_attention(*args, **kwargs)

    AttentionInterface.register(TREE_ATTENTION, spy)
    return calls


@pytest.fixture
def restore_tree_attention():
    yield
    AttentionInterface.register(TREE_ATTENTION, tree_attention)


def test_auto_runs_the_tree_attention_on_cpu_sdpa_else_the_dense_mask(restore_tree_attention):
    batch = random_batch(4, batch_size=3, num_candidates=4)
    calls = tree_calls()
    gpt2, llama = tiny_gpt2(), tiny_double_heads("llama", seed=2)
    for model, layers in ((gpt2, gpt2.config.n_layer), (llama, llama.config.num_hidden_layers)):
        calls.clear()
        assert_same(model, batch, row_tokens="auto")
        assert len(calls) == layers and model.config._attn_implementation == "sdpa"  # put back after the forward
        assert [len(row) for row in calls[0].rows] == [3]  # "auto" rows: the whole batch in one row
    assert tree_attention_unsupported_reason(gpt2.transformer) is None
    eager = tiny_gpt2()
    eager.set_attn_implementation("eager")
    checkpointed = tiny_gpt2()
    checkpointed.activation_checkpointing_enable()
    for model, reason in ((eager, "attention implementation 'eager'"), (checkpointed, "activation checkpointing")):
        assert tree_attention_unsupported_reason(model.transformer) == reason
        calls.clear()
        assert_same(model, batch, row_tokens="auto", packed_runs="packed-dense")
        assert calls == []


def test_tree_attention_needs_its_layout():
    model = tiny_gpt2()
    query = torch.zeros(1, 4, 3, 8)
    with pytest.raises(TreeLayoutLost, match="needs the packed layout"):
        tree_attention(model.transformer.h[0].attn, query, query, query, None)


def test_a_backbone_that_drops_attention_kwargs_falls_back_to_the_dense_mask(caplog):
    """Layers that do not pass the forward's keyword arguments to the attention: the packed pass reruns under the
    dense mask (same outputs), says so once, and asks for the dense mask from then on."""
    model = tiny_gpt2(seed=3)
    for block in model.transformer.h:
        forward_of = block.attn.forward
        block.attn.forward = lambda *a, _f=forward_of, **k: _f(*a, **{x: y for x, y in k.items() if x != "packed_tree"})
    batch = random_batch(5, batch_size=3, num_candidates=4)
    with caplog.at_level(logging.WARNING, logger="persona_packed"):
        assert_same(model, batch, row_tokens="auto", attention="tree")
        assert_same(model, batch, row_tokens="auto")
    assert caplog.text.count("does not pass attention keyword arguments through its layers") == 1
    assert "attention keyword arguments" in tree_attention_unsupported_reason(model.transformer)
    assert model.config._attn_implementation == "sdpa"


def test_tree_attention_applies_attention_dropout():
    """Training mode with attn_pdrop only: the packed tree forward draws dropout (two runs differ), eval does not."""
    model = tiny_gpt2(attn_pdrop=0.5)
    batch = random_batch(2, batch_size=2, num_candidates=3)
    for mode, differ in ((model.train, True), (model.eval, False)):
        mode()
        with torch.no_grad():
            a, b = (forward(model, batch, "packed", "auto", "tree").mc_logits for _ in range(2))
        assert torch.isfinite(a).all() and (not torch.equal(a, b)) == differ


# What falls back: openai-gpt (no custom 4D mask), sliding-window attention, attention kernels without custom masks.


def test_unsupported_reasons():
    openai = tiny_openai_gpt()
    assert "no custom 4D attention mask" in packed_unsupported_reason(openai.transformer)
    windowed = tiny_double_heads("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert "sliding-window" in packed_unsupported_reason(windowed.decoder)
    for family in GENERIC_FAMILIES:
        assert packed_unsupported_reason(tiny_double_heads(family).decoder) is None
    gpt2 = tiny_gpt2()
    assert packed_unsupported_reason(gpt2.transformer) is None
    gpt2.config._attn_implementation_internal = "flash_attention_2"  # the attribute only; no kernel is loaded
    assert "'flash_attention_2' takes no custom 4D mask" in packed_unsupported_reason(gpt2.transformer)


def test_falls_back_with_a_message(caplog):
    """openai-gpt and the sliding-window Qwen2 asked for packed run the plain path (no cache-broadcast either); the
    choice is logged once per model."""
    batch = random_batch(0, batch_size=2, num_candidates=4)
    for model in (
        tiny_openai_gpt(),
        tiny_double_heads("qwen2", seed=1, use_sliding_window=True, sliding_window=8, max_window_layers=0),
    ):
        calls = count_backbone_calls(model.transformer if hasattr(model, "transformer") else model.decoder)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="persona_encoding"):
            assert_same(model, batch, atol=0, packed_runs="plain")
            run(model, batch, packed=True, expect="plain")
        assert caplog.text.count("Candidate encoding: plain (asked for packed; not packed: ") == 1
        assert "; not shared_prefix: " in caplog.text
        b, c, t = batch["input_ids"].shape
        assert calls == [(b * c, t)] * 3  # every pass in full


# The choice: "auto" takes packed where it applies, then the cache broadcast, then plain; the config keeps it.


def test_auto_chooses_packed_and_says_so_once(caplog):
    model = tiny_gpt2()
    assert requested_encoding(model) == "auto"  # nothing set
    batch = random_batch(1, batch_size=3, num_candidates=4)
    calls = count_backbone_calls(model.transformer)
    with caplog.at_level(logging.INFO, logger="persona_encoding"), torch.no_grad(), encodings_run() as ran:
        auto = model(**batch)
        model(**batch)
    assert ran == ["packed-tree", "packed-tree"]
    assert caplog.text.count("Candidate encoding: packed (asked for auto). Packed attention: tree.") == 1
    b, c, t = batch["input_ids"].shape
    assert len(calls) == 2 and calls[0][0] * calls[0][1] < b * c * t / 2  # one packed pass each, a fraction of plain
    torch.testing.assert_close(auto.mc_logits, forward(model, batch, "plain").mc_logits, atol=1e-5, rtol=1e-5)


def test_auto_falls_back_in_order(caplog):
    """openai-gpt (no custom mask, no cache): plain. Sliding-window Qwen2: plain. Gradient checkpointing: packed
    still applies (one pass without a cache). Asked for shared_prefix with checkpointing in training: plain."""
    openai = tiny_openai_gpt()
    windowed = tiny_double_heads("qwen2", seed=1, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    checkpointed = tiny_double_heads("llama", seed=1)
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    batch = random_batch(3, batch_size=2, num_candidates=3)
    with caplog.at_level(logging.INFO, logger="persona_encoding"), encodings_run() as ran:
        for model in (openai, windowed, checkpointed):
            model(**batch)
        forward(checkpointed, batch, "shared_prefix")
    assert ran == ["plain", "plain", "packed-dense", "plain"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("Candidate encoding: plain (asked for auto; not packed: the openai-gpt backbone")
    assert "sliding-window" in lines[1] and lines[1].startswith("Candidate encoding: plain (asked for auto;")
    assert lines[2] == "Candidate encoding: packed (asked for auto). Packed attention: dense."  # checkpointed
    assert lines[3].startswith("Candidate encoding: plain (asked for shared_prefix; not shared_prefix: gradient")
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING", "INFO", "WARNING"]


def test_the_config_keeps_the_choice(tmp_path):
    """Saved and reloaded (GPT-2 and the generic model)."""
    from persona_backbone import PersonaDoubleHeadsModel

    gpt2 = tiny_gpt2()
    assert requested_encoding(gpt2) == "auto"
    set_candidate_encoding(gpt2, "shared_prefix")
    gpt2.save_pretrained(tmp_path / "gpt2")
    reloaded = PersonaGPT2DoubleHeadsModel.from_pretrained(tmp_path / "gpt2")
    assert requested_encoding(reloaded) == "shared_prefix"
    llama = tiny_double_heads("llama")
    set_candidate_encoding(llama, "plain")
    llama.save_pretrained(tmp_path / "llama")
    assert requested_encoding(PersonaDoubleHeadsModel.from_pretrained(tmp_path / "llama")) == "plain"
    with pytest.raises(ValueError, match="expected one of auto, packed, shared_prefix, plain"):
        set_candidate_encoding(llama, "fast")


# Padding-free batches through the Trainer: several examples per row, the loss bookkeeping unchanged.


def test_trainer_packed_rows_gradient_accumulation(tmp_path):
    """One SGD step on 4 examples: packed batch 4 = packed 2 x GA 2 = plain batch 4 = a hand-computed step."""
    rng = random.Random(1)  # one long example (100 tokens per candidate), three short ones (< 20)
    rows = [random_example(rng, 4, 2 if i == 0 else 0, long=i == 0, shared_start=i == 2) for i in range(4)]
    rows = Dataset.from_list(rows)
    base = tiny_gpt2(seed=5).train()  # dropout 0: deterministic
    results, packed_rows = {}, []
    for encoding, batch_size, accumulation in [("plain", 4, 1), ("packed", 4, 1), ("packed", 2, 2)]:
        model = copy.deepcopy(base)
        set_candidate_encoding(model, encoding)
        calls = count_backbone_calls(model.transformer)
        results[encoding, batch_size] = one_sgd_step(
            model, rows, tmp_path, batch_size, accumulation, PAD
        ).model.state_dict()
        if (encoding, batch_size) == ("packed", 4):
            packed_rows = [r for r, _ in calls]
    assert packed_rows and packed_rows[0] < 4  # several examples shared a row

    manual = copy.deepcopy(base)
    set_candidate_encoding(manual, "plain")
    out = manual(**PersonaCollator(pad_token_id=PAD)(list(rows)))
    (2.0 * out.lm_nll.sum() / out.lm_tokens.sum() + out.mc_nll.mean()).backward()
    with torch.no_grad():
        for p in manual.parameters():
            if p.grad is not None:
                p -= p.grad
    for name, expected in manual.state_dict().items():
        for key, state in results.items():
            torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    assert not torch.equal(results["packed", 2]["transformer.wte.weight"], base.transformer.wte.weight)


def test_bench_script_runs(capsys):
    """bench/shared_prefix.py end to end on a minimal setting: every path, the outputs checked against plain."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "bench" / "shared_prefix.py"
    spec = importlib.util.spec_from_file_location("bench_shared_prefix", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--candidates", "3", "--threads", "1", "--eval_batches", "1", "--train_steps", "1", "--repeats", "1"]
    bench.main(args)
    out = capsys.readouterr().out
    assert "packed-dense" in out and "  1   3 eval" in out and "  1   3 train" in out
    assert "outputs differ" not in out
