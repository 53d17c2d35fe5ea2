"""Which candidate encoding runs: packed, cache-broadcast shared prefix or plain, and `encode_candidates`, the one
dispatch every double-heads model's loss path goes through.

All three give the same outputs and gradients (to float rounding): `plain` encodes every candidate in full
(`persona_shared_prefix.encode_in_full`), `shared_prefix` encodes each context once and broadcasts its key/value
cache to the candidates (`encode_shared_prefix`), `packed` puts each context once and its candidates behind it in one
row under a tree mask (`persona_packed.encode_packed`). The model config's `persona_candidate_encoding` asks for one
("auto", the default, for the fastest that applies); a config with only the former `persona_shared_prefix: false`
asks for "plain". An encoding that cannot apply falls back to the next one, and the choice is logged once per model.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from persona_candidates import CandidateEncoding, encode_in_full
from persona_errors import UsageError
from persona_packed import encode_packed, packed_unsupported_reason, tree_attention_unsupported_reason
from persona_shared_prefix import encode_shared_prefix, shared_prefix_lengths, shared_prefix_unsupported_reason

logger = logging.getLogger(__name__)

ENCODING_ATTR = "persona_candidate_encoding"  # config attribute: one of ENCODINGS (absent = "auto")
ENCODINGS = ("auto", "packed", "shared_prefix", "plain")
# Config attributes of the packed encoding (absent = "auto"), set by `set_packed_layout`:
# the attention, "tree" (example by example), "dense" (one tree mask over whole rows) or "auto" (tree where it
# applies: sdpa without activation checkpointing); and how many tokens a packed row holds, "auto" = the whole batch
# in one row under the tree attention, rows no longer than the longest example under the dense mask, "longest", an
# int, or None (one example per row) (`persona_packed.encode_packed`).
PACKED_ATTENTION_ATTR = "persona_packed_attention"
PACKED_ROW_TOKENS_ATTR = "persona_packed_row_tokens"
PACKED_ATTENTIONS = ("auto", "tree", "dense")


def requested_encoding(model: PreTrainedModel) -> str:
    """The encoding `model.config` asks for: `persona_candidate_encoding`, else "auto"."""
    requested = getattr(model.config, ENCODING_ATTR, None) or "auto"
    if requested not in ENCODINGS:
        raise UsageError(f"config.{ENCODING_ATTR} is {requested!r}; expected one of {', '.join(ENCODINGS)}.")
    return requested


def set_candidate_encoding(model: PreTrainedModel, encoding: str) -> None:
    """Ask `model` for `encoding` (one of ENCODINGS); saved with its config, so a checkpoint keeps the choice."""
    if encoding not in ENCODINGS:
        raise UsageError(f"candidate encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}.")
    setattr(model.config, ENCODING_ATTR, encoding)


def set_packed_layout(model: PreTrainedModel, attention: str = "auto", row_tokens: int | str | None = "auto") -> None:
    """Choose the packed encoding's attention (one of PACKED_ATTENTIONS) and row budget for `model` (benchmarks and
    tests compare them; "auto" is what training and evaluation run)."""
    if attention not in PACKED_ATTENTIONS:
        raise UsageError(f"packed attention {attention!r}: expected one of {', '.join(PACKED_ATTENTIONS)}.")
    setattr(model.config, PACKED_ATTENTION_ATTR, attention)
    setattr(model.config, PACKED_ROW_TOKENS_ATTR, row_tokens)


def preference(requested: str, device: torch.device) -> tuple[str, ...]:
    """Encodings to try, best first. Measured on CPU (bench/shared_prefix.py, tiny GPT-2, 1-2 threads) packed beats
    the cache broadcast at every candidate count and thread count (20-candidate eval 5.2x / 5.5x vs 3.9x / 4.2x over
    plain on 1 / 2 threads, 4-candidate training 2.7x / 2.0x vs 2.3x / 1.8x) and both beat plain; on GPU unmeasured
    (no GPU here), the same order, the dense tree mask running through SDPA's memory-efficient kernel."""
    del device  # one order for every device until a GPU measurement says otherwise
    order = ("packed", "shared_prefix", "plain")
    return order if requested == "auto" else order[order.index(requested) :]


def encode_candidates(
    model: PreTrainedModel,
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
) -> CandidateEncoding:
    """[B, C, T] candidates through `backbone` with the first encoding of `preference` that applies.

    With `inputs_embeds` [B, C, T, H] (speaker embeddings already added by the caller) the backbone reads those in
    place of `input_ids` and `token_type_ids`, which then only decide which prefix the candidates share.
    """
    requested = requested_encoding(model)
    prefix_lengths, skipped = None, []
    for encoding in preference(requested, input_ids.device):
        if encoding == "plain":
            break
        reason = (packed_unsupported_reason if encoding == "packed" else shared_prefix_unsupported_reason)(backbone)
        if reason is None and encoding == "shared_prefix" and mc_token_ids is None:
            reason = "no mc_token_ids (the candidates' last tokens) were given"
        if reason is None:
            if prefix_lengths is None:
                prefix_lengths = shared_prefix_lengths(input_ids, token_type_ids, attention_mask, mc_token_ids, labels)
            if encoding == "shared_prefix" and int(prefix_lengths.min()) < 1:
                reason = "an example has no context shared by its candidates"
        if reason is None:
            break
        skipped.append(f"{encoding}: {reason}")
    attention = None
    if encoding == "packed":
        attention = getattr(model.config, PACKED_ATTENTION_ATTR, "auto")
        if attention == "auto":
            attention = "dense" if tree_attention_unsupported_reason(backbone) else "tree"
    _log_once(model, encoding, requested, skipped, attention)
    if inputs_embeds is not None:
        input_ids = token_type_ids = None
    inputs = {"token_type_ids": token_type_ids, "inputs_embeds": inputs_embeds}
    if encoding == "packed":
        return encode_packed(
            backbone,
            prefix_lengths,
            input_ids,
            attention_mask,
            **inputs,
            row_tokens=getattr(model.config, PACKED_ROW_TOKENS_ATTR, "auto"),
            attention=attention,
        )
    if encoding == "shared_prefix":
        return encode_shared_prefix(backbone, prefix_lengths, input_ids, attention_mask, **inputs)
    return encode_in_full(backbone, input_ids, attention_mask, **inputs)


def _log_once(
    model: PreTrainedModel, encoding: str, requested: str, skipped: list[str], attention: str | None = None
) -> None:
    """Log which encoding runs (and the packed attention), once per model and distinct message; a warning when one
    was passed over."""
    message = f"Candidate encoding: {encoding} (asked for {requested}"
    message += f"; not {'; not '.join(skipped)})." if skipped else ")."
    if attention is not None:
        message += f" Packed attention: {attention}."
    logged = model.__dict__.setdefault("_persona_encoding_logged", set())
    if message not in logged:
        logged.add(message)
        logger.log(logging.WARNING if skipped else logging.INFO, message)
