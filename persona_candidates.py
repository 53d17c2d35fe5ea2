"""What every encoding of [B, C, T] candidates gives (`CandidateEncoding`), and the plain encoding: every candidate in
full, the reference computation.

The shared-prefix (`persona_shared_prefix`) and packed (`persona_packed`) encodings give the same `CandidateEncoding`
from one encoding of each context and use the candidate frame built here; which of the three runs is
`persona_encoding.encode_candidates`'s choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persona_heads import DoubleHeadsOutput, apply_heads


def activation_checkpointed(backbone: torch.nn.Module) -> bool:
    """Whether any block of `backbone` is checkpointed (recomputed in the backward pass)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules())


def sequence_lengths(shape: torch.Size, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Real length [B, C] of each right-padded candidate of a [B, C, T] batch (T everywhere without a mask)."""
    if attention_mask is None:
        return torch.full(tuple(shape[:2]), shape[2], device=device, dtype=torch.long)
    return attention_mask.sum(dim=-1)  # right padding: the real tokens are the first ones


def candidate_frame(
    prefix_lengths: torch.Tensor, seq_lengths: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`index` and `valid` [B, C, S] of the candidate frame (see `CandidateEncoding`): frame position j of candidate
    (b, c) is full-sequence position `prefix_lengths[b] + j` (clamped to `seq_len - 1`), real when below its length.
    S is the longest candidate segment."""
    span = max(int((seq_lengths - prefix_lengths[:, None]).max()), 0) if seq_lengths.numel() else 0
    index = prefix_lengths[:, None, None] + torch.arange(span, device=seq_lengths.device)  # [B, 1, S]
    valid = index < seq_lengths[..., None]  # [B, C, S]
    return index.expand(*seq_lengths.shape, span).clamp(max=seq_len - 1), valid


@dataclass
class CandidateEncoding:
    """The backbone's last hidden states of [B, C, T] candidates, in full or in the shared-prefix candidate frame.

    In full (`prefix_lengths` None), `hidden` is [B, C, T, H]. In the candidate frame, `hidden` [B, C, S, H] holds
    positions `prefix_lengths[b] + j` (j < S); `index` [B, C, S] maps each frame position back to the full-sequence
    position (clamped) and `valid` [B, C, S] marks real tokens.
    """

    hidden: torch.Tensor
    prefix_lengths: torch.Tensor | None = None  # [B]
    index: torch.Tensor | None = None  # [B, C, S]
    valid: torch.Tensor | None = None  # [B, C, S]

    def gather(self, tensor: torch.Tensor, fill: int) -> torch.Tensor:
        """A [B, C, T] tensor in the candidate frame [B, C, S], `fill` on padding."""
        if self.prefix_lengths is None:
            return tensor
        return tensor.gather(2, self.index).masked_fill(~self.valid, fill)

    def shift(self, positions: torch.Tensor) -> torch.Tensor:
        """Full-sequence positions [B, C] (e.g. `mc_token_ids`) as candidate-frame positions."""
        return positions if self.prefix_lengths is None else positions - self.prefix_lengths[:, None]

    def apply_heads(self, mc_head, lm_head, mc_token_ids=None, labels=None, mc_labels=None) -> DoubleHeadsOutput:
        """`persona_heads.apply_heads` from full-sequence `mc_token_ids` [B, C] and `labels` [B, C, T].

        Every labelled pair (t, t+1) and multiple-choice token has t >= the prefix length (`shared_prefix_lengths`),
        so nothing the heads read lies in the shared prefix.
        """
        return apply_heads(
            self.hidden,
            mc_head,
            lm_head,
            None if mc_token_ids is None else self.shift(mc_token_ids),
            None if labels is None else self.gather(labels, -100),
            mc_labels,
        )


def encode_in_full(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> CandidateEncoding:
    """Run `backbone` on every [B, C, T] candidate in full, as one [B*C, T] batch (the reference computation)."""
    source = input_ids if input_ids is not None else inputs_embeds
    batch_size, num_candidates, seq_len = source.shape[:3]
    flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731
    inputs = {"attention_mask": flat(attention_mask), "use_cache": False}
    if input_ids is not None:
        inputs["input_ids"] = flat(input_ids)
    else:
        inputs["inputs_embeds"] = flat(inputs_embeds)
    if token_type_ids is not None:
        inputs["token_type_ids"] = flat(token_type_ids)
    hidden = backbone(**inputs).last_hidden_state  # [B*C, T, H]
    return CandidateEncoding(hidden.view(batch_size, num_candidates, seq_len, -1))
