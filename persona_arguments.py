"""The argument dataclasses every console script shares, as TRL's `ModelConfig` / `ScriptArguments`: which checkpoint
and how to load it (`ModelArguments`, `InferenceArguments`), which dialogs and how to read them (`DialogArguments`).

One declaration and one check per option, so `persona-train`, `persona-chat`, `persona-eval` and `persona-demo` take
the same flags with the same help. The dataclasses are keyword-only (a script's own dataclass inherits several of
them); their checks run while parsing and import nothing heavy, so a flag mistake is reported before torch loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from persona_errors import UsageError, check_positive
from persona_locations import check_model_path, check_writable
from persona_process import check_device_name

DTYPES = ["auto", "float32", "bfloat16", "float16"]


def _post_init_next(obj, cls) -> None:
    """Run the next `__post_init__` in the MRO: each shared dataclass checks its own fields, then hands on."""
    following = getattr(super(cls, obj), "__post_init__", None)
    if following is not None:
        following()


@dataclass(kw_only=True)
class ModelArguments:
    """The checkpoint and how to load it (every script)."""

    model_name_or_path: str = field(
        metadata={"help": "Checkpoint: a local folder, a Hub id or a GGUF file (de-quantized to --dtype)."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "The GGUF file to load from the --model_name_or_path folder (a folder holding several)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the checkpoint's own."})
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint on the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token; none: the one stored by `hf auth`."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are stored."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype at load time; none: the checkpoint's.", "choices": DTYPES}
    )

    def __post_init__(self):
        check_model_path(self.model_name_or_path, gguf_file=self.gguf_file)
        if self.tokenizer_name is not None:
            check_model_path(self.tokenizer_name, "--tokenizer_name")
        _post_init_next(self, ModelArguments)

    def load_options(self) -> dict:
        """Keyword arguments of `persona_model.load_model_and_tokenizer` (and `load_for_chat`) besides `dtype`."""
        return {
            "tokenizer_name_or_path": self.tokenizer_name,
            "revision": self.revision,
            "token": self.token,
            "cache_dir": self.cache_dir,
            "trust_remote_code": self.trust_remote_code,
            "gguf_file": self.gguf_file,
        }


@dataclass(kw_only=True)
class InferenceArguments(ModelArguments):
    """A checkpoint loaded for replies and scores (persona-chat, persona-eval, persona-demo): the model options and
    the device."""

    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1, mps, xpu; none: cuda when available."}
    )

    def __post_init__(self):
        check_device_name(self.device)
        _post_init_next(self, InferenceArguments)


@dataclass(kw_only=True)
class DialogArguments:
    """Persona dialogs and how to read them, and how much history a context keeps (every script)."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "Local path, http(s) URL or Hub id of persona dialogs (any format it reads)."}
    )
    dataset_format: str | None = field(
        default=None,
        metadata={"help": "Reader: personachat_json, jsonl, chat_jsonl, convai2_txt, spc_csv or hub; none: detected."},
    )
    dataset_cache: str | None = field(default=None, metadata={"help": "Folder caching downloads and features."})
    on_bad_record: str = field(
        default="error",
        metadata={
            "help": "On a malformed record: 'error' stops, 'skip' counts and reports it.",
            "choices": ["error", "skip"],
        },
    )
    max_history: int = field(default=2, metadata={"help": "Previous exchanges kept: the last 2*max_history+1 turns."})
    max_turn_chars: int | None = field(
        default=None,
        metadata={
            "help": "Longest text (turn, candidate, persona sentence) a record may hold, in characters; a longer one "
            "is a bad record. A guard against a mis-parsed file that lands whole in one field; shorter long texts are "
            "cut to the model's window like any long context. 0: no limit; none: 100000."
        },
    )

    def __post_init__(self):
        check_positive(self, "max_history", "max_turn_chars", minimum=0)
        if self.dataset_cache is not None and os.path.isfile(self.dataset_cache):
            raise UsageError(f"--dataset_cache {self.dataset_cache}: is a file; pass a folder.")
        if self.dataset_cache is not None:  # downloads and features are written there: checked before loading
            check_writable(self.dataset_cache, "--dataset_cache", folder=True)
        if self.on_bad_record not in ("error", "skip"):
            raise UsageError(f"--on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}.")
        _post_init_next(self, DialogArguments)

    def read_options(self) -> dict:
        """Keyword arguments of `persona_data.load_dialogs` besides the source and format."""
        options = {"on_bad_record": self.on_bad_record}
        if self.max_turn_chars is not None:
            options["max_turn_chars"] = self.max_turn_chars
        if self.dataset_cache is not None:
            options["cache_dir"] = self.dataset_cache
        return options


def source_fields(path: str, class_name: str) -> dict[str, dict]:
    """The init fields a dataclass declares in a source file, read without importing it (importing
    `TrainingArguments` costs seconds of torch): name -> {"default": source text, "help": text, "flag": True for a
    bool}, in declaration order. `persona-train --help` is printed from these."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    (klass,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name]
    fields = {}
    for node in klass.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        annotation = ast.unparse(node.annotation)
        if node.target.id.startswith("_") or annotation.startswith("ClassVar"):
            continue
        default, help_text = node.value, ""
        if isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith("field"):
            keywords = {k.arg: k.value for k in node.value.keywords}
            if "init" in keywords and ast.unparse(keywords["init"]) == "False":
                continue
            default = keywords.get("default", keywords.get("default_factory"))
            metadata = keywords.get("metadata")
            if isinstance(metadata, ast.Dict):
                for key, value in zip(metadata.keys, metadata.values):
                    if isinstance(key, ast.Constant) and key.value == "help" and isinstance(value, ast.Constant):
                        help_text = value.value
        fields[node.target.id] = {
            "default": "None" if default is None else ast.unparse(default),
            "help": help_text,
            "flag": annotation.split("|")[0].strip() == "bool",
        }
    return fields


def add_training_help(parser, defaults: dict[str, str]) -> None:
    """Add to `parser` the fields `PersonaTrainingArguments` adds, then the Trainer's own, read from their sources
    (`source_fields`), with `defaults` (source text) where the script sets its own: `persona-train --help` without
    importing the Trainer's stack (seconds of torch). Help only: the real parser is built from the classes."""
    import importlib.util

    transformers_dir = os.path.dirname(importlib.util.find_spec("transformers").origin)
    trainer = source_fields(os.path.join(transformers_dir, "training_args.py"), "TrainingArguments")
    persona = source_fields(importlib.util.find_spec("persona_trainer").origin, "PersonaTrainingArguments")
    merged = {
        name: {**spec, "default": defaults.get(name, spec["default"])} for name, spec in {**trainer, **persona}.items()
    }
    groups = [
        ("persona training (PersonaTrainingArguments)", [name for name in persona if name not in trainer]),
        ("Trainer (TrainingArguments, with persona-train's defaults)", list(trainer)),
    ]
    for title, names in groups:
        group = parser.add_argument_group(title)
        for name in names:
            spec = merged[name]
            options = {"nargs": "?", "metavar": name.upper()} if spec["flag"] else {"metavar": name.upper()}
            group.add_argument(f"--{name}", default=spec["default"], help=spec["help"] or " ", **options)
