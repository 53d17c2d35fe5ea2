"""The packed encoding: each example's context once, its candidates behind it in the same row under a tree mask.

`persona_shared_prefix.encode_shared_prefix` encodes the context once but then copies its key/value cache to every
candidate and runs the candidates as a batch of tiny sequences. `encode_packed` does everything in one backbone call:
an example becomes one stretch of a row,

    [context (P tokens)] [candidate 0 (L_0 tokens)] [candidate 1 (L_1 tokens)] ... [candidate C-1]

with position ids continuing after the context for every candidate, and a boolean 4D attention mask that lets a
candidate token see the whole context and its own earlier tokens only (a tree: the context is the trunk). No key or
value is copied. Several examples may share a row (`row_tokens`): position ids restart per example and the mask is
block-diagonal, so a batch carries almost no padding. The heads then read the candidate frame of a
`CandidateEncoding`, the same bookkeeping as the other two encodings.

Exact: every query sees exactly the keys, at exactly the positions, it sees in the full encoding, so the outputs and
gradients equal `encode_in_full`'s up to float rounding (tests/test_packed.py).

Why a dense boolean mask (bench/shared_prefix.py, tiny GPT-2, 2-core CPU): the mask is built once per batch and
shared by every layer; torch's fused CPU SDPA kernel takes it directly, and a float additive mask was no faster.
Computing the tree as a cascade (the candidates' scores against the context keys with one matmul, plus their own
causal blocks, one joint softmax) skips the masked candidate-candidate blocks, yet in plain torch ops it was slower
than the fused kernel where it matters (per layer, 1 thread: 20-candidate eval 4.5 vs 3.5 ms, 4-candidate training
2.4 vs 1.9 ms; only 20-candidate training gained, 6.7 vs 10.2 ms). The whole batch in one row removes all padding but
makes the dense mask quadratic in the batch: 2-3x slower than a row per example. `row_tokens="longest"` (short
examples share rows no longer than the longest one) costs the same as a row per example and carries less padding.
On GPU a FlexAttention block mask could skip the masked blocks; not implemented (no GPU to measure it on), the dense
mask runs there through SDPA's memory-efficient kernel.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from persona_shared_prefix import CandidateEncoding, candidate_frame, sequence_lengths

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
    index in [R*N] of each candidate-frame position (see `CandidateEncoding`), `index`/`valid` its frame.
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
    num_candidates = seq_lengths.size(1)
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

    # The candidate frame: positions prefix + j, j < S; padding points at the candidate's last real token.
    index, valid = candidate_frame(prefix, seq_lengths, seq_len)
    last = torch.minimum(torch.arange(index.size(-1), device=device), (cand_lengths[..., None] - 1).clamp(min=0))
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
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    row_tokens: int | str | None = None,
) -> CandidateEncoding:
    """One `backbone` pass over the packed rows of [B, C, T] candidates; their candidate frame as an encoding.

    input_ids / token_type_ids / attention_mask: [B, C, T], right-padded, each example's candidates agreeing on their
    first `prefix_lengths[b]` (>= 0) tokens (`shared_prefix_lengths`); or `inputs_embeds` [B, C, T, H] instead of
    input_ids (speaker embeddings added by the caller). `token_type_ids` go to the backbone as-is (GPT-2).
    `row_tokens`: None = one example per row; a token budget or "longest" packs several per row (`assign_rows`).
    The backbone must pass `packed_unsupported_reason`.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    seq_lengths = sequence_lengths(source.shape, attention_mask, source.device)
    layout = packed_layout(prefix_lengths, seq_lengths, source.size(2), row_tokens)
    if input_ids is not None:
        inputs = {"input_ids": layout.pack(input_ids)}  # [R, N]
    else:
        inputs = {"inputs_embeds": layout.pack(inputs_embeds)}  # [R, N, H]
    if token_type_ids is not None:
        inputs["token_type_ids"] = layout.pack(token_type_ids)
    if backbone.config._attn_implementation == "sdpa":
        # Boolean: torch's CPU SDPA kernels take it as is; the float form costs the same and 4x the memory.
        mask = layout.attention_mask()
    else:  # eager adds the mask to the scores
        mask = layout.attention_mask(next(backbone.parameters()).dtype)
    hidden = backbone(**inputs, attention_mask=mask, position_ids=layout.position_ids, use_cache=False)
    hidden = layout.candidate_frame(hidden.last_hidden_state)  # [B, C, S, H]
    return CandidateEncoding(hidden=hidden, prefix_lengths=prefix_lengths, index=layout.index, valid=layout.valid)
