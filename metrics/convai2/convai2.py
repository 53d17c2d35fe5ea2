"""ConvAI2 F1, Hits@k and persona consistency (NLI C-score) as an `evaluate` metric; the definitions live in
persona_metrics and persona_nli (one implementation).

    import evaluate
    f1 = evaluate.load("metrics/convai2")  # in a checkout; config "f1" (default)
    f1.compute(predictions=["i love the dogs!"], references=["i love cats"])  # {'f1': 0.666...}
    hits = evaluate.load("metrics/convai2", "hits")
    hits.compute(predictions=[[0.1, 2.0, 0.3]], references=[1], ks=[1, 2])  # {'hits@1': 1.0, 'hits@2': 1.0}
    consistency = evaluate.load("metrics/convai2", "consistency")
    consistency.compute(predictions=["i have two dogs ."], references=[["i have dogs.", "i like tea."]],
                        nli_model="path/to/nli-checkpoint")  # {'c_score': ..., 'contradiction_rate': ..., ...}

Loads offline from this folder (HF_HUB_OFFLINE=1) and needs persona-chat importable: a checkout, or an install, which
ships this folder (`evaluate.load(persona_eval.CONVAI2_METRIC_PATH)` finds it in both).
"""

import datasets
import evaluate
import numpy as np

import persona_metrics
import persona_nli

_DESCRIPTION = """ConvAI2 metrics with ParlAI's definitions. "f1": unigram F1 of each prediction against its reference
after ParlAI's normalisation (lowercase; punctuation and the articles a/an/the become spaces; whitespace collapsed),
averaged over pairs. "hits@k": fraction of turns where fewer than k other candidates score at least as high as the
reference (the gold candidate's index), for each k smaller than the candidate count; a tie counts against the gold, as
the reference's argmax with the gold last. The scores may be the multiple-choice head's or the LM's (persona-eval's
lm_hits@k ranks by the reply's log-probability per token): one rule for both. "consistency": the C-score of Madotto et
al. (2019): an NLI model judges each reply against each sentence of its persona (+1 entailment, 0 neutral, -1
contradiction, argmax label read by name from the checkpoint's id2label), summed per reply and averaged;
contradiction_rate / entailment_rate are the shares of replies with at least one such sentence; persona_copy_rate the
share that repeat a persona sentence nearly verbatim (80% of its normalised words, in order)."""

_KWARGS_DESCRIPTION = """
Args (config "f1"):
    predictions (list of str): generated replies.
    references (list of str): gold replies.
Args (config "hits"):
    predictions (list of list of float): one score per candidate, per turn: mc_logits (persona-eval's hits@k), or
        each candidate's LM log-probability of the reply per token (its lm_hits@k; summed: lm_hits@1_sum).
    references (list of int): index of the gold candidate of each turn.
    ks (list of int, optional): cut-offs, default [1, 5, 10]; those >= the candidate count are left out.
Args (config "consistency"):
    predictions (list of str): replies.
    references (list of list of str): the persona sentences of each reply.
    nli_model: an NLI checkpoint (local folder or Hub id), a loaded sequence classifier (with nli_tokenizer), a
        transformers text-classification pipeline, or a persona_nli.NLIScorer.
    nli_tokenizer (optional): the tokenizer of a loaded nli_model.
    pair_order (str, optional): "reply_first" (default, PAML's) or "persona_first".
Returns:
    {"f1": float}, {"hits@k": float, ...} or {"c_score", "contradiction_rate", "entailment_rate",
    "persona_copy_rate": float}
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
        elif self.config_name == "consistency":
            features = {
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }
        elif self.config_name in ("default", "f1"):
            features = {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        else:
            raise ValueError(f"Unknown convai2 config {self.config_name!r}: use 'f1', 'hits' or 'consistency'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(
        self,
        predictions,
        references,
        ks=persona_metrics.HITS_KS,
        nli_model=None,
        nli_tokenizer=None,
        pair_order="reply_first",
        batch_size=64,
    ):
        if self.config_name == "consistency":
            return consistency(predictions, references, nli_model, nli_tokenizer, pair_order, batch_size)
        if self.config_name == "hits":
            num_candidates = [len(scores) for scores in predictions]
            ranks = [
                int(persona_metrics.gold_rank(np.asarray([scores], dtype=np.float32), np.asarray([gold]))[0])
                for scores, gold in zip(predictions, references)
            ]
            return persona_metrics.hits_at_k(ranks, num_candidates, ks)
        return {"f1": persona_metrics.mean_f1(predictions, references)}


def consistency(replies, personas, nli_model, nli_tokenizer, pair_order, batch_size) -> dict:
    if nli_model is None:
        raise ValueError("convai2 'consistency' needs nli_model: an NLI checkpoint, model, pipeline or NLIScorer.")
    scorer = nli_model
    if isinstance(nli_model, str):
        scorer = persona_nli.NLIScorer.from_pretrained(nli_model, pair_order=pair_order, batch_size=batch_size)
    elif not isinstance(nli_model, persona_nli.NLIScorer):
        scorer = persona_nli.NLIScorer(nli_model, nli_tokenizer, pair_order=pair_order, batch_size=batch_size)
    labels = scorer.turn_labels(replies, personas)
    return {
        **persona_metrics.consistency_metrics(labels),
        "persona_copy_rate": persona_metrics.persona_copy_rate(replies, personas),
    }
