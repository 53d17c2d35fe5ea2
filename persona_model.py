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
    computed by `dual_head_forward`; without them (generation, plain inference) it is the parent's forward.
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
        return dual_head_forward(self, input_ids, token_type_ids, attention_mask, mc_token_ids, labels, mc_labels)


class PersonaGPT2DoubleHeadsModel(PersonaDoubleHeadsMixin, GPT2DoubleHeadsModel):
    """`GPT2DoubleHeadsModel` (same weights and checkpoints) with the label-only LM loss."""


class PersonaOpenAIGPTDoubleHeadsModel(PersonaDoubleHeadsMixin, OpenAIGPTDoubleHeadsModel):
    """`OpenAIGPTDoubleHeadsModel` (same weights and checkpoints) with the label-only LM loss."""


DOUBLE_HEADS_CLASSES.update({"gpt2": PersonaGPT2DoubleHeadsModel, "openai-gpt": PersonaOpenAIGPTDoubleHeadsModel})
