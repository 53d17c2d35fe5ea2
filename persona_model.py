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
from transformers.utils.peft_utils import find_adapter_config_file

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
    merge_adapter: bool = True,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hub id or local checkpoint as a dual-head model plus tokenizer, with the persona special tokens.

    A LoRA adapter folder (written by `--use_peft` training) loads its base model, then the adapter on top; with
    `merge_adapter` (default) the adapter is merged and a plain dual-head model is returned.
    """
    hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    adapter_config = find_adapter_config_file(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    if adapter_config is not None:
        return load_lora_adapter(name_or_path, adapter_config, tokenizer_name_or_path, merge_adapter, hub_kwargs, dtype)
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


# --- LoRA (PEFT) and gradient checkpointing

# Default LoRA targets per backbone: the fused QKV projection and the attention output (Conv1D layers).
LORA_TARGET_MODULES = {"gpt2": ["c_attn", "c_proj"], "openai-gpt": ["c_attn", "c_proj"]}


def apply_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
):
    """Wrap `model` in a PEFT LoRA model that also trains the MC head and the persona special-token embeddings.

    Everything trainable is saved in the adapter: LoRA matrices, the whole `multiple_choice_head`
    (`modules_to_save`; it is randomly initialised for a plain LM backbone) and the rows of the persona tokens in
    the input embedding (`trainable_token_indices`; the rows were added by `add_special_tokens`, so they are
    random too). GPT-2 ties the LM head to the embedding: PEFT keeps the tie for those rows.
    """
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    if target_modules is None:
        if model_type not in LORA_TARGET_MODULES:
            raise ValueError(f"No default LoRA targets for model type {model_type!r}: pass --lora_target_modules.")
        target_modules = LORA_TARGET_MODULES[model_type]
    embedding = model.get_input_embeddings()
    embedding_name = next(name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if mod is embedding)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=True,  # GPT/GPT-2 projections are transformers Conv1D layers (weight stored [in, out])
        modules_to_save=["multiple_choice_head"],
        trainable_token_indices={embedding_name: sorted(set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))},
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s: %d of %d parameters trainable.", r, target_modules, trainable, total)
    return peft_model


def load_lora_adapter(
    adapter_path: str,
    adapter_config_file: str,
    tokenizer_name_or_path: str | None,
    merge_adapter: bool,
    hub_kwargs: dict,
    dtype: str | torch.dtype | None = None,
):
    """Base model (embeddings sized to the adapter's tokenizer) + LoRA adapter, merged unless `merge_adapter` is off."""
    import json

    from peft import PeftModel

    with open(adapter_config_file, encoding="utf-8") as f:
        base_name = json.load(f).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{adapter_config_file}: no 'base_model_name_or_path'; cannot find the base model.")
    # The adapter folder holds the tokenizer with the persona tokens, so the base gets no tokens added: size its
    # embeddings to that tokenizer as training did; the adapter then restores the trained rows.
    model, tokenizer = load_model_and_tokenizer(
        base_name,
        tokenizer_name_or_path=tokenizer_name_or_path or adapter_path,
        dtype=dtype,
        token=hub_kwargs["token"],
        cache_dir=hub_kwargs["cache_dir"],
        trust_remote_code=hub_kwargs["trust_remote_code"],
    )
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, adapter_path, revision=hub_kwargs["revision"], token=hub_kwargs["token"])
    if merge_adapter:
        model = model.merge_and_unload()
    logger.info("Loaded LoRA adapter %s on %s%s.", adapter_path, base_name, " (merged)" if merge_adapter else "")
    return model, tokenizer


def check_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Raise a clear error when the backbone cannot recompute activations (the Trainer would fail deep inside)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"--gradient_checkpointing: {type(base).__name__} (model type {base.config.model_type!r}) does not "
            "support gradient checkpointing in transformers; drop the flag, or use a smaller per-device batch "
            "with more --gradient_accumulation_steps."
        )
