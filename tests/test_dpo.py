"""Preference training (persona_dpo): the loss and its gradients against TRL's DPOTrainer on the same triples, every
candidate's labels and log-probabilities, the encodings, the reference pass, gradient accumulation, a short run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from persona_collator import PersonaCollator
from persona_data import build_features, build_inputs, load_dialogs
from persona_dpo import (
    REF_COLUMN,
    PersonaDPOTrainer,
    add_reference_logps,
    candidate_labels,
    candidate_logps,
    preference_loss,
)
from persona_encoding import set_candidate_encoding
from persona_tokens import SpecialTokenIds
from persona_trainer import PersonaTrainingArguments


def _frozen_copy(model):
    """A copy without dropout in eval mode (the reference pass and TRL both run without dropout)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _nudge(model, seed: int = 1, scale: float = 0.02):
    """The policy: the reference moved a little, so that the log-ratios are not all zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model


def _features(tokenizer, personachat_json, num_candidates: int, rows: int = 4):
    dialogs = load_dialogs(personachat_json)["train"]
    return build_features(dialogs, tokenizer, num_candidates=num_candidates, max_history=2).select(range(rows))


def test_candidate_labels_are_each_candidates_own_lm_labels(tokenizer):
    """Every candidate's labels equal the labels `build_inputs` gives it as the gold (an independent construction)."""
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    persona, history = [[10, 11], [12]], [[20], [21, 22], [23]]
    replies = [[30, 31, 32], [33], [34, 35]]
    rows = [build_inputs(persona, history, r, ids, lm_labels=(i == 2)) for i, r in enumerate(replies)]
    batch = PersonaCollator(0)([{k: [r[k] for r in rows] for k in rows[0]} | {"mc_labels": 2}])
    got = candidate_labels(batch["input_ids"], batch["labels"], batch["mc_token_ids"])
    for c, reply in enumerate(replies):
        expected = build_inputs(persona, history, reply, ids, lm_labels=True)["labels"]
        padded = expected + [-100] * (got.size(-1) - len(expected))
        assert got[0, c].tolist() == padded


def _trl_triples(batch, num_rejected: int):
    """TRL's tokenized triples of a [B, C, T] batch: (prompt, chosen, rejected) per (turn, rejected candidate)."""
    labels = candidate_labels(batch["input_ids"], batch["labels"], batch["mc_token_ids"])
    triples = []
    ids, ends = batch["input_ids"], batch["mc_token_ids"]
    for b in range(ids.size(0)):
        start = int(labels[b, -1].ne(-100).nonzero()[0])
        chosen = ids[b, -1, start : int(ends[b, -1]) + 1].tolist()
        for c in range(num_rejected):
            rejected = ids[b, c, start : int(ends[b, c]) + 1].tolist()
            triples.append({"prompt_ids": ids[b, -1, :start].tolist(), "chosen_ids": chosen, "rejected_ids": rejected})
    return triples


@pytest.mark.parametrize("num_rejected", [1, 3])
def test_loss_and_gradients_equal_trl_dpo_trainer(tiny_model_and_tokenizer, personachat_json, tmp_path, num_rejected):
    """TRL's DPOTrainer on the same token triples (the 3 pairs of a turn fed separately), TRL's own reference model:
    the same loss, the same gradients, the same reward metrics (1e-5)."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model, tokenizer = tiny_model_and_tokenizer
    reference = _frozen_copy(model)
    policy = _nudge(_frozen_copy(model))
    rows = _features(tokenizer, personachat_json, num_candidates=num_rejected + 1)
    # TRL's models read input ids only: no token types on either side.
    batch = {k: v for k, v in PersonaCollator(tokenizer.pad_token_id)(list(rows)).items() if k != "token_type_ids"}

    # Ours: the reference pass as a column, then the trainer's loss on the batch.
    ref_rows = add_reference_logps(reference, rows.remove_columns("token_type_ids"), PersonaCollator(0))
    batch[REF_COLUMN] = torch.tensor(ref_rows[REF_COLUMN])
    args = PersonaTrainingArguments(output_dir=str(tmp_path / "ours"), objective="dpo", beta=0.1, report_to="none")
    ours = PersonaDPOTrainer(model=policy, args=args, data_collator=PersonaCollator(0))
    policy.train()  # dropout is off (PersonaDPOTrainer, as TRL)
    loss = ours.compute_loss(policy, batch)
    loss.backward()
    ours.log({})
    ours_logs = ours.state.log_history[-1]

    # TRL: plain GPT-2 causal LMs holding the same weights.
    def as_causal_lm(double_heads):
        lm = GPT2LMHeadModel(double_heads.config)
        lm.load_state_dict(double_heads.state_dict(), strict=False)
        return lm.eval()

    trl_policy, trl_reference = as_causal_lm(policy), as_causal_lm(reference)
    placeholder = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    config = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to="none", use_cpu=True, bf16=False)
    trl = DPOTrainer(
        model=trl_policy, ref_model=trl_reference, args=config, train_dataset=placeholder, processing_class=tokenizer
    )
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(_trl_triples(batch, num_rejected))
    trl_policy.train()
    trl_loss = trl.compute_loss(trl_policy, trl_batch)
    trl_loss.backward()
    trl_metrics = {k: sum(v) / len(v) for k, v in trl._metrics["train"].items()}

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    trl_params = dict(trl_policy.named_parameters())
    for name, param in policy.transformer.named_parameters():
        torch.testing.assert_close(param.grad, trl_params[f"transformer.{name}"].grad, atol=1e-5, rtol=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours_logs[key] == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_listwise_loss_is_the_softmax_cross_entropy_over_all_candidates():
    """Hand-computed: rewards beta * (logp - ref) = [0.1, -0.2, 0.3] with the gold last -> -log softmax(...)[2]."""
    logps, ref = torch.tensor([[-3.0, -5.0, -2.0]]), torch.tensor([[-4.0, -3.0, -5.0]])
    out = preference_loss(logps, ref, torch.tensor([2]), beta=0.1, kind="listwise")
    rewards = [0.1, -0.2, 0.3]
    expected = -rewards[2] + torch.logsumexp(torch.tensor(rewards), 0).item()
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    pairwise = preference_loss(logps, ref, torch.tensor([2]), beta=0.1).losses.item()
    assert pairwise == pytest.approx((-F.logsigmoid(torch.tensor(0.2)) - F.logsigmoid(torch.tensor(0.5))).item() / 2)


@pytest.mark.parametrize("encoding", ["packed", "shared_prefix"])
def test_shared_context_logps_equal_the_plain_encoding(tiny_model_and_tokenizer, personachat_json, encoding):
    model, tokenizer = tiny_model_and_tokenizer
    rows = _features(tokenizer, personachat_json, num_candidates=4)
    batch = PersonaCollator(tokenizer.pad_token_id)(list(rows))
    plain, shared = _frozen_copy(model), _frozen_copy(model)
    set_candidate_encoding(plain, "plain")
    set_candidate_encoding(shared, encoding)
    expected = candidate_logps(plain, batch)[0]
    got = candidate_logps(shared, batch)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and against the library's own full-vocabulary logits of each candidate on its own
    logits = torch.log_softmax(
        super(type(plain), plain)
        .forward(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids")})
        .logits,
        -1,
    )
    labels = candidate_labels(batch["input_ids"], batch["labels"], batch["mc_token_ids"])[..., 1:]
    token_logps = logits[..., :-1, :].gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(got, (token_logps * labels.ne(-100)).sum(-1), atol=1e-4, rtol=1e-5)


def test_precomputed_reference_logps_equal_the_frozen_models(tiny_model_and_tokenizer, personachat_json, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    rows = _features(tokenizer, personachat_json, num_candidates=3, rows=6)
    frozen = _frozen_copy(model)
    with_ref = add_reference_logps(model, rows, PersonaCollator(tokenizer.pad_token_id), batch_size=4)
    set_candidate_encoding(frozen, "plain")
    with torch.no_grad():
        expected = candidate_logps(frozen, PersonaCollator(tokenizer.pad_token_id)(list(rows)))[0]
    torch.testing.assert_close(torch.tensor(with_ref[REF_COLUMN]), expected, atol=1e-5, rtol=1e-5)
    assert model.training == tiny_model_and_tokenizer[0].training
