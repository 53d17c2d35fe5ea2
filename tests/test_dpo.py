"""Preference training (persona_dpo): the loss and its gradients against TRL's DPOTrainer on the same triples, every
candidate's labels and log-probabilities, the encodings, the reference pass, gradient accumulation, a short run."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import STEP_ARGS, assert_same_weights, launch, load_weights, run_args
from sgd_step import assert_hand_step, one_sgd_step

from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_dpo import (
    REF_COLUMN,
    PersonaDPOTrainer,
    PreferenceCollator,
    add_reference_logps,
    candidate_logps,
    preference_loss,
)
from persona_encoding import set_candidate_encoding
from persona_heads import candidate_labels
from persona_inputs import build_inputs
from persona_tokens import SpecialTokenIds
from persona_trainer import PersonaTrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    pytest.importorskip("trl")  # the test extras install it
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


def _dpo_args(tmp_path, name: str, **overrides) -> PersonaTrainingArguments:
    options = dict(
        objective="dpo",
        gradient_accumulation_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    return PersonaTrainingArguments(output_dir=str(tmp_path / name), **{**options, **overrides})


@pytest.mark.parametrize("dpo_loss", ["pairwise", "listwise"])
def test_gradient_accumulation_takes_the_step_of_one_large_batch(
    tiny_model_and_tokenizer, personachat_json, tmp_path, dpo_loss
):
    """GA=2 x batch 2 and GA=1 x batch 4 both equal one SGD step (lr 1) computed by hand on the four rows:
    mean DPO loss over turns + 2 * token-mean gold NLL + mean MC NLL (one_sgd_step's weights)."""
    model, tokenizer = tiny_model_and_tokenizer
    base = _frozen_copy(model)
    collator = PersonaCollator(tokenizer.pad_token_id)
    rows = build_features(load_dialogs(personachat_json)["train"], tokenizer, num_candidates=3, max_history=2).select(
        [0, 5, 9, 20]
    )  # uneven reply lengths: the token mean over the step is not a mean of batch means
    rows = add_reference_logps(_nudge(_frozen_copy(model), seed=3), rows, collator)

    def step(batch_size, accumulation):
        policy, dpo = copy.deepcopy(base), {"objective": "dpo", "dpo_loss": dpo_loss}
        return one_sgd_step(
            policy, rows, tmp_path, batch_size, accumulation, trainer_class=PersonaDPOTrainer, **dpo
        ).model

    one, two = step(4, 1), step(2, 2)
    manual = copy.deepcopy(base).train()
    batch = collator(list(rows))
    logps, out = candidate_logps(manual, batch)
    gold = batch["mc_labels"]
    dpo = preference_loss(logps, batch[REF_COLUMN], gold, 0.1, dpo_loss).losses.mean()
    gold_nll = (
        out.lm_candidate_nll.gather(1, gold[:, None]).sum() / out.lm_candidate_tokens.gather(1, gold[:, None]).sum()
    )
    assert_hand_step(dpo + 2.0 * gold_nll + F.cross_entropy(out.mc_logits, gold), manual, one, two)
    assert not torch.equal(one.transformer.wte.weight, base.transformer.wte.weight)


def test_a_few_steps_raise_the_margin_on_the_training_batch(tiny_model_and_tokenizer, personachat_json, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    policy = _frozen_copy(model)
    rows = _features(tokenizer, personachat_json, num_candidates=4, rows=8)
    collator = PersonaCollator(tokenizer.pad_token_id)
    args = _dpo_args(
        tmp_path, "margin", max_steps=6, learning_rate=1e-3, optim="adamw_torch", per_device_train_batch_size=8,
        lm_coef=0.0, mc_coef=0.0, logging_steps=1,
    )  # fmt: skip
    trainer = PersonaDPOTrainer(model=policy, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "rewards/margins" in log]
    assert len(logs) == 6 and logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    # Independently of the logs: the margin of every (gold, rejected) pair after training, from the two models.
    batch = collator(list(rows))
    with torch.no_grad():
        after = candidate_logps(policy.eval(), batch)[0] - candidate_logps(_frozen_copy(model), batch)[0]
    margins = after[:, -1:] - after[:, :-1]
    assert margins.mean() > 0.5 and logs[-1]["rewards/margins"] > 0.05
    assert logs[-1]["rewards/accuracies"] > 0.5


def test_lora_reference_is_the_model_with_its_adapter_disabled(tiny_model_and_tokenizer, personachat_json, tmp_path):
    """No reference column, no second model: after a LoRA step the reference log-probs are the starting model's."""
    from persona_lora import apply_lora

    model, tokenizer = tiny_model_and_tokenizer
    start = _frozen_copy(model)
    policy = apply_lora(_frozen_copy(model), tokenizer, r=4)
    rows = _features(tokenizer, personachat_json, num_candidates=3)
    collator = PersonaCollator(tokenizer.pad_token_id)
    args = _dpo_args(tmp_path, "lora", max_steps=2, learning_rate=0.05, optim="sgd", per_device_train_batch_size=4)
    trainer = PersonaDPOTrainer(model=policy, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    assert REF_COLUMN not in trainer.train_dataset.column_names
    batch = collator(list(rows))
    with torch.no_grad():
        moved = candidate_logps(policy, batch)[0]
        reference = trainer._reference_logps(policy, batch)
        expected = candidate_logps(start, batch)[0]
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    assert (moved - expected).abs().max() > 1e-3  # the adapter did train


def test_preference_collator_pads_curated_lists_of_different_lengths(tiny_model_and_tokenizer, personachat_json):
    """Rows of 2 and 4 candidates in one batch: the short row's log-probs and loss are those it has alone."""
    model, tokenizer = tiny_model_and_tokenizer
    frozen = _frozen_copy(model)
    dialogs = load_dialogs(personachat_json)["train"]
    two = build_features(dialogs, tokenizer, num_candidates=2, max_history=2).select([0])
    four = build_features(dialogs, tokenizer, num_candidates=4, max_history=2).select([1])
    collator = PreferenceCollator(PersonaCollator(tokenizer.pad_token_id))
    mixed = collator([two[0], four[0]])
    assert mixed["candidate_mask"].tolist() == [[False, False, True, True], [True] * 4]
    alone = collator([two[0]])
    with torch.no_grad():
        logps_mixed, logps_alone = candidate_logps(frozen, mixed)[0], candidate_logps(frozen, alone)[0]
    torch.testing.assert_close(logps_mixed[0, 2:], logps_alone[0], atol=1e-5, rtol=1e-5)
    ref = logps_mixed - torch.tensor([[0.0, 0.0, 0.3, -0.2], [0.1, 0.2, 0.3, 0.4]])  # the padding must not count
    for kind in ("pairwise", "listwise"):
        mixed_loss = preference_loss(logps_mixed, ref, mixed["mc_labels"], 0.1, kind, mixed["candidate_mask"]).losses
        alone_loss = preference_loss(logps_alone, ref[:1, 2:], alone["mc_labels"], 0.1, kind).losses
        torch.testing.assert_close(mixed_loss[0], alone_loss[0])


def readme_dpo_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Preference training (DPO)") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("python run_persona.py")]


def test_readme_dpo_stage_runs_as_written_and_the_folder_loads(
    tiny_checkpoint, personachat_json, tmp_path, monkeypatch
):
    """The README's two commands (tiny model and data swapped in, a few steps): the DPO run logs TRL's reward
    metrics, and its folder loads in persona-chat and as a causal LM."""
    from transformers import AutoModelForCausalLM

    from persona_chat import load_for_chat
    from run_persona import cli

    monkeypatch.chdir(tmp_path)
    first, second = readme_dpo_commands()
    assert "configs/dpo.yaml" in second and "runs/gpt2-persona" in second
    tiny = ["--dataset_path", personachat_json, "--dataset_cache", str(tmp_path / "cache"), "--use_cpu", "true",
            "--report_to", "none", "--max_train_samples", "8", "--max_eval_samples", "4", "--disable_tqdm", "true",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]  # fmt: skip
    argv = shlex.split(first.replace("configs/", f"{ROOT}/configs/"))[2:]
    assert cli([*argv, "--model_name_or_path", tiny_checkpoint, "--max_steps", "2", *tiny]) == 0
    argv = shlex.split(second.replace("configs/", f"{ROOT}/configs/"))[2:]
    assert cli([*argv, "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", *tiny]) == 0

    out = tmp_path / "runs" / "gpt2-persona-dpo"
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [log for log in state["log_history"] if "rewards/margins" in log]
    assert len(logs) == 3
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"} <= logs[0].keys()
    assert "eval_hits@1" in json.loads((out / "eval_results.json").read_text())
    written = yaml.safe_load(open(out / "training_config.yaml"))
    assert (written["objective"], written.get("beta", 0.1), written["lm_coef"]) == ("dpo", 0.1, 0.0)
    model, tokenizer = load_for_chat(str(out))
    assert "<speaker1>" in tokenizer.get_vocab()
    causal = AutoModelForCausalLM.from_pretrained(out)
    dpo_weights = dict(model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    torch.testing.assert_close(causal.transformer.h[0].attn.c_attn.weight, dpo_weights)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "0"], "--beta must be a finite number > 0, got 0.0."),
        (["--beta", "-1"], "--beta must be a finite number > 0"),
        (["--num_candidates", "1"], "--objective dpo with --num_candidates 1 and no curated 'rejected' replies"),
    ],
)
def test_bad_dpo_flags_are_one_line(tiny_checkpoint, personachat_json, tmp_path, capsys, flags, message):
    from run_persona import cli

    argv = ["--objective", "dpo", "--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json,
            "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
            "--report_to", "none", *flags]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def _curated_dialog(rejected_lists):
    utterances = [
        {"history": ["hi there"], "candidates": ["i like dogs .", "i have a cat named tom ."]},
        {"history": ["hi there", "i have a cat named tom .", "nice , what else ?"], "candidates": ["i love tea ."]},
    ]
    for utterance, rejected in zip(utterances, rejected_lists):
        if rejected is not None:
            utterance["rejected"] = rejected
    return {"personality": ["i have a cat .", "i love tea ."], "utterances": utterances}


def test_curated_rejected_replies_from_jsonl_and_chat_jsonl(tmp_path):
    """The curated lists come through both readers; a turn without one keeps its distractors."""
    from persona_dpo import preference_dialogs

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        json.dumps(_curated_dialog([None, ["i hate tea .", "i have no pets ."]]))
        + "\n"
        + json.dumps(_curated_dialog([None, None]))
        + "\n"
    )
    chat = tmp_path / "chat_train.jsonl"
    turns = ["hi there", "i have a cat named tom .", "nice , what else ?", "i love tea ."]
    record = {
        "persona": ["i have a cat .", "i love tea ."],
        "turns": turns,
        "rejected": [None, ["i hate tea .", "i have no pets ."]],
    }
    other = {"persona": ["i swim ."], "turns": ["hello", "i like dogs .", "cool", "i swim every day ."]}
    chat.write_text(json.dumps(record) + "\n" + json.dumps(other) + "\n")  # the other dialog: distractors to sample
    for path, fmt in ((jsonl, "jsonl"), (chat, "chat_jsonl")):
        dialogs = load_dialogs(str(path), fmt, num_distractors=1)["train"]
        assert [u["rejected"] for u in dialogs[0]["utterances"]] == [[], ["i hate tea .", "i have no pets ."]]
        assert all(u["rejected"] == [] for d in dialogs.select(range(1, dialogs.num_rows)) for u in d["utterances"])
        pairs = preference_dialogs(dialogs, num_candidates=2)
        first, second = pairs[0]["utterances"]
        assert second["candidates"] == ["i hate tea .", "i have no pets .", "i love tea ."]
        assert len(first["candidates"]) == 2 and first["candidates"][-1] == "i have a cat named tom ."
        # --num_candidates 1: the turn without a curated list has nothing to prefer against; dropped and counted
        assert [len(u["candidates"]) for u in preference_dialogs(dialogs, num_candidates=1)[0]["utterances"]] == [3]


@pytest.mark.parametrize(
    "rejected, message",
    [
        (
            ["i love tea ."],
            "line 1, utterance 1: field 'rejected' holds the gold reply (the last candidate) at item 0",
        ),
        ([], "line 1, utterance 1: field 'rejected' is empty."),
    ],
)
def test_bad_rejected_lists_name_the_record_or_are_skipped_and_counted(tmp_path, rejected, message):
    from persona_data import load_dialogs_with_report
    from persona_errors import PersonaDataError

    path = tmp_path / "train.jsonl"
    good = _curated_dialog([None, ["i hate tea ."]])
    path.write_text(json.dumps(_curated_dialog([None, rejected])) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(PersonaDataError, match=re.escape(message)) as err:
        load_dialogs(str(path), "jsonl")
    assert str(err.value).startswith(f"{path}: line 1") and "\n" not in str(err.value)
    dialogs, reports = load_dialogs_with_report(str(path), "jsonl", on_bad_record="skip")
    assert dialogs["train"].num_rows == 1 and reports["train"].skipped == 1


def test_dpo_run_on_curated_replies_with_one_candidate(tmp_path, tiny_checkpoint):
    """--num_candidates 1 with curated lists of 1 and 2 replies: turns of different widths share batches."""
    from run_persona import main, parse_args

    path = tmp_path / "train.jsonl"
    lines = [_curated_dialog([["i like dogs ."], ["i hate tea .", "i have no pets ."]]) for _ in range(4)]
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    argv = ["--objective", "dpo", "--num_candidates", "1", "--model_name_or_path", tiny_checkpoint,
            "--dataset_path", str(path), "--dataset_cache", str(tmp_path / "cache"), "--output_dir",
            str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none", "--do_eval", "false",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--disable_tqdm", "true"]  # fmt: skip
    metrics = main(*parse_args(argv))
    assert metrics["train_samples"] == 8
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert all(math.isfinite(log["loss"]) for log in state["log_history"] if "rewards/margins" in log)


@pytest.mark.parametrize("family, template", [("qwen2", "chatml"), ("llama", "llama3")])
def test_chat_template_rows_every_candidates_logp_is_the_causal_lms(tokenizers, family, template):
    """Chat-template rows on a generic backbone: each candidate's log-prob from the shared context (packed and cache
    broadcast) equals a plain causal LM's summed log-probs over that candidate's labels when it is the gold of a row
    of its own (its reply tokens and the end-of-turn token)."""
    from helpers import backbone_config
    from transformers import AutoModelForCausalLM

    from persona_backbone import PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel
    from persona_chat_template import ChatFormat
    from persona_synthetic import make_synthetic_personachat

    tok = tokenizers[template]
    chat = ChatFormat.from_tokenizer(tok)
    dialog = make_synthetic_personachat(num_train=6, num_valid=1, num_candidates=4, seed=2)["train"][0]
    persona, utterance = dialog["personality"], dialog["utterances"][1]
    candidates = utterance["candidates"][-4:]
    rows, _ = chat.build_rows(persona, utterance["history"], candidates)
    batch = PersonaCollator(tok.eos_token_id)([{k: v for k, v in rows.items()}])
    torch.manual_seed(0)
    model = PersonaDoubleHeadsModel(PersonaDoubleHeadsConfig.from_backbone(backbone_config(family, len(tok)))).eval()
    got = {}
    for encoding in ("plain", "shared_prefix", "packed"):
        set_candidate_encoding(model, encoding)
        with torch.no_grad():
            got[encoding] = candidate_logps(model, batch)[0][0]
    torch.testing.assert_close(got["packed"], got["plain"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["shared_prefix"], got["plain"], atol=1e-5, rtol=1e-5)
    lm = AutoModelForCausalLM.from_config(backbone_config(family, len(tok))).eval()
    lm.load_state_dict(model.state_dict(), strict=False)
    for c, candidate in enumerate(candidates):
        alone, _ = chat.build_rows(persona, utterance["history"], [candidate])
        ids, labels = torch.tensor(alone["input_ids"][0]), torch.tensor(alone["labels"][0])
        with torch.no_grad():
            logits = lm(input_ids=ids[None]).logits[0, :-1]
        expected = -F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
        assert got["plain"][c].item() == pytest.approx(expected.item(), abs=1e-4), c


@pytest.mark.slow
def test_dpo_step_same_in_1_process_2_processes_and_deepspeed_zero3(assets, tmp_path):
    """One SGD step of --objective dpo over the same 8 rows: 1 process x GA 4, DDP 2 x GA 2 and ZeRO-3 2 x GA 2 (the
    reference pass with the weights gathered on every process) give the same weights, and the step moved them."""
    pytest.importorskip("deepspeed")
    args = [*STEP_ARGS, "--objective", "dpo", "--beta", "0.5"]
    launch(run_args(assets, tmp_path / "single", *args, "--gradient_accumulation_steps", "4"))
    launch(run_args(assets, tmp_path / "ddp", *args, "--gradient_accumulation_steps", "2"), nproc=2)
    zero3 = os.path.join(ROOT, "configs", "deepspeed", "zero3.json")
    launch(run_args(assets, tmp_path / "zero3", *args, "--gradient_accumulation_steps", "2", "--deepspeed", zero3), 2)
    single = load_weights(tmp_path / "single")
    assert_same_weights(load_weights(tmp_path / "ddp"), single)
    assert_same_weights(load_weights(tmp_path / "zero3"), single)
    init = torch.load(tmp_path / "single" / "weights_init_rank0.pt")
    assert max(float((single[k] - init[k]).abs().max()) for k in init) > 1e-4
    logs = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/margins" in log for log in logs)


def test_resumed_dpo_run_keeps_the_starting_reference(tiny_checkpoint, personachat_json, tmp_path):
    """Resuming from checkpoint-2 ends on the uninterrupted run's weights: the reference log-probs come from the
    starting weights, not from the checkpoint's (which `Trainer.train` loads before the first batch)."""
    from safetensors.torch import load_file

    from run_persona import cli

    def run(out, *extra):
        argv = ["--objective", "dpo", "--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json,
                "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(out), "--num_candidates", "3",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
                "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--do_eval", "false",
                "--use_cpu", "true", "--report_to", "none", "--seed", "1", "--disable_tqdm", "1", *extra]  # fmt: skip
        assert cli(argv) == 0

    run(tmp_path / "whole")
    run(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    start = load_file(tmp_path / "whole" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(start[name], whole[name]) for name in whole)


def test_checkpoint_without_the_input_formats_tokens_is_the_training_line(
    tiny_checkpoint, personachat_json, tmp_path, capsys
):
    """A tokenizer without a chat template asked for chat-template rows: --objective dpo says what training says."""
    from run_persona import cli

    lines = []
    for objective in ("double_heads", "dpo"):
        argv = ["--objective", objective, "--input_format", "chat_template", "--model_name_or_path", tiny_checkpoint,
                "--dataset_path", personachat_json, "--dataset_cache", str(tmp_path / "cache"), "--output_dir",
                str(tmp_path / objective), "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
        assert len(errors) == 1
        lines.append(errors[0])
    assert "has no chat template: use --input_format speaker_tokens" in lines[0] and lines[1] == lines[0]
