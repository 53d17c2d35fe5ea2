"""ConvAI2 F1 and Hits@k as an `evaluate` metric; the definitions live in persona_metrics (one implementation).

    import evaluate
    f1 = evaluate.load("metrics/convai2")  # config "f1" (default)
    f1.compute(predictions=["i love the dogs!"], references=["i love cats"])  # {'f1': 0.666...}
    hits = evaluate.load("metrics/convai2", "hits")
    hits.compute(predictions=[[0.1, 2.0, 0.3]], references=[1], ks=[1, 2])  # {'hits@1': 1.0, 'hits@2': 1.0}

Loads offline from this folder (HF_HUB_OFFLINE=1); needs the persona-chat project importable (`pip install -e .`).
"""

import datasets
import evaluate
import numpy as np

import persona_metrics

_DESCRIPTION = """ConvAI2 metrics with ParlAI's definitions. "f1": unigram F1 of each prediction against its reference
after ParlAI's normalisation (lowercase; punctuation and the articles a/an/the become spaces; whitespace collapsed),
averaged over pairs. "hits@k": fraction of turns where fewer than k other candidates score at least as high as the
reference (the gold candidate's index), for each k smaller than the candidate count; a tie counts against the gold,
as the reference's argmax with the gold last."""

_KWARGS_DESCRIPTION = """
Args (config "f1"):
    predictions (list of str): generated replies.
    references (list of str): gold replies.
Args (config "hits"):
    predictions (list of list of float): one score per candidate, per turn (e.g. mc_logits).
    references (list of int): index of the gold candidate of each turn.
    ks (list of int, optional): cut-offs, default [1, 5, 10]; those >= the candidate count are left out.
Returns:
    {"f1": float} or {"hits@k": float, ...}
"""

_CITATION = """@article{dinan2019second, title={The Second Conversational Intelligence Challenge (ConvAI2)},
author={Dinan, Emily and others}, journal={arXiv preprint arXiv:1902.00098}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConvAI2(evaluate.Metric):
    def _info(self):
        if self.config_name == "hits":
            features = {
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Value("int64"),
            }
        elif self.config_name in ("default", "f1"):
            features = {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        else:
            raise ValueError(f"Unknown convai2 config {self.config_name!r}: use 'f1' or 'hits'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(self, predictions, references, ks=persona_metrics.HITS_KS):
        if self.config_name == "hits":
            num_candidates = [len(scores) for scores in predictions]
            ranks = [
                int(persona_metrics.gold_rank(np.asarray([scores], dtype=np.float32), np.asarray([gold]))[0])
                for scores, gold in zip(predictions, references)
            ]
            return persona_metrics.hits_at_k(ranks, num_candidates, ks)
        return {"f1": persona_metrics.mean_f1(predictions, references)}
