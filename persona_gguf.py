"""GGUF files as base models: which file a model path names, whether it can be read, and loading it de-quantized.

`--model_name_or_path model.gguf`, or a folder plus `--gguf_file NAME` (transformers' name for it), or a folder that
holds one `.gguf` and no `config.json`. transformers reads the file's config, tokenizer and chat template
(`from_pretrained(folder, gguf_file=NAME)`); the weights are de-quantized to the dtype asked for and the model is
rebuilt from its config and state dict, so nothing of the GGUF loading stays with it: training, saving (safetensors),
chat and evaluation treat it like any checkpoint. The path checks need nothing but `os`; reading the file needs the
`gguf` package (`pip install -e ".[gguf]"`), imported only when a GGUF is used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from persona_errors import CheckpointError, UsageError

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
INSTALL = 'pip install -e ".[gguf]"'
# A folder with one of these is a transformers checkpoint, whatever .gguf files lie beside it.
CHECKPOINT_FILES = ("config.json", "adapter_config.json")
# Tensor types that are plain numbers, not quantized blocks.
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file as transformers names it: the folder (`from_pretrained`'s first argument) and the file name in it."""

    folder: str
    file_name: str

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.file_name)


def gguf_files(folder: str) -> list[str]:
    """The `.gguf` files directly in `folder`, sorted."""
    return sorted(
        f for f in os.listdir(folder) if f.lower().endswith(SUFFIX) and os.path.isfile(os.path.join(folder, f))
    )


def find_gguf(name_or_path: str, gguf_file: str | None = None, flag: str = "--model_name_or_path") -> GGUFSource | None:
    """The GGUF file a model path means, or None for any other checkpoint (a transformers folder, a Hub id).

    A path ending in `.gguf`; a folder plus `gguf_file`; a folder without `config.json` that holds exactly one
    `.gguf`. A folder of several `.gguf` files without `gguf_file`, or a `gguf_file` that is not there, is a
    `UsageError` naming the files. Nothing is read here.
    """
    path = os.path.expanduser(name_or_path)
    if gguf_file is not None:
        if os.path.isfile(path):
            raise UsageError(
                f"--gguf_file {gguf_file}: {flag} {name_or_path} is a file already; pass the folder that holds "
                f"{gguf_file}, or leave --gguf_file out."
            )
        if not os.path.isdir(path):
            raise UsageError(
                f"--gguf_file {gguf_file}: {flag} {name_or_path} is not a local folder; pass the folder that holds the "
                f"GGUF file (download it first: hf download REPO {gguf_file} --local-dir FOLDER)."
            )
        if not os.path.isfile(os.path.join(path, gguf_file)):
            found = gguf_files(path)
            held = f"it holds {', '.join(found)}" if found else "it holds no .gguf file"
            raise UsageError(f"--gguf_file {gguf_file}: no such file in {name_or_path} ({held}).")
        return GGUFSource(path, gguf_file)
    if os.path.isfile(path) and path.lower().endswith(SUFFIX):
        return GGUFSource(os.path.dirname(path) or ".", os.path.basename(path))
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES):
        return None
    found = gguf_files(path)
    if len(found) > 1:
        raise UsageError(
            f"{flag} {name_or_path}: the folder holds {len(found)} GGUF files ({', '.join(found)}); choose one with "
            f"--gguf_file NAME (or pass the file itself)."
        )
    return GGUFSource(path, found[0]) if found else None


def import_gguf(path: str):
    """The `gguf` package, or a `UsageError` naming the file and the install command."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            f"{path}: reading a GGUF file needs the gguf package, which is not installed; {INSTALL} "
            "(or pip install 'gguf>=0.10')."
        ) from None
    return gguf


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says before its weights are read."""

    architecture: str
    tensor_types: tuple[str, ...]  # the distinct ggml types of its tensors, sorted


def read_gguf_header(path: str) -> GGUFHeader:
    """The file's architecture and tensor types, checked: a file cut short (a download that stopped) or not GGUF at
    all, and a quantization the `gguf` package cannot de-quantize (one row of each type is tried) are a
    `CheckpointError` naming the file."""
    gguf = import_gguf(path)
    fix = "download it again (a download cut short leaves a partial file)"
    try:
        reader = gguf.GGUFReader(path, "r")
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path}: not a complete GGUF file ({str(err)[:120]}); {fix}.") from err
    size = os.path.getsize(path)
    if end > size:
        raise CheckpointError(f"{path}: cut short ({size} of the {end} bytes its header announces); {fix}.")
    if not architecture:
        raise CheckpointError(f"{path}: no general.architecture in this GGUF file, so no model can be built from it.")
    types = {}
    for tensor in reader.tensors:
        types.setdefault(tensor.tensor_type.name, tensor)
    for name, tensor in types.items():
        if name in FLOAT_TYPES:
            continue
        try:
            gguf.dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} is quantized as {name}, which the gguf package cannot de-quantize; use "
                "a file of another quantization (Q8_0, Q4_K_M, F16, ...) or upgrade gguf (pip install -U gguf)."
            ) from None
    return GGUFHeader(str(architecture), tuple(sorted(types)))


def check_gguf_path(name_or_path: str, gguf_file: str | None = None, flag: str = "--model_name_or_path") -> bool:
    """Flag check: whether the model path is a GGUF (then its file is found, the `gguf` package is there and the
    file is complete, else a typed error naming it); False for any other checkpoint."""
    source = find_gguf(name_or_path, gguf_file, flag)
    if source is None:
        return False
    read_gguf_header(source.path)
    return True


def _arch_key(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


def check_architecture(path: str, header: GGUFHeader) -> None:
    """A `CheckpointError` for an architecture transformers cannot read from a GGUF (its two loaders' lists)."""
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    readable = {_arch_key(a) for a in (*GGUF_SUPPORTED_ARCHITECTURES, *GGUF_ARCHS)} - {"general", "tokenizer"}
    if _arch_key(header.architecture) not in readable:
        raise CheckpointError(
            f"{path}: architecture {header.architecture!r}, which transformers cannot read from a GGUF file (it reads "
            f"{', '.join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer')))}); "
            "use the model's transformers checkpoint (safetensors) instead."
        )


def open_gguf(source: GGUFSource) -> GGUFHeader:
    """The checks before anything loads: the header (`read_gguf_header`) and the architecture."""
    header = read_gguf_header(source.path)
    check_architecture(source.path, header)
    return header


def load_gguf_config(source: GGUFSource, **hub_kwargs):
    """The model config transformers reads from the file's metadata."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.folder, gguf_file=source.file_name, **hub_kwargs)


def load_gguf_tokenizer(source: GGUFSource, **hub_kwargs):
    """The tokenizer (vocabulary, merges, special tokens, chat template) transformers builds from the file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.file_name, **hub_kwargs)


def load_gguf_model(source: GGUFSource, model_cls, config, dtype=None, **model_kwargs):
    """`model_cls` (a double-heads class) with the file's weights de-quantized to `dtype` (None: the file's float type,
    float32 for quantized files), as `model_cls.from_pretrained(..., output_loading_info=True)` returns it.

    transformers loads the file as its causal LM (`gguf_file=`, `GgufConfig(dequantize=True)`: plain tensors, no
    quantizer kept), then `model_cls` is built from `config` and that state dict (`from_pretrained(None, state_dict=)`,
    the tensors shared, not copied), so the result holds no GGUF state and saves as an ordinary checkpoint.
    """
    from transformers import AutoModelForCausalLM

    options = {"gguf_file": source.file_name}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before the GGUF quantizer: the GGUF loader always de-quantized
        pass
    else:
        options["quantization_config"] = GgufConfig(dequantize=True)
    if dtype is not None:
        options["dtype"] = dtype
    lm = AutoModelForCausalLM.from_pretrained(source.folder, **options)
    if getattr(lm, "hf_quantizer", None) is not None:
        raise RuntimeError(f"{source.path}: transformers kept the GGUF quantizer on a de-quantized model.")
    state_dict, loaded_dtype = lm.state_dict(), lm.dtype
    del lm
    model, loading_info = model_cls.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=loaded_dtype, output_loading_info=True, **model_kwargs
    )
    # Built from no folder: the file is the model's name, so that a LoRA adapter trained on it names its base.
    model.name_or_path = model.config._name_or_path = source.path
    return model, loading_info
