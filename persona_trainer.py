"""`PersonaTrainer`: the Trainer with the dual-head loss `lm_coef·lm_loss + mc_coef·mc_loss` and ConvAI2-style eval."""

from __future__ import annotations

import math
import os
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

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | None = None,
        recipe: dict | None = None,
        eval_metrics: dict | None = None,
        **kwargs,
    ) -> None:
        """Write the project's model card (recipe, data, Hits@1/PPL/F1, usage) as `README.md` in `output_dir`.

        Replaces the Trainer's generic card; `push_to_hub(**kwargs)` forwards its keyword arguments here, and
        `self.model_card_info` (a dict of the same keywords) fills those not given. Metrics default to the last
        evaluation in the log history.
        """
        if not self.is_world_process_zero():
            return
        # run_persona sets model_card_info, so the push that save_model makes mid-run gets the same card.
        info = getattr(self, "model_card_info", {})
        finetuned_from = finetuned_from or info.get("finetuned_from")
        dataset, recipe = dataset or info.get("dataset"), recipe or info.get("recipe")
        if eval_metrics is None:
            eval_metrics = next((log for log in reversed(self.state.log_history) if "eval_hits@1" in log), {})
        card = persona_model_card(
            model_id=getattr(self, "hub_model_id", None) or model_name or self.args.output_dir,
            base_model=finetuned_from,
            dataset=dataset,
            recipe=recipe or {},
            args=self.args,
            metrics=eval_metrics,
            is_adapter=hasattr(self.model, "peft_config"),
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)


# Card rows: (label, metric key, format). F1 comes from persona_eval when the run computed it.
CARD_METRICS = [
    ("Hits@1", "eval_hits@1", "{:.4f}"),
    ("Perplexity", "eval_ppl", "{:.2f}"),
    ("F1 (greedy, ConvAI2 normalisation)", "convai2_f1", "{:.4f}"),  # recorded by --do_convai2_eval
    ("LM loss", "eval_lm_loss", "{:.4f}"),
    ("MC loss", "eval_mc_loss", "{:.4f}"),
]


def persona_model_card(
    *,
    model_id: str,
    base_model: str | None,
    dataset: str | None,
    recipe: dict,
    args: TrainingArguments,
    metrics: dict,
    is_adapter: bool = False,
) -> str:
    """The README.md of a pushed persona model: metadata header, usage, data, recipe and evaluation."""
    from huggingface_hub import ModelCardData

    is_hub_dataset = bool(dataset) and "://" not in dataset and not os.path.exists(dataset)
    data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        base_model=base_model if base_model and not os.path.exists(base_model) else None,
        datasets=[dataset] if is_hub_dataset else None,
        pipeline_tag="text-generation",
        tags=["persona-chat", "conversational", "double-heads"] + (["lora"] if is_adapter else []),
    )
    world = args.world_size
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    recipe_rows = [
        ("loss", f"{args.lm_coef} × LM loss + {args.mc_coef} × multiple-choice loss"),
        ("candidates per example", recipe.get("num_candidates")),
        ("history turns kept", None if "max_history" not in recipe else 2 * recipe["max_history"] + 1),
        ("personality permutations", recipe.get("personality_permutations")),
        (
            "learning rate",
            f"{args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)})",
        ),
        (
            "batch",
            f"{args.per_device_train_batch_size} per device × {args.gradient_accumulation_steps} accumulation "
            f"× {world} processes = {effective_batch}",
        ),
        ("epochs", f"{args.num_train_epochs:g}" if args.max_steps <= 0 else f"{args.max_steps} steps"),
        ("precision", precision),
        (
            "DeepSpeed",
            os.path.basename(args.deepspeed) if isinstance(args.deepspeed, str) else args.deepspeed and "yes",
        ),
        ("LoRA", "yes (adapter; the MC head and persona-token embeddings are trained in full)" if is_adapter else None),
        ("seed", args.seed),
    ]
    metric_rows = [(label, fmt.format(metrics[key])) for label, key, fmt in CARD_METRICS if key in metrics]
    lines = [
        f"# {model_id.rstrip('/').split('/')[-1]}",
        "",
        f"A persona chatbot fine-tuned from `{base_model}` with persona-chat's "
        "double-heads recipe (ConvAI2 / TransferTransfo): a language-modelling loss on the gold reply plus a "
        "next-utterance classification loss that picks the gold reply among distractor candidates.",
        "",
        "## Usage",
        "",
        "```python",
        "from persona_chat import PersonaBot",
        "from persona_model import load_model_and_tokenizer",
        "",
        f'model, tokenizer = load_model_and_tokenizer("{model_id}")',
        'bot = PersonaBot(model, tokenizer, persona=["i like to ski .", "i have two dogs ."])',
        'print(bot.reply("hi ! what do you do for fun ?"))',
        "```",
        "",
        "## Training data",
        "",
        f"`{dataset}`" if dataset else "Not recorded.",
        "",
        "## Training recipe",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in recipe_rows if value not in (None, False)],
        "",
        "Every option of the run is in `training_config.yaml`: `persona-train training_config.yaml --output_dir out` "
        "trains it again.",
        "",
        "## Evaluation",
        "",
    ]
    if metric_rows:
        lines += [
            "On the evaluation split; Hits@1 ranks the gold reply among all the candidates of each turn.",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {label} | {value} |" for label, value in metric_rows],
        ]
    else:
        lines.append("No evaluation was run.")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
