"""Loading persona-chat models: a checkpoint as a double-heads model plus its tokenizer, with the persona tokens.

GPT and GPT-2 load as their library double-heads classes with the label-only loss, any other causal LM as the generic
`PersonaDoubleHeadsModel` (both in `persona_backbone`); a LoRA
adapter folder as its base model with the adapter on top. `SPECIAL_TOKENS` and `add_special_tokens` are re-exported
from `persona_tokens` (public API).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from contextlib import contextmanager

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils.peft_utils import find_adapter_config_file

from persona_backbone import (
    DOUBLE_HEADS_CLASSES,
    MC_HEAD_LOADED_ATTR,
    PersonaDoubleHeadsConfig,
    PersonaDoubleHeadsModel,
)
from persona_errors import CheckpointError, PersonaError
from persona_formats import input_format_of, resolve_input_format
from persona_gguf import find_gguf, load_gguf_config, load_gguf_model, load_gguf_tokenizer, open_gguf
from persona_hub import hub_options
from persona_locations import is_tokenizer_folder, looks_local
from persona_tokens import SPECIAL_TOKENS, add_special_tokens  # noqa: F401 (public API)

logger = logging.getLogger(__name__)


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
    input_format: str | None = None,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    chat_template_name: str | None = None,
    grow_embeddings: bool = False,
    gguf_file: str | None = None,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hub id or local checkpoint as a double-heads model plus tokenizer for its input format.

    The input format (`persona_formats.resolve_input_format`: the options given, else what the checkpoint's
    tokenizer recorded, else the backbone's default) is recorded in the tokenizer. Speaker tokens: the persona
    special tokens are added (embeddings resized if needed). Chat template: nothing is added; the pad token is the
    tokenizer's pad or eos, and generation stops at the template's end-of-turn tokens (`ChatFormat.prepare_model`).
    A LoRA adapter folder (written by `--use_peft` training) loads its base model, then the adapter on top; with
    `merge_adapter` (default) the adapter is merged and a plain double-heads model is returned.
    A tokenizer with more tokens than the embedding matrix is refused (those tokens would fail at their first use),
    unless `grow_embeddings` (training: new rows, trained with the rest).
    A Hub id is looked up once first (`hub_options`): offline or unreachable, a cached copy is used as it is, and an id
    that is not cached fails at once.
    A GGUF file (`name_or_path` ending in `.gguf`, a folder plus `gguf_file`, or a folder holding one `.gguf` and no
    config.json) loads de-quantized to `dtype`, with the tokenizer and chat template it holds (`persona_gguf`); the
    model is an ordinary one, saved as safetensors.
    """
    format_options = {
        "input_format": input_format,
        "system_prompt": system_prompt,
        "chat_template": chat_template,
        "chat_template_name": chat_template_name,
    }
    try:
        return _load_model_and_tokenizer(
            name_or_path,
            tokenizer_name_or_path=tokenizer_name_or_path,
            revision=revision,
            token=token,
            dtype=dtype,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            merge_adapter=merge_adapter,
            format_options=format_options,
            grow_embeddings=grow_embeddings,
            gguf_file=gguf_file,
            **model_kwargs,
        )
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(name_or_path, err) from None
    except SafetensorError as err:
        # A copy or a save cut short: the library's error names neither the folder nor a fix.
        raise CheckpointError(
            f"{name_or_path}: a weights file is damaged or incomplete ({err}); copy the checkpoint again or re-train."
        ) from err
    except StrictDataclassError as err:
        # A config.json edited by hand (a text where a number belongs): the validator's message, with the file.
        raise CheckpointError(f"{name_or_path}: config.json is not valid ({' '.join(str(err).split())}).") from err


@contextmanager
def library_load_errors(name_or_path: str):
    """What transformers raises for a checkpoint it cannot find or read (an `OSError` without a file name: a Hub id
    offline or unknown, a folder without weights; a `ValueError`: an unknown model type) becomes a `CheckpointError`
    naming the checkpoint: the user's input, not a bug."""
    try:
        yield
    except PersonaError:
        raise
    except (OSError, ValueError) as err:
        damaged = _damaged_json_file(name_or_path)
        if damaged is not None:  # the JSON error names no file: which one of the folder's is cut short or broken
            raise CheckpointError(
                f"{damaged[0]}: not valid JSON ({damaged[1]}); the checkpoint is damaged: copy it again or re-train."
            ) from err
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CheckpointError(f"{name_or_path}: cannot be loaded: {first[:300]}") from err


def _damaged_json_file(name_or_path: str) -> tuple[str, str] | None:
    """The first `.json` file of a local checkpoint folder that does not parse, with the parser's words."""
    if not os.path.isdir(name_or_path):
        return None
    for name in sorted(os.listdir(name_or_path)):
        path = os.path.join(name_or_path, name)
        if name.endswith(".json") and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, OSError) as err:
                return path, str(err)
    return None


# Messages transformers logs at a load that one line of ours replaces: the load report (a table, with terminal
# colour codes even in a log file) and the notice of `resize_token_embeddings`.
LIBRARY_NOTICES = ("LOAD REPORT", "new embeddings will be initialized")


def _not_a_library_notice(record: logging.LogRecord) -> bool:
    return not any(notice in str(record.msg) for notice in LIBRARY_NOTICES)


@contextmanager
def library_notices_replaced():
    """Drop transformers' load report and resize notice while the project loads or resizes a model; the caller
    says what happened in its own line (`report_loading_info`, the "Loaded ..." line)."""
    library_logger = logging.getLogger("transformers.modeling_utils")
    library_logger.addFilter(_not_a_library_notice)
    try:
        yield
    finally:
        library_logger.removeFilter(_not_a_library_notice)


def report_loading_info(name_or_path: str, model: PreTrainedModel, loading_info: dict) -> None:
    """One line for the load report: the weights the checkpoint lacked (initialised at random) and those it held
    that the model does not use. Tied weights and the multiple-choice head (`multiple_choice_head_loaded`, said in the
    "Loaded ..." line) are expected."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in loading_info["missing_keys"] if k not in tied and not k.startswith("multiple_choice_head.")]
    unexpected = list(loading_info["unexpected_keys"])
    for keys, what in ((missing, "not in the checkpoint, initialised at random"), (unexpected, "unused")):
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (", ..." if len(keys) > 3 else "")
            logger.warning("%s: %d weights %s (%s).", name_or_path, len(keys), what, shown)


def unsafe_pickle_error(checkpoint: str, err: Exception) -> CheckpointError:
    """The one line for a pickled weights file that torch's restricted loader refused: it names the file and the
    object, and recommends safetensors; the file is never loaded with the protection lowered."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    name = found.group(1) if found else None
    what = f"refers to {name} (not tensor data)" if name else "holds more than tensors"
    return CheckpointError(
        f"{_refused_pickle(checkpoint, name)}: this pickled weights file {what}, so it was not loaded (unpickling it "
        "could run code); use the checkpoint in safetensors format (model.safetensors): ask whoever made it for one, "
        "or convert it where it was trained (save_pretrained writes safetensors)."
    )


def _refused_pickle(checkpoint: str, name: str | None) -> str:
    """The torch file of a local checkpoint folder that the restricted loader refuses for the object `name` (else the
    folder): training_args.bin and numpy RNG states are refused too, so the object tells which file it was."""
    if not os.path.isdir(checkpoint):
        return checkpoint
    for file_name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, file_name)
        if file_name.endswith((".bin", ".pt", ".pth")) and os.path.isfile(path):
            try:
                torch.load(path, map_location="meta", weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:
                if name is None or f"GLOBAL {name} " in str(err):
                    return path
            except Exception:  # not a torch file, or cut short: not the refused one
                continue
    return checkpoint


def _load_model_and_tokenizer(
    name_or_path,
    *,
    tokenizer_name_or_path,
    revision,
    token,
    dtype,
    cache_dir,
    trust_remote_code,
    merge_adapter,
    format_options,
    grow_embeddings,
    gguf_file=None,
    **model_kwargs,
):
    hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    gguf = find_gguf(name_or_path, gguf_file)
    if gguf is not None:
        open_gguf(gguf)  # a partial file, an architecture or quantization transformers cannot read: one line
        if gguf_file is None and os.path.isdir(os.path.expanduser(name_or_path)):
            logger.warning("%s: no config.json; using the folder's one GGUF file, %s.", name_or_path, gguf.file_name)
        name_or_path, hub_kwargs = gguf.path, {"trust_remote_code": trust_remote_code}
        with library_load_errors(name_or_path):
            config = load_gguf_config(gguf)
    else:
        hub_kwargs.update(hub_options(name_or_path, revision, token, trust_remote_code))
        adapter_config = find_adapter_config_file(
            name_or_path, revision=revision, token=token, cache_dir=cache_dir, local_files_only=_local_only(hub_kwargs)
        )
        if adapter_config is not None:
            return load_lora_adapter(
                name_or_path, adapter_config, tokenizer_name_or_path, merge_adapter, hub_kwargs, dtype, format_options
            )
        with library_load_errors(name_or_path):
            config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    model_type = config.model_type
    model_cls = DOUBLE_HEADS_CLASSES.get(model_type)
    if model_cls is None:  # any other causal LM: the generic double-heads model
        model_cls = PersonaDoubleHeadsModel
        config = PersonaDoubleHeadsConfig.from_backbone(config)
    # The tokenizer and the input format first: a template that cannot build rows fails before the weights load.
    tokenizer_path = tokenizer_name_or_path or name_or_path
    if os.path.isdir(tokenizer_path) and not is_tokenizer_folder(tokenizer_path):
        # transformers would build an empty tokenizer (a vocabulary of 1) and every reply would be garbage.
        raise CheckpointError(
            f"{tokenizer_path}: no tokenizer files (tokenizer.json, vocab.json, ...) in this folder (a merged LoRA "
            "model saved without its tokenizer?); save the tokenizer there too (tokenizer.save_pretrained), or pass "
            "--tokenizer_name with the folder that holds it (for a merged LoRA model: the adapter's folder)."
        )
    tokenizer_options = hub_kwargs
    if tokenizer_path != name_or_path:
        tokenizer_options = {**hub_kwargs, **hub_options(tokenizer_path, revision, token, trust_remote_code)}
    with library_load_errors(tokenizer_path):
        if gguf is not None and tokenizer_name_or_path is None:
            tokenizer = load_gguf_tokenizer(gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, **tokenizer_options)
    input_format = resolve_input_format(tokenizer, model_type, **format_options)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    try:
        with library_load_errors(name_or_path), library_notices_replaced():
            if gguf is not None:
                model, loading_info = load_gguf_model(gguf, model_cls, config, **model_kwargs)
            else:
                model, loading_info = model_cls.from_pretrained(
                    name_or_path, config=config, output_loading_info=True, **hub_kwargs, **model_kwargs
                )
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise CheckpointError(
            f"{name_or_path}: the weights do not match its config.json (model type {model_type!r}; tensor "
            "shapes differ); the config and weights come from different models, copy the checkpoint again."
        ) from err
    # GPT / GPT-2 report a head missing from the weights; the generic model looks for its own head file itself.
    head_missing = any(key.startswith("multiple_choice_head.") for key in loading_info["missing_keys"])
    mark_multiple_choice_head(model, loaded=not head_missing and multiple_choice_head_loaded(model))
    report_loading_info(name_or_path, model, loading_info)
    rows = model.get_input_embeddings().num_embeddings
    with library_notices_replaced():
        what = input_format.prepare_model(model)  # the persona tokens added, or the template's stop ids
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        if not grow_embeddings:
            raise tokenizer_too_large(name_or_path, tokenizer_path, len(tokenizer), rows)
        with library_notices_replaced():
            model.resize_token_embeddings(len(tokenizer))
    if model.get_input_embeddings().num_embeddings != rows:
        what += f", embeddings resized from {rows} to {model.get_input_embeddings().num_embeddings} rows"
    if not multiple_choice_head_loaded(model):
        what += "; no multiple-choice head in its weights (it starts untrained)"
    logger.info("Loaded %s (%s); %s.", name_or_path, model_cls.__name__, what)
    return model, tokenizer


def tokenizer_too_large(name_or_path: str, tokenizer_path: str, size: int, rows: int) -> CheckpointError:
    """The one line for a tokenizer whose last ids have no embedding row (an `IndexError` at their first use)."""
    where = name_or_path if tokenizer_path == name_or_path else f"{name_or_path} with the tokenizer of {tokenizer_path}"
    return CheckpointError(
        f"{where}: the tokenizer has {size} tokens but the embedding matrix has {rows} rows, so tokens {rows} and "
        "above have no embedding; the tokenizer and the weights come from different checkpoints: use the tokenizer "
        "the model was trained with (--tokenizer_name), or train with this one (persona-train adds the rows)."
    )


def _local_only(hub_kwargs: dict) -> bool:
    return bool(hub_kwargs.get("local_files_only"))


def mark_multiple_choice_head(model: PreTrainedModel, loaded: bool) -> None:
    """Record whether `model`'s multiple-choice head was loaded (trained) or initialised at random."""
    setattr(model, MC_HEAD_LOADED_ATTR, loaded)


def multiple_choice_head_loaded(model: PreTrainedModel) -> bool:
    """Whether the multiple-choice head holds trained weights: False for a checkpoint that had none (a plain causal
    LM); True for a model built or trained in this process, which nothing marked."""
    return bool(getattr(model, MC_HEAD_LOADED_ATTR, True))


def load_lora_adapter(
    adapter_path: str,
    adapter_config_file: str,
    tokenizer_name_or_path: str | None,
    merge_adapter: bool,
    hub_kwargs: dict,
    dtype: str | torch.dtype | None = None,
    format_options: dict | None = None,
):
    """Base model (embeddings sized to the adapter's tokenizer) + LoRA adapter, merged unless `merge_adapter` is off."""
    from peft import PeftModel

    with open(adapter_config_file, encoding="utf-8") as f:
        base_name = json.load(f).get("base_model_name_or_path")
    field = f"{adapter_config_file}: base_model_name_or_path"
    if not base_name:
        raise CheckpointError(f"{field} is empty; set it to the base model's folder or Hub id.")
    fix = "edit that field to the base model's folder or Hub id (or load a merged checkpoint instead)"
    if looks_local(base_name) and not os.path.exists(os.path.expanduser(base_name)):  # a folder, or a GGUF file
        raise CheckpointError(f"{field} {base_name!r}: no such folder (the LoRA adapter's base model); {fix}.")
    # The adapter folder holds the tokenizer with the persona tokens, so the base gets no tokens added: its
    # embeddings grow to that tokenizer as in training; the adapter then restores the trained rows.
    try:
        model, tokenizer = load_model_and_tokenizer(
            base_name,
            tokenizer_name_or_path=tokenizer_name_or_path or adapter_path,
            dtype=dtype,
            token=hub_kwargs["token"],
            cache_dir=hub_kwargs["cache_dir"],
            trust_remote_code=hub_kwargs["trust_remote_code"],
            grow_embeddings=True,
            **(format_options or {}),
        )
    except CheckpointError as err:
        raise CheckpointError(f"{field} {base_name!r} (the LoRA adapter's base model): {err} ({fix})") from err
    if input_format_of(tokenizer).adds_tokens and model.get_input_embeddings().num_embeddings != len(tokenizer):
        with library_notices_replaced():  # training sized them to the tokenizer, larger or smaller
            model.resize_token_embeddings(len(tokenizer))
    head_loaded = multiple_choice_head_loaded(model)
    model = PeftModel.from_pretrained(model, adapter_path, revision=hub_kwargs["revision"], token=hub_kwargs["token"])
    # The adapter saves the head in full when it trained it (`modules_to_save`, see persona_lora).
    head_loaded = head_loaded or "multiple_choice_head" in (model.active_peft_config.modules_to_save or [])
    if merge_adapter:
        model = model.merge_and_unload()
    mark_multiple_choice_head(model, head_loaded)
    logger.info("Loaded LoRA adapter %s on %s%s.", adapter_path, base_name, " (merged)" if merge_adapter else "")
    return model, tokenizer


def max_positions(model) -> int | None:
    """The model's window: its maximum number of positions (None when the config does not say)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def input_budget(model, max_length: int | None) -> int | None:
    """The longest input in tokens: `max_length` capped by the model's window (the window when None)."""
    window = max_positions(model)
    if max_length is None or window is None:
        return max_length or window
    return min(max_length, window)
