"""persona_model: special tokens, loading, and the label-only double-heads loss against the library's own."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import backbone_config
from transformers import GPT2DoubleHeadsModel, OpenAIGPTDoubleHeadsModel, T5Config

from persona_backbone import PersonaGPT2DoubleHeadsModel, PersonaOpenAIGPTDoubleHeadsModel
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_heads import DoubleHeadsOutput
from persona_model import SPECIAL_TOKENS, add_special_tokens, load_model_and_tokenizer


@pytest.fixture
def batch(tiny_model_and_tokenizer, personachat_json):
    _, tokenizer = tiny_model_and_tokenizer
    feats = build_features(load_dialogs(personachat_json)["valid"], tokenizer, num_candidates=4, max_history=2)
    return PersonaCollator(tokenizer.pad_token_id)([feats[i] for i in range(0, 12, 2)])


def test_special_tokens_added_once(tiny_checkpoint):
    model, tokenizer = load_model_and_tokenizer(tiny_checkpoint)
    assert isinstance(model, PersonaGPT2DoubleHeadsModel)
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in SPECIAL_TOKENS)
    size = model.get_input_embeddings().weight.shape[0]
    assert size == len(tokenizer)
    assert add_special_tokens(model, tokenizer) == 0  # already there: nothing added, no resize
    assert model.get_input_embeddings().weight.shape[0] == size
    assert model.config.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")


def test_saved_checkpoint_reloads_without_adding(tiny_model_and_tokenizer, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, tok2 = load_model_and_tokenizer(str(tmp_path))
    assert len(tok2) == len(tokenizer)
    plain = GPT2DoubleHeadsModel.from_pretrained(tmp_path)  # checkpoints stay loadable by the library class
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        assert torch.equal(weight, theirs[name]), name
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)


def test_loss_equals_gpt2_double_heads(tiny_model_and_tokenizer, batch):
    model, _ = tiny_model_and_tokenizer
    ours = copy.deepcopy(model).eval()
    reference = GPT2DoubleHeadsModel(model.config).eval()
    reference.load_state_dict(model.state_dict())
    out, ref = ours(**batch), reference(**batch)
    assert isinstance(out, DoubleHeadsOutput) and "logits" not in out  # no [B, C, T, V] tensor
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.mc_loss, ref.mc_loss)
    torch.testing.assert_close(out.mc_logits, ref.mc_logits)
    # Gradients agree too.
    (out.loss + out.mc_loss).backward()
    (ref.loss + ref.mc_loss).backward()
    torch.testing.assert_close(
        ours.transformer.h[0].attn.c_attn.weight.grad, reference.transformer.h[0].attn.c_attn.weight.grad
    )


def test_loss_equals_openai_gpt_double_heads(batch, tokenizer):
    torch.manual_seed(0)
    config = backbone_config("openai-gpt", len(tokenizer), n_head=2)
    ours = PersonaOpenAIGPTDoubleHeadsModel(config).eval()
    reference = OpenAIGPTDoubleHeadsModel(config).eval()
    reference.load_state_dict(ours.state_dict())
    # The library's OpenAI GPT cannot take a [B, C, T] attention mask; with right padding and causal attention the
    # mask changes nothing at labelled or classified positions, so the reference runs without it.
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    out, ref = ours(**batch), reference(**unmasked)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.mc_loss, ref.mc_loss)


def test_per_example_sums_match_a_loop(tiny_model_and_tokenizer, batch):
    model, _ = tiny_model_and_tokenizer
    model = copy.deepcopy(model).eval()
    out = model(**batch)
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        single = model(**one)
        torch.testing.assert_close(out.lm_nll[i], single.lm_loss * single.lm_tokens[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.mc_nll[i], single.mc_loss)


def test_backbone_without_causal_lm_is_a_clear_error(tmp_path):
    T5Config(num_layers=1, d_model=8, d_kv=4, num_heads=2, d_ff=16, vocab_size=20).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'t5' has no AutoModelForCausalLM class"):
        load_model_and_tokenizer(str(tmp_path))
