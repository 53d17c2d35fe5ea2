"""persona_nli: labels read by name whatever the checkpoint's order, C-scores against an independent pipeline
computation, bad checkpoints as one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import PretrainedConfig, pipeline

from persona_errors import NLIModelError
from persona_nli import NLI_LABELS, NLIScorer, nli_label_order


def test_label_order_is_read_by_name():
    def order(*labels):
        return nli_label_order(PretrainedConfig(id2label=dict(enumerate(labels))), "m")

    assert order("CONTRADICTION", "NEUTRAL", "ENTAILMENT") == [2, 1, 0]
    assert order("contradiction", "entailment", "neutral") == [1, 2, 0]
    assert order("Entail", "Neutral", "Contradict") == [0, 1, 2]
    assert order("neutral", "contradictory", "entails") == [2, 0, 1]


@pytest.mark.parametrize(
    "labels, expected",
    [
        (("LABEL_0", "LABEL_1", "LABEL_2"), "generic names"),
        (("entailment", "not_entailment"), "has 2 labels"),
        (("positive", "negative", "neutral"), "are not entailment/neutral/contradiction"),
        (("entailment", "entailment", "contradiction"), "are not entailment/neutral/contradiction"),
    ],
)
def test_unmappable_labels_are_one_line_naming_them(labels, expected):
    config = PretrainedConfig(id2label=dict(enumerate(labels)))
    with pytest.raises(NLIModelError, match=expected) as info:
        nli_label_order(config, "some/checkpoint")
    message = str(info.value)
    assert "\n" not in message and "some/checkpoint" in message and all(label in message for label in labels)


def test_permuted_label_orders_give_the_same_c_scores(tiny_nli_checkpoints, synthetic_data):
    dialog = synthetic_data["valid"][0]
    replies = [c for u in dialog["utterances"] for c in u["candidates"][-4:]]
    results = {}
    for name, path in tiny_nli_checkpoints.items():
        scorer = NLIScorer.from_pretrained(path, device="cpu")
        results[name] = (
            scorer.probabilities(replies, dialog["personality"]),
            scorer.c_scores(replies, dialog["personality"]),
        )
    probs, c_scores = results.pop("deberta-style")
    assert set(c_scores.tolist()) != {0} and len(set(c_scores.tolist())) > 2  # the replies are told apart
    for other_probs, other_c in results.values():
        torch.testing.assert_close(other_probs, probs, rtol=1e-5, atol=1e-6)
        assert other_c.tolist() == c_scores.tolist()


@pytest.mark.parametrize("pair_order", ["reply_first", "persona_first"])
def test_c_scores_equal_a_pipeline_summed_by_hand(tiny_nli_checkpoints, synthetic_data, pair_order):
    path = tiny_nli_checkpoints["mnli-style"]
    classifier = pipeline("text-classification", model=path, tokenizer=path, device="cpu")
    scorer = NLIScorer(classifier, pair_order=pair_order, batch_size=5)
    for dialog in synthetic_data["valid"][:3]:
        persona = dialog["personality"]
        replies = [u["candidates"][-1] for u in dialog["utterances"]]
        expected = []
        for reply in replies:
            pairs = [
                {"text": reply, "text_pair": p} if pair_order == "reply_first" else {"text": p, "text_pair": reply}
                for p in persona
            ]
            top = [out["label"].lower() for out in classifier(pairs)]
            expected.append(top.count("entailment") - top.count("contradiction"))
        assert scorer.c_scores(replies, persona).tolist() == expected


def test_a_pipeline_and_a_loaded_model_agree(tiny_nli_checkpoints):
    path = tiny_nli_checkpoints["cross-encoder-style"]
    scorer = NLIScorer.from_pretrained(path, device="cpu")
    via_pipeline = NLIScorer(pipeline("text-classification", model=path, device="cpu"))
    replies, persona = ["i have cats at home .", "i like red the most ."], ["i love to eat pizza.", "i have cats."]
    assert scorer.probabilities(replies, persona).shape == (2, 2, len(NLI_LABELS))
    torch.testing.assert_close(scorer.probabilities(replies, persona), via_pipeline.probabilities(replies, persona))


def test_long_pairs_are_truncated_to_the_window(tiny_nli_checkpoints, caplog):
    scorer = NLIScorer.from_pretrained(tiny_nli_checkpoints["deberta-style"], device="cpu")
    long_reply = "i have cats at home . " * 100
    with caplog.at_level("WARNING", logger="persona_nli"):
        labels = scorer.labels([long_reply, "i like red ."], ["i have cats."] * 2)
        scorer.labels([long_reply], ["i have cats."])
    assert labels.shape == (2, 2)
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1


def edit_config(path: str, **changes) -> str:
    config_file = os.path.join(path, "config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config.update(changes)
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path


def test_bad_checkpoints_are_one_line_naming_their_labels(tmp_path, tiny_nli_checkpoints, tiny_checkpoint):
    import shutil

    two = edit_config(
        shutil.copytree(tiny_nli_checkpoints["deberta-style"], tmp_path / "two"),
        id2label={"0": "entailment", "1": "not_entailment"},
        label2id={"entailment": 0, "not_entailment": 1},
    )
    generic = edit_config(
        shutil.copytree(tiny_nli_checkpoints["deberta-style"], tmp_path / "generic"),
        id2label={"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"},
        label2id={"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
    )
    for path, expected in ((two, "has 2 labels"), (generic, "generic names"), (tiny_checkpoint, "not a sequence")):
        with pytest.raises(NLIModelError, match=expected) as info:
            NLIScorer.from_pretrained(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_an_uncached_hub_id_offline_is_one_fast_line():
    import time

    from persona_errors import CheckpointError

    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="no-such-org/no-such-nli-model") as info:
        NLIScorer.from_pretrained("no-such-org/no-such-nli-model")
    assert time.perf_counter() - start < 5 and "\n" not in str(info.value)


def test_an_unreachable_hub_is_one_fast_line(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    from persona_errors import CheckpointError

    def no_network(self, *args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    with pytest.raises(CheckpointError, match=r"NLI model org/nli-model: the Hub \(\S+\) cannot be reached") as info:
        NLIScorer.from_pretrained("org/nli-model")
    assert "\n" not in str(info.value)


def test_persona_eval_with_a_bad_nli_checkpoint_is_one_line_before_the_model_loads(
    tmp_path, tiny_nli_checkpoints, tiny_checkpoint, personachat_json, capsys, monkeypatch
):
    import shutil

    from helpers import error_line

    import persona_eval
    import persona_model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the NLI checkpoint was checked")

    monkeypatch.setattr(persona_model, "load_model_and_tokenizer", refuse)
    bad = edit_config(
        shutil.copytree(tiny_nli_checkpoints["deberta-style"], tmp_path / "sentiment"),
        id2label={"0": "negative", "1": "neutral", "2": "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    argv = ["--model_name_or_path", tiny_checkpoint, "--dataset_path", personachat_json, "--nli_model", str(bad)]
    line = error_line(persona_eval.cli, argv, capsys)
    assert f"NLI model {bad}: labels ['negative', 'neutral', 'positive'] are not" in line
