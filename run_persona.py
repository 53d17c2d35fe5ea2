#!/usr/bin/env python
"""Fine-tune a causal LM (GPT, GPT-2, DialoGPT, Llama, Qwen2, ...) into a persona chatbot with the double-heads loss (LM
+ next-utterance multiple choice).

    python run_persona.py configs/gpt2.yaml [--flag value ...]
    accelerate launch run_persona.py configs/gpt2.yaml
    torchrun --nproc_per_node 8 run_persona.py --model_name_or_path openai-community/gpt2 --output_dir out

A lone `.yaml`/`.json` argument is a config file; flags after it override its values. `--debug` shows the traceback
of a user error (otherwise one line and exit status 2).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import HfArgumentParser, set_seed

from persona_chat_template import chat_format_of, load_chat_template
from persona_checkpoints import TRAINING_CONFIG_NAME, default_output_dir, inspect_run_folder, write_training_config
from persona_cli import (
    MIN_INPUT_LENGTH,
    UsageError,
    check_mixed_precision,
    check_model_path,
    check_positive,
    feature_cache_hint,
    find_split,
    input_budget,
    parse_args_with_config,
    release_deepspeed,
    run_console_script,
    say,
    say_where_saved,
)
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_encoding import ENCODINGS, set_candidate_encoding
from persona_lora import apply_lora, check_gradient_checkpointing
from persona_model import load_model_and_tokenizer
from persona_trainer import PersonaTrainer, PersonaTrainingArguments, has_accelerator

logger = logging.getLogger(__name__)

PERSONACHAT_URL = "https://s3.amazonaws.com/datasets.huggingface.co/personachat/personachat_self_original.json"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="openai-community/openai-gpt",
        metadata={"help": "Hub id or local path of the backbone (gpt2, distilgpt2, microsoft/DialoGPT-*, openai-gpt)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one stored by `hf auth`)."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype at load time: 'auto', 'float32', 'bfloat16' or 'float16'.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    candidate_encoding: str = field(
        default="auto",
        metadata={
            "help": "How the loss path encodes each example's candidates, all exact: 'packed' (the context once, the "
            "candidates behind it in one row under a tree mask), 'shared_prefix' (the context once, its KV cache "
            "broadcast to the candidates), 'plain' (every candidate in full, the reference computation) or 'auto' "
            "(the fastest that applies to the backbone: see docs/architecture.md). Saved in the model config.",
            "choices": list(ENCODINGS),
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
    shared_prefix: bool = field(
        default=True,
        metadata={"help": "false = --candidate_encoding plain (the former switch of the shared-context encodings)."},
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
        metadata={"help": "Module names LoRA adapts (default: PEFT's targets for the architecture)."},
    )

    def __post_init__(self):
        check_model_path(self.model_name_or_path)
        if self.tokenizer_name is not None:
            check_model_path(self.tokenizer_name, "--tokenizer_name")
        if not self.shared_prefix:
            if self.candidate_encoding not in ("auto", "plain"):
                raise ValueError(
                    f"--shared_prefix false asks for the plain encoding, --candidate_encoding for "
                    f"{self.candidate_encoding!r}: give only one of them."
                )
            self.candidate_encoding = "plain"
        if self.use_peft and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ValueError(
                f"--use_peft needs --lora_r >= 1, --lora_alpha > 0 and 0 <= --lora_dropout < 1; got "
                f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}."
            )


@dataclass
class DataArguments:
    dataset_path: str = field(
        default=PERSONACHAT_URL, metadata={"help": "Local path, http(s) URL or Hub id of the persona dialogs."}
    )
    dataset_format: str | None = field(
        default=None,
        metadata={
            "help": "Reader: personachat_json, jsonl, chat_jsonl, convai2_txt, spc_csv or hub (default: detected)."
        },
    )
    on_bad_record: str = field(
        default="error",
        metadata={
            "help": "On a malformed record: 'error' stops, 'skip' counts and reports it.",
            "choices": ["error", "skip"],
        },
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
    max_history: int = field(default=2, metadata={"help": "Previous exchanges kept: the last 2*max_history+1 turns."})
    personality_permutations: int = field(
        default=1, metadata={"help": "Times each dialog is used, the persona rotated by one sentence each time."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest input in tokens (default: the model's maximum positions)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on (default: the first of valid, validation, test the data has)."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Rebuild cached features."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation rows."})
    do_convai2_eval: bool = field(
        default=False,
        metadata={"help": "After training, score ConvAI2 Hits@k, perplexity and F1 (persona_eval) on the eval split."},
    )

    def __post_init__(self):
        check_positive(self, "num_candidates", "personality_permutations", "max_train_samples", "max_eval_samples")
        check_positive(self, "preprocessing_num_workers")
        check_positive(self, "max_history", "num_distractors", minimum=0)
        check_positive(self, "max_length", minimum=MIN_INPUT_LENGTH)
        if os.path.isfile(self.dataset_cache):
            raise UsageError(f"--dataset_cache {self.dataset_cache}: is a file; pass a folder.")


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, PersonaTrainingArguments), prog="persona-train")
    # The command line evaluates each epoch (the reference's schedule) when it evaluates; the dataclass default is
    # 'no' so that a Trainer built in Python without an eval_dataset works.
    parser.set_defaults(eval_strategy="auto")
    parser.set_defaults(use_cpu=not has_accelerator())  # on the CPU anyway: saying so lets bf16 (CPU autocast) through
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, PersonaTrainingArguments]:
    """Parse flags; a first argument ending in .yaml/.yml/.json is a config file whose values the flags override."""
    model_args, data_args, training_args = parse_args_with_config(make_parser(), argv)
    check_mixed_precision(training_args.fp16, on_cpu=training_args.use_cpu or not has_accelerator())
    if training_args.deepspeed and not any(v in os.environ for v in ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK")):
        # Without a launcher DeepSpeed looks for MPI and fails deep inside its communicator.
        raise UsageError(
            "--deepspeed needs a launcher: run under deepspeed, torchrun or accelerate launch "
            "(one GPU: torchrun --nproc_per_node 1 run_persona.py ...)."
        )
    return model_args, data_args, training_args


def _previous_run(training_args: PersonaTrainingArguments) -> tuple[str | None, bool]:
    """What `output_dir` already holds, said on stderr: (the checkpoint to resume from, whether the run finished)."""
    folder = inspect_run_folder(
        training_args.output_dir, overwrite=training_args.overwrite_output_dir, clear=training_args.process_index == 0
    )
    if folder.removed:
        say(f"persona-train: --overwrite_output_dir: removed {len(folder.removed)} checkpoint(s) of {folder.path}.")
    if folder.finished_step is not None:
        say(
            f"persona-train: {folder.path} already holds a finished run (step {folder.finished_step}); nothing to do. "
            "To train afresh pass --overwrite_output_dir true or another --output_dir."
        )
        return None, True
    for path, reason in folder.skipped:
        say(f"persona-train: skipping the incomplete checkpoint {path} ({reason}).")
    if folder.resume_from is not None:
        say(f"persona-train: resuming from {folder.resume_from} (pass --overwrite_output_dir true to start afresh).")
    return folder.resume_from, False


def _splits(
    dialogs, data_args: DataArguments, training_args: PersonaTrainingArguments
) -> tuple[str | None, str | None]:
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
            users = [
                flag
                for flag, on in (
                    ("--do_eval false", training_args.do_eval),
                    (
                        "--eval_strategy no",
                        training_args.eval_strategy != "no" and not training_args.auto_eval_strategy,
                    ),
                    ("--do_convai2_eval false", data_args.do_convai2_eval),
                )
                if on
            ]
            raise UsageError(
                f"{err} Nothing to evaluate on: pass {' '.join(users)} to train without evaluating, or "
                "--eval_split NAME."
            ) from None
    return train_split, eval_split


def main(model_args: ModelArguments, data_args: DataArguments, training_args: PersonaTrainingArguments) -> dict:
    """Train and/or evaluate; returns the final metrics."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    for lib in (datasets, transformers):
        lib.utils.logging.set_verbosity(log_level)
    for name in list(logging.root.manager.loggerDict):  # every project module logs under its own name
        if name.startswith("persona_"):
            logging.getLogger(name).setLevel(log_level)
    if training_args.auto_output_dir:
        from accelerate.utils import broadcast_object_list

        # Every process must write to the folder the main process named.
        training_args.output_dir = broadcast_object_list([default_output_dir(model_args.model_name_or_path)])[0]
        say(f"persona-train: writing the run to {training_args.output_dir}")
    logger.info("Training parameters %s", training_args)

    last_checkpoint = None
    if training_args.do_train and training_args.resume_from_checkpoint is None:
        last_checkpoint, done = _previous_run(training_args)
        if done:
            return {}

    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        # ZeRO-3 partitions the weights while from_pretrained loads them (zero.Init), and reads the world size from
        # DeepSpeed's own communicator, which accelerate leaves unset on CPU: hand it the process group now.
        deepspeed.init_distributed()

    with training_args.main_process_first(desc="loading persona dialogs"):
        dialogs = load_dialogs(
            data_args.dataset_path,
            data_args.dataset_format,
            cache_dir=data_args.dataset_cache,
            on_bad_record=data_args.on_bad_record,
            num_distractors=data_args.num_distractors,
            spc_bot_role=data_args.spc_bot_role,
            column_mapping=data_args.column_mapping,
            distractor_seed=training_args.seed,
        )
    train_split, eval_split = _splits(dialogs, data_args, training_args)

    set_seed(training_args.seed)
    chat_template = load_chat_template(model_args.chat_template) if model_args.chat_template else None
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        tokenizer_name_or_path=model_args.tokenizer_name,
        revision=model_args.model_revision,
        token=model_args.token,
        dtype=model_args.dtype,
        cache_dir=model_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code,
        input_format=model_args.input_format,
        system_prompt=model_args.system_prompt,
        chat_template=chat_template,
        chat_template_name=f"--chat_template {model_args.chat_template}" if chat_template else None,
    )
    chat_format = chat_format_of(tokenizer)
    set_candidate_encoding(model, model_args.candidate_encoding)
    if training_args.gradient_checkpointing:
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
        with (
            training_args.main_process_first(desc=f"building {split} features"),
            feature_cache_hint(data_args.dataset_cache),
        ):
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
                chat_format=chat_format,
            )
        if rows.num_rows == 0:
            raise UsageError(f"{data_args.dataset_path}: split {split!r} gives no examples (no dialog with a turn).")
        return rows.select(range(min(max_samples, rows.num_rows))) if max_samples is not None else rows

    train_dataset = eval_dataset = None
    if train_split is not None:
        train_dataset = features(train_split, data_args.num_candidates, data_args.max_train_samples)
    if eval_split is not None:
        # Evaluation ranks every candidate (20 in PERSONA-CHAT), as ConvAI2's Hits@1.
        eval_dataset = features(eval_split, None, data_args.max_eval_samples)

    mixed = training_args.fp16 or training_args.bf16
    trainer = PersonaTrainer(
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
            "input_format": "speaker_tokens" if chat_format is None else "chat_template",
            **({"system_prompt": chat_format.system_prompt} if chat_format is not None else {}),
        },
    )
    if training_args.do_train and trainer.is_world_process_zero():
        # Saved with the model (and pushed with it): the options that reproduce the run.
        os.makedirs(training_args.output_dir, exist_ok=True)
        config_path = os.path.join(training_args.output_dir, TRAINING_CONFIG_NAME)
        write_training_config(config_path, make_parser(), model_args, data_args, training_args)

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
        from persona_eval import evaluate_convai2

        convai2 = evaluate_convai2(
            trainer.model,
            tokenizer,
            dialogs[eval_split],
            trainer=trainer,
            max_history=data_args.max_history,
            max_length=max_length,
            max_turns=data_args.max_eval_samples,
            cache_dir=data_args.dataset_cache,
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
        main(*parse_args(args))

    return run_console_script("persona-train", train, argv)


if __name__ == "__main__":
    sys.exit(cli())
