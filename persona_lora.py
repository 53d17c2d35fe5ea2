"""LoRA (PEFT) for a persona double-heads model: its settings and the wrapping; the gradient-checkpointing check.

LoRA goes on PEFT's own default target modules for the backbone family ("all-linear" where PEFT has none), the
multiple-choice head is trained in full and only the persona special tokens' rows of the word embeddings are trained.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from persona_errors import UsageError
from persona_tokens import SPECIAL_TOKENS

logger = logging.getLogger(__name__)


def lora_settings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Keyword arguments for `peft.LoraConfig` that fit a persona model.

    `target_modules`: PEFT's default for the backbone family (the generic double-heads config hides the family from
    PEFT, so it is looked up here), "all-linear" for families PEFT has no default for. The multiple-choice head is
    trained in full (`modules_to_save`; it starts from scratch), and only the persona special tokens' rows of the word
    embeddings are trained (`trainable_token_indices`; tied output embeddings follow) when the tokenizer has them
    (speaker-token inputs; chat-template inputs add no tokens).
    Usage: `get_peft_model(model, LoraConfig(r=16, **lora_settings(model, tokenizer)))`.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = model.config.get_text_config().model_type
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    embeddings = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embeddings).rsplit(".", 1)[-1]
    settings = {
        "target_modules": list(targets) if targets else "all-linear",
        # GPT/GPT-2 projections are transformers Conv1D layers (weight stored [in, out]).
        "fan_in_fan_out": any(isinstance(module, Conv1D) for module in model.modules()),
        "modules_to_save": ["multiple_choice_head"],
    }
    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in SPECIAL_TOKENS):  # chat-template models add no tokens: no new rows to train
        settings["trainable_token_indices"] = {embedding_name: tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)}
    return settings


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

    settings = lora_settings(model, tokenizer)
    if target_modules is not None:
        settings["target_modules"] = list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, **settings)
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s: %d of %d parameters trainable.", r, settings["target_modules"], trainable, total)
    return peft_model


def check_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Raise a clear error when the backbone cannot recompute activations (the Trainer would fail deep inside)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"--activation_checkpointing: {type(base).__name__} (model type {base.config.model_type!r}) does not "
            "support activation (gradient) checkpointing in transformers; drop the flag, or use a smaller "
            "per-device batch with more --gradient_accumulation_steps."
        )
