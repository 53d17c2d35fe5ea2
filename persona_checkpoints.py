"""The run folder: its default name, its training config, and what it holds (complete checkpoints, a finished run,
checkpoints to clear for a fresh start).

The Trainer writes a checkpoint in order (weights, optimizer and scheduler, RNG states) and `trainer_state.json`
last, so a run killed while saving leaves a folder without a readable `trainer_state.json`, or with a file cut short.
A checkpoint is complete when `trainer_state.json` parses, a weights file is present, and every weights or torch file
in it is whole (safetensors: the header and the data it announces; torch files: a readable zip directory). Checks
read headers only, never the tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import zipfile
from dataclasses import dataclass, field
from datetime import datetime

from persona_errors import UsageError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Written by the Trainer at the end of a training run (`save_metrics("train")`, `save_state()`).
FINISHED_MARKERS = ("train_results.json", TRAINER_STATE)
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def incomplete_reason(checkpoint: str) -> str | None:
    """Why `checkpoint` cannot be resumed from (a few words), or None when it is complete."""
    state = os.path.join(checkpoint, TRAINER_STATE)
    try:
        with open(state, encoding="utf-8") as f:
            if "global_step" not in json.load(f):
                return f"{TRAINER_STATE} has no global_step"
    except FileNotFoundError:
        return f"no {TRAINER_STATE}: the save was cut short"
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is unreadable"
    names = os.listdir(checkpoint)
    has_deepspeed_state = any(n.startswith("global_step") for n in names)
    if not any(n in names for n in WEIGHTS_FILES) and not has_deepspeed_state:
        return "no weights file"
    for name in sorted(names):
        path = os.path.join(checkpoint, name)
        if name.endswith(".safetensors") and not _safetensors_whole(path):
            return f"{name} is cut short"
        if name.endswith((".pt", ".pth", ".bin")) and os.path.isfile(path) and not zipfile.is_zipfile(path):
            return f"{name} is cut short"
    return None


def _safetensors_whole(path: str) -> bool:
    """Whether a safetensors file holds its header and every byte of data the header announces."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return False
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return False
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    return 8 + header_len + max(ends, default=0) <= size


def last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint of `output_dir` (None if there is none) and the newer incomplete ones skipped,
    as (path, reason)."""
    skipped = []
    for checkpoint in checkpoints(output_dir):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint, skipped
        skipped.append((checkpoint, reason))
    return None, skipped


def finished_run(output_dir: str) -> int | None:
    """The final step of a training run that finished in `output_dir`, or None when it holds no finished run."""
    if not all(os.path.isfile(os.path.join(output_dir, name)) for name in FINISHED_MARKERS):
        return None
    try:
        with open(os.path.join(output_dir, TRAINER_STATE), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_checkpoints(output_dir: str) -> list[str]:
    """Delete the `checkpoint-N` folders and the finished-run markers of `output_dir` (a fresh start must not resume
    from them later); returns the folders removed."""
    removed = checkpoints(output_dir)
    for path in removed:
        shutil.rmtree(path)
    for name in FINISHED_MARKERS:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    return removed


TRAINING_CONFIG_NAME = "training_config.yaml"


def write_training_config(path: str, parser, *args_dataclasses, given=None) -> dict:
    """Write the options of a run as a config file `run_persona.py` accepts back; return them. With `given` (the
    option names the user set, in a config file or as flags, and what else reproduces the run), those options with
    their parsed values; without, every option that differs from its default.

    Tokens and machine-local paths of the run (output/logging dirs) are left out: the file is pushed to the Hub.
    """
    import yaml

    skip = {"output_dir", "logging_dir", "hub_token", "token", "push_to_hub_token", "resume_from_checkpoint"}
    defaults = {action.dest: action.default for action in parser._actions}
    config = {}
    for args in args_dataclasses:
        values = args.to_dict() if hasattr(args, "to_dict") else vars(args)
        for key, value in values.items():
            value = getattr(value, "value", value)  # enums (eval_strategy, ...) as their strings
            default = getattr(defaults.get(key), "value", defaults.get(key))
            wanted = value != default if given is None else key in given
            if key in defaults and key not in skip and wanted:
                config[key] = value
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return config


def default_output_dir(model_name_or_path: str) -> str:
    """runs/<date>_<host>_<model>, as the reference names its log folder."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    return os.path.join("runs", f"{stamp}_{socket.gethostname()}_{os.path.basename(model_name_or_path.rstrip('/'))}")


@dataclass
class RunFolder:
    """What an output folder holds for a new run: the checkpoint to resume from, the step of a finished run, the
    incomplete checkpoints skipped (path, reason) and the checkpoints removed by an overwrite."""

    path: str
    resume_from: str | None = None
    finished_step: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    continued_from: int | None = None  # the step a finished run ended at, when this run asks for more

    def messages(self) -> list[str]:
        """What a new run into this folder does, in lines for the user."""
        lines = []
        if self.removed:
            lines.append(f"--overwrite_output_dir: removed {len(self.removed)} checkpoint(s) of {self.path}.")
        if self.finished_step is not None:
            lines.append(
                f"{self.path} already holds a finished run (step {self.finished_step}); nothing to do. To train "
                "afresh pass --overwrite_output_dir true or another --output_dir; to train longer, a larger "
                "--max_steps or --num_train_epochs."
            )
            return lines
        lines += [f"skipping the incomplete checkpoint {path} ({reason})." for path, reason in self.skipped]
        if self.continued_from is not None:
            lines.append(f"{self.path} holds a run finished at step {self.continued_from}; training on.")
        if self.resume_from is not None:
            lines.append(f"resuming from {self.resume_from} (pass --overwrite_output_dir true to start afresh).")
        return lines


def asks_for_more(output_dir: str, finished_step: int, max_steps: int, num_train_epochs: float | None) -> bool:
    """Whether a new run's length (`max_steps` when > 0, else `num_train_epochs`) goes past the finished run's."""
    if max_steps > 0:
        return max_steps > finished_step
    if num_train_epochs is None:
        return False
    with open(os.path.join(output_dir, TRAINER_STATE), encoding="utf-8") as f:
        done = json.load(f).get("num_train_epochs")
    return isinstance(done, (int, float)) and num_train_epochs > done


def inspect_run_folder(
    output_dir: str,
    *,
    overwrite: bool = False,
    clear: bool = True,
    max_steps: int = -1,
    num_train_epochs: float | None = None,
) -> RunFolder:
    """Where a run into `output_dir` starts: afresh (no folder, or `overwrite`, whose checkpoints are removed when
    `clear`), nowhere (a finished run as long as the one asked for: `max_steps` when > 0, else `num_train_epochs`),
    or from the newest complete checkpoint (also of a finished run asked to train longer)."""
    folder = RunFolder(output_dir)
    if not os.path.isdir(output_dir):
        return folder
    if overwrite:
        folder.removed = remove_checkpoints(output_dir) if clear else []
        return folder
    folder.finished_step = finished_run(output_dir)
    if folder.finished_step is not None and asks_for_more(
        output_dir, folder.finished_step, max_steps, num_train_epochs
    ):
        folder.continued_from, folder.finished_step = folder.finished_step, None
    if folder.finished_step is None:
        folder.resume_from, folder.skipped = last_complete_checkpoint(output_dir)
    if folder.continued_from is not None and folder.resume_from is None:
        raise UsageError(
            f"{output_dir} holds a run that finished at step {folder.continued_from} and no checkpoint to train on "
            "from (the run saved none); pass --overwrite_output_dir true to train afresh, or another --output_dir."
        )
    return folder


def recorded_options(output_dir: str) -> dict | None:
    """The options a run folder's `training_config.yaml` records (None when it has none or it cannot be read)."""
    import yaml

    try:
        with open(os.path.join(output_dir, TRAINING_CONFIG_NAME), encoding="utf-8") as f:
            recorded = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, dict) else None


def check_resume_objective(
    output_dir: str,
    checkpoint: str | None,
    wanted: dict,
    defaults: dict,
    *,
    explicit: bool = False,
    finished: bool = False,
) -> None:
    """A `UsageError` when resuming `checkpoint` of the run in `output_dir` would train under another loss than the
    run's: `wanted` holds the new run's objective options (`objective`, `dpo_loss`), compared with those its
    `training_config.yaml` records (`defaults` for the ones it leaves out, as it keeps only the options a user set).
    A checkpoint carries its optimizer state and schedule, which belong to the loss they were trained under.
    `explicit`: the checkpoint was named by --resume_from_checkpoint (the fix is then to drop it). `finished`: the
    folder holds a finished run as long as the one asked for, which a run under another loss must not take for its
    own ("nothing to do")."""
    recorded = None if checkpoint is None and not finished else recorded_options(output_dir)
    if recorded is None:
        return
    for name, value in wanted.items():
        before = recorded.get(name, defaults.get(name))
        if name == "dpo_loss" and wanted.get("objective") != "dpo":
            continue
        if before is not None and before != value:
            fix = (
                f"Drop --resume_from_checkpoint (--model_name_or_path {checkpoint} starts from its weights)"
                if explicit
                else f"Pass a new --output_dir (--model_name_or_path {output_dir} starts from its weights), or "
                "--overwrite_output_dir true to discard its checkpoints"
            )
            raise UsageError(
                f"{output_dir}: holds a run trained with --{name} {before} ({TRAINING_CONFIG_NAME}); "
                + (
                    f"resuming its {os.path.basename(checkpoint)} under --{name} {value} would carry that run's "
                    "optimizer state and schedule into another loss."
                    if checkpoint is not None
                    else f"it is finished, and not a run under --{name} {value}."
                )
                + f" {fix}."
            )
