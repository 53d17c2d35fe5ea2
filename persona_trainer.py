"""`PersonaTrainer`: the Trainer with the dual-head loss `lm_coef·lm_loss + mc_coef·mc_loss` and ConvAI2-style eval."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy


@dataclass
class PersonaTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the dual-head loss weights; defaults are the reference recipe's (train.py)."""

    # --- dual-head objective
    lm_coef: float = field(default=1.0, metadata={"help": "Weight of the language-modelling loss."})
    mc_coef: float = field(default=1.0, metadata={"help": "Weight of the multiple-choice (next-utterance) loss."})
    # --- reference defaults for fields TrainingArguments already has
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Batch size per device for evaluation."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Accumulate gradients over this many batches before an optimizer step."}
    )
    learning_rate: float = field(default=6.25e-5, metadata={"help": "Peak learning rate (linear decay to 0)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Number of training epochs."})
    eval_strategy: IntervalStrategy | str = field(
        default="epoch", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."}
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

    def __post_init__(self):
        # No output_dir: run_persona names a run folder after date, host and model (as the reference).
        self.auto_output_dir = self.output_dir is None
        if self.report_to == "auto":
            from transformers.integrations import is_tensorboard_available

            self.report_to = ["tensorboard"] if is_tensorboard_available() else "none"
        if self.lm_coef < 0 or self.mc_coef < 0 or self.lm_coef + self.mc_coef == 0:
            raise ValueError(f"lm_coef and mc_coef must be >= 0 and not both 0, got {self.lm_coef}, {self.mc_coef}.")
        super().__post_init__()


def persona_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Corpus-level eval metrics from the per-example statistics that `PersonaTrainer.prediction_step` returns."""
    gold_rank, lm_nll, lm_tokens, mc_nll = np.asarray(eval_pred.predictions, dtype=np.float64).T
    tokens = lm_tokens.sum()
    lm_loss = lm_nll.sum() / tokens if tokens else float("nan")
    return {
        "hits@1": float((gold_rank == 0).mean()),
        "lm_loss": float(lm_loss),
        "ppl": float(math.exp(lm_loss)) if tokens else float("nan"),
        "mc_loss": float(mc_nll.mean()),
    }


class PersonaTrainer(Trainer):
    """Trainer for dual-head persona models.

    The loss of an optimizer step is `lm_coef · (NLL of every gold-reply token / number of those tokens) +
    mc_coef · (mean multiple-choice cross-entropy)`, both normalised over the whole accumulated batch on every
    process (so GA=2 × batch 2 takes the same step as GA=1 × batch 4). `lm_loss` and `mc_loss` are logged apart.
    Evaluation keeps four numbers per example, never vocabulary logits.
    """

    # compute_loss already normalises over the accumulated batch: the Trainer must not divide by GA again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_metrics", persona_metrics)
        super().__init__(*args, **kwargs)
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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss plus per-example `[gold rank, LM NLL sum, LM tokens, MC NLL]`; gathered and de-duplicated by Trainer."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        mc_logits = outputs.mc_logits.float()  # [B, C]
        gold = inputs["mc_labels"]
        gold_logit = mc_logits.gather(1, gold[:, None])
        gold_rank = (mc_logits > gold_logit).sum(dim=1)  # 0 = ranked first; ties count in the gold's favour
        stats = torch.stack([gold_rank.float(), outputs.lm_nll.float(), outputs.lm_tokens.float(), outputs.mc_nll], 1)
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
