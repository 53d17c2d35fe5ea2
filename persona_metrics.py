"""ConvAI2 metrics with ParlAI's definitions: F1 and its normalisation, gold rank, Hits@k, perplexities, persona
consistency (C-score), persona copying, repetition and diversity.

The one home of these rules: the Trainer's `compute_metrics`, `persona-eval` and the `evaluate` module
`metrics/convai2` all call these functions. Nothing here imports torch or the rest of the project; `gold_rank`
takes numpy arrays or torch tensors alike.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

HITS_KS = (1, 5, 10)

# The per-example statistics of one ranked turn, as `PersonaTrainer.prediction_step` returns them (columns): the
# gold's rank by the multiple-choice head, its reply's NLL sum and token count, the MC cross-entropy, the candidate
# count, the NLL of its end-of-reply token, and its rank by the LM: by each candidate's reply log-probability per reply
# token (mean, `lm_hits@k`, ParlAI's ranking) and by the summed log-probability (`lm_hits@1_sum`).
STAT_COLUMNS = (
    "gold_rank",
    "lm_nll",
    "lm_tokens",
    "mc_nll",
    "num_candidates",
    "lm_end_nll",
    "lm_gold_rank",
    "lm_gold_rank_sum",
)

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


def gold_rank(scores, gold, same_as_gold=None):
    """Candidates scored at least as high as the gold, per turn: 0 = the gold alone on top.

    A tie counts against the gold, as the reference's argmax with the gold last. scores: [N, C] (numpy or torch),
    gold: [N] candidate indices → [N], of the same library. `same_as_gold` ([N, C] bool, optional) marks candidates
    that are the gold's reply again (the same tokens): they tie with it whatever the float rounding of their scores
    (an encoding that computes two copies at different places of a row may round them apart).

    >>> gold_rank(np.array([[0.0, 2.0, 1.0], [3.0, 3.0, 1.0], [5.0, 1.0, 1.0]]), np.array([1, 0, 0])).tolist()
    [0, 1, 0]
    >>> same = np.array([[False, False, False], [False, False, False], [True, False, True]])
    >>> gold_rank(np.array([[0.0, 2.0, 1.0], [3.0, 3.0, 1.0], [5.0, 1.0, 4.9999]]), np.array([1, 0, 0]), same).tolist()
    [0, 1, 1]
    """
    gold_score = scores[list(range(len(gold))), gold]  # [N]
    at_least = scores >= gold_score[:, None]
    if same_as_gold is not None:
        at_least = at_least | same_as_gold
    return at_least.sum(1) - 1


def hits_at_k(ranks: Sequence[int], num_candidates: Sequence[int], ks: Sequence[int] = HITS_KS) -> dict[str, float]:
    """`hits@k` = fraction of turns whose gold rank is below k: hits@1 always, a larger k when it is smaller than
    every turn's candidate count (as large as the candidate count it would be 1 by construction, so it is left out).
    A turn with one candidate (the gold alone) has no choice to make: it is left out, and without a turn that has a
    choice there is no hits@k.

    >>> hits_at_k([0, 1, 6, 12], [20, 20, 20, 20])
    {'hits@1': 0.25, 'hits@5': 0.5, 'hits@10': 0.75}
    >>> hits_at_k([0, 1], [2, 2])
    {'hits@1': 0.5}
    >>> hits_at_k([0, 1, 0], [1, 2, 1])
    {'hits@1': 0.0}
    >>> hits_at_k([0, 0], [1, 1])
    {}
    """
    counts = np.asarray(num_candidates)
    ranks = np.asarray(ranks)[counts > 1]
    if ranks.size == 0:
        return {}
    fewest = int(np.min(counts[counts > 1]))
    return {f"hits@{k}": float((ranks < k).mean()) for k in ks if k == 1 or k < fewest}


def lm_hits_at_k(
    ranks: Sequence[int],
    ranks_sum: Sequence[int],
    num_candidates: Sequence[int],
    ks: Sequence[int] = HITS_KS,
) -> dict[str, float]:
    """`lm_hits@k`: `hits_at_k` of the gold's ranks by its reply's mean LM log-probability per token (the reply's
    tokens and end token; ParlAI's generator agents rank candidates so), and `lm_hits@1_sum`: hits@1 of the ranks by
    the summed log-probability, which favours short replies.

    >>> lm_hits_at_k([0, 1, 0], [0, 0, 0], [20, 20, 1], ks=(1, 5))
    {'lm_hits@1': 0.5, 'lm_hits@5': 1.0, 'lm_hits@1_sum': 1.0}
    """
    hits = {f"lm_{name}": value for name, value in hits_at_k(ranks, num_candidates, ks).items()}
    summed = hits_at_k(ranks_sum, num_candidates, (1,))
    return {**hits, **({"lm_hits@1_sum": summed["hits@1"]} if summed else {})}


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
    """Corpus metrics of per-turn statistics (rows of `STAT_COLUMNS`): hits (the multiple-choice head's), lm_hits
    (the LM's, `lm_hits_at_k`), lm_loss, ppl, mc_loss.

    With `ks=None` only `hits@1` and `lm_hits@1` (and `lm_hits@1_sum`), as the Trainer logs them; else
    `hits_at_k(ks)` for both.
    """
    columns = stat_columns(stats)
    ks = (1,) if ks is None else ks
    hits = hits_at_k(columns["gold_rank"], columns["num_candidates"], ks)
    hits.update(lm_hits_at_k(columns["lm_gold_rank"], columns["lm_gold_rank_sum"], columns["num_candidates"], ks))
    lm_loss, ppl = corpus_perplexity(columns["lm_nll"].sum(), columns["lm_tokens"].sum())
    return {**hits, "lm_loss": lm_loss, "ppl": ppl, "mc_loss": float(columns["mc_nll"].mean())}


def stat_columns(stats) -> dict[str, np.ndarray]:
    """Per-turn statistics ([N, len(STAT_COLUMNS)]) as one array per `STAT_COLUMNS` name."""
    return dict(zip(STAT_COLUMNS, np.asarray(stats, dtype=np.float64).reshape(-1, len(STAT_COLUMNS)).T))


def compute_metrics(eval_pred) -> dict[str, float]:
    """The Trainer's `compute_metrics`: `ranking_metrics` of what `PersonaTrainer.prediction_step` returned."""
    return ranking_metrics(eval_pred.predictions)


def split_tokenize(text: str) -> list[str]:
    """ParlAI's `split_tokenize` words (the ConvAI2 word-level perplexity's unit): lower case, spaces around
    . , ; : ! ?, split on whitespace.

    >>> split_tokenize("Hi, I'm Bob... you?")
    ['hi', ',', "i'm", 'bob', '.', '.', '.', 'you', '?']
    """
    for mark in ".,;:!?":
        text = text.replace(mark, f" {mark} ")
    return text.lower().split()


def word_perplexity(nll_without_end: float, words: int) -> tuple[float, float]:
    """`(lm_loss_word, ppl_word)`: the gold replies' NLL (end-of-reply token excluded) per `split_tokenize` word.

    >>> word_perplexity(6.0, 2)
    (3.0, 20.085536923187668)
    """
    return corpus_perplexity(nll_without_end, words)


# Label scores of the C-score, in persona_nli.NLI_LABELS order (entailment, neutral, contradiction).
# The two orders of an NLI pair: PAML's `[CLS] reply [SEP] persona [SEP]`, or the persona first.
PAIR_ORDERS = ("reply_first", "persona_first")
NLI_SCORES = (1, 0, -1)


def reply_c_score(labels: Sequence[int]) -> int:
    """C of one reply: the sum over its persona's sentences of +1 entailment, 0 neutral, -1 contradiction (0 for an
    empty persona).

    >>> reply_c_score([1, 0, -1, 1])
    1
    """
    return int(sum(labels))


def consistency_metrics(labels: Sequence[Sequence[int]], suffix: str = "") -> dict[str, float]:
    """`c_score` (mean C over replies), `contradiction_rate` / `entailment_rate` (share of replies with at least one
    contradicted / entailed persona sentence) of per-reply NLI labels (+1/0/-1 per persona sentence), names + suffix.

    >>> consistency_metrics([[1, 0, 0], [0, -1, 1], []])
    {'c_score': 0.3333333333333333, 'contradiction_rate': 0.3333333333333333, 'entailment_rate': 0.6666666666666666}
    """
    if not labels:
        return {}
    return {
        f"c_score{suffix}": float(np.mean([reply_c_score(row) for row in labels])),
        f"contradiction_rate{suffix}": float(np.mean([-1 in row for row in labels])),
        f"entailment_rate{suffix}": float(np.mean([1 in row for row in labels])),
    }


# A reply copies a persona sentence when this share of the sentence's normalised words appear in it, in order.
PERSONA_COPY_THRESHOLD = 0.8


def copies_persona(reply: str, persona: Sequence[str], threshold: float = PERSONA_COPY_THRESHOLD) -> bool:
    """Whether `reply` repeats a persona sentence nearly verbatim: the longest in-order matching (difflib) of the
    sentence's `normalize_answer` words within the reply's covers at least `threshold` of the sentence's words.

    >>> copies_persona("yes! i have two dogs at home.", ["i have dogs at home.", "i like pizza."])
    True
    >>> copies_persona("dogs are great, i have some", ["i have dogs at home."])
    False
    """
    reply_words = normalize_answer(reply).split()
    for sentence in persona:
        words = normalize_answer(sentence).split()
        if not words:
            continue
        blocks = difflib.SequenceMatcher(None, words, reply_words, autojunk=False).get_matching_blocks()
        if sum(block.size for block in blocks) >= threshold * len(words):
            return True
    return False


def persona_copy_rate(replies: Sequence[str], personas: Sequence[Sequence[str]]) -> float:
    """Share of replies that `copies_persona` of their own persona."""
    return float(np.mean([copies_persona(r, p) for r, p in zip(replies, personas)])) if replies else 0.0


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repetition_metrics(
    replies: Sequence[str],
    contexts: Sequence[Sequence[str]],
    dialog_ids: Sequence[int],
    n: int = 3,
    suffix: str = "",
) -> dict[str, float]:
    """Diversity and repetition of replies in turn order, words by `normalize_answer` (names + suffix):

    - `distinct_1`, `distinct_2`: distinct uni-/bigrams over all replies / all uni-/bigrams;
    - `repeat_within`: share of replies holding one of their own n-grams twice;
    - `repeat_context`: share of all reply n-grams that occur in the turns the bot saw (`contexts`, per reply);
    - `repeat_self`: share of replies sharing an n-gram with an earlier reply of the same series in the same dialog
      (`dialog_ids`, per reply; replies of a dialog are consecutive and in order).
    """
    words = [normalize_answer(reply).split() for reply in replies]
    out = {}
    for k in (1, 2):
        grams = [g for w in words for g in ngrams(w, k)]
        out[f"distinct_{k}{suffix}"] = len(set(grams)) / len(grams) if grams else 0.0
    within = context_hits = reply_grams = self_hits = 0
    seen_in_dialog: set = set()
    for i, (w, context) in enumerate(zip(words, contexts)):
        grams = ngrams(w, n)
        within += len(set(grams)) < len(grams)
        context_grams = {g for turn in context for g in ngrams(normalize_answer(turn).split(), n)}
        context_hits += sum(g in context_grams for g in grams)
        reply_grams += len(grams)
        if i == 0 or dialog_ids[i] != dialog_ids[i - 1]:
            seen_in_dialog = set()
        self_hits += bool(seen_in_dialog.intersection(grams))
        seen_in_dialog.update(grams)
    total = max(len(replies), 1)
    out[f"repeat_within{suffix}"] = within / total
    out[f"repeat_context{suffix}"] = context_hits / reply_grams if reply_grams else 0.0
    out[f"repeat_self{suffix}"] = self_hits / total
    return out
