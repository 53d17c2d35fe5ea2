"""Special tokens, backbone loading and the dual-head (LM + multiple-choice) forward of persona-chat."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationMixin,
    GPT2DoubleHeadsModel,
    OpenAIGPTDoubleHeadsModel,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import ModelOutput
from transformers.utils.peft_utils import find_adapter_config_file

from persona_tokens import SPECIAL_TOKENS, SpecialTokenIds, add_special_tokens  # noqa: F401 (public API)

logger = logging.getLogger(__name__)

# model_type -> double-heads class that holds the LM head and the multiple-choice head.
DOUBLE_HEADS_CLASSES: dict[str, type[PreTrainedModel]] = {}  # filled below the class definitions


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
    if config.model_type in DOUBLE_HEADS_CLASSES:
        model_cls = double_heads_class(config.model_type)
    else:  # any other causal LM: the generic dual-head wrapper (section at the end of this file)
        model_cls = PersonaDualHeadModel
        config = PersonaDualHeadConfig.from_backbone(config)
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


def dual_head_output(
    hidden: torch.Tensor,
    mc_head,
    lm_head,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mc_labels: torch.Tensor | None = None,
) -> DualHeadOutput:
    """Apply the two heads to candidate hidden states and fill a `DualHeadOutput` (losses and per-example sums).

    hidden: [B, C, S, H]; mc_token_ids [B, C] and labels [B, C, S] index the same S positions (the full sequences,
    or the candidate frame of a `SharedPrefixEncoding`). `mc_head(hidden, mc_token_ids)` returns scores [B, C]
    (a trailing singleton dimension is dropped); `lm_head` maps hidden states to vocabulary logits.
    """
    batch_size, num_candidates = hidden.shape[:2]
    out = DualHeadOutput()
    if mc_token_ids is not None:
        mc_logits = mc_head(hidden, mc_token_ids)
        out.mc_logits = mc_logits.squeeze(-1) if mc_logits.dim() == 3 else mc_logits  # [B, C]
        if mc_labels is not None:
            out.mc_nll = F.cross_entropy(out.mc_logits.float(), mc_labels, reduction="none")  # [B]
            out.mc_loss = out.mc_nll.mean()
    if labels is not None:
        nll, tokens = labelled_lm_nll(hidden.flatten(0, 1), labels.flatten(0, 1), lm_head)
        out.lm_nll = nll.view(batch_size, num_candidates).sum(1)
        out.lm_tokens = tokens.view(batch_size, num_candidates).sum(1)
        # NaN when nothing is labelled, as CrossEntropyLoss(reduction="mean") gives.
        out.lm_loss = out.lm_nll.sum() / out.lm_tokens.sum()
    out.loss = out.lm_loss
    return out


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
    hidden = hidden.view(batch_size, num_candidates, seq_len, -1)
    return dual_head_output(hidden, model.multiple_choice_head, model.lm_head, mc_token_ids, labels, mc_labels)


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


# ======================================================================================================================
# Any causal LM as the backbone (issue 8): `PersonaDualHeadModel` = an AutoModelForCausalLM + a multiple-choice head.
# ======================================================================================================================

# Key under which the head settings are stored in the backbone's own config.json: the folder stays a plain checkpoint
# of the backbone (AutoModelForCausalLM, vLLM, ... load it and ignore the head weights), and this project recognises it.
DUAL_HEAD_CONFIG_KEY = "persona_dual_head"

# PEFT/LoRA `target_modules` per model_type: the attention projections, LoRA's usual choice (see `lora_settings`).
LORA_TARGET_MODULES: dict[str, list[str]] = {
    # GPT/GPT-2: the fused QKV projection and the attention/MLP output projections (transformers Conv1D layers).
    "gpt2": ["c_attn", "c_proj"],
    "openai-gpt": ["c_attn", "c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],  # also SmolLM/SmolLM2, TinyLlama
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],  # Qwen2 / Qwen2.5
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "smollm3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value"],  # Pythia
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
}


def lora_target_modules(model_type: str) -> list[str]:
    """LoRA `target_modules` for a backbone type (the attention projections), with a clear error for unknown ones."""
    try:
        return list(LORA_TARGET_MODULES[model_type])
    except KeyError:
        raise ValueError(
            f"No LoRA target modules known for model_type {model_type!r}; pass target_modules yourself "
            f"(known: {sorted(LORA_TARGET_MODULES)})."
        ) from None


def lora_settings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Keyword arguments for `peft.LoraConfig` that fit a persona model (PEFT itself is not a dependency).

    LoRA on the attention projections, the multiple-choice head trained in full (it starts from scratch), and only
    the persona special tokens' rows of the word embeddings trained (`trainable_token_indices`, PEFT >= 0.15; tied
    output embeddings follow). Usage: `get_peft_model(model, LoraConfig(r=16, **lora_settings(model, tokenizer)))`.
    """
    model_type = model.config.get_text_config().model_type
    embeddings = model.get_input_embeddings()
    embedding_name = next(name for name, module in model.named_modules() if module is embeddings).rsplit(".", 1)[-1]
    return {
        "target_modules": lora_target_modules(model_type),
        # GPT/GPT-2 projections are transformers Conv1D layers (weight stored [in, out]).
        "fan_in_fan_out": model_type in DOUBLE_HEADS_CLASSES,
        "modules_to_save": ["multiple_choice_head"],
        "trainable_token_indices": {embedding_name: tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)},
    }


class PersonaDualHeadConfig(PreTrainedConfig):
    """Configuration of `PersonaDualHeadModel`: the backbone's config (`text_config`) and the multiple-choice head.

    On disk it is written as the backbone's own config.json plus a `persona_dual_head` entry holding the head
    settings, so that the same folder loads as a plain `AutoModelForCausalLM`.
    """

    model_type = "persona_dual_head"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    text_config: dict | PreTrainedConfig | None = None
    summary_first_dropout: float = 0.1  # dropout before the score projection, as GPT-2's sequence summary
    speaker_embeddings: bool = True  # add the word embedding of token_type_ids to the input embeddings
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Tying is declared by the backbone; the base class reads it from the top-level config.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: backbone attributes (max_position_embeddings, hidden_size, vocab_size,
        # ...) read through, so code written for a plain causal-LM config works on this one.
        if name.startswith("_") or name == "text_config" or "text_config" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self.__dict__["text_config"], name)

    def head_settings(self) -> dict:
        """The head settings stored next to the backbone config."""
        return {"summary_first_dropout": self.summary_first_dropout, "speaker_embeddings": self.speaker_embeddings}

    @classmethod
    def from_backbone(cls, backbone_config: PreTrainedConfig, **head_settings) -> PersonaDualHeadConfig:
        """Wrap a causal-LM config, reading the head settings a persona checkpoint stored in it."""
        if isinstance(backbone_config, cls):
            return backbone_config
        if type(backbone_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"Backbone type {backbone_config.model_type!r} has no AutoModelForCausalLM class, so it cannot be a "
                f"persona backbone (double-heads types: {sorted(DOUBLE_HEADS_CLASSES)})."
            )
        backbone_config = copy.deepcopy(backbone_config)
        stored = getattr(backbone_config, DUAL_HEAD_CONFIG_KEY, None) or {}
        if hasattr(backbone_config, DUAL_HEAD_CONFIG_KEY):
            delattr(backbone_config, DUAL_HEAD_CONFIG_KEY)
        config = cls(text_config=backbone_config, **{**stored, **head_settings})
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(backbone_config, attr, None))
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Read a backbone (or persona dual-head) checkpoint's config.json as a `PersonaDualHeadConfig`."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        backbone, unused = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs
        )
        config = cls.from_backbone(backbone)
        return (config, unused) if return_unused_kwargs else config

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write the backbone's config.json with the head settings under `persona_dual_head`."""
        backbone = copy.deepcopy(self.text_config)
        setattr(backbone, DUAL_HEAD_CONFIG_KEY, self.head_settings())
        backbone.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(backbone)].__name__]
        # add_special_tokens sets these on the top-level config: the LM-only reload must see them too.
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(backbone, attr, getattr(self, attr, None))
        if self.dtype is not None:
            backbone.dtype = self.dtype
        backbone.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


@dataclass
class PersonaCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the multiple-choice scores when candidates and `mc_token_ids` are given."""

    mc_logits: torch.Tensor | None = None  # [B, C]


class PersonaMultipleChoiceHead(nn.Module):
    """Score of one candidate from the hidden state at its `mc_token_ids` position (GPT-2's cls_index summary)."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.first_dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, mc_token_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, C, T, H], mc_token_ids [B, C] -> scores [B, C]."""
        index = mc_token_ids[..., None, None].expand(*mc_token_ids.shape, 1, hidden.size(-1))
        picked = hidden.gather(-2, index).squeeze(-2)  # [B, C, H]
        return self.summary(self.first_dropout(picked).to(self.summary.weight.dtype)).squeeze(-1)


class PersonaDualHeadModel(PreTrainedModel, GenerationMixin):
    """Any `AutoModelForCausalLM` backbone with a multiple-choice head, trained like `GPT2DoubleHeadsModel`.

    The causal LM's modules are registered under their own names (e.g. `model`, `lm_head`), so the state dict is
    exactly the backbone's plus `multiple_choice_head.*`: a saved folder also loads as a plain causal LM.
    Speaker information: `token_type_ids` are looked up in the word embedding table and added to the input
    embeddings (GPT-2's convention), so the DESIGN.md inputs work on backbones without token-type embeddings.
    With `labels`/`mc_labels` the forward returns a `DualHeadOutput` (vocabulary logits only at labelled positions;
    the shared context encoded once per example unless `config.persona_shared_prefix` is False, see the issue-9
    section); without, a `PersonaCausalLMOutput` (what `generate()` uses, KV cache included).
    """

    config_class = PersonaDualHeadConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the backbone checks its own support when it is built
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # PersonaTrainer normalises over the accumulated batch itself

    def __init__(self, config: PersonaDualHeadConfig):
        super().__init__(config)
        lm = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)](config.text_config)
        output_embeddings = lm.get_output_embeddings()
        for name, module in lm.named_children():
            self.add_module(name, module)
            if module is output_embeddings:
                self._lm_head_name = name
        self._decoder_name = lm.base_model_prefix
        self._tied_weights_keys = lm._tied_weights_keys
        hidden_size = output_embeddings.in_features  # OPT-350m-like projections: the LM head's input, not hidden_size
        self.multiple_choice_head = PersonaMultipleChoiceHead(hidden_size, config.summary_first_dropout)
        self.post_init()

    @property
    def decoder(self) -> PreTrainedModel:
        """The backbone's base model (hidden states, KV cache)."""
        return getattr(self, self._decoder_name)

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return getattr(self, self._lm_head_name)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        setattr(self, self._lm_head_name, new_embeddings)

    def _init_weights(self, module: nn.Module) -> None:
        # Only the modules outside the backbone's base model land here (its PreTrainedModel initialises the rest).
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from hidden states, with the final logit transforms some families apply."""
        logits = self.get_output_embeddings()(hidden)
        text_config = self.config.text_config
        if (cap := getattr(text_config, "final_logit_softcapping", None)) is not None:  # Gemma 2/3
            logits = torch.tanh(logits / cap) * cap
        if (scale := getattr(text_config, "logit_scale", None)) is not None:  # Cohere
            logits = logits * scale
        if (divisor := getattr(text_config, "logits_scaling", None)) is not None:  # Granite
            logits = logits / divisor
        return logits

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: word embeddings plus, GPT-2 style, the word embedding of each token's speaker token."""
        embeddings = self.get_input_embeddings()
        inputs_embeds = embeddings(input_ids)
        if token_type_ids is not None and self.config.speaker_embeddings:
            inputs_embeds = inputs_embeds + embeddings(token_type_ids)
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mc_token_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mc_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> DualHeadOutput | PersonaCausalLMOutput:
        """[B, C, T] candidates (training/eval) or [B, T] sequences (generation); see the class docstring."""
        if labels is not None or mc_labels is not None:
            if inputs_embeds is not None or position_ids is not None or cache is not None:
                raise ValueError("The dual-head loss path takes input_ids and default positions only.")
            return self._dual_head_forward(input_ids, token_type_ids, attention_mask, mc_token_ids, labels, mc_labels)
        candidates_shape = input_ids.shape if input_ids is not None and input_ids.dim() == 3 else None
        if candidates_shape is not None:  # [B, C, T] -> [B*C, T]
            flat = lambda t: None if t is None else t.reshape(-1, t.size(-1))  # noqa: E731
            input_ids, token_type_ids, attention_mask = flat(input_ids), flat(token_type_ids), flat(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, token_type_ids)
        elif token_type_ids is not None and self.config.speaker_embeddings:
            inputs_embeds = inputs_embeds + self.get_input_embeddings()(token_type_ids)
        outputs = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_logits(slice_logits_to_keep(hidden, logits_to_keep))
        mc_logits = None
        if candidates_shape is not None:
            logits = logits.view(*candidates_shape[:2], *logits.shape[1:])
            if mc_token_ids is not None:
                mc_logits = self.multiple_choice_head(hidden.view(*candidates_shape, -1), mc_token_ids)
        return PersonaCausalLMOutput(
            logits=logits,
            mc_logits=mc_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _dual_head_forward(self, input_ids, token_type_ids, attention_mask, mc_token_ids, labels, mc_labels):
        """`shared_prefix_forward` / `dual_head_forward` for this backbone (speaker embeddings added by `embed`)."""
        batch_size, num_candidates, seq_len = input_ids.shape
        inputs_embeds = self.embed(input_ids, token_type_ids)  # [B, C, T, H]
        prefix_lengths = None
        if shared_prefix_enabled(self):
            prefix_lengths = shared_prefix_plan(
                self, self.decoder, input_ids, token_type_ids, attention_mask, mc_token_ids, labels
            )
        if prefix_lengths is not None:  # the context encoded once per example (see the shared-prefix section)
            enc = encode_shared_prefix(
                self.decoder, prefix_lengths, attention_mask=attention_mask, inputs_embeds=inputs_embeds
            )
            return enc.dual_head_output(self.multiple_choice_head, self.lm_logits, mc_token_ids, labels, mc_labels)
        hidden = self.decoder(
            inputs_embeds=inputs_embeds.flatten(0, 1),
            attention_mask=None if attention_mask is None else attention_mask.flatten(0, 1),
            use_cache=False,
        ).last_hidden_state  # [B*C, T, H]
        hidden = hidden.view(batch_size, num_candidates, seq_len, -1)
        return dual_head_output(hidden, self.multiple_choice_head, self.lm_logits, mc_token_ids, labels, mc_labels)


# =====================================================================================================================
# Shared-prefix dual-head forward (issue 9)
#
# Every candidate of an example carries the same persona + history; only the reply segment differs. Instead of
# encoding that context C times, encode it once per example, broadcast its key/value cache to the C candidates and run
# only the candidate segments on top of it (positions continue after the prefix). Exact: the same attention, the same
# positions, the same outputs as `dual_head_forward`, up to float rounding. Built on the backbone's standard forward
# (input_ids/inputs_embeds, attention_mask, position_ids, cache, use_cache) so any causal LM with a KV cache can use it:
# GPT-2 via `shared_prefix_forward`, the generic `PersonaDualHeadModel` (inputs_embeds with speaker embeddings) too.
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

    def dual_head_output(self, mc_head, lm_head, mc_token_ids=None, labels=None, mc_labels=None) -> DualHeadOutput:
        """`dual_head_output` on the candidate frame, from full-sequence `mc_token_ids` [B, C] and `labels` [B, C, T].

        Every labelled pair (t, t+1) and multiple-choice token has t >= the prefix length (`shared_prefix_lengths`),
        so nothing the heads read lies in the shared prefix.
        """
        return dual_head_output(
            self.hidden,
            mc_head,
            lm_head,
            None if mc_token_ids is None else self.shift(mc_token_ids),
            None if labels is None else self.gather(labels, -100),
            mc_labels,
        )


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


def shared_prefix_plan(
    model: PreTrainedModel,
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mc_token_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Per-example prefix lengths [B] for `encode_shared_prefix` on `backbone`, or None when it cannot apply.

    None (logged once per model) for backbones without a KV cache (openai-gpt), gradient checkpointing in training,
    sliding-window attention, inputs without `mc_token_ids`, or an example with no shareable prefix.
    """
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
        return None
    return prefix_lengths


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

    Falls back to `dual_head_forward` where `shared_prefix_plan` finds the shared prefix cannot apply.
    """
    inputs = (input_ids, token_type_ids, attention_mask, mc_token_ids, labels)
    prefix_lengths = shared_prefix_plan(model, model.transformer, *inputs)
    if prefix_lengths is None:
        return dual_head_forward(model, *inputs, mc_labels)
    enc = encode_shared_prefix(
        model.transformer, prefix_lengths, input_ids, attention_mask, token_type_ids=token_type_ids
    )
    return enc.dual_head_output(model.multiple_choice_head, model.lm_head, mc_token_ids, labels, mc_labels)


# --- LoRA (PEFT) and gradient checkpointing


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
    target_modules = settings["target_modules"]
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
