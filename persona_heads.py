"""The two heads on candidate hidden states: LM loss on the labelled tokens only (the gold's reply, or every
candidate's: `candidate_labels`), multiple-choice scores and loss.

Every double-heads model of the project (GPT/GPT-2 and the generic causal-LM backbone, full or shared-prefix encoding)
ends in `apply_heads`, so the losses and per-example statistics are computed in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class DoubleHeadsOutput(ModelOutput):
    """Losses and per-example statistics of one double-heads forward.

    `lm_loss`/`mc_loss` are batch means (what `GPT2DoubleHeadsModel` returns as `loss`/`mc_loss`); the per-example
    sums let callers normalise over a larger batch (gradient accumulation, several processes, a whole eval set).
    """

    loss: torch.Tensor | None = None  # = lm_loss, as GPT2DoubleHeadsModel
    lm_loss: torch.Tensor | None = None
    mc_loss: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None  # [B, C]
    lm_nll: torch.Tensor | None = None  # [B] summed NLL of each example's labelled tokens
    lm_tokens: torch.Tensor | None = None  # [B] labelled tokens per example
    mc_nll: torch.Tensor | None = None  # [B] multiple-choice cross-entropy per example
    lm_end_nll: torch.Tensor | None = None  # [B] NLL of each labelled run's last token (the end of the reply)
    # [B, C] the same NLL sums and token counts per candidate: sequence log-probabilities when every candidate's
    # reply is labelled (preference training, persona_dpo)
    lm_candidate_nll: torch.Tensor | None = None
    lm_candidate_tokens: torch.Tensor | None = None
    lm_candidate_end_nll: torch.Tensor | None = None


class PersonaMultipleChoiceHead(nn.Module):
    """Score of one candidate from the hidden state at its `mc_token_ids` position (GPT-2's cls_index summary)."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.first_dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, mc_token_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, C, T, H], mc_token_ids [B, C] -> scores [B, C]."""
        index = mc_token_ids[..., None, None].expand(*mc_token_ids.shape, 1, hidden.size(-1))
        picked = hidden.gather(-2, index).squeeze(-2)  # [B, C, H]
        return self.summary(self.first_dropout(picked).to(self.summary.weight.dtype)).squeeze(-1)


def candidate_labels(input_ids: torch.Tensor, labels: torch.Tensor, mc_token_ids: torch.Tensor) -> torch.Tensor:
    """LM labels [B, C, T] on every candidate's reply: the tokens the gold's labels cover, for each candidate.

    Rows label only the gold reply (its tokens and eos, or its end-of-turn token in chat-template rows), from the
    first reply position, the same for every candidate (they share the context), to the candidate's multiple-choice
    token (its last labelled token). So candidate c's labels are its own tokens from that position to
    `mc_token_ids[c]`; the gold's stay as they are. Preference training and the ranking evaluation's LM scores
    (each candidate's reply log-probability) both read them.

    >>> ids = torch.tensor([[[1, 4, 3, 7, 2, 0], [1, 4, 3, 8, 9, 2]]])
    >>> labels = torch.tensor([[[-100] * 6, [-100, -100, -100, 8, 9, 2]]])
    >>> candidate_labels(ids, labels, torch.tensor([[4, 5]])).tolist()
    [[[-100, -100, -100, 7, 2, -100], [-100, -100, -100, 8, 9, 2]]]
    """
    seq_len = input_ids.size(-1)
    positions = torch.arange(seq_len, device=input_ids.device)
    start = torch.where(labels.ne(-100), positions, seq_len).amin(dim=(1, 2))  # [B]; T when nothing is labelled
    reply = (positions >= start[:, None, None]) & (positions <= mc_token_ids[..., None])  # [B, C, T]
    return input_ids.masked_fill(~reply, -100)


# Largest vocabulary-logits tensor (elements) one LM-head call makes without gradients: every candidate's reply
# labelled (evaluation) would otherwise make [20 · B · reply length, V] logits at once.
LM_HEAD_CHUNK_ELEMENTS = 2**26


def labelled_lm_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, ...]:
    """Per-example summed NLL, token count and NLL of the end-of-reply token (the last of each labelled run; the
    word-level perplexity leaves it out), running the LM head only where a next token is labelled.

    hidden: [N, T, H], labels: [N, T] (same positions; shifted here, like the library's causal LM loss).
    Only the gold candidate's reply carries labels, so this skips the vocabulary projection of every distractor
    and every context position: ~95% of the LM-head FLOPs and the [B, C, T, V] logits tensor.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels.ne(-100)  # [N, T-1]
    rows, cols = mask.nonzero(as_tuple=True)
    picked, targets = hidden[rows, cols], shift_labels[rows, cols]  # [K, H], [K]: K = labelled tokens in the batch
    vocab = getattr(lm_head, "out_features", None) or 1
    chunk = max(1, LM_HEAD_CHUNK_ELEMENTS // vocab)
    if torch.is_grad_enabled() or len(targets) <= chunk:
        nll = F.cross_entropy(lm_head(picked).float(), targets, reduction="none")  # [K]
    else:  # no gradient: the logits of one chunk at a time
        parts = [
            F.cross_entropy(lm_head(h).float(), t, reduction="none")
            for h, t in zip(picked.split(chunk), targets.split(chunk))
        ]
        nll = torch.cat(parts) if parts else picked.new_zeros(0, dtype=torch.float32)
    per_row = torch.zeros(labels.size(0), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    run_end = mask & ~F.pad(mask[:, 1:], (0, 1), value=False)  # [N, T-1]: labelled, the next position not
    end_nll = torch.zeros_like(per_row).index_add(0, rows, nll * run_end[rows, cols])
    return per_row, mask.sum(dim=1), end_nll


def apply_heads(
    hidden: torch.Tensor,
    mc_head,
    lm_head,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mc_labels: torch.Tensor | None = None,
) -> DoubleHeadsOutput:
    """Apply the two heads to candidate hidden states: losses and per-example sums in a `DoubleHeadsOutput`.

    hidden: [B, C, S, H]; mc_token_ids [B, C] and labels [B, C, S] index the same S positions (the full sequences,
    or the candidate frame of the shared-prefix encoding). `mc_head(hidden, mc_token_ids)` returns scores [B, C]
    (a trailing singleton dimension is dropped); `lm_head` maps hidden states to vocabulary logits.
    """
    batch_size, num_candidates = hidden.shape[:2]
    out = DoubleHeadsOutput()
    if mc_token_ids is not None:
        mc_logits = mc_head(hidden, mc_token_ids)
        out.mc_logits = mc_logits.squeeze(-1) if mc_logits.dim() == 3 else mc_logits  # [B, C]
        if mc_labels is not None:
            out.mc_nll = F.cross_entropy(out.mc_logits.float(), mc_labels, reduction="none")  # [B]
            out.mc_loss = out.mc_nll.mean()
    if labels is not None:
        nll, tokens, end_nll = labelled_lm_nll(hidden.flatten(0, 1), labels.flatten(0, 1), lm_head)
        out.lm_candidate_nll = nll.view(batch_size, num_candidates)
        out.lm_candidate_tokens = tokens.view(batch_size, num_candidates)
        out.lm_nll = out.lm_candidate_nll.sum(1)
        out.lm_candidate_end_nll = end_nll.view(batch_size, num_candidates)
        out.lm_end_nll = out.lm_candidate_end_nll.sum(1)
        out.lm_tokens = out.lm_candidate_tokens.sum(1)
        # NaN when nothing is labelled, as CrossEntropyLoss(reduction="mean") gives.
        out.lm_loss = out.lm_nll.sum() / out.lm_tokens.sum()
    out.loss = out.lm_loss
    return out
