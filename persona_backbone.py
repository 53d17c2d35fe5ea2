"""The double-heads models: any causal LM plus a multiple-choice head, and the library's GPT / GPT-2 classes.

`PersonaDoubleHeadsModel` = an `AutoModelForCausalLM` + a multiple-choice head. GPT and GPT-2 keep their library
classes (same weights and checkpoints as the reference) with the label-only loss (`PersonaGPT2DoubleHeadsModel`,
`PersonaOpenAIGPTDoubleHeadsModel`). Every loss path encodes the candidates through
`persona_encoding.encode_candidates`.

The folder it saves is exactly the backbone's own checkpoint (its config.json plus a `persona_double_heads` entry, its
`model*.safetensors` holding the causal LM's tensors and nothing else) with the multiple-choice head in its own file
beside them (`multiple_choice_head.safetensors`): AutoModelForCausalLM, vLLM, llama.cpp's converter, ... load the folder
as a plain causal LM without an unknown tensor, and this project loads it back as a double-heads model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    GenerationMixin,
    GPT2DoubleHeadsModel,
    OpenAIGPTDoubleHeadsModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import cached_file

from persona_encoding import ENCODING_ATTR, encode_candidates
from persona_errors import CheckpointError, quote
from persona_heads import DoubleHeadsOutput, PersonaMultipleChoiceHead

logger = logging.getLogger(__name__)

# The multiple-choice head's own weights file beside the causal LM's, and the prefix of its tensors in the model.
MC_HEAD_FILE = "multiple_choice_head.safetensors"
MC_HEAD_PREFIX = "multiple_choice_head."
# Set on a loaded model: whether its multiple-choice head came from the checkpoint (False: a plain causal LM's
# weights, the head randomly initialised, its scores meaningless); see `persona_model.multiple_choice_head_loaded`.
MC_HEAD_LOADED_ATTR = "persona_multiple_choice_head_loaded"

# Key under which the head settings are stored in the backbone's own config.json.
DOUBLE_HEADS_CONFIG_KEY = "persona_double_heads"


class PersonaDoubleHeadsConfig(PreTrainedConfig):
    """Configuration of `PersonaDoubleHeadsModel`: the backbone's config (`text_config`) and the multiple-choice head.

    On disk it is written as the backbone's own config.json plus a `persona_double_heads` entry holding the head
    settings, so that the same folder loads as a plain `AutoModelForCausalLM`.
    """

    model_type = "persona_double_heads"
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
        """The head settings stored next to the backbone config (and the candidate encoding, where one was set)."""
        settings = {"summary_first_dropout": self.summary_first_dropout, "speaker_embeddings": self.speaker_embeddings}
        if (encoding := self.__dict__.get(ENCODING_ATTR)) is not None:
            settings[ENCODING_ATTR] = encoding
        return settings

    @classmethod
    def from_backbone(cls, backbone_config: PreTrainedConfig, **head_settings) -> PersonaDoubleHeadsConfig:
        """Wrap a causal-LM config, reading the head settings a persona checkpoint stored in it."""
        if isinstance(backbone_config, cls):
            return backbone_config
        if type(backbone_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"Backbone type {backbone_config.model_type!r} has no AutoModelForCausalLM class, so it cannot be a "
                "persona backbone."
            )
        backbone_config = copy.deepcopy(backbone_config)
        stored = {}
        if hasattr(backbone_config, DOUBLE_HEADS_CONFIG_KEY):
            stored = dict(getattr(backbone_config, DOUBLE_HEADS_CONFIG_KEY) or {})
            delattr(backbone_config, DOUBLE_HEADS_CONFIG_KEY)
        config = cls(text_config=backbone_config, **{**stored, **head_settings})
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(backbone_config, attr, None))
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Read a backbone (or persona double-heads) checkpoint's config.json as a `PersonaDoubleHeadsConfig`."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        backbone, unused = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs
        )
        config = cls.from_backbone(backbone)
        return (config, unused) if return_unused_kwargs else config

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write the backbone's config.json with the head settings under `persona_double_heads`."""
        backbone = copy.deepcopy(self.text_config)
        setattr(backbone, DOUBLE_HEADS_CONFIG_KEY, self.head_settings())
        backbone.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(backbone)].__name__]
        # add_special_tokens sets these on the top-level config: the LM-only reload must see them too.
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(backbone, attr, getattr(self, attr, None))
        if self.dtype is not None:
            backbone.dtype = self.dtype
        backbone.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


def _weights_hold_head(name_or_path: str, hub_kwargs: dict) -> bool:
    """Whether a checkpoint's safetensors weights (one file or an index) hold `multiple_choice_head.*` tensors."""
    lookup = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    index = cached_file(name_or_path, "model.safetensors.index.json", **lookup, **hub_kwargs)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            names = json.load(f).get("weight_map", {})
    elif (weights := cached_file(name_or_path, "model.safetensors", **lookup, **hub_kwargs)) is not None:
        with safe_open(weights, framework="pt") as f:
            names = list(f.keys())
    else:
        return False
    return any(name.startswith(MC_HEAD_PREFIX) for name in names)


@dataclass
class PersonaCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the multiple-choice scores when candidates and `mc_token_ids` are given."""

    mc_logits: torch.Tensor | None = None  # [B, C]


class PersonaDoubleHeadsModel(PreTrainedModel, GenerationMixin):
    """Any `AutoModelForCausalLM` backbone with a multiple-choice head, trained like `GPT2DoubleHeadsModel`.

    The causal LM's modules are registered under their own names (e.g. `model`, `lm_head`), so the state dict is
    exactly the backbone's plus `multiple_choice_head.*`; `save_pretrained` writes the head to its own file
    (`MC_HEAD_FILE`), so a saved folder is exactly a causal-LM checkpoint. `from_pretrained` records whether the head
    came from the checkpoint (its own file, or a folder saved with the head inside the weights) in
    `MC_HEAD_LOADED_ATTR`.
    Speaker information: `token_type_ids` are looked up in the word embedding table and added to the input
    embeddings (GPT-2's convention), so the persona inputs work on backbones without token-type embeddings.
    With `labels`/`mc_labels` the forward returns a `DoubleHeadsOutput` (vocabulary logits only at labelled positions;
    the shared context encoded once per example as `config.persona_candidate_encoding` asks, see
    `persona_encoding`); without, a `PersonaCausalLMOutput` (what `generate()` uses, KV cache included).
    """

    config_class = PersonaDoubleHeadsConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the backbone checks its own support when it is built
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # PersonaTrainer normalises over the accumulated batch itself
    # The head is not in the causal LM's weights: `from_pretrained` loads it from its own file (no missing-keys report).
    _keys_to_ignore_on_load_missing = [rf"^{MC_HEAD_PREFIX}"]

    def __init__(self, config: PersonaDoubleHeadsConfig):
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

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """The causal LM's checkpoint (config, `model*.safetensors` with its tensors only), then the head's file."""
        if state_dict is None:
            state_dict = self.state_dict()
        head = {k[len(MC_HEAD_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MC_HEAD_PREFIX)}
        backbone = {k: v for k, v in state_dict.items() if not k.startswith(MC_HEAD_PREFIX)}
        push_to_hub = kwargs.pop("push_to_hub", False)
        super().save_pretrained(save_directory, *args, state_dict=backbone, **kwargs)
        if head and kwargs.get("is_main_process", True):
            tensors = {k: v.detach().contiguous().cpu() for k, v in head.items()}
            save_file(tensors, os.path.join(save_directory, MC_HEAD_FILE), metadata={"format": "pt"})
        if push_to_hub:  # transformers would upload before the head's file exists: push the whole model instead
            repo_id = kwargs.get("repo_id") or os.path.basename(os.path.normpath(save_directory))
            self.push_to_hub(repo_id, token=kwargs.get("token"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load the causal LM's weights, then the head from its own file when the folder has one (None: built from
        `config` and `state_dict`, the head loaded when the state dict holds it)."""
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded
        if pretrained_model_name_or_path is None:  # built from `config` and `state_dict`: no folder, no head file
            setattr(model, MC_HEAD_LOADED_ATTR, any(k.startswith(MC_HEAD_PREFIX) for k in kwargs.get("state_dict", {})))
            return loaded
        head_file = cached_file(
            pretrained_model_name_or_path,
            MC_HEAD_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if head_file is not None:
            model.load_multiple_choice_head(head_file)
        else:  # a folder saved with the head inside its weights, or a plain causal LM (the head is new)
            setattr(model, MC_HEAD_LOADED_ATTR, _weights_hold_head(pretrained_model_name_or_path, hub_kwargs))
        return loaded

    def load_multiple_choice_head(self, path: str) -> None:
        """Load the head's weights from `MC_HEAD_FILE` (a file, or a folder holding it); a damaged or mismatched file
        (cut short, another model's head, other tensors, integer or non-finite weights) is a `CheckpointError` naming
        the file, what it holds and what this backbone needs."""
        if os.path.isdir(path):
            path = os.path.join(path, MC_HEAD_FILE)
        head = self.multiple_choice_head
        needed = {name: tuple(value.shape) for name, value in head.state_dict().items()}
        shown = ", ".join(f"{name} {list(shape)}" for name, shape in needed.items())
        fix = "restore it from the run that trained this model (without the file the model has no trained head)"
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({str(err).strip() or type(err).__name__}; cut short or "
                f"damaged?); it should hold the multiple-choice head ({shown}): {fix}."
            ) from None
        found = {name: tuple(value.shape) for name, value in tensors.items()}
        if set(found) != set(needed):
            raise CheckpointError(
                f"{path}: holds {quote(sorted(found))}, not the multiple-choice head's tensors ({shown}): {fix}."
            )
        for name, value in tensors.items():
            if found[name] != needed[name]:
                raise CheckpointError(
                    f"{path}: {name} has shape {list(found[name])}, this model's head needs {list(needed[name])} "
                    f"(hidden size {needed['summary.weight'][-1]}): a head from another model? {fix}."
                )
            if not value.is_floating_point():
                raise CheckpointError(
                    f"{path}: {name} holds {value.dtype} values, not weights (floating point): {fix}."
                )
            if not torch.isfinite(value).all():
                raise CheckpointError(f"{path}: {name} holds non-finite values (NaN or infinity): {fix}.")
        head.load_state_dict({k: v.to(head.summary.weight.dtype) for k, v in tensors.items()})
        setattr(self, MC_HEAD_LOADED_ATTR, True)

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
    ) -> DoubleHeadsOutput | PersonaCausalLMOutput:
        """[B, C, T] candidates (training/eval) or [B, T] sequences (generation); see the class docstring."""
        if labels is not None or mc_labels is not None:
            if inputs_embeds is not None or position_ids is not None or cache is not None:
                raise ValueError("The double-heads loss path takes input_ids and default positions only.")
            encoding = encode_candidates(
                self,
                self.decoder,
                input_ids,
                token_type_ids,
                attention_mask,
                mc_token_ids,
                labels,
                inputs_embeds=self.embed(input_ids, token_type_ids),  # [B, C, T, H], speaker embeddings added
            )
            return encoding.apply_heads(self.multiple_choice_head, self.lm_logits, mc_token_ids, labels, mc_labels)
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


class PersonaDoubleHeadsMixin:
    """Training/evaluation forward of the library's double-heads classes that never builds [B, C, T, V] logits.

    With `labels` or `mc_labels` the forward returns a `persona_heads.DoubleHeadsOutput` (`loss` = LM loss, as the
    parent class), the candidates encoded by `persona_encoding.encode_candidates`; without them (generation,
    plain inference) it is the parent's forward. Going through `forward` (not a side function) keeps DDP and DeepSpeed
    wrappers in the loop.
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
            raise ValueError("The double-heads loss path takes input_ids and default positions only.")
        encoding = encode_candidates(
            self, self.transformer, input_ids, token_type_ids, attention_mask, mc_token_ids, labels
        )
        return encoding.apply_heads(self.multiple_choice_head, self.lm_head, mc_token_ids, labels, mc_labels)


class PersonaGPT2DoubleHeadsModel(PersonaDoubleHeadsMixin, GPT2DoubleHeadsModel):
    """`GPT2DoubleHeadsModel` (same weights and checkpoints) with the label-only LM loss."""


class PersonaOpenAIGPTDoubleHeadsModel(PersonaDoubleHeadsMixin, OpenAIGPTDoubleHeadsModel):
    """`OpenAIGPTDoubleHeadsModel` (same weights and checkpoints) with the label-only LM loss."""


# model_type -> the library's double-heads class (with our loss) for it; every other causal LM uses the generic one.
DOUBLE_HEADS_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": PersonaGPT2DoubleHeadsModel,
    "openai-gpt": PersonaOpenAIGPTDoubleHeadsModel,
}
