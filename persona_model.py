"""Special tokens, backbone loading and the dual-head (LM + multiple-choice) forward of persona-chat."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GPT2DoubleHeadsModel,
    OpenAIGPTDoubleHeadsModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

# The reference's five tokens, in its order: checkpoints stay interchangeable with transfer-learning-conv-ai.
SPECIAL_TOKENS = ["<bos>", "<eos>", "<speaker1>", "<speaker2>", "<pad>"]
ATTR_TO_SPECIAL_TOKEN = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "additional_special_tokens": ["<speaker1>", "<speaker2>"],
}

# model_type -> double-heads class that holds the LM head and the multiple-choice head.
DOUBLE_HEADS_CLASSES: dict[str, type[PreTrainedModel]] = {}  # filled below the class definitions


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the persona special tokens in one tokenizer."""

    bos: int
    eos: int
    speaker1: int
    speaker2: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
        ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        unknown = [tok for tok, i in zip(SPECIAL_TOKENS, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(
                f"The tokenizer lacks the persona special tokens {unknown}: call "
                "persona_model.add_special_tokens(model, tokenizer) first."
            )
        return cls(*ids)


def add_special_tokens(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the persona special tokens to `tokenizer` (once) and resize `model`'s embeddings only if any was added.

    Returns the number of tokens added (0 for a checkpoint trained by this project).
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    num_added = tokenizer.add_special_tokens(ATTR_TO_SPECIAL_TOKEN) if missing else 0
    if num_added > 0 and model is not None:
        model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        # generate() reads these; the persona tokens replace GPT-2's shared <|endoftext|>.
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, attr)
            setattr(model.config, attr, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, attr, value)
    return num_added


def double_heads_class(model_type: str) -> type[PreTrainedModel]:
    """The dual-head class for a backbone `model_type`, with a clear error for unsupported ones."""
    try:
        return DOUBLE_HEADS_CLASSES[model_type]
    except KeyError:
        raise ValueError(
            f"Backbone type {model_type!r} has no double-heads model; supported: {sorted(DOUBLE_HEADS_CLASSES)}."
        ) from None


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    revision: str = "main",
    token: str | bool | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hub id or local checkpoint as a dual-head model plus tokenizer, with the persona special tokens."""
    hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    model_cls = double_heads_class(config.model_type)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = model_cls.from_pretrained(name_or_path, config=config, **hub_kwargs, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or name_or_path, **hub_kwargs)
    num_added = add_special_tokens(model, tokenizer)
    logger.info("Loaded %s (%s); %d special tokens added.", name_or_path, model_cls.__name__, num_added)
    return model, tokenizer


@dataclass
class DualHeadOutput(ModelOutput):
    """Losses and per-example statistics of one dual-head forward.

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


def labelled_lm_nll(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Per-example summed NLL and token count, running the LM head only where a next token is labelled.

    hidden: [N, T, H], labels: [N, T] (same positions; shifted here, like the library's causal LM loss).
    Only the gold candidate's reply carries labels, so this skips the vocabulary projection of every distractor
    and every context position: ~95% of the LM-head FLOPs and the [B, C, T, V] logits tensor.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels.ne(-100)  # [N, T-1]
    rows, cols = mask.nonzero(as_tuple=True)
    logits = lm_head(hidden[rows, cols])  # [K, V], K = labelled tokens in the batch
    nll = F.cross_entropy(logits.float(), shift_labels[rows, cols], reduction="none")  # [K]
    per_row = torch.zeros(labels.size(0), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return per_row, mask.sum(dim=1)


def dual_head_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mc_labels: torch.Tensor | None = None,
) -> DualHeadOutput:
    """One pass of a GPT/GPT-2 double-heads model on [B, C, T] candidates; losses equal the model's own."""
    batch_size, num_candidates, seq_len = input_ids.shape
    flat = lambda t: None if t is None else t.reshape(batch_size * num_candidates, seq_len)  # noqa: E731
    hidden = model.transformer(
        input_ids=flat(input_ids),
        token_type_ids=flat(token_type_ids),
        attention_mask=flat(attention_mask),
        use_cache=False,
    ).last_hidden_state  # [B*C, T, H]
    out = DualHeadOutput()
    if mc_token_ids is not None:
        hidden_bc = hidden.view(batch_size, num_candidates, seq_len, -1)
        out.mc_logits = model.multiple_choice_head(hidden_bc, mc_token_ids).squeeze(-1)  # [B, C]
        if mc_labels is not None:
            out.mc_nll = F.cross_entropy(out.mc_logits.float(), mc_labels, reduction="none")  # [B]
            out.mc_loss = out.mc_nll.mean()
    if labels is not None:
        nll, tokens = labelled_lm_nll(hidden, flat(labels), model.lm_head)
        out.lm_nll = nll.view(batch_size, num_candidates).sum(1)
        out.lm_tokens = tokens.view(batch_size, num_candidates).sum(1)
        # NaN when nothing is labelled, as CrossEntropyLoss(reduction="mean") gives.
        out.lm_loss = out.lm_nll.sum() / out.lm_tokens.sum()
    out.loss = out.lm_loss
    return out


class PersonaDoubleHeadsMixin:
    """Training/evaluation forward that never builds [B, C, T, V] logits.

    With `labels` or `mc_labels` the forward returns a `DualHeadOutput` (`loss` = LM loss, as the parent class)
    computed by `shared_prefix_forward` (or `dual_head_forward` when `config.persona_shared_prefix` is False);
    without them (generation, plain inference) it is the parent's forward.
    Going through `forward` (not a side function) keeps DDP and DeepSpeed wrappers in the loop.
    """

    accepts_loss_kwargs = False  # PersonaTrainer normalises over the accumulated batch itself

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        mc_token_ids=None,
        labels=None,
        mc_labels=None,
        **kwargs,
    ):
        if labels is None and mc_labels is None:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                mc_token_ids=mc_token_ids,
                **kwargs,
            )
        if kwargs.get("inputs_embeds") is not None or kwargs.get("position_ids") is not None:
            raise ValueError("The dual-head loss path takes input_ids and default positions only.")
        inputs = (input_ids, token_type_ids, attention_mask, mc_token_ids, labels, mc_labels)
        if shared_prefix_enabled(self):  # the context encoded once per example (see the shared-prefix section)
            return shared_prefix_forward(self, *inputs)
        return dual_head_forward(self, *inputs)


class PersonaGPT2DoubleHeadsModel(PersonaDoubleHeadsMixin, GPT2DoubleHeadsModel):
    """`GPT2DoubleHeadsModel` (same weights and checkpoints) with the label-only LM loss."""


class PersonaOpenAIGPTDoubleHeadsModel(PersonaDoubleHeadsMixin, OpenAIGPTDoubleHeadsModel):
    """`OpenAIGPTDoubleHeadsModel` (same weights and checkpoints) with the label-only LM loss."""


DOUBLE_HEADS_CLASSES.update({"gpt2": PersonaGPT2DoubleHeadsModel, "openai-gpt": PersonaOpenAIGPTDoubleHeadsModel})


# =====================================================================================================================
# Shared-prefix dual-head forward (issue 9)
#
# Every candidate of an example carries the same persona + history; only the reply segment differs. Instead of
# encoding that context C times, encode it once per example, broadcast its key/value cache to the C candidates and run
# only the candidate segments on top of it (positions continue after the prefix). Exact: the same attention, the same
# positions, the same outputs as `dual_head_forward`, up to float rounding. Built on the backbone's standard forward
# (input_ids/inputs_embeds, attention_mask, position_ids, cache, use_cache) so any causal LM with a KV cache can use it.
# =====================================================================================================================

# Config attribute switching the labels path of `PersonaDoubleHeadsMixin.forward` (absent = on).
SHARED_PREFIX_ATTR = "persona_shared_prefix"


def shared_prefix_enabled(model: PreTrainedModel) -> bool:
    """Whether `model.config` asks for the shared-prefix forward (`persona_shared_prefix`, default True)."""
    return bool(getattr(model.config, SHARED_PREFIX_ATTR, True))


def shared_prefix_unsupported_reason(backbone: torch.nn.Module) -> str | None:
    """Why `backbone` cannot run the shared-prefix forward right now, or None when it can."""
    import inspect

    params = inspect.signature(backbone.forward).parameters
    model_type = getattr(backbone.config, "model_type", type(backbone).__name__)
    if "cache" not in params:
        return f"the {model_type} backbone has no key/value cache (its forward takes no `cache`)"
    if backbone.training and any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules()):
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


@dataclass
class SharedPrefixEncoding:
    """Candidate-segment view of [B, C, T] inputs after `encode_shared_prefix`.

    `hidden` [B, C, S, H] holds the backbone's last hidden states of positions `prefix_lengths[b] + j` (j < S);
    `index` [B, C, S] maps each candidate-frame position back to the full-sequence position (clamped), `valid`
    [B, C, S] marks real tokens. Use `to_candidate_frame` to move labels / token indices into that frame.
    """

    hidden: torch.Tensor
    prefix_lengths: torch.Tensor  # [B]
    index: torch.Tensor  # [B, C, S]
    valid: torch.Tensor  # [B, C, S]

    def gather(self, tensor: torch.Tensor, fill: int) -> torch.Tensor:
        """A [B, C, T] tensor in the candidate frame [B, C, S], `fill` on padding."""
        return tensor.gather(2, self.index).masked_fill(~self.valid, fill)

    def shift(self, positions: torch.Tensor) -> torch.Tensor:
        """Full-sequence positions [B, C] (e.g. `mc_token_ids`) as candidate-frame positions."""
        return positions - self.prefix_lengths[:, None]


def encode_shared_prefix(
    backbone: torch.nn.Module,
    prefix_lengths: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> SharedPrefixEncoding:
    """Run `backbone` once on each example's prefix and then on the C candidate segments over its broadcast cache.

    input_ids / token_type_ids / attention_mask: [B, C, T], right-padded, candidates agreeing on their first
    `prefix_lengths[b]` (>= 1) tokens (see `shared_prefix_lengths`); or `inputs_embeds` [B, C, T, H] instead of
    input_ids (for backbones whose token types are added to the embeddings by the caller). `token_type_ids` are
    passed to the backbone as-is (GPT-2). Gradients reach the prefix through the cache. Only backbones whose forward
    takes `cache`, `position_ids` and `use_cache` (GPT-2, Llama, Mistral, Qwen2, OPT-like models in transformers 5)
    qualify: see `shared_prefix_unsupported_reason`.
    """
    from transformers import DynamicCache

    source = input_ids if input_ids is not None else inputs_embeds
    batch_size, num_candidates, seq_len = source.shape[:3]
    device = source.device
    if attention_mask is None:
        seq_lengths = torch.full((batch_size, num_candidates), seq_len, device=device, dtype=torch.long)
    else:
        seq_lengths = attention_mask.sum(dim=-1)  # right padding: the real tokens are the first ones
    prefix_len = int(prefix_lengths.max())
    cand_len = int((seq_lengths - prefix_lengths[:, None]).max())

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
    index = prefix_lengths[:, None, None] + torch.arange(cand_len, device=device)  # [B, 1, S]
    valid = index < seq_lengths[..., None]  # [B, C, S]
    index = index.expand(batch_size, num_candidates, cand_len).clamp(max=seq_len - 1)
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
    hidden = hidden.view(batch_size, num_candidates, cand_len, -1)
    return SharedPrefixEncoding(hidden=hidden, prefix_lengths=prefix_lengths, index=index, valid=valid)


def shared_prefix_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mc_labels: torch.Tensor | None = None,
) -> DualHeadOutput:
    """`dual_head_forward` with the context encoded once per example (same outputs, same gradients).

    Falls back to `dual_head_forward` (logged once per model) where the shared prefix cannot apply: backbones
    without a KV cache (openai-gpt), gradient checkpointing in training, sliding-window attention, or an example
    with no shareable prefix.
    """
    backbone = model.transformer
    reason = shared_prefix_unsupported_reason(backbone)
    prefix_lengths = None
    if reason is None and mc_token_ids is None:
        reason = "no mc_token_ids (the candidates' last tokens) were given"
    if reason is None:
        prefix_lengths = shared_prefix_lengths(input_ids, token_type_ids, attention_mask, mc_token_ids, labels)
        if int(prefix_lengths.min()) < 1:
            reason = "an example has no context shared by its candidates"
    if reason is not None:
        if not getattr(model, "_persona_shared_prefix_warned", False):
            logger.warning("Shared-prefix forward off (%s): encoding every candidate in full.", reason)
            model._persona_shared_prefix_warned = True
        return dual_head_forward(model, input_ids, token_type_ids, attention_mask, mc_token_ids, labels, mc_labels)

    batch_size, num_candidates, _ = input_ids.shape
    enc = encode_shared_prefix(backbone, prefix_lengths, input_ids, attention_mask, token_type_ids=token_type_ids)
    out = DualHeadOutput()
    out.mc_logits = model.multiple_choice_head(enc.hidden, enc.shift(mc_token_ids)).squeeze(-1)  # [B, C]
    if mc_labels is not None:
        out.mc_nll = F.cross_entropy(out.mc_logits.float(), mc_labels, reduction="none")  # [B]
        out.mc_loss = out.mc_nll.mean()
    if labels is not None:
        cand_labels = enc.gather(labels, -100)  # [B, C, S]; every labelled pair (t, t+1) has t >= prefix length
        hidden = enc.hidden.flatten(0, 1)
        nll, tokens = labelled_lm_nll(hidden, cand_labels.flatten(0, 1), model.lm_head)
        out.lm_nll = nll.view(batch_size, num_candidates).sum(1)
        out.lm_tokens = tokens.view(batch_size, num_candidates).sum(1)
        out.lm_loss = out.lm_nll.sum() / out.lm_tokens.sum()
    out.loss = out.lm_loss
    return out
