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

Two attentions compute the tree. `tree_attention` (registered with transformers' `AttentionInterface`, chosen on CPU
with sdpa) runs it example by example: the context with a causal kernel, then the candidate tokens over the
example's own tokens under a small mask. It never computes a pair across examples or on padding, so the whole batch
goes in one row with no padding at all. Per layer, tiny GPT-2, 20 candidates, 4 examples of 370-450 tokens: 3.4 ms
against 4.9 ms for one dense mask per example (1 thread; 2.0 vs 2.5 ms on 2), and it builds no [N, N] mask. The
dense form (`PackedLayout.attention_mask`: one boolean mask over whole rows, shared by every
layer) serves everything else: eager attention (an additive float mask), activation checkpointing (recomputed
blocks run outside `encode_packed`, where the tree attention is not set), other devices. There a row's cost grows
with its square, so `row_tokens="longest"` packs short examples into rows no longer than the longest one.
Computing the candidates over the context and over themselves as two kernels merged by their log-sum-exp skips more
pairs, but the gathers it needs made it slower on CPU. On GPU a FlexAttention block mask could skip the masked
blocks; not implemented (no GPU to measure it on).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from persona_candidates import CandidateEncoding, activation_checkpointed, candidate_frame, sequence_lengths

logger = logging.getLogger(__name__)

# Attention implementations that take a custom 4D mask: SDPA (boolean mask) and eager (additive float mask).
# flash_attention_2 only knows causal/varlen masks; FlexAttention would need a BlockMask (GPU-fast only).
PACKED_ATTENTION = ("sdpa", "eager")
# The attention function name under which `tree_attention` is registered with transformers.
TREE_ATTENTION = "persona_tree"


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
    examples: list[tuple[int, int, int, int]]  # per example: (row, start column, context length, length)

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
        ex, seg = self.example_ids, self.segment_ids
        # Within an example a visible key never lies at a later column: its context comes first, then each
        # candidate's tokens in order. So "earlier position" is the lower triangle of the columns.
        mask = torch.ones(self.row_len, self.row_len, dtype=torch.bool, device=ex.device).tril_()
        mask = mask & (ex[:, :, None] == ex[:, None, :])
        mask &= (seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :])
        mask = mask[:, None]
        if dtype is None or dtype == torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)

    def tree_blocks(self) -> TreeBlocks:
        """The per-example form of `attention_mask` that `tree_attention` reads."""
        rows = [[] for _ in range(self.num_rows)]
        for row, start, prefix, length in sorted(self.examples):
            seg = self.segment_ids[row, start : start + length]
            mask = torch.ones(length - prefix, length, dtype=torch.bool, device=seg.device).tril_(prefix)
            rows[row].append((prefix, length, mask & ((seg[None, :] == 0) | (seg[prefix:, None] == seg[None, :]))))
        return TreeBlocks(row_len=self.row_len, rows=rows)

    def candidate_frame(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden states [R, N, H] -> the candidate frame [B, C, S, H]."""
        return hidden.flatten(0, 1)[self.frame.flatten()].view(*self.frame.shape, hidden.size(-1))


@dataclass
class TreeBlocks:
    """What `tree_attention` needs of a `PackedLayout`: per row, its examples in column order as (context length,
    length, mask [length - context, length] of the candidate tokens over the example's tokens)."""

    row_len: int
    rows: list[list[tuple[int, int, torch.Tensor]]]


class TreeLayoutLost(RuntimeError):
    """The backbone did not pass its forward's keyword arguments down to the attention (`encode_packed` then falls
    back to the dense mask for good)."""


def tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed_tree: TreeBlocks | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The packed rows' attention, example by example: the context causally, the candidates over the context and
    themselves. The transformers attention interface (registered as TREE_ATTENTION): query [R, heads, N, D],
    key/value [R, kv heads, N, D] -> [R, N, heads, D].

    Each example costs context² / 2 + candidate tokens × example tokens instead of N² for its whole row (and no
    cross-example pairs); nothing is computed for padding.
    """
    if packed_tree is None:
        raise TreeLayoutLost(f"{TREE_ATTENTION} attention needs the packed layout (`packed_tree`); the layers lost it.")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    options = {"dropout_p": dropout, "scale": scaling}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for row, examples in enumerate(packed_tree.rows):
        # split, not slicing: the backward of a slice fills a zero tensor the size of the whole row, per slice.
        sizes = [length for _, length, _ in examples]
        sizes.append(packed_tree.row_len - sum(sizes))
        parts = [t[row : row + 1] if t.size(0) > 1 else t for t in (query, key, value)]
        pieces = []
        for (prefix, length, mask), q, k, v in zip(examples, *(t.split(sizes, dim=2) for t in parts)):
            if prefix:
                q_context, q_candidates = q.split([prefix, length - prefix], dim=2)
                pieces.append(sdpa(q_context, k[:, :, :prefix], v[:, :, :prefix], is_causal=True, **options))
            else:
                q_candidates = q
            if length > prefix:
                pieces.append(sdpa(q_candidates, k, v, attn_mask=mask, **options))
        if sizes[-1]:
            pieces.append(value.new_zeros(1, value.size(1), sizes[-1], value.size(-1)))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, tree_attention)


def tree_attention_unsupported_reason(backbone: torch.nn.Module) -> str | None:
    """Why the packed forward of `backbone` runs on the dense tree mask rather than `tree_attention`, or None."""
    config = backbone.config
    if getattr(backbone, "_persona_tree_lost", False):
        return "the backbone does not pass attention keyword arguments through"
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r}"
    if next(backbone.parameters()).device.type != "cpu":
        return "not on CPU (unmeasured elsewhere)"
    if getattr(config, "sub_configs", None):
        return "a backbone with sub-configs"
    # Checkpointed blocks recompute in the backward pass, outside `encode_packed`'s choice of attention.
    if activation_checkpointed(backbone):
        return "activation checkpointing"
    return None


@contextmanager
def attention_implementation(config, implementation: str):
    """`config._attn_implementation` set to `implementation` for the duration of the block."""
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


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
    lengths_list = example_lengths.tolist()
    rows_list, starts_list = assign_rows(lengths_list, row_tokens)
    examples = list(zip(rows_list, starts_list, prefix.tolist(), lengths_list, strict=True))
    rows, starts = torch.tensor(rows_list, device=device), torch.tensor(starts_list, device=device)
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
        examples=examples,
    )


def encode_packed(
    backbone: torch.nn.Module,
    prefix_lengths: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    row_tokens: int | str | None = "auto",
    attention: str = "auto",
) -> CandidateEncoding:
    """One `backbone` pass over the packed rows of [B, C, T] candidates; their candidate frame as an encoding.

    input_ids / token_type_ids / attention_mask: [B, C, T], right-padded, each example's candidates agreeing on their
    first `prefix_lengths[b]` (>= 0) tokens (`shared_prefix_lengths`); or `inputs_embeds` [B, C, T, H] instead of
    input_ids (speaker embeddings added by the caller). `token_type_ids` go to the backbone as-is (GPT-2).
    `attention`: "tree" (`tree_attention`), "dense" (one mask over whole rows) or "auto" (tree where
    `tree_attention_unsupported_reason` allows). `row_tokens`: None = one example per row; a token budget or
    "longest" packs several per row (`assign_rows`); "auto" = the whole batch in one row under tree attention (no
    padding at all), "longest" under the dense mask (whose cost grows with the square of the row).
    The backbone must pass `packed_unsupported_reason`.
    """
    if attention == "auto":
        attention = "dense" if tree_attention_unsupported_reason(backbone) else "tree"
    source = input_ids if input_ids is not None else inputs_embeds
    seq_lengths = sequence_lengths(source.shape, attention_mask, source.device)
    tensors = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}  # [B, C, T(, H)]
    if token_type_ids is not None:
        tensors["token_type_ids"] = token_type_ids

    def run(attention: str) -> tuple[PackedLayout, torch.Tensor]:
        rows = row_tokens if row_tokens != "auto" else (1 << 62 if attention == "tree" else "longest")
        layout = packed_layout(prefix_lengths, seq_lengths, source.size(2), rows)
        inputs = {key: layout.pack(value) for key, value in tensors.items()}  # [R, N(, H)]
        inputs.update(position_ids=layout.position_ids, use_cache=False)
        if attention == "tree":
            with attention_implementation(backbone.config, TREE_ATTENTION):
                return layout, backbone(**inputs, packed_tree=layout.tree_blocks()).last_hidden_state
        if backbone.config._attn_implementation == "sdpa":
            # Boolean: torch's CPU SDPA kernels take it as is; the float form costs the same and 4x the memory.
            mask = layout.attention_mask()
        else:  # eager adds the mask to the scores
            mask = layout.attention_mask(next(backbone.parameters()).dtype)
        return layout, backbone(**inputs, attention_mask=mask).last_hidden_state

    try:
        layout, hidden = run(attention)
    except TreeLayoutLost:
        logger.warning(
            "The %s backbone does not pass attention keyword arguments through its layers: the packed encoding runs "
            "under the dense tree mask from now on.",
            type(backbone).__name__,
        )
        backbone._persona_tree_lost = True
        layout, hidden = run("dense")
    hidden = layout.candidate_frame(hidden)  # [B, C, S, H]
    return CandidateEncoding(hidden=hidden, prefix_lengths=prefix_lengths, index=layout.index, valid=layout.valid)
