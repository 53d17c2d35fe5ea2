"""Preference training (DPO) on persona candidates: the gold reply preferred to every other candidate of its turn (the
distractors, or the record's curated `rejected` replies), all of them scored behind one shared context.

A general DPO trainer scores each (prompt, chosen, rejected) triple on its own: the prompt is encoded twice per pair,
plus twice more for the reference model. Here a turn is one double-heads row: its context is encoded once and every
candidate behind it (`persona_encoding.encode_candidates`: packed / cache broadcast, the plain encoding as the check),
and the LM head runs only on the candidates' reply tokens. The reference model is the starting weights: with LoRA the
same model with the adapter disabled; otherwise its log-probabilities are computed once before training, in one pass
over the features, and kept as a `ref_logps` column (cached by the features' and the weights' fingerprints), so no
second model sits in memory during training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets.fingerprint import Hasher
from torch import nn

from persona_collator import candidate_counts
from persona_errors import PersonaDataError
from persona_heads import candidate_labels
from persona_records import DIALOG_FEATURES
from persona_trainer import PersonaTrainer

logger = logging.getLogger(__name__)

REF_COLUMN = "ref_logps"  # per row: the reference model's sequence log-probability of each candidate
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids", "mc_labels")
REFERENCE_VERSION = "1"  # bump when the reference pass changes for the same features and weights


def candidate_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, object]:
    """Sequence log-probabilities [B, C] of every candidate's reply (summed token log-probs, eos or end-of-turn
    included) from one double-heads forward, and that forward's outputs (`persona_heads.DoubleHeadsOutput`)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    labels = candidate_labels(batch["input_ids"], batch["labels"], batch["mc_token_ids"])
    outputs = model(**inputs, labels=labels)
    return -outputs.lm_candidate_nll, outputs


@dataclass
class PreferenceLoss:
    """Per-turn DPO losses and the implicit rewards `beta * (log pi - log pi_ref)` of a batch."""

    losses: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B, C], detached
    chosen: torch.Tensor  # [B] the gold's reward, detached
    rejected: torch.Tensor  # [B, C] bool: the turn's rejected candidates (real, not the gold)


def preference_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    gold: torch.Tensor,
    beta: float,
    kind: str = "pairwise",
    mask: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO over each turn's candidates: logps / ref_logps [B, C], gold [B] (the chosen candidate), mask [B, C] (real
    candidates; None = all).

    pairwise: mean over the turn's rejected l of `-log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)])` (TRL's
    `sigmoid` loss of each pair); listwise: cross-entropy of the softmax over `beta * (pi - ref)` of the turn's
    candidates, the gold as the target (Plackett-Luce with the gold first).
    """
    mask = torch.ones_like(logps, dtype=torch.bool) if mask is None else mask
    scores = beta * (logps.float() - ref_logps.float())  # [B, C]
    is_gold = F.one_hot(gold, logps.size(1)).bool()
    rejected = mask & ~is_gold
    chosen = scores.gather(1, gold[:, None])  # [B, 1]
    if kind == "pairwise":
        pair_losses = -F.logsigmoid(chosen - scores)  # [B, C]; only the rejected columns count
        losses = (pair_losses * rejected).sum(1) / rejected.sum(1).clamp(min=1)
    elif kind == "listwise":
        losses = F.cross_entropy(scores.masked_fill(~mask, float("-inf")), gold, reduction="none")
    else:
        raise ValueError(f"dpo_loss must be 'pairwise' or 'listwise', got {kind!r}.")
    return PreferenceLoss(losses=losses, rewards=scores.detach(), chosen=chosen.squeeze(1).detach(), rejected=rejected)


def pad_candidates(row: dict, width: int) -> dict:
    """A feature row with copies of its first candidate put in front until it has `width` candidates (the gold stays
    last); the copies carry no labels and no reference log-probability, and `PreferenceCollator` masks them."""
    extra = width - len(row["input_ids"])
    if extra <= 0:
        return row
    out = dict(row)
    for key in ("input_ids", "token_type_ids"):
        if key in row:
            out[key] = [row[key][0]] * extra + row[key]
    out["labels"] = [[-100] * len(row["input_ids"][0])] * extra + row["labels"]
    out["mc_token_ids"] = [row["mc_token_ids"][0]] * extra + row["mc_token_ids"]
    if REF_COLUMN in row:
        out[REF_COLUMN] = [0.0] * extra + row[REF_COLUMN]
    out["mc_labels"] = row["mc_labels"] + extra
    return out


@dataclass
class PreferenceCollator:
    """Training batches of DPO: rows with fewer candidates than the batch's widest (curated rejected lists of
    different lengths) get padding candidates (`pad_candidates`), and `candidate_mask` [B, C] marks the real ones.
    Rows of one width (distractors) go to `collator` as they came (an Arrow table stays one)."""

    collator: Callable

    def __call__(self, features: list[dict] | pa.Table) -> dict:
        counts = candidate_counts(features)
        width = max(counts)
        if min(counts) < width:
            rows = features.to_pylist() if isinstance(features, pa.Table) else features
            features = [pad_candidates(row, width) for row in rows]
        batch = self.collator(features)
        batch["candidate_mask"] = torch.arange(width) >= width - torch.tensor(counts)[:, None]
        return batch


def preference_dialogs(
    dialogs: datasets.Dataset, num_candidates: int, *, source: str = "", num_proc: int | None = None
) -> datasets.Dataset:
    """Dialogs whose candidates are each turn's preference set: its curated `rejected` replies then the gold where
    the record has them (all of them), else its last `num_candidates` candidates (distractors, then the gold).

    Turns left with the gold alone (no curated replies and `num_candidates` 1) are dropped and counted; none left
    with a rejected reply is a `PersonaDataError`.
    """
    curated = "rejected" in dialogs.features["utterances"].feature
    if not curated and num_candidates < 2:
        raise PersonaDataError(
            f"{source}: --objective dpo with --num_candidates {num_candidates} and no curated 'rejected' replies "
            "leaves nothing to prefer the gold reply to; pass --num_candidates 2 or more."
        )

    def select(batch: dict) -> dict:
        utterances, dropped = [], []
        for dialog in batch["utterances"]:
            kept, gone = [], 0
            for u in dialog:
                rejected = u.get("rejected") or u["candidates"][-num_candidates:-1]
                if rejected:
                    kept.append({"history": u["history"], "candidates": [*rejected, u["candidates"][-1]]})
                else:
                    gone += 1
            utterances.append(kept)
            dropped.append(gone)
        return {"utterances": utterances, "dropped_turns": dropped}

    features = datasets.Features({**DIALOG_FEATURES, "dropped_turns": datasets.Value("int64")})
    out = dialogs.map(select, batched=True, features=features, num_proc=num_proc, desc="Choosing preference pairs")
    dropped = sum(out["dropped_turns"])
    out = out.remove_columns("dropped_turns").filter(lambda d: len(d["utterances"]) > 0, num_proc=num_proc)
    if out.num_rows == 0:
        raise PersonaDataError(
            f"{source}: no turn has a rejected reply for --objective dpo (no curated 'rejected' list and "
            f"--num_candidates {num_candidates}); pass --num_candidates 2 or more."
        )
    if dropped:
        logger.warning(
            "%s: %d turns have no rejected reply (no curated 'rejected' list, --num_candidates %d): left out of DPO.",
            source,
            dropped,
            num_candidates,
        )
    return out


def weights_fingerprint(model: nn.Module) -> str:
    """A fingerprint of the weights (per tensor: name, shape, sum and sum of squares), cheaper than one forward pass
    over the data; it keys the cached reference log-probabilities."""
    stats = []
    for name, tensor in model.state_dict().items():
        values = tensor.detach().double()
        stats.append((name, tuple(tensor.shape), float(values.sum()), float(values.square().sum())))
    return Hasher.hash(stats)


def add_reference_logps(
    model: nn.Module,
    features: datasets.Dataset,
    collator: Callable,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    fingerprint: str | None = None,
    keep_in_memory: bool = False,
) -> datasets.Dataset:
    """`features` plus the `ref_logps` column: `model`'s sequence log-probability of each candidate of each row, in
    one pass (eval mode, no gradient) through the same encodings as training.

    Cached next to the features under a fingerprint of the features and `fingerprint` (default: the weights'), so
    a second run on the same data and starting weights reads it back. `collator` pads a list of rows (e.g.
    `PersonaCollator`).
    """
    fingerprint = Hasher.hash((REFERENCE_VERSION, features._fingerprint, fingerprint or weights_fingerprint(model)))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    preference = collator if isinstance(collator, PreferenceCollator) else PreferenceCollator(collator)
    was_training = model.training
    model.eval()

    def score(rows: dict) -> dict:
        table = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batch = {k: v.to(device) for k, v in preference(table).items()}
        with torch.no_grad():
            logps = candidate_logps(model, batch)[0].float().cpu()
        return {REF_COLUMN: [logps[i, len(logps[i]) - len(row["input_ids"]) :].tolist() for i, row in enumerate(table)]}

    try:
        return features.map(
            score,
            batched=True,
            batch_size=batch_size,
            new_fingerprint=fingerprint,
            keep_in_memory=keep_in_memory,
            features=datasets.Features({**features.features, REF_COLUMN: datasets.List(datasets.Value("float32"))}),
            desc="Reference log-probabilities (starting weights)",
        )
    finally:
        model.train(was_training)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off (as TRL's DPO default): with it the policy's and the reference's log-probabilities of the same
    weights would differ, and the rewards would be noise at the first step."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class PersonaDPOTrainer(PersonaTrainer):
    """`PersonaTrainer` with the preference objective (`--objective dpo`): per turn the DPO loss of the gold against
    its rejected candidates (`preference_loss`), plus `lm_coef` x the gold's NLL (RPO) and `mc_coef` x the
    multiple-choice loss, each normalised over the whole accumulated batch on every process as the double-heads loss.

    Logs TRL's `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (means over the
    (chosen, rejected) pairs) and `logps/chosen`, `logps/rejected`. Evaluation is the double-heads ranking evaluation.
    A training set without `ref_logps` gets them before the first step (`add_reference_logps`) unless the model is a
    LoRA model, whose reference is itself with the adapter disabled.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.objective != "dpo":
            raise ValueError(f"PersonaDPOTrainer trains --objective dpo, got --objective {self.args.objective!r}.")
        disable_dropout(self.model)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if REF_COLUMN not in self._signature_columns:
            self._signature_columns.append(REF_COLUMN)

    def train(self, *args, **kwargs):
        # Before `Trainer.train` loads the weights of a checkpoint to resume from: the reference is the start.
        dataset = self.train_dataset
        if (
            dataset is not None
            and REF_COLUMN not in dataset.column_names
            and not hasattr(self.model, "disable_adapter")
        ):
            self.train_dataset = self._with_reference_logps(dataset)
        return super().train(*args, **kwargs)

    def get_train_dataloader(self):
        collator = self.data_collator
        self.data_collator = PreferenceCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def _with_reference_logps(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """The reference pass before training, on the starting weights, not yet wrapped by DDP / DeepSpeed. The main
        process computes and caches, the others read the cache; under ZeRO-3 (weights sharded) every process gathers
        the weights and computes in step with the others, in memory."""
        from accelerate.utils import broadcast_object_list
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        columns = [c for c in dataset.column_names if c in (*MODEL_INPUTS, "labels")]
        dataset = dataset.select_columns(columns)
        options = {"batch_size": self.args.per_device_eval_batch_size, "device": self.args.device}
        if is_deepspeed_zero3_enabled():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                fingerprint = broadcast_object_list([weights_fingerprint(self.model)])[0]
                return add_reference_logps(
                    self.model, dataset, self.data_collator, fingerprint=fingerprint, keep_in_memory=True, **options
                )
        self.model.to(self.args.device)  # DeepSpeed ZeRO-1/2 leaves it on the CPU until `train` wraps it
        with self.args.main_process_first(desc="reference log-probabilities"):
            return add_reference_logps(self.model, dataset, self.data_collator, **options)

    def _reference_logps(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """LoRA: the reference log-probabilities are the model's own with the adapter disabled."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not hasattr(unwrapped, "disable_adapter"):
            raise ValueError(
                f"A training batch without {REF_COLUMN!r} on a model without a LoRA adapter: the reference is unknown."
            )
        with torch.no_grad(), unwrapped.disable_adapter():
            return candidate_logps(model, inputs)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, outputs = candidate_logps(model, inputs)  # [B, C]
        ref_logps = inputs.get(REF_COLUMN)
        if ref_logps is None:
            ref_logps = self._reference_logps(model, inputs)
        gold, mask = inputs["mc_labels"], inputs.get("candidate_mask")
        pref = preference_loss(logps, ref_logps, gold, self.args.beta, self.args.dpo_loss, mask)
        gold_nll = outputs.lm_candidate_nll.gather(1, gold[:, None]).squeeze(1)  # [B]
        gold_tokens = outputs.lm_candidate_tokens.gather(1, gold[:, None]).squeeze(1)
        mc_logits = outputs.mc_logits.float()
        if mask is not None:
            mc_logits = mc_logits.masked_fill(~mask, float("-inf"))
        mc_nll = F.cross_entropy(mc_logits, gold, reduction="none")
        if num_items_in_batch is None:  # a lone batch: batch means
            lm_tokens, examples, scale = gold_tokens.sum().clamp(min=1), len(gold), 1
        else:  # counts of the whole accumulated step on every process (PersonaTrainer.get_batch_samples)
            lm_tokens, examples = num_items_in_batch.clamp(min=1)
            scale = self.args.world_size if self.args.average_tokens_across_devices else 1
        loss = scale * (
            pref.losses.sum() / examples
            + self.args.lm_coef * gold_nll.sum() / lm_tokens
            + self.args.mc_coef * mc_nll.sum() / examples
        )
        self._log_preference(pref, logps.detach(), gold_nll.detach(), gold_tokens, mc_nll.detach())
        return (loss, outputs) if return_outputs else loss

    def _log_preference(self, pref: PreferenceLoss, logps, gold_nll, gold_tokens, mc_nll) -> None:
        """TRL's reward metrics, means over the (chosen, rejected) pairs of all processes."""
        pairs = pref.rejected.float()
        chosen = pref.chosen[:, None].expand_as(pref.rewards)
        sums = torch.stack(
            [
                (chosen * pairs).sum(),
                (pref.rewards * pairs).sum(),
                ((chosen > pref.rewards).float() * pairs).sum(),
                (logps.float() * pairs).sum(),
                pairs.sum(),
                pref.losses.sum(),
                gold_nll.sum(),
                gold_tokens.sum().float(),
                mc_nll.sum(),
                torch.tensor(float(len(mc_nll)), device=mc_nll.device),
            ]
        )
        sums = self.accelerator.gather(sums[None]).sum(0)
        chosen_sum, rejected_sum, wins, rejected_logps, num_pairs, loss_sum, nll, tokens, mc, turns = sums.tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["rewards/chosen"].append(chosen_sum / max(num_pairs, 1))
        metrics["rewards/rejected"].append(rejected_sum / max(num_pairs, 1))
        metrics["rewards/margins"].append((chosen_sum - rejected_sum) / max(num_pairs, 1))
        metrics["rewards/accuracies"].append(wins / max(num_pairs, 1))
        metrics["logps/rejected"].append(rejected_logps / max(num_pairs, 1))
        metrics["logps/chosen"].append(-nll / max(turns, 1))
        metrics["dpo_loss"].append(loss_sum / max(turns, 1))
        metrics["lm_loss"].append(nll / max(tokens, 1))
        metrics["mc_loss"].append(mc / max(turns, 1))
