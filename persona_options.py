"""Checks of the four scripts' flags against each other and the file system, made while parsing: output paths that
can be written, options that do not apply (said once, not silently dropped), and persona-train's look at its run
folder and the splits it needs.

Everything here runs before a model or data loads, so a mistake found at the end of a run (results that cannot be
written) is found at its start instead. It imports only `persona_cli` and the run-folder inspection.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields

from persona_cli import find_split, say
from persona_errors import UsageError


def check_writable(path: str, flag: str, *, folder: bool = False) -> None:
    """A `UsageError` naming `flag` when `path` (a file, or with `folder` a folder) cannot be written: a folder where
    a file goes or the reverse, a file among the folders above it, or a place where nothing can be created (a
    read-only folder, /proc, /sys).

    Writability is tried, not read from permission bits: a temporary file is created and removed in the nearest
    existing folder (root ignores permission bits, and /proc refuses new files whatever its bits say). An existing
    file is opened for appending, which leaves it as it is.
    """
    full = os.path.abspath(os.path.expanduser(path))
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a file, not a folder; pass a folder.")
    if not folder and os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a directory; pass a file name (e.g. results.json).")
    existing = full if folder else os.path.dirname(full)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; pass another path.")
    try:
        if not folder and os.path.exists(full):
            with open(full, "a", encoding="utf-8"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".persona-write-check-"):
                pass
    except OSError as err:
        where = full if not folder and os.path.exists(full) else existing
        raise UsageError(
            f"{flag} {path}: cannot write {'to' if where == full else 'in'} {where} ({err.strerror}); pass a path "
            "where you can write."
        ) from None


def given_options(parser, argv) -> set[str]:
    """The option names a command line sets: a config file's keys (first argument) and the flags it passes."""
    from persona_cli import CONFIG_SUFFIXES, read_config_file

    argv = list(argv)
    given = set()
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        given.update(read_config_file(argv.pop(0)))
    options = parser._option_string_actions
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        # argparse takes a unique prefix of a flag (`--learning_r`) as the flag itself.
        dests = {options[name].dest} if name in options else {a.dest for o, a in options.items() if o.startswith(name)}
        if len(dests) == 1:
            given.update(dests)
    return given


def set_by_user(args, names) -> list[str]:
    """The `names` of fields of the dataclass `args` whose value differs from the field's default."""
    defaults = {}
    for f in fields(args):
        if f.name in names:
            defaults[f.name] = f.default_factory() if callable(f.default_factory) else f.default
    return [name for name in names if getattr(args, name) != defaults[name]]


def warn_ignored(prog: str, names, reason: str) -> None:
    """One line saying that the flags `names` have no effect, and why."""
    if names:
        flags = ", ".join(f"--{name}" for name in names)
        say(f"{prog}: warning: {flags} {'is' if len(names) == 1 else 'are'} ignored: {reason}.")


def warn_ignored_training_options(model_args, data_args, training_args) -> None:
    """persona-train's options that a run does not use, each said once: LoRA's without --use_peft, DPO's under the
    double-heads objective, distractors where no candidate is ranked; and a multiple-choice loss that is always 0."""
    prog = "persona-train"
    lora = set_by_user(model_args, ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"))
    if not model_args.use_peft:
        warn_ignored(prog, lora, "LoRA options apply with --use_peft true")
    if training_args.objective != "dpo":
        dpo = set_by_user(training_args, ("beta", "dpo_loss"))
        warn_ignored(prog, dpo, f"DPO options apply with --objective dpo (this run: {training_args.objective})")
    if not ranks_candidates(data_args, training_args):
        warn_ignored(
            prog,
            set_by_user(data_args, ("num_distractors",)),
            "this run ranks no candidates (--num_candidates 1 and no evaluation)",
        )
    if (
        training_args.do_train
        and training_args.objective == "double_heads"
        and data_args.num_candidates == 1
        and training_args.mc_coef > 0
    ):
        say(
            f"{prog}: warning: --num_candidates 1 gives the multiple-choice head nothing to choose from: its loss is 0 "
            f"and --mc_coef {training_args.mc_coef:g} trains nothing. Pass --num_candidates 2 or more (gold and "
            "distractors), or --mc_coef 0 to train the language model alone."
        )


def ranks_candidates(data_args, training_args) -> bool:
    """Whether a run ranks candidates: it trains on more than one, or it evaluates (every candidate)."""
    evaluates = training_args.do_eval or training_args.eval_strategy != "no" or data_args.do_convai2_eval
    return (training_args.do_train and data_args.num_candidates > 1) or evaluates


def warn_unused_distractors(data_args, training_args, reports: dict) -> None:
    """--num_distractors set, yet no reply of the data needed sampled distractors (the format has its own
    candidates); said only when `warn_ignored_training_options` has not said it already."""
    default = next(f.default for f in fields(data_args) if f.name == "num_distractors")
    if not ranks_candidates(data_args, training_args):
        return
    source = data_args.dataset_path
    if data_args.num_distractors != default and not any(getattr(r, "sampled", 0) for r in reports.values()):
        warn_ignored(
            "persona-train",
            ["num_distractors"],
            f"every turn of {source} carries its own candidates, so none were sampled",
        )


def previous_run(training_args) -> tuple[str | None, bool]:
    """What `output_dir` already holds, said on stderr: (the checkpoint to resume from, whether the run finished)."""
    from persona_checkpoints import inspect_run_folder

    folder = inspect_run_folder(
        training_args.output_dir,
        overwrite=training_args.overwrite_output_dir,
        clear=training_args.process_index == 0,
        max_steps=training_args.max_steps,
        num_train_epochs=training_args.num_train_epochs,
    )
    for line in folder.messages():
        say(f"persona-train: {line}")
    return folder.resume_from, folder.finished_step is not None


def needed_splits(dialogs, data_args, training_args) -> tuple[str | None, str | None]:
    """The train and evaluation splits the run needs (None when it needs none); a `UsageError` saying how to fix a
    missing one."""
    train_split = eval_split = None
    source = data_args.dataset_path
    if training_args.do_train:
        train_split = find_split(dialogs, data_args.train_split, source)
    if training_args.do_eval or training_args.eval_strategy != "no" or data_args.do_convai2_eval:
        try:
            eval_split = find_split(dialogs, data_args.eval_split, source)
        except UsageError as err:
            flags = {
                "--do_eval false": training_args.do_eval,
                "--eval_strategy no": training_args.eval_strategy != "no" and not training_args.auto_eval_strategy,
                "--do_convai2_eval false": data_args.do_convai2_eval,
            }
            users = [flag for flag, on in flags.items() if on]
            raise UsageError(
                f"{err} Nothing to evaluate on: pass {' '.join(users)} to train without evaluating, or "
                "--eval_split NAME."
            ) from None
    return train_split, eval_split


def check_mixed_precision(fp16: bool, on_cpu: bool) -> None:
    """fp16 mixed precision needs a GPU (its loss scaling and kernels are CUDA's); on the CPU a `UsageError` points to
    bf16, whose autocast CPUs run."""
    if fp16 and on_cpu:
        raise UsageError(
            "--fp16 true: fp16 mixed precision needs a GPU and this run is on the CPU; pass --bf16 true "
            "(bfloat16 autocast runs on CPUs) or leave --fp16 out."
        )


def say_where_saved(prog: str, output_dir: str, callbacks) -> None:
    """Where a training run saved, and its TensorBoard logs when a callback wrote some (the callback names the
    folder)."""
    boards = [cb.logging_dir for cb in callbacks if isinstance(getattr(cb, "logging_dir", None), str)]
    logs = "".join(f"; TensorBoard logs: tensorboard --logdir {folder}" for folder in boards)
    say(f"{prog}: saved the model, tokenizer and metrics to {output_dir}{logs}")
