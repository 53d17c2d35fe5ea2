"""PersonaTrainer and run_persona: loss scaling under gradient accumulation, logging, saving, resuming."""

from __future__ import annotations

import copy
import json
import os

import pyarrow as pa
import pytest
import torch
from datasets import Dataset
from sgd_step import assert_hand_step, one_sgd_step

import persona_checkpoints
from persona_collator import ArrowBatches, PersonaCollator
from persona_data import build_features, load_dialogs
from persona_trainer import CandidateCountBatches, PersonaTrainer, PersonaTrainingArguments
from run_persona import cli, parse_args


def _without_dropout(model):
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture
def four_rows(tiny_model_and_tokenizer, personachat_json):
    _, tokenizer = tiny_model_and_tokenizer
    feats = build_features(load_dialogs(personachat_json)["train"], tokenizer, num_candidates=3, max_history=2)
    rows = feats.select([0, 5, 9, 20])  # uneven reply lengths: token-mean over the step != mean of batch means
    gold_tokens = [sum(t != -100 for t in r["labels"][-1]) for r in rows]
    assert len(set(gold_tokens)) > 1
    return rows


def test_gradient_accumulation_scales_loss_once(tiny_model_and_tokenizer, four_rows, tmp_path):
    base = _without_dropout(tiny_model_and_tokenizer[0])
    one = one_sgd_step(copy.deepcopy(base), four_rows, tmp_path, batch_size=4, accumulation=1).model
    two = one_sgd_step(copy.deepcopy(base), four_rows, tmp_path, batch_size=2, accumulation=2).model

    # Independent expectation: one SGD step (lr 1) on 2 * token-mean LM NLL + mean MC NLL over all four rows.
    manual = copy.deepcopy(base).train()
    batch = PersonaCollator(base.config.pad_token_id)(list(four_rows))
    out = manual(**batch)
    assert_hand_step(2.0 * out.lm_nll.sum() / out.lm_tokens.sum() + out.mc_nll.mean(), manual, one, two)
    assert not torch.equal(one.transformer.wte.weight, base.transformer.wte.weight)


def test_eval_metrics_are_corpus_level(tiny_model_and_tokenizer, personachat_json, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    feats = build_features(load_dialogs(personachat_json)["valid"], tokenizer, num_candidates=None, max_history=2)
    feats = feats.select(range(10))
    args = PersonaTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none", use_cpu=True, lm_coef=1.0
    )
    trainer = PersonaTrainer(
        model=model, args=args, eval_dataset=feats, data_collator=PersonaCollator(tokenizer.pad_token_id)
    )
    metrics = trainer.evaluate()
    # Second implementation: one forward over all rows, metrics computed directly.
    model.eval()
    with torch.no_grad():
        out = model(**PersonaCollator(tokenizer.pad_token_id)(list(feats)))
    hits = (out.mc_logits.argmax(dim=1) == 19).float().mean().item()
    lm_loss = (out.lm_nll.sum() / out.lm_tokens.sum()).item()
    assert metrics["eval_hits@1"] == pytest.approx(hits)
    assert metrics["eval_lm_loss"] == pytest.approx(lm_loss, rel=1e-5)
    assert metrics["eval_ppl"] == pytest.approx(torch.tensor(lm_loss).exp().item(), rel=1e-5)
    assert metrics["eval_mc_loss"] == pytest.approx(out.mc_nll.mean().item(), rel=1e-5)


def test_eval_ranks_mixed_candidate_counts(tiny_model_and_tokenizer, personachat_json, tmp_path):
    """Rows with 20 and 5 candidates in one batch: each count scored apart, Hits@1 with ties against the gold."""
    model, tokenizer = tiny_model_and_tokenizer
    feats = build_features(load_dialogs(personachat_json)["valid"], tokenizer, num_candidates=None, max_history=2)
    five = build_features(load_dialogs(personachat_json)["valid"], tokenizer, num_candidates=5, max_history=2)
    rows = [feats[0], five[1], feats[2], five[3], five[4], feats[5]]
    args = PersonaTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True, eval_strategy="no"
    )
    collator = PersonaCollator(tokenizer.pad_token_id)
    trainer = PersonaTrainer(model=model, args=args, data_collator=collator)
    stats = trainer.predict(Dataset.from_list(rows)).predictions
    # Independent: one row at a time, the gold strictly above every other candidate.
    model.eval()
    with torch.no_grad():
        outs = [model(**collator([row])) for row in rows]
    assert stats[:, 4].tolist() == [20, 5, 20, 5, 5, 20]
    for row_stats, out, row in zip(stats, outs, rows):
        logits, gold = out.mc_logits[0], row["mc_labels"]
        assert row_stats[0] == sum(float(x) >= float(logits[gold]) for x in logits) - 1
        assert row_stats[1] == pytest.approx(out.lm_nll.item(), rel=1e-5) and row_stats[2] == out.lm_tokens.item()


def test_collator_takes_an_arrow_batch_as_it_takes_rows(tiny_model_and_tokenizer, personachat_json):
    """`ArrowBatches` hands the collator one Arrow table: the same tensors as the list of rows `datasets` gives,
    for plain batches, padded to a multiple, and grouped by candidate count."""
    _, tokenizer = tiny_model_and_tokenizer
    valid = load_dialogs(personachat_json)["valid"]
    feats = build_features(valid, tokenizer, num_candidates=None, max_history=2)
    five = build_features(valid, tokenizer, num_candidates=5, max_history=2)
    mixed = Dataset.from_list([feats[0], five[1], feats[2], five[3]])
    batches = ArrowBatches(feats)
    assert len(batches) == len(feats) and batches[3] == feats[3]
    for pad_to in (None, 8):
        collator = PersonaCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to)
        for indices in ([0], [7, 2, 5], list(range(len(feats) - 3, len(feats)))):
            table = batches.__getitems__(indices)
            assert isinstance(table, pa.Table)
            expected, got = collator([feats[i] for i in indices]), collator(table)
            assert list(got) == list(expected)
            for key in expected:
                assert torch.equal(got[key], expected[key]), key
    grouped = CandidateCountBatches(PersonaCollator(tokenizer.pad_token_id))
    expected, got = grouped(list(mixed)), grouped(ArrowBatches(mixed).__getitems__(range(4)))
    assert torch.equal(got["row_order"], expected["row_order"]) and len(got["groups"]) == 2
    for group_got, group_expected in zip(got["groups"], expected["groups"]):
        assert all(torch.equal(group_got[k], group_expected[k]) for k in group_expected)
    with pytest.raises(ValueError, match="empty batch"):
        PersonaCollator(0)(feats.with_format("arrow")[0:0])


def test_trainer_batches_come_as_arrow_tables(tiny_model_and_tokenizer, four_rows, tmp_path):
    """A PersonaCollator gets each batch as one Arrow table, in training and evaluation; any other collator gets
    the rows as `datasets` gives them."""
    model, tokenizer = tiny_model_and_tokenizer
    seen = []

    class Spy(PersonaCollator):
        def __call__(self, features):
            seen.append(type(features))
            return super().__call__(features)

    def other(features):
        seen.append(type(features))
        return PersonaCollator(tokenizer.pad_token_id)(features)

    args = PersonaTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, report_to="none"
    )
    for collator, kind in ((Spy(tokenizer.pad_token_id), pa.Table), (other, list)):
        seen.clear()
        trainer = PersonaTrainer(model=model, args=args, data_collator=collator, train_dataset=four_rows)
        assert next(iter(trainer.get_train_dataloader()))["input_ids"].shape[:2] == (2, 3)
        assert next(iter(trainer.get_eval_dataloader(four_rows)))["groups"][0]["input_ids"].shape[:2] == (2, 3)
        assert set(seen) == {kind}  # the loaders fetch ahead: some batches more than asked for


def test_model_card_gets_its_facts_from_the_constructor(tiny_model_and_tokenizer, tmp_path):
    model, _ = tiny_model_and_tokenizer
    args = PersonaTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, eval_strategy="no")
    trainer = PersonaTrainer(
        model=model, args=args, base_model="org/base", dataset_name="org/data", recipe={"num_candidates": 3}
    )
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "base_model: org/base" in card and "`org/data`" in card and "| candidates per example | 3 |" in card


def test_config_file_with_overrides(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model_name_or_path: some/model\nnum_candidates: 4\nlm_coef: 2.0\nlearning_rate: 1.0e-4\n")
    model_args, data_args, training_args = parse_args([str(config), "--num_candidates", "3", "--output_dir", "x"])
    assert model_args.model_name_or_path == "some/model"
    assert data_args.num_candidates == 3 and training_args.lm_coef == 2.0 and training_args.learning_rate == 1e-4
    # Reference defaults when nothing is given.
    _, data_args, training_args = parse_args(["--output_dir", "x"])
    assert (data_args.num_candidates, data_args.max_history, data_args.personality_permutations) == (2, 2, 1)
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (4, 8)
    assert (training_args.learning_rate, training_args.num_train_epochs, training_args.max_grad_norm) == (
        6.25e-5,
        3,
        1.0,
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_candidatez: 4\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown option"):
        parse_args([str(bad)])
    with pytest.raises(ValueError, match="num_candidates"):
        parse_args(["--num_candidates", "0", "--output_dir", "x"])


@pytest.mark.slow
def test_run_persona_end_to_end_save_reload_resume(tiny_checkpoint, personachat_json, tmp_path):
    out = tmp_path / "run"
    common = [
        "--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json,
        "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(out), "--num_candidates", "4",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "2e-3",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "20", "--eval_strategy", "no",
        "--use_cpu", "true", "--report_to", "none", "--max_eval_samples", "16", "--seed", "1",
    ]  # fmt: skip
    cli([*common, "--max_steps", "40"])
    state = json.loads((out / "trainer_state.json").read_text())
    train_logs = [log for log in state["log_history"] if "loss" in log]
    assert all("lm_loss" in log and "mc_loss" in log for log in train_logs)
    first, last = sum(x["loss"] for x in train_logs[:5]) / 5, sum(x["loss"] for x in train_logs[-5:]) / 5
    assert last < first * 0.9, (first, last)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_hits@1", "eval_ppl", "eval_lm_loss", "eval_mc_loss"} <= eval_results.keys()

    from transformers import AutoTokenizer, GPT2DoubleHeadsModel

    GPT2DoubleHeadsModel.from_pretrained(out)
    assert "<speaker1>" in AutoTokenizer.from_pretrained(out).get_vocab()

    # Resume from the step-20 checkpoint to step 40: the same weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    cli([*common, "--max_steps", "40", "--output_dir", str(resumed),
         "--resume_from_checkpoint", str(out / "checkpoint-20")])  # fmt: skip
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert os.path.isdir(resumed / "checkpoint-40")


def test_run_folder_and_tensorboard_defaults(monkeypatch):
    from transformers.integrations import is_tensorboard_available

    _, _, training_args = parse_args(["--model_name_or_path", "org/DialoGPT-small"])
    assert training_args.auto_output_dir
    assert training_args.report_to == (["tensorboard"] if is_tensorboard_available() else [])
    monkeypatch.setattr(persona_checkpoints.socket, "gethostname", lambda: "node7")
    folder = persona_checkpoints.default_output_dir("org/DialoGPT-small/")
    assert folder.startswith("runs" + os.sep) and folder.endswith("_node7_DialoGPT-small")
    _, _, explicit = parse_args(["--output_dir", "mine", "--report_to", "none"])
    assert not explicit.auto_output_dir and explicit.output_dir == "mine"


def test_gradient_checkpointing_maps_to_activation_checkpointing_without_a_warning(tmp_path, recwarn):
    args = PersonaTrainingArguments(
        output_dir=str(tmp_path), gradient_checkpointing=True, report_to="none", use_cpu=True
    )
    assert args.activation_checkpointing is True
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)]
    # The library default (no eval_dataset needed in Python); persona-train evaluates each epoch with --do_eval.
    assert args.eval_strategy == "no"
