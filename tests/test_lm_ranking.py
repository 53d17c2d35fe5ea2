"""LM ranking (`lm_hits@k`): every candidate's reply log-probability from the evaluation's one forward, against a plain
causal LM scoring each candidate's full row on its own, in both input formats (speaker tokens on GPT-2, the chat
template on tiny Llama / Qwen2 instruct models without a trained head); ties; the Trainer's `eval_lm_hits@1`; the
`evaluate` metric; `persona-eval` end to end."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from helpers import END_OF_TURN, chat_ids, reference_messages
from helpers import INSTRUCT_FAMILIES as FAMILIES
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import persona_eval
from persona_convai2 import evaluate_convai2, rank_candidates, ranking_trainer
from persona_data import build_features
from persona_heads import DoubleHeadsOutput
from persona_metrics import stat_columns
from persona_model import load_model_and_tokenizer, multiple_choice_head_loaded
from persona_trainer import PersonaTrainer, PersonaTrainingArguments, score_candidates

MAX_HISTORY = 2  # evaluate_convai2's and persona-eval's default


def reply_logp(lm, ids: list[int], start: int, end: int, token_type_ids: list[int] | None = None) -> float:
    """log p(ids[start..end] | ids[:start]) from one plain forward of the whole row: the sum of each reply token's
    log-probability given the tokens before it (float64 softmax)."""
    kwargs = {} if token_type_ids is None else {"token_type_ids": torch.tensor([token_type_ids])}
    with torch.no_grad():
        logp = lm(input_ids=torch.tensor([ids]), **kwargs).logits[0].double().log_softmax(-1)
    return float(sum(logp[p - 1, ids[p]] for p in range(start, end + 1)))


def rank(scores: list[float], gold: int) -> int:
    """Candidates other than the gold scoring at least as high as it (a tie counts against the gold)."""
    return sum(score >= scores[gold] for c, score in enumerate(scores) if c != gold)


def turns_of(dialogs_list: list[dict]) -> list[tuple[list[str], list[str], list[str]]]:
    return [(d["personality"], u["history"], u["candidates"]) for d in dialogs_list for u in d["utterances"]]


def speaker_token_expectation(checkpoint: str, tokenizer, dialogs_list: list[dict], features) -> dict:
    """Per turn: the gold's rank by the reply's mean and summed log-probability, each candidate's row scored by the
    library's plain GPT2LMHeadModel. A reply is its own tokens and eos at the end of its row (checked)."""
    lm = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    out = {"sum": [], "mean": [], "counts": [], "logps": [], "mean_logps": []}
    for row, (_, _, candidates) in zip(features, turns_of(dialogs_list), strict=True):
        sums, means = [], []
        for c, text in enumerate(candidates):
            ids = row["input_ids"][c]
            reply = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            assert ids[-len(reply) :] == reply
            start = len(ids) - len(reply)
            sums.append(reply_logp(lm, ids, start, len(ids) - 1, row["token_type_ids"][c]))
            means.append(sums[-1] / len(reply))
        gold = len(candidates) - 1
        out["sum"].append(rank(sums, gold))
        out["mean"].append(rank(means, gold))
        out["counts"].append(len(candidates))
        out["logps"].append(sums)
        out["mean_logps"].append(means)
    return out


def chat_template_expectation(checkpoint: str, family: str, tokenizer, dialogs_list: list[dict], features) -> dict:
    """The same for a chat-template row: the reply is the assistant turn's tokens from the end of the generation
    prompt up to and including the template's end-of-turn token, each row scored by AutoModelForCausalLM."""
    lm = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[FAMILIES[family]])
    out = {"sum": [], "mean": [], "counts": []}
    for row, (persona, history, candidates) in zip(features, turns_of(dialogs_list), strict=True):
        context = history[-(2 * MAX_HISTORY + 1) :]
        start = len(chat_ids(tokenizer, reference_messages(persona, context), add_generation_prompt=True))
        sums, means = [], []
        for c, text in enumerate(candidates):
            ids = chat_ids(tokenizer, reference_messages(persona, context, text))
            assert row["input_ids"][c] == ids
            end = ids.index(end_of_turn, start)
            sums.append(reply_logp(lm, ids, start, end))
            means.append(sums[-1] / (end - start + 1))
        gold = len(candidates) - 1
        out["sum"].append(rank(sums, gold))
        out["mean"].append(rank(means, gold))
        out["counts"].append(len(candidates))
    return out


def expected_hits(expectation: dict, key: str) -> float:
    ranked = [r for r, n in zip(expectation[key], expectation["counts"]) if n > 1]
    return sum(r == 0 for r in ranked) / len(ranked)


def mixed_turns(valid: list[dict], num_dialogs: int) -> list[dict]:
    """The first dialogs with mixed candidate counts (5, 20 and a one-candidate turn) and, in two turns, a
    distractor that is the gold reply again: the LM scores them alike, and the tie counts against the gold."""
    out = copy.deepcopy(valid[:num_dialogs])
    out[0]["utterances"][0]["candidates"] = out[0]["utterances"][0]["candidates"][-5:]
    out[0]["utterances"][1]["candidates"] = out[0]["utterances"][1]["candidates"][-1:]
    for u in (out[1]["utterances"][0], out[0]["utterances"][2]):
        u["candidates"][3] = u["candidates"][-1]
    return out


@pytest.fixture(scope="module")
def gpt2_case(persona_checkpoint, synthetic_data):
    model, tokenizer = load_model_and_tokenizer(persona_checkpoint)
    dialogs_list = mixed_turns(synthetic_data["valid"], 2)
    dataset = datasets.Dataset.from_list(dialogs_list)
    features = build_features(dataset, tokenizer, num_candidates=None, max_history=MAX_HISTORY)
    expectation = speaker_token_expectation(persona_checkpoint, tokenizer, dialogs_list, features)
    return {"model": model, "tokenizer": tokenizer, "dialogs": dataset, "features": features, "expected": expectation}


def test_lm_ranks_match_a_plain_causal_lm_speaker_tokens(gpt2_case):
    model, tokenizer, expected = gpt2_case["model"], gpt2_case["tokenizer"], gpt2_case["expected"]
    columns = stat_columns(rank_candidates(ranking_trainer(model, tokenizer, 3), gpt2_case["features"]))
    assert columns["lm_gold_rank"].tolist() == expected["mean"]
    assert columns["lm_gold_rank_sum"].tolist() == expected["sum"]
    # The duplicated gold ties with itself: never first, by the sum, the mean or the head (whatever the float rounding
    # of the copy's place in a packed row).
    for turn in (2, len(gpt2_case["dialogs"][0]["utterances"])):
        assert expected["mean"][turn] >= 1 and expected["sum"][turn] >= 1 and columns["gold_rank"][turn] >= 1
    assert expected["sum"] != expected["mean"]  # the two scores rank differently somewhere (or the test is weak)
    metrics = evaluate_convai2(model, tokenizer, gpt2_case["dialogs"], batch_size=3, f1=False)
    assert metrics["lm_hits@1"] == pytest.approx(expected_hits(expected, "mean"))
    assert metrics["lm_hits@1_sum"] == pytest.approx(expected_hits(expected, "sum"))
    assert "lm_hits@5" not in metrics and metrics["turns_one_candidate"] == 1  # 5 candidates; a turn left out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lm_ranks_match_a_plain_causal_lm_chat_template(family, instruct_checkpoints, dialogs):  # noqa: F811
    checkpoint = instruct_checkpoints[family]
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    assert not multiple_choice_head_loaded(model)  # a plain instruct model: no trained head
    dialogs_list = mixed_turns(dialogs, 2)
    dataset = datasets.Dataset.from_list(dialogs_list)
    features = build_features(dataset, tokenizer, num_candidates=None, max_history=MAX_HISTORY)
    expected = chat_template_expectation(checkpoint, family, tokenizer, dialogs_list, features)
    columns = stat_columns(rank_candidates(ranking_trainer(model, tokenizer, 4), features))
    assert columns["lm_gold_rank"].tolist() == expected["mean"]
    assert columns["lm_gold_rank_sum"].tolist() == expected["sum"]
    metrics = evaluate_convai2(model, tokenizer, dataset, batch_size=4, f1=False)
    assert metrics["lm_hits@1"] == pytest.approx(expected_hits(expected, "mean"))
    assert metrics["lm_hits@1_sum"] == pytest.approx(expected_hits(expected, "sum"))
    assert "hits@1" in metrics  # the untrained head's, reported with a warning


def test_ties_count_against_the_gold():
    # Turn 0: a distractor ties with the gold's sum (and mean); turn 1: candidate 0 above the gold by the sum, then
    # the gold alone on top by the sum but last by the mean (its reply is short); turn 2: every candidate alike.
    nll = torch.tensor([[2.0, 1.0, 2.0], [3.0, 9.0, 4.0], [0.0, 0.0, 0.0]])
    tokens = torch.tensor([[2, 1, 2], [10, 9, 1], [0, 0, 0]])
    outputs = DoubleHeadsOutput(
        mc_logits=torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, 1.0], [0.0, 0.0, 0.0]]),
        mc_nll=torch.zeros(3),
        lm_candidate_nll=nll,
        lm_candidate_tokens=tokens,
        lm_candidate_end_nll=torch.zeros(3, 3),
    )
    stats = stat_columns(score_candidates(outputs, torch.tensor([2, 2, 2])).numpy())
    assert stats["lm_gold_rank_sum"].tolist() == [2, 1, 2]
    nll[1] = torch.tensor([5.0, 9.0, 4.0])
    stats = stat_columns(score_candidates(outputs, torch.tensor([2, 2, 2])).numpy())
    assert stats["lm_gold_rank_sum"].tolist() == [2, 0, 2] and stats["lm_gold_rank"].tolist() == [2, 2, 2]
    assert stats["gold_rank"].tolist() == [2, 0, 2]
    assert stats["lm_nll"].tolist() == [2.0, 4.0, 0.0] and stats["lm_tokens"].tolist() == [2, 1, 0]  # the gold's
    # Candidate 1 of turn 1 labelled as the gold (its reply again): it ties with the gold, its own score aside.
    labels = torch.full((3, 3, 4), -100)
    labels[:, :, 2] = torch.arange(9).view(3, 3)
    labels[1, 1] = labels[1, 2]
    stats = stat_columns(score_candidates(outputs, torch.tensor([2, 2, 2]), labels).numpy())
    assert stats["lm_gold_rank_sum"].tolist() == [2, 1, 2] and stats["gold_rank"].tolist() == [2, 1, 2]


def test_trainer_evaluation_reports_lm_hits(gpt2_case, tmp_path):
    """persona-train's evaluation (and a DPO run's, the same step) reports eval_lm_hits@1 by the same rule."""
    from persona_collator import PersonaCollator
    from persona_dpo import PersonaDPOTrainer

    model, tokenizer, expected = gpt2_case["model"], gpt2_case["tokenizer"], gpt2_case["expected"]
    for objective, trainer_class in (("double_heads", PersonaTrainer), ("dpo", PersonaDPOTrainer)):
        args = PersonaTrainingArguments(
            output_dir=str(tmp_path / objective),
            objective=objective,
            per_device_eval_batch_size=4,
            report_to="none",
            use_cpu=True,
            do_train=False,
            save_strategy="no",
        )
        collator = PersonaCollator(tokenizer.pad_token_id)
        trainer = trainer_class(model=model, args=args, data_collator=collator, eval_dataset=gpt2_case["features"])
        metrics = trainer.evaluate()
        assert metrics["eval_lm_hits@1"] == pytest.approx(expected_hits(expected, "mean"))
        assert metrics["eval_lm_hits@1_sum"] == pytest.approx(expected_hits(expected, "sum"))


def test_evaluate_metric_ranks_lm_log_probabilities(gpt2_case, tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    hits = evaluate.load(persona_eval.CONVAI2_METRIC_PATH, "hits", cache_dir=str(tmp_path / "cache"))
    expected = gpt2_case["expected"]
    golds = [len(scores) - 1 for scores in expected["logps"]]
    result = hits.compute(predictions=expected["logps"], references=golds, ks=[1])
    assert result == {"hits@1": pytest.approx(expected_hits(expected, "sum"))}
    result = hits.compute(predictions=expected["mean_logps"], references=golds, ks=[1])
    assert result == {"hits@1": pytest.approx(expected_hits(expected, "mean"))}


def test_persona_eval_reports_lm_hits_speaker_tokens(gpt2_case, persona_checkpoint, tmp_path, capsys):
    data = tmp_path / "dialogs.json"
    data.write_text(json.dumps({"valid": gpt2_case["dialogs"].to_list()}))
    output = tmp_path / "results.json"
    argv = ["--model_name_or_path", persona_checkpoint, "--dataset_path", str(data), "--no_f1",
            "--batch_size", "3", "--output_file", str(output)]  # fmt: skip
    assert persona_eval.cli(argv) == 0
    results = json.loads(output.read_text())
    assert results["metrics"]["lm_hits@1"] == pytest.approx(expected_hits(gpt2_case["expected"], "mean"))
    assert results["metrics"]["lm_hits@1_sum"] == pytest.approx(expected_hits(gpt2_case["expected"], "sum"))
    assert results["multiple_choice_head"] == "trained" and "lm_hits@1" in results["ranking"]
    table = capsys.readouterr().out
    assert "lm_hits@1 (log-prob per token)" in table and "untrained head" not in table


@pytest.mark.slow
def test_persona_eval_ranks_an_instruct_model_without_a_head(instruct_checkpoints, dialogs, tmp_path, capsys):  # noqa: F811
    checkpoint = instruct_checkpoints["qwen2"]
    _, tokenizer = load_model_and_tokenizer(checkpoint)
    dialogs_list = mixed_turns(dialogs, 2)
    data = tmp_path / "dialogs.json"
    data.write_text(json.dumps({"valid": dialogs_list}))
    features = build_features(
        datasets.Dataset.from_list(dialogs_list), tokenizer, num_candidates=None, max_history=MAX_HISTORY
    )
    expected = chat_template_expectation(checkpoint, "qwen2", tokenizer, dialogs_list, features)
    output = tmp_path / "results.json"
    argv = ["--model_name_or_path", checkpoint, "--dataset_path", str(data), "--no_f1", "--output_file", str(output)]
    assert persona_eval.cli(argv) == 0
    results = json.loads(output.read_text())
    assert results["metrics"]["lm_hits@1"] == pytest.approx(expected_hits(expected, "mean"))
    assert results["metrics"]["lm_hits@1_sum"] == pytest.approx(expected_hits(expected, "sum"))
    assert results["multiple_choice_head"].startswith("untrained") and "hits@1" in results["metrics"]
    assert "hits@1 (untrained head)" in capsys.readouterr().out


def test_lm_head_runs_in_chunks_without_gradients(monkeypatch):
    """Every candidate labelled makes many LM-head rows: without gradients they go through the head a chunk at a time,
    with the same NLL as one call (the gradient path, one call)."""
    import persona_heads

    torch.manual_seed(0)
    hidden, head = torch.randn(3, 7, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (3, 7)).masked_fill(torch.rand(3, 7) < 0.3, -100)
    whole = [t.detach() for t in persona_heads.labelled_lm_nll(hidden, labels, head)]
    monkeypatch.setattr(persona_heads, "LM_HEAD_CHUNK_ELEMENTS", 11 * 2)  # two rows per chunk
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    with torch.no_grad():
        chunked = persona_heads.labelled_lm_nll(hidden, labels, head)
    assert max(calls) == 2 and sum(calls) == int(labels[:, 1:].ne(-100).sum())
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want)
