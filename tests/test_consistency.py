"""Persona consistency, repetition and word-level perplexity in persona-eval: worked examples by hand, a stub NLI whose
labels are known, the C-score against a text-classification pipeline on real dialogs, one process against two."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, stub_scorer
from transformers import GPT2DoubleHeadsModel, pipeline

from persona_assets import CONVAI2_METRIC_PATH
from persona_convai2 import evaluate_convai2, flatten_turns, reply_metrics
from persona_data import build_features, load_dialogs
from persona_metrics import (
    consistency_metrics,
    copies_persona,
    repetition_metrics,
    split_tokenize,
    word_perplexity,
)
from persona_nli import NLIScorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repetition_worked_example():
    replies = ["I like dogs. I like dogs a lot!", "you like dogs too", "i like dogs", "Yes, I like dogs!"]
    contexts = [["do you like dogs?"], ["so do you like dogs"], [], ["i like dogs"]]
    # Normalised words (the article "a" and punctuation go):
    #   [i like dogs i like dogs lot] [you like dogs too] [i like dogs] [yes i like dogs]
    # 3-grams: 5 (one twice), 2, 1, 2 = 10; in the context: 0, 1 ("you like dogs"), 0, 1 ("i like dogs") = 2.
    # Unigrams 18, distinct 7 (i like dogs lot you too yes); bigrams 14, distinct 7.
    # repeat_self: reply 3 is the first of dialog 1; reply 4 shares "i like dogs" with it; reply 2 shares nothing.
    metrics = repetition_metrics(replies, contexts, dialog_ids=[0, 0, 1, 1])
    assert metrics == pytest.approx(
        {
            "distinct_1": 7 / 18,
            "distinct_2": 7 / 14,
            "repeat_within": 1 / 4,
            "repeat_context": 2 / 10,
            "repeat_self": 1 / 4,
        }
    )
    assert set(repetition_metrics(replies, contexts, [0, 0, 1, 1], suffix="_gold")) == {f"{k}_gold" for k in metrics}


def test_word_level_perplexity_worked_example():
    assert split_tokenize("Hello, how are you? I'm FINE.") == [
        "hello",
        ",",
        "how",
        "are",
        "you",
        "?",
        "i'm",
        "fine",
        ".",
    ]
    assert split_tokenize("well...ok;no:yes!") == ["well", ".", ".", ".", "ok", ";", "no", ":", "yes", "!"]
    # NLL 9.0 over 9 words (the end token's NLL already left out): exp(1).
    assert word_perplexity(9.0, 9) == (1.0, pytest.approx(math.e))


def test_persona_copy_rule():
    persona = ["i have two dogs.", "my favorite color is blue."]
    assert copies_persona("My favorite color is blue!", persona)  # verbatim
    assert copies_persona("well, my favourite color is blue", persona)  # 4 of 5 words in order: 0.8
    assert not copies_persona("blue is my favorite color", persona)  # in order only "my favorite color" (3/5)
    assert not copies_persona("i have dogs", persona)  # 3 of 4 ("two" missing): 0.75
    assert not copies_persona("anything", [])


def test_consistency_worked_example():
    # C per reply: 1 + 0 - 1 = 0; -1 -1 = -2; 1 + 1 = 2; empty persona 0. Mean 0; contradictions in 2 of 4.
    labels = [[1, 0, -1], [-1, -1], [1, 1], []]
    assert consistency_metrics(labels, "_gold") == {
        "c_score_gold": 0.0,
        "contradiction_rate_gold": 0.5,
        "entailment_rate_gold": 0.5,
    }


def test_a_stub_nli_moves_c_score_by_the_expected_amount(synthetic_data):
    from persona_records import dialogs_to_dataset_dict

    dialogs = dialogs_to_dataset_dict(synthetic_data, "synthetic")["valid"]
    _, turns = flatten_turns(dialogs, 8)
    labels = ("entailment", "neutral", "contradiction")
    fixed = {label: stub_scorer(lambda reply, sentence, label=label: label) for label in labels}
    accelerator = SimpleNamespace(is_local_main_process=False, process_index=0, num_processes=1)
    mean_persona = sum(len(t["persona"]) for t in turns) / len(turns)
    expected = {"entailment": mean_persona, "neutral": 0.0, "contradiction": -mean_persona}
    replies = [t["gold"] for t in turns]
    for label, scorer in fixed.items():
        metrics, labels = reply_metrics(turns, replies, max_history=2, nli=scorer, accelerator=accelerator)
        assert metrics["c_score"] == pytest.approx(expected[label])
        assert metrics["contradiction_rate"] == (label == "contradiction")
        assert [len(row) for row in labels] == [len(t["persona"]) for t in turns]

    # A judge that reads the pair: one reply entailing one persona sentence moves the mean by +1/N, one reply
    # contradicting two sentences by -2/N, a reply ignoring the persona not at all.
    persona = ["i have a dog.", "i like tea.", "i live in paris."]

    def judge(reply, sentence):
        if "not" in reply and sentence.split()[-1].rstrip(".") in reply:
            return "contradiction"
        return "entailment" if sentence.rstrip(".") in reply else "neutral"

    scorer = stub_scorer(judge)
    base = ["hello there", "how are you", "nice weather", "see you"]
    n = len(base)
    turns = [{"persona": persona, "history": [], "dialog": 0} for _ in base]

    def c_score(replies):
        return reply_metrics(turns, replies, max_history=2, nli=scorer, accelerator=accelerator)[0]["c_score"]

    assert c_score(base) == 0
    assert c_score(["i have a dog", *base[1:]]) == pytest.approx(1 / n)
    assert c_score(["not tea, not paris", *base[1:]]) == pytest.approx(-2 / n)
    assert c_score(["i like pizza", *base[1:]]) == 0


def test_c_score_equals_a_pipeline_summed_by_hand_on_real_dialogs(shared_spc_csv, tiny_nli_checkpoints):
    path = tiny_nli_checkpoints["mnli-style"]
    dialogs = load_dialogs(shared_spc_csv)
    split = next(iter(dialogs))
    _, turns = flatten_turns(dialogs[split], 12)
    replies = [t["gold"] for t in turns]
    scorer = NLIScorer.from_pretrained(path, device="cpu", batch_size=7)
    accelerator = SimpleNamespace(is_local_main_process=False, process_index=0, num_processes=1)
    metrics, _ = reply_metrics(turns, replies, max_history=2, nli=scorer, accelerator=accelerator)

    classifier = pipeline("text-classification", model=path, device="cpu")
    c_values, contradicted, entailed = [], 0, 0
    for reply, turn in zip(replies, turns):
        top = [out["label"].lower() for out in classifier([{"text": reply, "text_pair": p} for p in turn["persona"]])]
        c_values.append(top.count("entailment") - top.count("contradiction"))
        contradicted += "contradiction" in top
        entailed += "entailment" in top
    assert metrics["c_score"] == pytest.approx(sum(c_values) / len(turns))
    assert metrics["contradiction_rate"] == pytest.approx(contradicted / len(turns))
    assert metrics["entailment_rate"] == pytest.approx(entailed / len(turns))


def test_evaluation_reports_word_perplexity_and_consistency(persona_checkpoint, synthetic_data):
    from persona_model import load_model_and_tokenizer
    from persona_records import dialogs_to_dataset_dict

    dialogs = dialogs_to_dataset_dict(synthetic_data, "synthetic")["valid"]
    model, tok = load_model_and_tokenizer(persona_checkpoint)
    scorer = stub_scorer(lambda reply, sentence: "entailment")
    metrics = evaluate_convai2(model, tok, dialogs, batch_size=4, max_turns=6, nli=scorer, return_predictions=True)

    # Independent: the library's double-heads model on each gold candidate, the end token's NLL left out.
    plain = GPT2DoubleHeadsModel.from_pretrained(persona_checkpoint).eval()
    features = build_features(dialogs, tok, num_candidates=None, max_history=2).select(range(6))
    _, turns = flatten_turns(dialogs, 6)
    nll_without_end = 0.0
    with torch.no_grad():
        for row in features:
            gold = row["mc_labels"]
            logits = plain(input_ids=torch.tensor([row["input_ids"][gold]]), token_type_ids=torch.tensor(
                [row["token_type_ids"][gold]])).logits[0]  # fmt: skip
            labels = torch.tensor(row["labels"][gold])
            positions = (labels[1:] != -100).nonzero().flatten()[:-1]  # the reply's tokens, not its end token
            nll = torch.nn.functional.cross_entropy(logits[positions], labels[1:][positions], reduction="sum")
            nll_without_end += nll.item()
    words = sum(len(split_tokenize(t["gold"])) for t in turns)
    assert metrics["gold_reply_words"] == words
    assert metrics["ppl_word"] == pytest.approx(math.exp(nll_without_end / words), rel=1e-4)
    mean_persona = sum(len(t["persona"]) for t in turns) / 6
    assert metrics["c_score"] == pytest.approx(mean_persona) and metrics["c_score_gold"] == pytest.approx(mean_persona)
    assert {"distinct_1", "repeat_self", "repeat_context_gold", "persona_copy_rate_gold"} <= set(metrics)
    first = metrics["predictions"][0]
    assert first["gold"] == turns[0]["gold"] and first["nli_labels"] == [1] * len(turns[0]["persona"])


def test_evaluate_module_consistency(tmp_path, monkeypatch, tiny_nli_checkpoints):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    metric = evaluate.load(CONVAI2_METRIC_PATH, "consistency", cache_dir=str(tmp_path / "cache"))
    replies = ["i have a dog", "not tea, not paris", "i like tea and i live in paris"]
    personas = [
        ["i have a dog.", "i like tea."],
        ["i like tea.", "i live in paris."],
        ["i like tea.", "i live in paris."],
    ]

    def judge(reply, sentence):
        if "not" in reply and sentence.split()[-1].rstrip(".") in reply:
            return "contradiction"
        return "entailment" if sentence.rstrip(".") in reply else "neutral"

    # C: 1 + 0, -1 - 1, 1 + 1 -> mean 1/3; one reply of three contradicts, two entail; the third copies "i like tea".
    result = metric.compute(predictions=replies, references=personas, nli_model=stub_scorer(judge))
    assert result == pytest.approx(
        {"c_score": 1 / 3, "contradiction_rate": 1 / 3, "entailment_rate": 2 / 3, "persona_copy_rate": 2 / 3}
    )
    path = tiny_nli_checkpoints["cross-encoder-style"]
    by_path = metric.compute(predictions=replies, references=personas, nli_model=path)
    by_pipeline = metric.compute(
        predictions=replies, references=personas, nli_model=pipeline("text-classification", model=path)
    )
    assert by_path == by_pipeline


@pytest.mark.slow
def test_console_script_with_nli_one_and_two_processes(
    tmp_path, persona_checkpoint, personachat_json, tiny_nli_checkpoints
):
    common = ["--model_name_or_path", persona_checkpoint, "--dataset_path", personachat_json, "--max_turns", "7"]
    common += ["--batch_size", "4", "--save_predictions", "--nli_model", tiny_nli_checkpoints["mnli-style"]]
    common += ["--nli_batch_size", "5"]
    one = run_cli("persona_eval.py", [*common, "--output_file", str(tmp_path / "one.json")])
    run_cli("persona_eval.py", [*common, "--output_file", str(tmp_path / "two.json")], nproc=2)
    results = json.loads((tmp_path / "one.json").read_text())
    results_two = json.loads((tmp_path / "two.json").read_text())
    assert "perplexity (word-level, ParlAI words)" in one.stdout and "c_score_gold" in one.stdout
    assert "ppl_word" in results["perplexity"] and results_two["num_processes"] == 2
    consistency = ("c_score", "contradiction_rate", "entailment_rate", "persona_copy_rate", "repeat_self")
    for key in consistency + tuple(f"{k}_gold" for k in consistency):
        assert results_two["metrics"][key] == results["metrics"][key], key
    assert results_two["predictions"] == results["predictions"] and len(results["predictions"]) == 7
    first = results["predictions"][0]
    assert set(first) == {"reply", "gold", "persona", "context", "nli_labels", "nli_labels_gold"}
    assert len(first["nli_labels"]) == len(first["persona"]) and set(first["nli_labels"]) <= {-1, 0, 1}


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_nli_command_runs(persona_checkpoint, personachat_json, tiny_nli_checkpoints, tmp_path, capsys):
    import shlex

    import persona_eval

    (line,) = [
        line
        for line in readme().splitlines()
        if line.startswith("persona-eval") and "--nli_model" in line and "--self_chat" not in line  # self-chat: its own
    ]
    swapped = line.replace("runs/my-run", persona_checkpoint).replace("data.json", personachat_json)
    argv = shlex.split(swapped.replace("path/to/nli-checkpoint", tiny_nli_checkpoints["deberta-style"]))[1:]
    assert persona_eval.cli([*argv, "--output_file", str(tmp_path / "out.json")]) == 0
    metrics = json.loads((tmp_path / "out.json").read_text())["metrics"]
    assert {"c_score", "c_score_gold", "persona_copy_rate", "ppl_word", "distinct_2_gold"} <= set(metrics)


def test_readme_consistency_snippet_runs(tiny_nli_checkpoints, tmp_path, monkeypatch):
    import re

    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme(), flags=re.S) if '"consistency"' in b]
    monkeypatch.chdir(tmp_path)  # the snippet finds the metric wherever it runs
    namespace = {}
    code = snippet.replace("path/to/nli-checkpoint", tiny_nli_checkpoints["deberta-style"])
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert set(namespace["scores"]) == {"c_score", "contradiction_rate", "entailment_rate", "persona_copy_rate"}
