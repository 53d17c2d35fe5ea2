"""The shared-prefix encoding of [B, C, T] candidates: their common context encoded once, its cache broadcast.

Every candidate of an example carries the same persona + history; only the reply segment differs. Where the plain
encoding (`persona_candidates.encode_in_full`) runs every candidate as a sequence of its own, `encode_shared_prefix`
encodes that context once per example, broadcasts its key/value cache to the C candidates and runs only the candidate
segments on top of it (positions continue after the prefix). Exact: the same attention, the same positions, the same
outputs as encoding every candidate in full, up to float rounding. Built on the backbone's standard forward
(input_ids/inputs_embeds, attention_mask, position_ids, cache, use_cache), so any causal LM with a key/value cache can
use it (`shared_prefix_unsupported_reason` says when not). It gives a `CandidateEncoding`, as the plain and packed
encodings do; which one runs is `persona_encoding.encode_candidates`'s choice.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from persona_candidates import CandidateEncoding, activation_checkpointed, candidate_frame, sequence_lengths


def shared_prefix_unsupported_reason(backbone: torch.nn.Module) -> str | None:
    """Why `backbone` cannot run the shared-prefix encoding right now, or None when it can."""
    params = inspect.signature(backbone.forward).parameters
    model_type = getattr(backbone.config, "model_type", type(backbone).__name__)
    if "cache" not in params:
        return f"the {model_type} backbone has no key/value cache (its forward takes no `cache`)"
    if backbone.training and activation_checkpointed(backbone):
        # Checkpointed blocks (GradientCheckpointingLayer) drop the cache in training.
        return "gradient checkpointing disables the key/value cache during training"
    layer_types = getattr(backbone.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        # A sliding-window cache keeps only the last window of the prefix: not exact for long contexts.
        return f"the {model_type} backbone has non-full attention layers ({sorted(set(layer_types))})"
    return None


def shared_prefix_lengths(
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example length [B] of the context encoded once for all candidates of [B, C, T] inputs.

    The longest prefix on which every candidate has the same token, token type and a real (unpadded) token, cut
    before the first position any output reads: the multiple-choice token of every candidate and the position
    predicting the first label (the reply's `<speaker1>` in `build_features` rows). Any length up to that keeps the
    forward exact, so nothing has to come from the collator and the public row format stays as it is.

    >>> ids = torch.tensor([[[1, 5, 6, 7, 2], [1, 5, 6, 8, 0]]])  # two candidates, the second one padded
    >>> shared_prefix_lengths(ids, attention_mask=ids.ne(0).long()).tolist()
    [3]
    >>> labels = torch.tensor([[[-100] * 5, [-100, -100, -100, 8, -100]]])  # the gold's reply starts at position 3
    >>> shared_prefix_lengths(ids, attention_mask=ids.ne(0).long(), labels=labels).tolist()  # position 2 predicts it
    [2]
    """
    batch_size, _, seq_len = input_ids.shape
    same = (input_ids == input_ids[:, :1]).all(dim=1)  # [B, T]
    if token_type_ids is not None:
        same &= (token_type_ids == token_type_ids[:, :1]).all(dim=1)
    if attention_mask is not None:
        same &= attention_mask.bool().all(dim=1)
    lengths = same.long().cumprod(dim=1).sum(dim=1)  # [B]
    if mc_token_ids is not None:
        lengths = torch.minimum(lengths, mc_token_ids.amin(dim=1))
    if labels is not None:
        positions = torch.arange(seq_len, device=labels.device).expand_as(labels)
        first_label = torch.where(labels.ne(-100), positions, seq_len).amin(dim=(1, 2))  # [B]; T when unlabelled
        lengths = torch.minimum(lengths, first_label - 1)
    return lengths.clamp(min=0)


def encode_shared_prefix(
    backbone: torch.nn.Module,
    prefix_lengths: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> CandidateEncoding:
    """Run `backbone` once on each example's prefix and then on the C candidate segments over its broadcast cache.

    input_ids / token_type_ids / attention_mask: [B, C, T], right-padded, candidates agreeing on their first
    `prefix_lengths[b]` (>= 1) tokens (see `shared_prefix_lengths`); or `inputs_embeds` [B, C, T, H] instead of
    input_ids (for backbones whose token types are added to the embeddings by the caller). `token_type_ids` are
    passed to the backbone as-is (GPT-2). Gradients reach the prefix through the cache. Only backbones whose forward
    takes `cache`, `position_ids` and `use_cache` (GPT-2, Llama, Mistral, Qwen2, OPT-like models in transformers 5)
    qualify: see `shared_prefix_unsupported_reason`.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    batch_size, num_candidates, seq_len = source.shape[:3]
    device = source.device
    seq_lengths = sequence_lengths(source.shape, attention_mask, device)
    prefix_len = int(prefix_lengths.max())

    # 1. The prefixes: row 0 of each example (all candidates agree there), padded to the longest prefix.
    arange_p = torch.arange(prefix_len, device=device)
    prefix_mask = (arange_p[None] < prefix_lengths[:, None]).long()  # [B, P]
    prefix_inputs = {"position_ids": arange_p.expand(batch_size, -1), "attention_mask": prefix_mask}
    if input_ids is not None:
        prefix_inputs["input_ids"] = input_ids[:, 0, :prefix_len]
    else:
        prefix_inputs["inputs_embeds"] = inputs_embeds[:, 0, :prefix_len]
    if token_type_ids is not None:
        prefix_inputs["token_type_ids"] = token_type_ids[:, 0, :prefix_len]
    cache = DynamicCache(config=backbone.config)
    backbone(**prefix_inputs, cache=cache, use_cache=True)
    # [B, heads, P, d] -> [B*C, heads, P, d]; repeat_interleave's backward sums the candidates' gradients.
    cache.batch_repeat_interleave(num_candidates)

    # 2. The candidate segments, positions continuing after each example's own prefix.
    index, valid = candidate_frame(prefix_lengths, seq_lengths, seq_len)  # [B, C, S]
    flat = lambda t: t.reshape(batch_size * num_candidates, *t.shape[2:])  # noqa: E731
    # Keys: the example's real prefix positions (its padded ones masked out), then the candidate's own tokens.
    cand_mask = torch.cat([prefix_mask.repeat_interleave(num_candidates, dim=0), flat(valid).long()], dim=1)
    cand_inputs = {"position_ids": flat(index), "attention_mask": cand_mask}
    if input_ids is not None:
        cand_inputs["input_ids"] = flat(input_ids.gather(2, index))
    else:
        embed_index = index[..., None].expand(-1, -1, -1, inputs_embeds.size(-1))
        cand_inputs["inputs_embeds"] = flat(inputs_embeds.gather(2, embed_index))
    if token_type_ids is not None:
        cand_inputs["token_type_ids"] = flat(token_type_ids.gather(2, index))
    hidden = backbone(**cand_inputs, cache=cache, use_cache=True).last_hidden_state  # [B*C, S, H]
    hidden = hidden.view(batch_size, num_candidates, index.size(-1), -1)
    return CandidateEncoding(hidden=hidden, prefix_lengths=prefix_lengths, index=index, valid=valid)
