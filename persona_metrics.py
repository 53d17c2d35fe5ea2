"""ConvAI2 metrics with ParlAI's definitions: F1 and its normalisation, gold rank, Hits@k, corpus perplexity.

The one home of these rules: the Trainer's `compute_metrics`, `persona-eval` and the `evaluate` module
`metrics/convai2` all call these functions. Nothing here imports torch or the rest of the project; `gold_rank`
takes numpy arrays or torch tensors alike.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

HITS_KS = (1, 5, 10)

# The per-example statistics of one ranked turn, as `PersonaTrainer.prediction_step` returns them (columns).
STAT_COLUMNS = ("gold_rank", "lm_nll", "lm_tokens", "mc_nll", "num_candidates")

# ParlAI's `normalize_answer`: punctuation (string.punctuation, the apostrophe included) and articles become spaces.
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, replace punctuation and the articles a/an/the with spaces, collapse whitespace (ParlAI).

    >>> normalize_answer("The cat's  hat, (an) A-ha!")
    'cat s hat ha'
    """
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """The ConvAI2 F1 of one pair: unigram overlap (multiset) of the normalised strings; 0 when nothing is shared.

    >>> round(f1_score("I love the dogs!", "i love cats"), 4)
    0.6667
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def mean_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Average `f1_score` over pairs (0.0 for none)."""
    scores = [f1_score(p, g) for p, g in zip(predictions, golds)]
    return float(np.mean(scores)) if scores else 0.0


def gold_rank(scores, gold):
    """Candidates scored at least as high as the gold, per turn: 0 = the gold alone on top.

    A tie counts against the gold, as the reference's argmax with the gold last. scores: [N, C] (numpy or torch),
    gold: [N] candidate indices → [N], of the same library.

    >>> gold_rank(np.array([[0.0, 2.0, 1.0], [3.0, 3.0, 1.0], [5.0, 1.0, 1.0]]), np.array([1, 0, 0])).tolist()
    [0, 1, 0]
    """
    gold_score = scores[list(range(len(gold))), gold]  # [N]
    return (scores >= gold_score[:, None]).sum(1) - 1


def hits_at_k(ranks: Sequence[int], num_candidates: Sequence[int], ks: Sequence[int] = HITS_KS) -> dict[str, float]:
    """`hits@k` = fraction of turns whose gold rank is below k: hits@1 always, a larger k when it is smaller than
    every turn's candidate count (as large as the candidate count it would be 1 by construction, so it is left out).

    >>> hits_at_k([0, 1, 6, 12], [20, 20, 20, 20])
    {'hits@1': 0.25, 'hits@5': 0.5, 'hits@10': 0.75}
    >>> hits_at_k([0, 1], [2, 2])
    {'hits@1': 0.5}
    >>> hits_at_k([0, 0], [1, 1])
    {'hits@1': 1.0}
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {}
    fewest = int(np.min(num_candidates))
    return {f"hits@{k}": float((ranks < k).mean()) for k in ks if k == 1 or k < fewest}


def corpus_perplexity(nll_sum: float, tokens: float) -> tuple[float, float]:
    """`(lm_loss, ppl)`: the mean NLL per gold-reply token over the whole corpus and its exp (token-level).

    >>> corpus_perplexity(6.0, 3)
    (2.0, 7.38905609893065)
    >>> corpus_perplexity(0.0, 0)
    (nan, nan)
    """
    if not tokens:
        return float("nan"), float("nan")
    lm_loss = float(nll_sum / tokens)
    return lm_loss, math.exp(lm_loss)


def ranking_metrics(stats, ks: Sequence[int] | None = None) -> dict[str, float]:
    """Corpus metrics of per-turn statistics (rows of `STAT_COLUMNS`): hits, lm_loss, ppl, mc_loss.

    With `ks=None` only `hits@1`, as the Trainer logs it; else `hits_at_k(ks)`.
    """
    columns = dict(zip(STAT_COLUMNS, np.asarray(stats, dtype=np.float64).reshape(-1, len(STAT_COLUMNS)).T))
    hits = hits_at_k(columns["gold_rank"], columns["num_candidates"], (1,) if ks is None else ks)
    lm_loss, ppl = corpus_perplexity(columns["lm_nll"].sum(), columns["lm_tokens"].sum())
    return {**hits, "lm_loss": lm_loss, "ppl": ppl, "mc_loss": float(columns["mc_nll"].mean())}


def compute_metrics(eval_pred) -> dict[str, float]:
    """The Trainer's `compute_metrics`: `ranking_metrics` of what `PersonaTrainer.prediction_step` returned."""
    return ranking_metrics(eval_pred.predictions)
