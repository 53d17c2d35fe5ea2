"""Packed dual-head forward (issue 15): each turn's context once, its candidates behind it under a tree mask.

The shared-prefix forward (`persona_model.encode_shared_prefix`) encodes the context once but then copies its
key/value cache to every candidate and runs the candidates as a batch of tiny sequences. Here one backbone call
does everything: an example becomes one stretch of a row,

    [context (P tokens)] [candidate 0 (L_0 tokens)] [candidate 1 (L_1 tokens)] ... [candidate C-1]

with position ids continuing after the context for every candidate, and a boolean 4D attention mask that lets a
candidate token see the whole context and its own earlier tokens only (a tree: the context is the trunk). No key or
value is copied. Several examples may share a row (`row_tokens`): position ids restart per example and the mask is
block-diagonal, so a batch carries almost no padding. The heads then read the candidate frame of a
`SharedPrefixEncoding`, the same bookkeeping (`dual_head_output`) as the plain and cache-broadcast paths.

Exact: every query sees exactly the keys, at exactly the positions, it sees in the plain forward, so the outputs
and gradients equal `dual_head_forward`'s up to float rounding (tests/test_packed.py).

Why a dense boolean mask over rows of one example (bench/packed.py, tiny GPT-2, 2-core CPU): the mask is built once
per batch and shared by every layer; torch's fused CPU SDPA kernel takes it directly, and a float additive mask was
no faster. Computing the tree as a cascade (the candidates' scores against the context keys with one matmul, plus
their own causal blocks, one joint softmax) skips the masked candidate-candidate blocks, yet in plain torch ops it
was slower than the fused kernel where it matters (per layer, 1 thread: 20-candidate eval 4.5 vs 3.5 ms, 4-candidate
training 2.4 vs 1.9 ms; only 20-candidate training gained, 6.7 vs 10.2 ms). The whole batch in one
row removes all padding but makes the dense mask quadratic in the batch: 2-3x slower than a row per example. The
default worth wiring is `row_tokens="longest"`: short examples share rows no longer than the longest one.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from persona_model import (
    DualHeadOutput,
    PersonaDualHeadModel,
    SharedPrefixEncoding,
    dual_head_forward,
    shared_prefix_enabled,
    shared_prefix_forward,
    shared_prefix_lengths,
)

logger = logging.getLogger(__name__)

# Attention implementations that take a custom 4D mask: SDPA (boolean mask) and eager (additive float mask).
# flash_attention_2 only knows causal/varlen masks; FlexAttention would need a BlockMask (GPU-fast only).
PACKED_ATTENTION = ("sdpa", "eager")


def packed_unsupported_reason(backbone: torch.nn.Module) -> str | None:
    """Why `backbone` cannot run the packed forward, or None when it can.

    Gradient checkpointing is no reason: the packed forward is one ordinary pass without a cache.
    """
    params = inspect.signature(backbone.forward).parameters
    config = backbone.config
    model_type = getattr(config, "model_type", type(backbone).__name__)
    if "cache" not in params or "position_ids" not in params:
        # openai-gpt: its attention adds a fixed causal triangle to a mask it builds from a 2D padding mask.
        return f"the {model_type} backbone takes no custom 4D attention mask (older attention code, no `cache`)"
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in PACKED_ATTENTION:
        return f"attention implementation {implementation!r} takes no custom 4D mask (use sdpa or eager)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        windowed = any(t != "full_attention" for t in layer_types)
    else:
        windowed = getattr(config, "sliding_window", None) is not None
    if windowed:
        # The model builds the sliding-window mask itself; a custom mask would override the window.
        return f"the {model_type} backbone has sliding-window attention layers"
    return None


def assign_rows(example_lengths: list[int], row_tokens: int | str | None) -> tuple[list[int], list[int]]:
    """Row and start column of each example: one row each (`row_tokens` None), else first-fit decreasing.

    With a budget, examples (longest first) go into the first row with room for them; an example longer than the
    budget gets a row of its own. `row_tokens="longest"` (the longest example's length) packs short examples
    together without making any row longer than the longest example: the attention cost of a row stays the same
    (its mask is dense), the number of rows drops.
    """
    if row_tokens is None:
        return list(range(len(example_lengths))), [0] * len(example_lengths)
    if row_tokens == "longest":
        row_tokens = max(example_lengths)
    rows, starts, fill = [0] * len(example_lengths), [0] * len(example_lengths), []
    for b in sorted(range(len(example_lengths)), key=lambda i: -example_lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + example_lengths[b] <= row_tokens), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[b], starts[b] = row, fill[row]
        fill[row] += example_lengths[b]
    return rows, starts


@dataclass
class PackedLayout:
    """Where each token of [B, C, T] candidates lies in the packed [R, N] rows, and the rows' positions and mask.

    `source` [M] / `dest` [M]: flat indices of the M packed tokens in [B*C*T] and in [R*N]. `frame` [B, C, S]: flat
    index in [R*N] of each candidate-frame position (see `SharedPrefixEncoding`), `index`/`valid` its frame.
    """

    num_rows: int
    row_len: int
    source: torch.Tensor  # [M]
    dest: torch.Tensor  # [M]
    position_ids: torch.Tensor  # [R, N]
    example_ids: torch.Tensor  # [R, N]; -1 on padding
    segment_ids: torch.Tensor  # [R, N]; 0 context, c + 1 candidate c, -1 padding
    frame: torch.Tensor  # [B, C, S]
    index: torch.Tensor  # [B, C, S]
    valid: torch.Tensor  # [B, C, S]

    def pack(self, tensor: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """[B, C, T, ...] -> [R, N, ...]: the packed rows, `fill` on the rows' padding."""
        flat = tensor.flatten(0, 2)
        out = flat.new_full((self.num_rows * self.row_len, *flat.shape[1:]), fill)
        out[self.dest] = flat[self.source]
        return out.view(self.num_rows, self.row_len, *flat.shape[1:])

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[R, 1, N, N] mask: True (or 0.0 with a float `dtype`, else the dtype's minimum) where a query sees a key.

        A query sees keys of its own example that lie in the context or in its own segment, at positions up to its
        own. Padding sees padding (never an all-masked row: SDPA would return NaN there, even if nobody reads it).
        """
        ex, seg, pos = self.example_ids, self.segment_ids, self.position_ids
        mask = ex[:, :, None] == ex[:, None, :]
        mask &= (seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :])
        mask &= pos[:, None, :] <= pos[:, :, None]
        mask = mask[:, None]
        if dtype is None or dtype == torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)

    def candidate_frame(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden states [R, N, H] -> the candidate frame [B, C, S, H]."""
        return hidden.flatten(0, 1)[self.frame.flatten()].view(*self.frame.shape, hidden.size(-1))


def packed_layout(
    prefix_lengths: torch.Tensor, seq_lengths: torch.Tensor, seq_len: int, row_tokens: int | str | None = None
) -> PackedLayout:
    """The packed layout of [B, C, `seq_len`] right-padded candidates with real lengths `seq_lengths` [B, C] whose
    first `prefix_lengths` [B] tokens are the same for every candidate of an example (`shared_prefix_lengths`)."""
    device = seq_lengths.device
    batch_size, num_candidates = seq_lengths.shape
    prefix = prefix_lengths.to(device)
    cand_lengths = (seq_lengths - prefix[:, None]).clamp(min=0)  # [B, C]
    cand_start = prefix[:, None] + cand_lengths.cumsum(1) - cand_lengths  # [B, C] offset inside the example
    example_lengths = prefix + cand_lengths.sum(1)  # [B]
    rows, starts = assign_rows(example_lengths.tolist(), row_tokens)
    rows, starts = torch.tensor(rows, device=device), torch.tensor(starts, device=device)
    num_rows = int(rows.max()) + 1
    row_len = int(torch.zeros(num_rows, dtype=torch.long, device=device).index_add(0, rows, example_lengths).max())

    def ragged(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner, offset) of each element of consecutive runs of `lengths` [K]."""
        owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        offset = torch.arange(owner.numel(), device=device) - (lengths.cumsum(0) - lengths)[owner]
        return owner, offset

    ctx_b, ctx_t = ragged(prefix)  # context tokens: taken from candidate 0
    bc, j = ragged(cand_lengths.flatten())  # candidate tokens
    cand_b, cand_c = bc // num_candidates, bc % num_candidates
    b = torch.cat([ctx_b, cand_b])
    c = torch.cat([torch.zeros_like(ctx_b), cand_c])
    t = torch.cat([ctx_t, prefix[cand_b] + j])  # position in the full sequence = position id
    col = starts[b] + torch.cat([ctx_t, cand_start.flatten()[bc] + j])
    dest = rows[b] * row_len + col
    source = (b * num_candidates + c) * seq_len + t

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((num_rows * row_len,), fill, dtype=torch.long, device=device)
        return out.index_put_((dest,), values).view(num_rows, row_len)

    # Candidate frame (as `encode_shared_prefix`): positions prefix + j, j < S; padding points at a real token.
    span = int(cand_lengths.max()) if cand_lengths.numel() else 0
    arange_s = torch.arange(span, device=device)
    valid = arange_s < cand_lengths[..., None]  # [B, C, S]
    index = (prefix[:, None, None] + arange_s).expand(batch_size, num_candidates, span).clamp(max=seq_len - 1)
    last = torch.minimum(arange_s, (cand_lengths[..., None] - 1).clamp(min=0))
    frame = (rows * row_len + starts)[:, None, None] + cand_start[..., None] + last
    return PackedLayout(
        num_rows=num_rows,
        row_len=row_len,
        source=source,
        dest=dest,
        position_ids=scatter(t, 0),
        example_ids=scatter(b, -1),
        segment_ids=scatter(torch.cat([torch.zeros_like(ctx_b), cand_c + 1]), -1),
        frame=frame.clamp(max=num_rows * row_len - 1),
        index=index,
        valid=valid,
    )


def encode_packed(
    backbone: torch.nn.Module,
    prefix_lengths: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    embed: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    row_tokens: int | str | None = None,
) -> SharedPrefixEncoding:
    """One `backbone` pass over the packed rows of [B, C, T] candidates; their candidate frame as an encoding.

    input_ids / token_type_ids / attention_mask: [B, C, T], right-padded, each example's candidates agreeing on their
    first `prefix_lengths[b]` (>= 0) tokens (`shared_prefix_lengths`). `token_type_ids` go to the backbone as-is
    (GPT-2 adds their embeddings per token), unless `embed(input_ids, token_type_ids) -> inputs_embeds` is given
    (the generic dual-head model's speaker embeddings): then the backbone gets the packed embeddings.
    `row_tokens`: None = one example per row; a token budget or "longest" packs several per row (`assign_rows`).
    The backbone must pass `packed_unsupported_reason`.
    """
    batch_size, num_candidates, seq_len = input_ids.shape
    if attention_mask is None:
        seq_lengths = torch.full((batch_size, num_candidates), seq_len, device=input_ids.device, dtype=torch.long)
    else:
        seq_lengths = attention_mask.sum(dim=-1)  # right padding: the real tokens are the first ones
    layout = packed_layout(prefix_lengths, seq_lengths, seq_len, row_tokens)
    ids = layout.pack(input_ids)  # [R, N]
    types = None if token_type_ids is None else layout.pack(token_type_ids)
    inputs = {"inputs_embeds": embed(ids, types)} if embed is not None else {"input_ids": ids, "token_type_ids": types}
    if backbone.config._attn_implementation == "sdpa":
        # Boolean: torch's CPU SDPA kernels take it as is; the float form costs the same and 4x the memory.
        mask = layout.attention_mask()
    else:  # eager adds the mask to the scores
        mask = layout.attention_mask(next(backbone.parameters()).dtype)
    hidden = backbone(**inputs, attention_mask=mask, position_ids=layout.position_ids, use_cache=False)
    hidden = layout.candidate_frame(hidden.last_hidden_state)  # [B, C, S, H]
    return SharedPrefixEncoding(hidden=hidden, prefix_lengths=prefix_lengths, index=layout.index, valid=layout.valid)


def packed_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mc_labels: torch.Tensor | None = None,
    *,
    row_tokens: int | str | None = None,
) -> DualHeadOutput:
    """`dual_head_forward` through `encode_packed` (same outputs and gradients) for a GPT-2 double-heads model or a
    `PersonaDualHeadModel`.

    Where `packed_unsupported_reason` objects (logged once per model) it runs the model's other path instead: the
    cache-broadcast shared prefix when enabled (itself falling back to the plain forward), else the plain forward.
    """
    generic = isinstance(model, PersonaDualHeadModel)
    backbone = model.decoder if generic else model.transformer
    reason = packed_unsupported_reason(backbone)
    if reason is not None:
        if not getattr(model, "_persona_packed_warned", False):
            logger.warning("Packed forward off (%s): using the %s path.", reason, "shared-prefix or plain")
            model._persona_packed_warned = True
        inputs = (input_ids, token_type_ids, attention_mask, mc_token_ids, labels, mc_labels)
        if generic:
            return model._dual_head_forward(*inputs)
        return (shared_prefix_forward if shared_prefix_enabled(model) else dual_head_forward)(model, *inputs)
    prefix_lengths = shared_prefix_lengths(input_ids, token_type_ids, attention_mask, mc_token_ids, labels)
    enc = encode_packed(
        backbone,
        prefix_lengths,
        input_ids,
        attention_mask,
        token_type_ids=token_type_ids,
        embed=model.embed if generic else None,
        row_tokens=row_tokens,
    )
    lm_head = model.lm_logits if generic else model.lm_head
    return enc.dual_head_output(model.multiple_choice_head, lm_head, mc_token_ids, labels, mc_labels)
