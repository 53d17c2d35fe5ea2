"""Generate, then rank: the multiple-choice head scores sampled replies to one context, optionally less a contradiction
penalty from an NLI model (Welleck et al., 2019).

The candidates become model inputs through the training builder (`persona_data.candidate_rows`: speaker tokens or the
chat template, the head reading the last token or the end-of-turn token), so the head scores what it was trained
on. Two computations give those scores:

- `score_on_cache`, what generation uses: sampling already holds the key/value cache of the context and of every
  token it fed, so each candidate row continues the cache row of a sample that decoded to it, from the first token
  where the row and the sample part (usually just the end token), up to its multiple-choice token: one forward of a
  token or two per candidate, nothing encoded twice. Exact: the same tokens, token types and positions as the row.
- `score_replies`, the reference (and the fallback when a row's context is not the generation context, e.g. cut
  otherwise for a shorter reply): the rows' double-heads forward, the context encoded once with every candidate
  behind it (`persona_encoding.encode_candidates`: packed or cache-broadcast).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RankedReply:
    """One ranked candidate: its text, its score (the multiple-choice head's, less the NLI penalty when one is asked)
    and the token ids of the first sample that decoded to it (without its stop token)."""

    reply: str
    score: float
    ids: tuple[int, ...] = ()


def check_can_rank(model: PreTrainedModel) -> None:
    """A `UsageError` when `model`'s multiple-choice head was not loaded from its checkpoint: its scores would be a
    random ranking."""
    if not multiple_choice_head_loaded(model):
        raise UsageError(
            "--num_ranked > 1 ranks replies with the multiple-choice head, and this checkpoint has none (a plain "
            "causal LM: the head is untrained); use --num_ranked 1, or a checkpoint trained by persona-train."
        )


def reply_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    persona: Sequence[str],
    history: Sequence[str],
    replies: Sequence[str],
    *,
    max_history: int = 2,
    max_length: int | None = None,
) -> dict[str, list]:
    """The training builder's rows of replies to one context (`persona_data.candidate_rows`), what the head scores."""
    return candidate_rows(
        tokenizer,
        list(persona),
        list(history),
        list(replies),
        max_history=max_history,
        max_length=input_budget(model, max_length),
        input_format=input_format_of(tokenizer),
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
    rows: dict[str, list] | None = None,
) -> torch.Tensor:
    """Multiple-choice scores [len(replies)] (float32, on CPU) of replies to one context, in one forward of their
    rows (`rows`: those `reply_rows` gave, not built again)."""
    if rows is None:
        rows = reply_rows(model, tokenizer, persona, history, replies, max_history=max_history, max_length=max_length)
    batch = PersonaCollator(tokenizer.pad_token_id)([rows])  # [1, C, T]
    # No LM loss: the head alone. The rows' mc_labels route the forward through the candidate encodings.
    del batch["labels"]
    batch = {key: value.to(model.device) for key, value in batch.items()}
    return model(**batch).mc_logits[0].float().cpu()


@dataclass
class Continuation:
    """How one candidate row goes on from cache row `row`: it keeps that row's first `keep` generated positions and
    feeds `input_ids` (with `token_type_ids`) from position `position` on; the head reads the last of them."""

    row: int
    keep: int
    position: int
    input_ids: list[int]
    token_type_ids: list[int] | None


def continuation(
    rows: dict[str, list],
    candidate: int,
    row: int,
    context_ids: Sequence[int],
    context_types: Sequence[int] | None,
    fed_ids: Sequence[int],
) -> Continuation | None:
    """Candidate `candidate` of `rows` as a `Continuation` of cache row `row`, whose context is `context_ids` (real
    tokens, with their `context_types`) and whose generated tokens fed so far are `fed_ids` (every one with the
    context's last token type, as `generate()` gives them). None when the row does not start with that context."""
    ids = rows["input_ids"][candidate]
    types = rows["token_type_ids"][candidate] if context_types is not None else None
    start, end = len(context_ids), rows["mc_token_ids"][candidate] + 1
    if end <= start or ids[:start] != list(context_ids) or (types is not None and types[:start] != list(context_types)):
        return None
    suffix, suffix_types = ids[start:end], None if types is None else types[start:end]
    keep = 0  # the longest run of the row's reply tokens the sample already fed, the head's token left to feed
    while (
        keep < min(len(fed_ids), len(suffix) - 1)
        and suffix[keep] == fed_ids[keep]
        and (suffix_types is None or suffix_types[keep] == context_types[-1])
    ):
        keep += 1
    return Continuation(row, keep, start + keep, suffix[keep:], None if suffix_types is None else suffix_types[keep:])


@torch.inference_mode()
def score_on_cache(model: PreTrainedModel, cache, key_mask: torch.Tensor, width: int, continuations) -> torch.Tensor:
    """Multiple-choice scores [len(continuations)] (float32, on CPU) of candidate rows continuing a generation's cache.

    `cache`: the key/value cache `generate()` returned, [R] rows of `width` context positions (left-padded) then the
    generated ones; `key_mask` [R, cache length]: its attention mask (context padding 0). The cache is narrowed to the
    continued rows in place (it is not usable for generation afterwards). One forward: each continuation sees its
    row's context and kept tokens, then its own tokens at their positions; the head reads its last token.
    """
    device = key_mask.device
    rows = torch.tensor([c.row for c in continuations], device=device)
    if len(continuations) != key_mask.size(0) or rows.ne(torch.arange(len(rows), device=device)).any():
        cache.batch_select_indices(rows)
    keys = key_mask[rows].clone()  # [D, L]
    generated = torch.arange(keys.size(1) - width, device=device)
    kept = torch.tensor([c.keep for c in continuations], device=device)
    keys[:, width:] *= (generated[None] < kept[:, None]).to(keys.dtype)
    lengths = [len(c.input_ids) for c in continuations]
    span = max(lengths)

    def padded(values: list[int]) -> list[int]:  # on the right, with the last value (never read)
        return values + values[-1:] * (span - len(values))

    inputs = {
        "input_ids": torch.tensor([[padded(c.input_ids) for c in continuations]], device=device),  # [1, D, S]
        "attention_mask": torch.cat([keys, keys.new_ones(len(continuations), span)], dim=1)[None],  # [1, D, L + S]
        "position_ids": torch.tensor(
            [padded(list(range(c.position, c.position + n))) for c, n in zip(continuations, lengths)], device=device
        ),  # [D, S]  # fmt: skip
        "mc_token_ids": torch.tensor([[n - 1 for n in lengths]], device=device),  # [1, D]
    }
    if continuations[0].token_type_ids is not None:
        inputs["token_type_ids"] = torch.tensor([[padded(c.token_type_ids) for c in continuations]], device=device)
    return forward_without_vocabulary(model, inputs, cache)[0].float().cpu()


def forward_without_vocabulary(model: PreTrainedModel, inputs: dict, cache) -> torch.Tensor | None:
    """Run `inputs` on `cache` without projecting onto the vocabulary (no logit of them is read): with
    `logits_to_keep=1` where the model takes it (the generic backbone), else through its base transformer (GPT-2's
    double-heads forward would project every position), or the plain forward for a model with neither. Returns the
    multiple-choice scores when `inputs` holds `mc_token_ids`."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).mc_logits
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model: the adapted model
    backbone = getattr(inner, inner.base_model_prefix, None)
    if not (isinstance(backbone, torch.nn.Module) and "cache" in inspect.signature(backbone.forward).parameters):
        return model(**inputs, cache=cache, use_cache=True).mc_logits
    inputs = dict(inputs)
    mc_token_ids = inputs.pop("mc_token_ids", None)
    hidden = backbone(**inputs, cache=cache, use_cache=True).last_hidden_state  # GPT-2: token types included
    # As GPT2DoubleHeadsModel.forward reads them: the head on the hidden state at each mc_token_ids position.
    return None if mc_token_ids is None else inner.multiple_choice_head(hidden, mc_token_ids).squeeze(-1)


def nli_penalised(scores: torch.Tensor, contradiction: torch.Tensor, penalty: float) -> torch.Tensor:
    """Welleck et al.'s re-scoring `s_i - penalty * (s_1 - s_N) * c_i`: s_1 and s_N the best and worst scores,
    c_i the candidate's highest contradiction probability over the persona sentences.

    >>> [round(s, 4) for s in nli_penalised(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 0.0, 0.1]), 1.0).tolist()]
    [2.0, 1.0, 1.8]
    """
    return scores - penalty * (scores.max() - scores.min()) * contradiction


def best_first(
    replies: Sequence[str],
    scores: torch.Tensor,
    persona: Sequence[str],
    *,
    ids: Sequence[Sequence[int]] | None = None,
    nli_scorer=None,
    nli_penalty: float = 0.0,
) -> list[RankedReply]:
    """Distinct `replies` with their head `scores` (and `ids`) as `RankedReply`s, best first (a tie keeps the
    earlier first), less the NLI penalty (see `rank_replies`)."""
    if nli_scorer is not None and nli_penalty > 0 and persona:
        probabilities = torch.as_tensor(nli_scorer.probabilities(list(replies), list(persona)), dtype=torch.float32)
        contradiction = probabilities[..., CONTRADICTION].amax(dim=1).cpu()  # [R]
        scores = nli_penalised(scores, contradiction, nli_penalty)
    order = sorted(range(len(replies)), key=lambda i: -float(scores[i]))
    return [RankedReply(replies[i], float(scores[i]), tuple(ids[i]) if ids is not None else ()) for i in order]


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
    """`(reply, score)` of each distinct reply, best first (a tie keeps the earlier sample first), by the reference
    forward (`score_replies`).

    `nli_scorer`: any object with `probabilities(replies, persona) -> [R, P, 3]` (entailment, neutral,
    contradiction), e.g. `persona_nli.NLIScorer`; with `nli_penalty` > 0 and a persona, the scores are
    `nli_penalised`.
    """
    check_can_rank(model)
    distinct = list(dict.fromkeys(replies))  # a duplicate sample is scored once
    scores = score_replies(model, tokenizer, persona, history, distinct, max_history=max_history, max_length=max_length)
    ranked = best_first(distinct, scores, persona, nli_scorer=nli_scorer, nli_penalty=nli_penalty)
    return [(r.reply, r.score) for r in ranked]
