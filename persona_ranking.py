"""Generate, then rank: the multiple-choice head scores sampled replies to one context, optionally less a contradiction
penalty from an NLI model (Welleck et al., 2019).

The candidates become model inputs through the training builder (`persona_data.candidate_rows`: speaker tokens or the
chat template, the head reading the last token or the end-of-turn token), so the head scores what it was trained
on; the model's double-heads forward encodes the context once with every candidate behind it
(`persona_encoding.encode_candidates`: packed or cache-broadcast).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from persona_collator import PersonaCollator
from persona_data import candidate_rows
from persona_errors import UsageError
from persona_formats import input_format_of
from persona_model import input_budget, multiple_choice_head_loaded

logger = logging.getLogger(__name__)

# Index of "contradiction" in an NLI scorer's (entailment, neutral, contradiction) probabilities.
CONTRADICTION = 2


def check_can_rank(model: PreTrainedModel) -> None:
    """A `UsageError` when `model`'s multiple-choice head was not loaded from its checkpoint: its scores would be a
    random ranking."""
    if not multiple_choice_head_loaded(model):
        raise UsageError(
            "--num_ranked > 1 ranks replies with the multiple-choice head, and this checkpoint has none (a plain "
            "causal LM: the head is untrained); use --num_ranked 1, or a checkpoint trained by persona-train."
        )


@torch.inference_mode()
def score_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    persona: Sequence[str],
    history: Sequence[str],
    replies: Sequence[str],
    *,
    max_history: int = 2,
    max_length: int | None = None,
) -> torch.Tensor:
    """Multiple-choice scores [len(replies)] (float32, on CPU) of replies to one context, in one forward."""
    rows = candidate_rows(
        tokenizer,
        list(persona),
        list(history),
        list(replies),
        max_history=max_history,
        max_length=input_budget(model, max_length),
        input_format=input_format_of(tokenizer),
    )
    batch = PersonaCollator(tokenizer.pad_token_id)([rows])  # [1, C, T]
    # No LM loss: the head alone. The rows' mc_labels route the forward through the candidate encodings.
    del batch["labels"]
    batch = {key: value.to(model.device) for key, value in batch.items()}
    return model(**batch).mc_logits[0].float().cpu()


def nli_penalised(scores: torch.Tensor, contradiction: torch.Tensor, penalty: float) -> torch.Tensor:
    """Welleck et al.'s re-scoring `s_i - penalty * (s_1 - s_N) * c_i`: s_1 and s_N the best and worst scores,
    c_i the candidate's highest contradiction probability over the persona sentences.

    >>> [round(s, 4) for s in nli_penalised(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 0.0, 0.1]), 1.0).tolist()]
    [2.0, 1.0, 1.8]
    """
    return scores - penalty * (scores.max() - scores.min()) * contradiction


def rank_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    persona: Sequence[str],
    history: Sequence[str],
    replies: Sequence[str],
    *,
    max_history: int = 2,
    max_length: int | None = None,
    nli_scorer=None,
    nli_penalty: float = 0.0,
) -> list[tuple[str, float]]:
    """`(reply, score)` of each distinct reply, best first (a tie keeps the earlier sample first).

    `nli_scorer`: any object with `probabilities(replies, persona) -> [R, P, 3]` (entailment, neutral,
    contradiction), e.g. `persona_nli.NLIScorer`; with `nli_penalty` > 0 and a persona, the scores are
    `nli_penalised`.
    """
    check_can_rank(model)
    distinct = list(dict.fromkeys(replies))  # a duplicate sample is scored once
    scores = score_replies(model, tokenizer, persona, history, distinct, max_history=max_history, max_length=max_length)
    if nli_scorer is not None and nli_penalty > 0 and persona:
        probabilities = torch.as_tensor(nli_scorer.probabilities(distinct, list(persona)), dtype=torch.float32)
        contradiction = probabilities[..., CONTRADICTION].amax(dim=1).cpu()  # [R]
        scores = nli_penalised(scores, contradiction, nli_penalty)
    order = sorted(range(len(distinct)), key=lambda i: -float(scores[i]))
    return [(distinct[i], float(scores[i])) for i in order]
