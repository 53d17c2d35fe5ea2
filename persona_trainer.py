"""`PersonaTrainer`: the Trainer with the double-heads loss `lm_coef·lm_loss + mc_coef·mc_loss` and the ranking
evaluation that `persona-eval` uses too (every candidate of a turn, mixed candidate counts included)."""

from __future__ import annotations

import math
import os
import pickle
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from persona_backbone import MC_HEAD_FILE, MC_HEAD_PREFIX, PersonaDoubleHeadsModel
from persona_card import persona_model_card, self_chat_summary
from persona_collator import ArrowBatches, PersonaCollator, candidate_counts
from persona_errors import UsageError
from persona_files import file_in_the_way
from persona_heads import candidate_labels
from persona_metrics import compute_metrics, gold_rank
from persona_model import unsafe_pickle_error

# DPO's beta: the rewards beta * (log pi - log pi_ref) and their gradients scale with it. Sequence log-probabilities
# run to hundreds of nats, so far above 10 a step overflows; far below 0.001 the loss stays at log 2.
BETA_MIN, BETA_MAX = 1e-3, 10.0


@dataclass
class PersonaTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the objective (double heads or DPO) and its loss weights; defaults are the reference
    recipe's (train.py)."""

    # --- objective: double heads (LM + multiple choice) or preference (DPO, persona_dpo)
    objective: str = field(
        default="double_heads",
        metadata={
            "help": "'double_heads': lm_coef * LM loss + mc_coef * multiple-choice loss (the reference recipe). "
            "'dpo': preference training, the gold reply preferred to each distractor (or to the record's curated "
            "rejected replies), plus lm_coef * the gold's NLL and mc_coef * the multiple-choice loss.",
            "choices": ["double_heads", "dpo"],
        },
    )
    lm_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the language-modelling loss on the gold reply (default 1; 0 with --objective dpo)."
        },
    )
    mc_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the multiple-choice (next-utterance) loss (default 1; 0 with --objective dpo)."},
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "dpo: how far from the reference model the policy may move (DPO's beta; 0.001 to 10, 0.01-0.5 "
            "in practice: a larger beta multiplies the gradients until they overflow, a smaller one trains nothing). "
            "A run whose loss or gradient norm goes non-finite stops at that step with one line naming the step and "
            "the likely flag, and the model is not saved."
        },
    )
    dpo_loss: str = field(
        default="pairwise",
        metadata={
            "help": "dpo: 'pairwise' (the DPO sigmoid loss of the gold against each rejected reply, averaged over "
            "the turn's rejected replies; TRL's 'sigmoid') or 'listwise' (cross-entropy of the softmax over "
            "beta * (log pi - log pi_ref) of all candidates, the gold as the target).",
            "choices": ["pairwise", "listwise"],
        },
    )
    # --- reference defaults for fields TrainingArguments already has
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Batch size per device for evaluation."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Accumulate gradients over this many batches before an optimizer step."}
    )
    learning_rate: float = field(default=6.25e-5, metadata={"help": "Peak learning rate (linear decay to 0)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Number of training epochs."})
    eval_strategy: IntervalStrategy | str = field(
        default="no",
        metadata={
            "help": "When to evaluate: 'no', 'steps' or 'epoch' (persona-train: 'epoch' with --do_eval, else 'no')."
        },
    )
    save_strategy: SaveStrategy | str = field(
        default="epoch", metadata={"help": "When to save a checkpoint: 'no', 'steps', 'epoch'."}
    )
    logging_steps: float = field(default=50, metadata={"help": "Log every this many optimizer steps."})
    do_train: bool = field(default=True, metadata={"help": "Train (on by default, as the reference)."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate at the end (on by default, as the reference)."})
    report_to: None | str | list[str] = field(
        default="auto", metadata={"help": "Trackers to log to; 'auto' = TensorBoard when installed, else none."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir that holds a run (its checkpoints are deleted)."},
    )

    def __post_init__(self):
        # No output_dir: run_persona names a run folder after date, host and model (as the reference).
        self.auto_output_dir = self.output_dir is None
        if self.report_to == "auto":
            from transformers.integrations import is_tensorboard_available

            self.report_to = ["tensorboard"] if is_tensorboard_available() else "none"
        self.auto_eval_strategy = self.eval_strategy == "auto"
        if self.auto_eval_strategy:  # persona-train's default: evaluate each epoch when evaluating at all
            self.eval_strategy = "epoch" if self.do_eval else "no"
        check_objective(self)
        check_training_values(self)
        # The old name warns in transformers 5; it means activation checkpointing.
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if getattr(self, old) is not None and getattr(self, new) is None:
                setattr(self, new, getattr(self, old))
            setattr(self, old, None)
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator():
            # Several processes on a machine without an accelerator: without use_cpu accelerate ignores the launch
            # and every process trains alone.
            self.use_cpu = True
        super().__post_init__()


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) on this machine."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def check_objective(args: PersonaTrainingArguments) -> None:
    """Resolve the loss weights' defaults for the objective (1 and 1; 0 and 0 under dpo) and check the objective's
    flags (a `UsageError` naming the flag)."""
    if args.objective not in ("double_heads", "dpo"):
        raise UsageError(f"--objective must be 'double_heads' or 'dpo', got {args.objective!r}.")
    default = 0.0 if args.objective == "dpo" else 1.0
    args.lm_coef = default if args.lm_coef is None else args.lm_coef
    args.mc_coef = default if args.mc_coef is None else args.mc_coef
    if not (args.lm_coef >= 0 and args.mc_coef >= 0):
        raise UsageError(f"--lm_coef and --mc_coef must be >= 0, got {args.lm_coef}, {args.mc_coef}.")
    if args.objective == "double_heads" and args.lm_coef + args.mc_coef <= 0:
        raise UsageError(f"--lm_coef and --mc_coef must not both be 0, got {args.lm_coef}, {args.mc_coef}.")
    if not (math.isfinite(args.beta) and args.beta > 0):
        raise UsageError(f"--beta must be a finite number > 0, got {args.beta}.")
    if not BETA_MIN <= args.beta <= BETA_MAX:
        raise UsageError(
            f"--beta {args.beta:g}: out of the range that trains ({BETA_MIN:g} to {BETA_MAX:g}; 0.01-0.5 in practice): "
            + ("the DPO gradients scale with beta and overflow." if args.beta > BETA_MAX else "DPO learns nothing.")
        )
    if args.dpo_loss not in ("pairwise", "listwise"):
        raise UsageError(f"--dpo_loss must be 'pairwise' or 'listwise', got {args.dpo_loss!r}.")


def non_finite_error(args: PersonaTrainingArguments, step: int, what: str) -> UsageError:
    """The one line for a run that went non-finite at optimizer step `step`, naming the flag most likely behind it."""
    lr, likely = args.learning_rate, []
    if lr > 1e-3:
        likely.append(f"--learning_rate {lr:g} is large for fine-tuning (1e-5 to 1e-4 in practice)")
    if args.objective == "dpo" and args.beta > 1:
        likely.append(f"--beta {args.beta:g} is large (0.01-0.5 in practice)")
    for name in ("lm_coef", "mc_coef"):
        if getattr(args, name) > 100:
            likely.append(f"--{name} {getattr(args, name):g} is large (the loss weights are about 1)")
    if args.fp16:
        likely.append("--fp16 overflows: train with --bf16 true or in float32")
    if not likely:
        clip = " or clip with --max_grad_norm 1.0" if not args.max_grad_norm else ""
        likely.append(f"lower --learning_rate (now {lr:g}){clip}, and check the base model's weights")
    likely = "; ".join(likely)
    return UsageError(f"training went non-finite at step {step} ({what}); stopped without saving the model: {likely}.")


def check_training_values(args: TrainingArguments) -> None:
    """A `UsageError` naming the flag for values the Trainer would accept and then fail on (or train wrongly with)."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if not getattr(args, name) >= 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "num_train_epochs", "warmup_steps", "adam_epsilon"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a finite number >= 0, got {value}.")
    if args.max_steps == 0 or (args.max_steps < 0 and args.num_train_epochs == 0 and args.do_train):
        raise UsageError("Nothing to train: pass --max_steps >= 1 or --num_train_epochs > 0 (or --do_train false).")
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be > 0, got {value}.")
    if args.output_dir is not None and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir}: is a file; pass a folder (it is created if missing).")
    blocking = None if args.output_dir is None else file_in_the_way(args.output_dir)
    if blocking:
        raise UsageError(f"--output_dir {args.output_dir}: {blocking} is a file, not a folder; pass another path.")
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume and not os.path.isdir(resume):
        raise UsageError(
            f"--resume_from_checkpoint {resume}: no such checkpoint folder; pass a checkpoint-N folder (re-running "
            "into the same --output_dir resumes from its newest complete checkpoint by itself)."
        )


class PersonaTrainer(Trainer):
    """Trainer for double-heads persona models.

    The loss of an optimizer step is `lm_coef · (NLL of every gold-reply token / number of those tokens) +
    mc_coef · (mean multiple-choice cross-entropy)`, both normalised over the whole accumulated batch on every
    process (so GA=2 × batch 2 takes the same step as GA=1 × batch 4). `lm_loss` and `mc_loss` are logged apart.
    Evaluation keeps eight numbers per turn (`persona_metrics.STAT_COLUMNS`), never vocabulary logits: the gold's
    rank by the multiple-choice head and by the LM (every candidate's reply log-probability, from the same forward).
    """

    # compute_loss already normalises over the accumulated batch: the Trainer must not divide by GA again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        base_model: str | None = None,
        dataset_name: str | None = None,
        recipe: dict | None = None,
        **kwargs,
    ):
        """Trainer's arguments, plus what the model card records: the model fine-tuned from, the data, the recipe
        (the data options of the run)."""
        kwargs.setdefault("compute_metrics", compute_metrics)
        super().__init__(*args, **kwargs)
        self.card_info = {"finetuned_from": base_model, "dataset": dataset_name, "recipe": recipe}
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their LM tokens and examples (all processes)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        counts = torch.tensor(
            [
                [int(b["labels"][..., 1:].ne(-100).sum()) for b in batch_samples],
                [len(b["mc_labels"]) for b in batch_samples],
            ],
            device=device,
        ).sum(dim=1)  # [lm tokens, examples]
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(dim=0)
        return batch_samples, counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if num_items_in_batch is None:  # a lone batch (evaluation, direct call): batch means
            lm_loss, mc_loss = outputs.lm_loss, outputs.mc_loss
        else:
            # DDP and DeepSpeed average gradients over processes: undo it, the counts are already global.
            scale = self.args.world_size if self.args.average_tokens_across_devices else 1
            lm_tokens, examples = num_items_in_batch.clamp(min=1)
            lm_loss = outputs.lm_nll.sum() * scale / lm_tokens
            mc_loss = outputs.mc_nll.sum() * scale / examples
        loss = self.args.lm_coef * lm_loss + self.args.mc_coef * mc_loss

        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["lm_loss"].append(self.accelerator.gather(outputs.lm_loss.detach()).nanmean().item())
        self._metrics[mode]["mc_loss"].append(self.accelerator.gather(outputs.mc_loss.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; a non-finite loss stops the run (`non_finite_error`) instead of being left out of the
        logs by the Trainer's NaN filter while the weights go on updating."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():  # one sync, as the Trainer's own NaN filter makes every step
            raise non_finite_error(self.args, self.state.global_step + 1, f"loss {loss.item()}")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm of the step, before the optimizer takes it: a non-finite norm stops the run
        (under --fp16 an overflow is the loss scaler's, torch's or DeepSpeed's, which skips that step and lowers its
        scale)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not self.args.fp16:
            norm = float(grad_norm)
            if not math.isfinite(norm):
                raise non_finite_error(self.args, self.state.global_step + 1, f"gradient norm {norm}")
        return grad_norm

    def _remove_unused_columns(self, dataset, description=None):
        """The Trainer's column filter, then `ArrowBatches` when the collator is a `PersonaCollator`: the DataLoader
        hands it each batch as one Arrow table instead of Python lists (the only hook between the dataset and the
        DataLoader). Any other collator gets the rows as `datasets` gives them."""
        dataset = super()._remove_unused_columns(dataset, description)
        collator = self.data_collator
        while not isinstance(collator, PersonaCollator) and hasattr(collator, "collator"):  # wrappers of one
            collator = collator.collator
        return ArrowBatches(dataset) if isinstance(collator, PersonaCollator) else dataset

    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_by_candidate_count():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_by_candidate_count():
            return super().get_test_dataloader(test_dataset)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's loop; a resumed checkpoint whose pickled files torch's restricted loader refuses is one line
        naming the file (`persona_model.unsafe_pickle_error`), never a hint to lower the protection."""
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except pickle.UnpicklingError as err:
            if not isinstance(resume_from_checkpoint, str):
                raise
            raise unsafe_pickle_error(resume_from_checkpoint, err) from None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's weights, then the multiple-choice head from its own file (it is not in model.safetensors)."""
        target = model if model is not None else self.model
        self._head_in_own_file = isinstance(
            getattr(target, "module", target), PersonaDoubleHeadsModel
        ) and os.path.isfile(os.path.join(resume_from_checkpoint, MC_HEAD_FILE))
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_head_file(model if model is not None else self.model, resume_from_checkpoint)

    def _issue_warnings_after_load(self, load_result):
        """The Trainer's report of missing and unexpected weights, less the expected: tied weights (saved once) and a
        multiple-choice head that has its own file (loaded next)."""
        model = getattr(self.model, "module", self.model)
        expected = set(getattr(model, "all_tied_weights_keys", None) or {})
        if getattr(self, "_head_in_own_file", False):
            expected.update(k for k in load_result.missing_keys if k.startswith(MC_HEAD_PREFIX))
        missing = [k for k in load_result.missing_keys if k not in expected]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_best_model(self):
        super()._load_best_model()
        _load_head_file(self.model, self.state.best_model_checkpoint)

    @contextmanager
    def _collating_by_candidate_count(self):
        collator = self.data_collator
        self.data_collator = CandidateCountBatches(collator)
        try:
            yield
        finally:
            self.data_collator = collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss plus per-turn `persona_metrics.STAT_COLUMNS`; gathered and de-duplicated by the Trainer.

        One forward per group labels every candidate's reply (`persona_heads.candidate_labels`), so the LM scores
        each candidate behind the context its encoding computed once; the gold's own labels are unchanged."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            groups = []
            for batch in inputs["groups"]:
                labels = candidate_labels(batch["input_ids"], batch["labels"], batch["mc_token_ids"])
                outputs = model(**{**batch, "labels": labels})
                groups.append((score_candidates(outputs, batch["mc_labels"], labels), batch["mc_labels"]))
        stats = torch.cat([s for s, _ in groups])[inputs["row_order"]]  # [B, 8] in the batch's row order
        gold = torch.cat([g for _, g in groups])[inputs["row_order"]]
        lm_loss = stats[:, 1].sum() / stats[:, 2].sum()  # NaN when nothing is labelled, as the model's lm_loss
        loss = self.args.lm_coef * lm_loss + self.args.mc_coef * stats[:, 3].mean()
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), stats, gold

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(v) / len(v) for key, v in self._metrics[mode].items() if v}
        if mode == "eval":
            # persona_metrics gives the corpus-level eval_lm_loss / eval_mc_loss: batch means would only shadow them.
            metrics = {f"eval_{key}": val for key, val in metrics.items() if f"eval_{key}" not in logs}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | None = None,
        recipe: dict | None = None,
        eval_metrics: dict | None = None,
        **kwargs,
    ) -> None:
        """Write the project's model card (`persona_card`) as `README.md` in `output_dir`.

        Replaces the Trainer's generic card; `push_to_hub(**kwargs)` forwards its keyword arguments here, and the
        constructor's `base_model`, `dataset_name` and `recipe` fill those not given. Metrics default to the last
        evaluation in the log history.
        """
        if not self.is_world_process_zero():
            return
        if eval_metrics is None:
            eval_metrics = next((log for log in reversed(self.state.log_history) if "eval_hits@1" in log), {})
        card = persona_model_card(
            model_id=getattr(self, "hub_model_id", None) or model_name or self.args.output_dir,
            base_model=finetuned_from or self.card_info["finetuned_from"],
            dataset=dataset or self.card_info["dataset"],
            recipe=recipe or self.card_info["recipe"] or {},
            args=self.args,
            metrics=eval_metrics,
            is_adapter=hasattr(self.model, "peft_config"),
            self_chat=self_chat_summary(self.args.output_dir),
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)


def _load_head_file(model, folder: str | None) -> None:
    """Load `MC_HEAD_FILE` from a checkpoint folder into the (unwrapped) double-heads model when both have one."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT: the adapter file holds the head already
        return
    if folder and isinstance(model, PersonaDoubleHeadsModel) and os.path.isfile(os.path.join(folder, MC_HEAD_FILE)):
        model.load_multiple_choice_head(folder)


def score_candidates(outputs, mc_labels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-turn `persona_metrics.STAT_COLUMNS` ([B, 8]: gold rank, LM NLL sum, LM tokens, MC NLL, candidates, NLL of
    the end-of-reply token, gold rank by the reply's LM log-probability per token, by its sum) of one double-heads
    forward whose labels cover every candidate's reply (`persona_heads.candidate_labels`, `labels` [B, C, T]): the
    NLL columns are the gold's, the LM ranks compare every candidate's. A tie counts against the gold, for the head
    and the LM alike; a candidate labelled exactly as the gold (its reply again) ties with it."""
    mc_logits = outputs.mc_logits.float()  # [B, C]
    count = torch.full_like(mc_labels, mc_logits.size(1))
    nll, tokens = outputs.lm_candidate_nll.float(), outputs.lm_candidate_tokens  # [B, C]
    gold = mc_labels[:, None]
    same = None
    if labels is not None:
        gold_labels = labels.gather(1, gold[..., None].expand(-1, 1, labels.size(-1)))  # [B, 1, T]
        same = labels.eq(gold_labels).all(-1)  # [B, C]
    logp_mean = -nll / tokens.clamp(min=1)
    columns = (gold_rank(mc_logits, mc_labels, same), nll.gather(1, gold)[:, 0], tokens.gather(1, gold)[:, 0])
    columns += (outputs.mc_nll, count, outputs.lm_candidate_end_nll.gather(1, gold)[:, 0])
    columns += (gold_rank(logp_mean, mc_labels, same), gold_rank(-nll, mc_labels, same))
    return torch.stack([c.float() for c in columns], dim=1)


@dataclass
class CandidateCountBatches:
    """Evaluation collation: the rows of a batch grouped by candidate count, one padded batch per count.

    Returns `{"row_order": [B], "groups": [batch, ...]}`; concatenating the groups' rows and indexing with
    `row_order` gives the batch's own row order back. Batches keep their size, so gathering across processes works
    as for any batch.
    """

    collator: Callable

    def __call__(self, features: list[dict] | pa.Table) -> dict:
        counts = candidate_counts(features)
        by_count = defaultdict(list)
        for i, count in enumerate(counts):
            by_count[count].append(i)
        order = [i for rows in by_count.values() for i in rows]
        if isinstance(features, pa.Table):
            groups = [features.take(rows) if len(by_count) > 1 else features for rows in by_count.values()]
        else:
            groups = [[features[i] for i in rows] for rows in by_count.values()]
        return {"row_order": torch.tensor(order).argsort(), "groups": [self.collator(group) for group in groups]}
