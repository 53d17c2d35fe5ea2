#!/usr/bin/env python
"""Fine-tune a causal LM (GPT, GPT-2, DialoGPT, Llama, Qwen2, ...) into a persona chatbot with the double-heads loss (LM
+ next-utterance multiple choice).

    python run_persona.py configs/gpt2.yaml [--flag value ...]
    accelerate launch run_persona.py configs/gpt2.yaml
    torchrun --nproc_per_node 8 run_persona.py --model_name_or_path openai-community/gpt2 --output_dir out

A lone `.yaml`/`.json` argument is a config file; flags after it override its values. A user error is one line and exit
status 2 (`PERSONA_DEBUG=1` shows its traceback); a bug keeps its traceback (exit status 1).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from transformers import HfArgumentParser

from persona_arguments import DialogArguments, add_training_help
from persona_arguments import ModelArguments as SharedModelArguments
from persona_chat_options import check_system_prompt, load_chat_template
from persona_checkpoints import TRAINING_CONFIG_NAME, default_output_dir, write_training_config
from persona_cli import (
    check_option_names,
    given_options,
    parse_args_with_config,
    run_console_script,
    set_by_user,
    setup_logging,
    warn_ignored,
)
from persona_errors import UsageError, check_positive
from persona_inputs import MIN_INPUT_LENGTH
from persona_locations import check_model_path, check_writable
from persona_process import release_deepspeed, say

if TYPE_CHECKING:  # the Trainer's stack loads after the flags are parsed (see cli)
    from persona_trainer import PersonaTrainingArguments

logger = logging.getLogger(__name__)

# `persona_encoding.ENCODINGS`, written out so that the flags parse (and --help prints) before torch loads; a test
# keeps the two equal.
CANDIDATE_ENCODINGS = ("auto", "packed", "shared_prefix", "plain")

PERSONACHAT_URL = "https://s3.amazonaws.com/datasets.huggingface.co/personachat/personachat_self_original.json"


@dataclass(kw_only=True)
class ModelArguments(SharedModelArguments):
    """The backbone and how to load it (the options every script shares), input format, candidate encoding, LoRA."""

    model_name_or_path: str = field(
        default="openai-community/openai-gpt",
        metadata={
            "help": "Hub id or local path of the backbone (gpt2, distilgpt2, microsoft/DialoGPT-*, openai-gpt), or a "
            "GGUF file (de-quantized to --dtype; the run folder is safetensors)."
        },
    )
    candidate_encoding: str = field(
        default="auto",
        metadata={
            "help": "How the loss path encodes each example's candidates, all exact: 'packed' (the context once, the "
            "candidates behind it in one row under a tree mask), 'shared_prefix' (the context once, its KV cache "
            "broadcast to the candidates), 'plain' (every candidate in full, the reference computation) or 'auto' "
            "(the fastest that applies to the backbone: see docs/architecture.md). Saved in the model config.",
            "choices": list(CANDIDATE_ENCODINGS),
        },
    )
    input_format: str | None = field(
        default=None,
        metadata={
            "help": "How persona dialogs become tokens: 'chat_template' (the tokenizer's chat template, the persona as "
            "the system message; a plain causal LM that serving engines prompt as in training) or 'speaker_tokens' "
            "(the reference's <speaker1>/<speaker2> layout). Default: chat_template for a tokenizer with a chat "
            "template, speaker_tokens for GPT / GPT-2 / DialoGPT / openai-gpt and tokenizers without one.",
            "choices": ["chat_template", "speaker_tokens"],
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "chat_template: the system message, {persona} standing for the persona sentences (one per line). "
            "Default: 'You are chatting with someone. Stay in character. Your persona:\\n{persona}'."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "chat_template: a Jinja template file (or a tokenizer_config.json / chat_template.json) used "
            "instead of the tokenizer's own; it is saved with the model."
        },
    )
    # --- LoRA (PEFT)
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train a LoRA adapter (plus the MC head and persona-token embeddings) instead of all weights."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names LoRA adapts; none: PEFT's targets for the architecture."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_system_prompt(self.system_prompt, warn=False)  # before anything loads (warnings: once logging is set)
        if self.use_peft and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise UsageError(
                f"--use_peft needs --lora_r >= 1, --lora_alpha > 0 and 0 <= --lora_dropout < 1; got "
                f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}."
            )


@dataclass(kw_only=True)
class DataArguments(DialogArguments):
    """The dialogs (the options every script shares) and how they become training rows."""

    dataset_path: str = field(
        default=PERSONACHAT_URL, metadata={"help": "Local path, http(s) URL or Hub id of the persona dialogs."}
    )
    num_distractors: int = field(
        default=19, metadata={"help": "Distractors sampled from other dialogs for formats that have none."}
    )
    spc_bot_role: str = field(
        default="user2",
        metadata={"help": "Synthetic-Persona-Chat: the user the bot plays.", "choices": ["user1", "user2", "both"]},
    )
    column_mapping: str | None = field(
        default=None,
        metadata={
            "help": "Hub datasets: rename columns to the record's fields, e.g. 'persona=personality,dialog=utterances'."
        },
    )
    dataset_cache: str = field(
        default="./dataset_cache", metadata={"help": "Folder caching downloads and tokenized features."}
    )
    num_candidates: int = field(default=2, metadata={"help": "Candidates per training example (gold included)."})
    personality_permutations: int = field(
        default=1, metadata={"help": "Times each dialog is used, the persona rotated by one sentence each time."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest input in tokens; none: the model's maximum positions."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on; none: the first of valid, validation, test the data has."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Rebuild cached features."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation rows."})
    do_convai2_eval: bool = field(
        default=False,
        metadata={"help": "After training, score persona_eval's metrics (Hits@k, ppl, F1, ...) on the eval split."},
    )
    nli_model: str | None = field(
        default=None, metadata={"help": "With --do_convai2_eval: an NLI checkpoint scoring persona consistency."}
    )

    def __post_init__(self):
        check_positive(self, "num_candidates", "personality_permutations", "max_train_samples", "max_eval_samples")
        check_positive(self, "preprocessing_num_workers")
        check_positive(self, "num_distractors", minimum=0)
        check_positive(self, "max_length", minimum=MIN_INPUT_LENGTH)
        if self.nli_model is not None:
            check_model_path(self.nli_model, "--nli_model")
            if not self.do_convai2_eval:
                raise UsageError("--nli_model scores the replies of --do_convai2_eval; add --do_convai2_eval.")
        super().__post_init__()


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
    check_same_objective(training_args, folder.path, folder.resume_from, finished=folder.finished_step is not None)
    for line in folder.messages():
        say(f"persona-train: {line}")
    return folder.resume_from, folder.finished_step is not None


def check_same_objective(
    training_args, output_dir: str, checkpoint: str | None, explicit: bool = False, finished: bool = False
) -> None:
    """Resuming `checkpoint` of the run in `output_dir` (or taking its finished run for done) under another objective
    is refused in one line."""
    from persona_checkpoints import check_resume_objective

    names = ("objective", "dpo_loss")
    defaults = {f.name: f.default for f in dataclasses.fields(training_args) if f.name in names}
    wanted = {name: getattr(training_args, name) for name in names}
    check_resume_objective(output_dir, checkpoint, wanted, defaults, explicit=explicit, finished=finished)


def needed_splits(dialogs, data_args, training_args) -> tuple[str | None, str | None]:
    """The train and evaluation splits the run needs (None when it needs none); a `UsageError` saying how to fix a
    missing one."""
    from persona_data import find_split

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


def make_parser() -> HfArgumentParser:
    from transformers import TrainingArguments

    from persona_trainer import PersonaTrainingArguments, has_accelerator

    parser = HfArgumentParser((ModelArguments, DataArguments, PersonaTrainingArguments), prog="persona-train")
    # The command line evaluates each epoch (the reference's schedule) when it evaluates; the dataclass default is
    # 'no' so that a Trainer built in Python without an eval_dataset works.
    parser.set_defaults(eval_strategy="auto")
    parser.set_defaults(use_cpu=not has_accelerator())  # on the CPU anyway: saying so lets bf16 (CPU autocast) through
    # --help: the persona options (model, data, and the objective fields PersonaTrainingArguments adds) first, then
    # the Trainer's own; HfArgumentParser lists a subclass's new fields after all of its base class's.
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    first = [a for a in parser._actions if a.dest not in trainer_fields]
    parser._actions[:] = first + [a for a in parser._actions if a.dest in trainer_fields]
    for group in parser._action_groups:
        group._group_actions.sort(key=lambda a: a.dest in trainer_fields)  # stable: each part keeps its order
    return parser


def help_parser() -> HfArgumentParser:
    """The parser `persona-train --help` prints, built without importing the Trainer's stack (`add_training_help`);
    a test keeps its flags equal to `make_parser()`'s."""
    parser = HfArgumentParser((ModelArguments, DataArguments), prog="persona-train", description=__doc__)
    add_training_help(parser, {"eval_strategy": "'auto'", "use_cpu": "true on a machine without an accelerator"})
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PersonaTrainingArguments]:
    """Parse flags; a first argument ending in .yaml/.yml/.json is a config file whose values the flags override."""
    from persona_trainer import has_accelerator

    parser = make_parser()
    model_args, data_args, training_args = parse_args_with_config(parser, argv)
    # What training_config.yaml keeps: the options the user set, and the model and data the run cannot do without.
    argv = sys.argv[1:] if argv is None else argv
    training_args.given_options = given_options(parser, argv) | {"model_name_or_path", "dataset_path"}
    check_mixed_precision(training_args.fp16, on_cpu=training_args.use_cpu or not has_accelerator())
    if training_args.deepspeed and not any(v in os.environ for v in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK")):
        # Without a launcher DeepSpeed looks for MPI and fails deep inside its communicator.
        raise UsageError(
            "--deepspeed needs a launcher: run under deepspeed, torchrun or accelerate launch "
            "(one GPU: torchrun --nproc_per_node 1 run_persona.py ...)."
        )
    # Every folder the run writes, before anything loads: a run must not fail at its end for want of a place to save.
    check_writable("runs" if training_args.auto_output_dir else training_args.output_dir, "--output_dir", folder=True)
    warn_ignored_training_options(model_args, data_args, training_args)
    return model_args, data_args, training_args


def main(model_args: ModelArguments, data_args: DataArguments, training_args: PersonaTrainingArguments) -> dict:
    """Train and/or evaluate; returns the final metrics."""
    import datasets
    from transformers import set_seed

    from persona_collator import PersonaCollator
    from persona_data import build_features, load_dialogs_with_report
    from persona_dpo import PersonaDPOTrainer, preference_dialogs
    from persona_encoding import set_candidate_encoding
    from persona_formats import input_format_of
    from persona_lora import apply_lora, check_gradient_checkpointing
    from persona_model import input_budget, load_model_and_tokenizer
    from persona_nli import NLIScorer
    from persona_trainer import PersonaTrainer

    log_level = training_args.get_process_log_level()
    # The project's own lines (data and model loaded, candidate encoding) show on the main process by default.
    passive = training_args.log_level == "passive" and training_args.should_log
    setup_logging(logging.INFO if passive else log_level, library_level=log_level)
    if training_args.auto_output_dir:
        from accelerate.utils import broadcast_object_list

        # Every process must write to the folder the main process named.
        training_args.output_dir = broadcast_object_list([default_output_dir(model_args.model_name_or_path)])[0]
        say(f"persona-train: writing the run to {training_args.output_dir}")
    logger.debug("Training parameters %s", training_args)

    last_checkpoint = None
    if training_args.do_train and training_args.resume_from_checkpoint is None:
        last_checkpoint, done = previous_run(training_args)
        if done:
            return {}
    elif training_args.do_train and isinstance(training_args.resume_from_checkpoint, str):
        checkpoint = os.path.normpath(training_args.resume_from_checkpoint)
        check_same_objective(training_args, os.path.dirname(checkpoint), checkpoint, explicit=True)

    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        # ZeRO-3 partitions the weights while from_pretrained loads them (zero.Init), and reads the world size from
        # DeepSpeed's own communicator, which accelerate leaves unset on CPU: hand it the process group now.
        deepspeed.init_distributed()

    # Before training: an NLI checkpoint whose labels cannot be read fails now, not hours later.
    nli = NLIScorer.from_pretrained(data_args.nli_model, device="cpu") if data_args.nli_model else None
    with training_args.main_process_first(desc="loading persona dialogs"):
        dialogs, reports = load_dialogs_with_report(
            data_args.dataset_path,
            data_args.dataset_format,
            **data_args.read_options(),
            num_distractors=data_args.num_distractors,
            spc_bot_role=data_args.spc_bot_role,
            column_mapping=data_args.column_mapping,
            distractor_seed=training_args.seed,
        )
    warn_unused_distractors(data_args, training_args, reports)
    train_split, eval_split = needed_splits(dialogs, data_args, training_args)
    dpo = training_args.objective == "dpo"
    if dpo and train_split is not None:  # each turn's candidates become its preference set (before the model loads)
        with training_args.main_process_first(desc="choosing preference pairs"):
            source = f"{data_args.dataset_path}: split {train_split!r}"
            dialogs[train_split] = preference_dialogs(dialogs[train_split], data_args.num_candidates, source=source)
    set_seed(training_args.seed)
    chat_template = load_chat_template(model_args.chat_template) if model_args.chat_template else None
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        **model_args.load_options(),
        input_format=model_args.input_format,
        system_prompt=model_args.system_prompt,
        chat_template=chat_template,
        chat_template_name=f"--chat_template {model_args.chat_template}" if chat_template else None,
        grow_embeddings=True,  # a tokenizer larger than the embeddings gets new rows, trained with the rest
    )
    input_format = input_format_of(tokenizer)
    set_candidate_encoding(model, model_args.candidate_encoding)
    if training_args.activation_checkpointing:  # --gradient_checkpointing, its old name, was folded into it
        check_gradient_checkpointing(model)
    if model_args.use_peft:
        model = apply_lora(
            model,
            tokenizer,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
        )
    max_length = input_budget(model, data_args.max_length)

    def features(split: str, num_candidates: int | None, max_samples: int | None) -> datasets.Dataset:
        with training_args.main_process_first(desc=f"building {split} features"):
            rows = build_features(
                dialogs[split],
                tokenizer,
                num_candidates=num_candidates,
                max_history=data_args.max_history,
                personality_permutations=data_args.personality_permutations if split == data_args.train_split else 1,
                max_length=max_length,
                num_proc=data_args.preprocessing_num_workers,
                cache_dir=data_args.dataset_cache,
                load_from_cache_file=not data_args.overwrite_cache,
                source=f"{data_args.dataset_path}: split {split!r}",
                input_format=input_format,
            )
        if rows.num_rows == 0:
            raise UsageError(f"{data_args.dataset_path}: split {split!r} gives no examples (no dialog with a turn).")
        return rows.select(range(min(max_samples, rows.num_rows))) if max_samples is not None else rows

    train_dataset = eval_dataset = None
    if train_split is not None:
        train_dataset = features(train_split, None if dpo else data_args.num_candidates, data_args.max_train_samples)
    if eval_split is not None:
        # Evaluation ranks every candidate (20 in PERSONA-CHAT), as ConvAI2's Hits@1.
        eval_dataset = features(eval_split, None, data_args.max_eval_samples)

    mixed = training_args.fp16 or training_args.bf16
    trainer = (PersonaDPOTrainer if dpo else PersonaTrainer)(
        model=model,
        args=training_args,
        data_collator=PersonaCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if mixed else None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        base_model=model_args.model_name_or_path,
        dataset_name=data_args.dataset_path,
        recipe={
            **vars(data_args),
            "use_peft": model_args.use_peft,
            **input_format.record,
        },
    )
    if training_args.do_train and trainer.is_world_process_zero():
        # Saved with the model (and pushed with it): the options that reproduce the run.
        os.makedirs(training_args.output_dir, exist_ok=True)
        config_path = os.path.join(training_args.output_dir, TRAINING_CONFIG_NAME)
        given = getattr(training_args, "given_options", None)
        write_training_config(config_path, make_parser(), model_args, data_args, training_args, given=given)

    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
        trainer.save_model()
        train_metrics = {**result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
        say_where_saved("persona-train", training_args.output_dir, trainer.callback_handler.callbacks)
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if data_args.do_convai2_eval:
        from persona_convai2 import evaluate_convai2

        convai2 = evaluate_convai2(
            trainer.model,
            tokenizer,
            dialogs[eval_split],
            trainer=trainer,
            max_history=data_args.max_history,
            max_length=max_length,
            max_turns=data_args.max_eval_samples,
            cache_dir=data_args.dataset_cache,
            nli=nli,
        )
        convai2 = {f"convai2_{key}": value for key, value in convai2.items() if key != "candidates_per_turn"}
        trainer.log(convai2)
        trainer.log_metrics("convai2", convai2)
        trainer.save_metrics("convai2", convai2)
        metrics.update(convai2)
    if training_args.push_to_hub:
        trainer.push_to_hub(eval_metrics=metrics)
    release_deepspeed(trainer)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """Console script `persona-train`."""

    def train(args: list[str]) -> None:
        if "-h" in args or "--help" in args:
            help_parser().print_help()
            return
        check_option_names(help_parser(), args)  # a mistyped flag or config key: said before torch loads
        main(*parse_args(args))

    return run_console_script("persona-train", train, argv)


if __name__ == "__main__":
    sys.exit(cli())
