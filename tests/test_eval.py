"""ConvAI2 metrics and evaluation: F1 on hand-computed pairs, Hits@k on constructed logits (ties against the gold),
perplexity and Hits@1 against a plain GPT2DoubleHeadsModel, the `evaluate` metric module, one process against two, and
the console script end to end."""

from __future__ import annotations

import copy
import doctest
import json
import math
import os

import datasets
import pytest
import torch
from helpers import run_cli
from transformers import GPT2DoubleHeadsModel

import persona_eval
import persona_metrics
from persona_convai2 import evaluate_convai2
from persona_data import build_features
from persona_eval import f1_score
from persona_metrics import corpus_perplexity, gold_rank, hits_at_k, normalize_answer
from persona_records import dialogs_to_dataset_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_doctests():
    assert doctest.testmod(persona_metrics).failed == 0


def test_f1_is_the_public_one():
    assert persona_eval.f1_score is persona_metrics.f1_score


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("Hello, world!", "hello world", 1.0),
        ("I LOVE Cats", "i love cats", 1.0),
        # articles vanish: pred [cat, sat], gold [cat, sat, on, mat] -> P=1, R=1/2
        ("The cat sat.", "a cat sat on the mat", 2 / 3),
        ("an apple", "apple", 1.0),
        # "theatre" is not an article; "the atre" normalises to "atre"
        ("theatre", "the atre", 0.0),
        # the apostrophe and hyphen are punctuation: "don't" -> "don t", "the-end" -> "end"
        ("don't", "don t", 1.0),
        ("the-end", "end", 1.0),
        # repeated tokens count as a multiset: shared 1, P=1/3, R=1/2 -> 2/5
        ("dog dog dog", "dog cat", 0.4),
        # shared 2, P=1, R=2/3 -> 4/5
        ("dog dog", "dog dog cat", 0.8),
        # P=1/4 ("i" of "i i i you"), R=1/2 -> 1/3
        ("i i i you", "i am", 1 / 3),
        ("", "hi there", 0.0),
        ("...!", "hi", 0.0),
        ("hi there", "", 0.0),
        ("", "", 0.0),
        ("the a an", "the", 0.0),
    ],
)
def test_f1_hand_computed(prediction, gold, expected):
    assert f1_score(prediction, gold) == pytest.approx(expected, abs=1e-12)


def test_normalize_answer_punctuation_set():
    # Every character of ParlAI's punctuation list becomes a space; nothing else is touched.
    design = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'"
    assert normalize_answer(f"x{design}y") == "x y"
    assert normalize_answer("Ünïcode café") == "ünïcode café"


def test_hits_at_k_on_constructed_logits():
    logits = torch.zeros(5, 20)
    gold = torch.tensor([19, 0, 7, 3, 19])
    # Turn 0: gold on top. Turn 1: 3 candidates above. Turn 2: 7 above. Turn 3: 12 above. Turn 4: a tie on top, which
    # counts against the gold (the reference's argmax with the gold last picks the other candidate).
    logits[0, 19] = 5.0
    logits[1, 0], logits[1, [4, 5, 6]] = 1.0, 2.0
    logits[2, 7], logits[2, 10:17] = 1.0, 3.0
    logits[3, 3], logits[3, 5:17] = 1.0, 2.0
    logits[4, 19], logits[4, 2] = 4.0, 4.0
    ranks = gold_rank(logits, gold)
    assert ranks.tolist() == [0, 3, 7, 12, 1]
    assert hits_at_k(ranks.tolist(), [20] * 5) == {"hits@1": 0.2, "hits@5": 0.6, "hits@10": 0.8}
    # The same ranks from numpy scores.
    assert gold_rank(logits.numpy(), gold.numpy()).tolist() == [0, 3, 7, 12, 1]
    # Cut-offs at or beyond the candidate count are left out.
    assert hits_at_k([0, 1, 4], [5, 5, 20]) == {"hits@1": pytest.approx(1 / 3)}


def test_all_equal_scores_never_rank_the_gold_first():
    # An untrained head that scores every candidate alike: the gold is last among equals (Hits@1 = 0, not 1).
    scores = torch.zeros(4, 20)
    ranks = gold_rank(scores, torch.tensor([19, 0, 5, 19]))
    assert ranks.tolist() == [19, 19, 19, 19] and hits_at_k(ranks, [20] * 4)["hits@1"] == 0.0


def test_corpus_perplexity_is_token_level():
    # Two turns, 1 and 3 tokens: the mean over tokens (8 / 4), not over turns ((1 + 7/3) / 2).
    assert corpus_perplexity(1.0 + 7.0, 1 + 3) == (2.0, pytest.approx(math.exp(2.0)))


def test_evaluate_metric_module_loads_offline(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    f1 = evaluate.load(persona_eval.CONVAI2_METRIC_PATH, cache_dir=str(tmp_path / "cache"))
    preds, golds = ["The cat sat.", "dog dog dog", ""], ["a cat sat on the mat", "dog cat", "hi"]
    assert f1.compute(predictions=preds, references=golds)["f1"] == pytest.approx((2 / 3 + 0.4 + 0) / 3)
    hits = evaluate.load(persona_eval.CONVAI2_METRIC_PATH, "hits", cache_dir=str(tmp_path / "cache"))
    scores = [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    # gold ranks: 5 (index 0 is lowest), 0, 1 (a tie counts against the gold)
    assert hits.compute(predictions=scores, references=[0, 0, 1], ks=[1, 5]) == {
        "hits@1": pytest.approx(1 / 3),
        "hits@5": pytest.approx(2 / 3),
    }


@pytest.fixture
def mixed_dialogs(synthetic_data) -> datasets.Dataset:
    """Validation dialogs where the first two keep only their last 5 candidates (mixed candidate counts)."""
    data = copy.deepcopy(synthetic_data)
    for dialog in data["valid"][:2]:
        for u in dialog["utterances"]:
            u["candidates"] = u["candidates"][-5:]
    return dialogs_to_dataset_dict(data, "synthetic")["valid"]


def test_ppl_and_hits_match_plain_double_heads_model(persona_checkpoint, tokenizer, mixed_dialogs):
    from persona_model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(persona_checkpoint)
    metrics = evaluate_convai2(model, tok, mixed_dialogs, batch_size=3, max_turns=20, f1=False)

    # Independent: the library's own double-heads model, full logits, one turn at a time.
    plain = GPT2DoubleHeadsModel.from_pretrained(persona_checkpoint).eval()
    features = build_features(mixed_dialogs, tok, num_candidates=None, max_history=2).select(range(20))
    nll_sum, tokens, top1, counts = 0.0, 0, 0, set()
    with torch.no_grad():
        for row in features:
            num_candidates = len(row["input_ids"])
            counts.add(num_candidates)
            logits = []
            for c in range(num_candidates):
                ids = torch.tensor([[row["input_ids"][c]]])
                out = plain(
                    input_ids=ids,
                    token_type_ids=torch.tensor([[row["token_type_ids"][c]]]),
                    mc_token_ids=torch.tensor([[row["mc_token_ids"][c]]]),
                    labels=torch.tensor([[row["labels"][c]]]),
                )
                logits.append(out.mc_logits.item())
                if c == row["mc_labels"]:
                    n = sum(label != -100 for label in row["labels"][c][1:])
                    nll_sum, tokens = nll_sum + out.loss.item() * n, tokens + n
            gold = row["mc_labels"]
            top1 += all(score < logits[gold] for c, score in enumerate(logits) if c != gold)
    assert counts == {5, 20}
    assert metrics["turns"] == 20 and metrics["gold_reply_tokens"] == tokens
    assert metrics["ppl"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-4)
    assert metrics["hits@1"] == pytest.approx(top1 / 20)
    assert set(metrics) >= {"hits@1", "ppl", "lm_loss"} and "hits@5" not in metrics  # 5 candidates in some turns


def test_f1_scores_generated_replies_against_gold(persona_checkpoint, mixed_dialogs):
    from persona_generation import generate_replies
    from persona_model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(persona_checkpoint)
    metrics = evaluate_convai2(model, tok, mixed_dialogs, batch_size=3, max_turns=9, return_predictions=True)
    # Independent: the turns read straight from the dialogs, the gold history, one generate_replies call.
    contexts, golds = [], []
    for dialog in mixed_dialogs:
        for u in dialog["utterances"]:
            contexts.append((dialog["personality"], u["history"]))
            golds.append(u["candidates"][-1])
    replies = generate_replies(model, tok, contexts[:9], max_history=2, no_sample=True)
    assert metrics["predictions"] == replies
    assert metrics["f1"] == pytest.approx(sum(f1_score(r, g) for r, g in zip(replies, golds)) / 9)


@pytest.mark.slow
def test_console_script_end_to_end_and_two_processes(tmp_path, persona_checkpoint, synthetic_data):
    # 13 turns in batches of 4 over 2 processes: uneven shards, the tail is padded then dropped again. Two turns
    # with 5 and 3 candidates make one-turn batches, fewer than the processes.
    data = copy.deepcopy(synthetic_data)
    for dialog, utterance, count in ((0, 0, 5), (1, 2, 3)):
        candidates = data["valid"][dialog]["utterances"][utterance]["candidates"]
        data["valid"][dialog]["utterances"][utterance]["candidates"] = candidates[-count:]
    (tmp_path / "mixed.json").write_text(json.dumps(data))
    common = ["--model_name_or_path", persona_checkpoint, "--dataset_path", str(tmp_path / "mixed.json")]
    common += ["--max_turns", "13", "--batch_size", "4", "--save_predictions"]
    one = run_cli("persona_eval.py", common + ["--output_file", str(tmp_path / "one.json")])
    two = run_cli("persona_eval.py", common + ["--output_file", str(tmp_path / "two.json")], nproc=2)

    results = json.loads((tmp_path / "one.json").read_text())
    assert "perplexity (token-level)" in one.stdout and "hits@1" in one.stdout
    assert results["checkpoint"] == persona_checkpoint and results["turns"] == 13 and results["split"] == "valid"
    assert results["options"]["max_turns"] == 13 and "token-level" in results["perplexity"]
    assert set(results["metrics"]) >= {"hits@1", "ppl", "lm_loss", "f1", "turns"} and "hits@5" not in results["metrics"]
    assert results["metrics"]["candidates_per_turn"] == [3, 5, 20]

    results_two = json.loads((tmp_path / "two.json").read_text())
    assert results_two["num_processes"] == 2 and results["num_processes"] == 1
    assert two.stdout.count("Saved ") == 1  # only the main process prints and writes
    # Same turns in the same order: the same ranks and counts; the sums agree to float rounding, since the packed
    # encoding shares rows between different examples on 1 and 2 processes.
    counts_two, counts = (
        results_two["metrics"].pop("candidates_per_turn"),
        results["metrics"].pop("candidates_per_turn"),
    )
    assert counts_two == counts and results_two["metrics"] == pytest.approx(results["metrics"], rel=1e-6)
    assert results_two.get("predictions") == results.get("predictions")
    assert len(results["predictions"]) == 13 and 0 <= results["metrics"]["f1"] <= 1


@pytest.mark.slow
def test_run_persona_do_convai2_eval(tmp_path, tiny_checkpoint, personachat_json, tiny_nli_checkpoints):
    from run_persona import main, parse_args

    out = tmp_path / "run"
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, "--output_dir", str(out)]
    args += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    args += ["--do_eval", "true", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"]
    args += ["--max_eval_samples", "6", "--per_device_eval_batch_size", "4", "--do_convai2_eval", "--use_cpu"]
    args += ["--dataset_cache", str(tmp_path / "cache"), "--nli_model", tiny_nli_checkpoints["mnli-style"]]
    metrics = main(*parse_args(args))
    saved = json.loads((out / "convai2_results.json").read_text())
    assert saved == {key: value for key, value in metrics.items() if key.startswith("convai2_")}
    assert saved["convai2_turns"] == 6
    assert set(saved) >= {"convai2_hits@1", "convai2_hits@5", "convai2_hits@10", "convai2_ppl", "convai2_f1"}
    assert set(saved) >= {"convai2_ppl_word", "convai2_c_score", "convai2_c_score_gold", "convai2_repeat_self"}


def test_a_second_evaluation_says_it_replaces_the_first_results(tmp_path, persona_checkpoint, personachat_json, capsys):
    argv = ["--model_name_or_path", persona_checkpoint, "--dataset_path", personachat_json, "--max_turns", "2",
            "--output_file", str(tmp_path / "results.json")]  # fmt: skip
    assert persona_eval.cli(argv) == 0
    first = capsys.readouterr().out
    assert persona_eval.cli(argv) == 0
    second = capsys.readouterr().out
    assert f"Saved {tmp_path / 'results.json'}\n" in first and "replaces" not in first
    assert f"Saved {tmp_path / 'results.json'} (it replaces the earlier results that file held)" in second


def test_one_candidate_turns_are_left_out_of_hits(persona_checkpoint, synthetic_data):
    """A turn whose only candidate is the gold "hits" by construction: Hits@k counts the other turns, and says how many
    it left out. Independent expectation: the same dialogs with those turns removed (each turn carries its own
    history, so the other turns are unchanged)."""
    from persona_model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(persona_checkpoint)
    mixed, removed = copy.deepcopy(synthetic_data["valid"][:3]), copy.deepcopy(synthetic_data["valid"][:3])
    for dialog in mixed:
        for u in dialog["utterances"][1::2]:
            u["candidates"] = u["candidates"][-1:]
    for dialog in removed:
        dialog["utterances"] = dialog["utterances"][0::2]
    singles = sum(len(d["utterances"][1::2]) for d in mixed)
    turns = sum(len(d["utterances"]) for d in mixed)
    metrics = evaluate_convai2(model, tok, datasets.Dataset.from_list(mixed), f1=False)
    expected = evaluate_convai2(model, tok, datasets.Dataset.from_list(removed), f1=False)
    assert (metrics["turns"], metrics["hits_turns"], metrics["turns_one_candidate"]) == (
        turns,
        turns - singles,
        singles,
    )
    assert metrics["hits@1"] == expected["hits@1"] and expected["hits_turns"] == turns - singles
    assert "turns_one_candidate" not in expected


def test_saved_predictions_carry_gold_persona_and_context(
    persona_checkpoint, personachat_json, synthetic_data, tmp_path
):
    from persona_cli import parse_args_with_config

    output = tmp_path / "results.json"
    argv = ["--model_name_or_path", persona_checkpoint, "--dataset_path", personachat_json, "--max_turns", "3",
            "--max_new_tokens", "3", "--save_predictions", "--max_history", "1"]  # fmt: skip
    argv += ["--output_file", str(output)]
    persona_eval.main(*parse_args_with_config(persona_eval.make_parser(), argv))
    rows = json.loads(output.read_text())["predictions"]
    dialog = synthetic_data["valid"][0]
    expected = [(u["candidates"][-1], dialog["personality"], u["history"][-3:]) for u in dialog["utterances"]][:3]
    assert [(r["gold"], r["persona"], r["context"]) for r in rows] == expected
    assert all(isinstance(r["reply"], str) for r in rows) and len(rows) == 3
