"""ConvAI2 evaluation of a checkpoint without ParlAI: Hits@k, token- and word-level perplexity, F1 of generated
replies, their repetition and diversity and, with an NLI model, persona consistency (C-score), for generated and gold
replies alike. `persona-eval` (persona_eval.py) is its command line; `persona-train --do_convai2_eval` calls it too.

Definitions (ParlAI's; `persona_metrics`): Hits@k ranks each turn's candidates (20 in PERSONA-CHAT) by the
multiple-choice head, a tie counting against the gold; LM Hits@k (`lm_hits@k`) ranks them by the reply's
log-probability per token under the LM (its tokens and end token; `lm_hits@1_sum` by the summed log-probability),
the same rule for a model without a trained head; `ppl` is exp of the mean NLL over gold reply tokens
(token-level), `ppl_word` the same NLL without the end-of-reply token per ParlAI `split_tokenize` word; F1 compares
the greedy reply with the gold after ParlAI's normalisation. The history always holds the gold replies. Candidates are
scored by `PersonaTrainer`'s own evaluation step, so these numbers and the Trainer's `eval_*` metrics come from one
piece of code.
"""

from __future__ import annotations

import logging
import os
import tempfile

import datasets
import numpy as np
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from persona_collator import PersonaCollator
from persona_data import build_features
from persona_decoding import EvalGenerationArguments
from persona_errors import UsageError
from persona_formats import input_format_of
from persona_generation import generate_replies
from persona_inputs import history_window
from persona_metrics import (
    HITS_KS,
    consistency_metrics,
    mean_f1,
    persona_copy_rate,
    ranking_metrics,
    repetition_metrics,
    split_tokenize,
    stat_columns,
    word_perplexity,
)
from persona_model import input_budget, multiple_choice_head_loaded
from persona_nli import NLIScorer
from persona_trainer import PersonaTrainer, PersonaTrainingArguments, has_accelerator

logger = logging.getLogger(__name__)


def flatten_turns(dialogs: datasets.Dataset, max_turns: int | None = None) -> tuple[datasets.Dataset, list[dict]]:
    """The dialogs holding the first `max_turns` turns, and those turns as `{persona, history, gold, dialog}` (the
    dialog's index) in row order."""
    turns, num_dialogs = [], 0
    for dialog in dialogs:
        if max_turns is not None and len(turns) >= max_turns:
            break
        num_dialogs += 1
        for utterance in dialog["utterances"]:
            gold = utterance["candidates"][-1]
            turns.append(
                {"persona": dialog["personality"], "history": utterance["history"], "gold": gold, "dialog": num_dialogs}
            )
    return dialogs.select(range(num_dialogs)), turns[:max_turns]


def ranking_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> PersonaTrainer:
    """A `PersonaTrainer` that only evaluates `model`, on this machine's accelerator (or all processes of a launch)."""
    args = PersonaTrainingArguments(
        # Nothing is saved; the Trainer only creates the folder.
        output_dir=os.path.join(tempfile.gettempdir(), "persona-eval"),
        per_device_eval_batch_size=batch_size,
        report_to="none",
        # Without it accelerate ignores torchrun's WORLD_SIZE on a machine with no accelerator (no gloo group).
        use_cpu=not has_accelerator(),
        do_train=False,
        eval_strategy="no",
        save_strategy="no",
    )
    return PersonaTrainer(model=model, args=args, data_collator=PersonaCollator(tokenizer.pad_token_id))


def rank_candidates(trainer: PersonaTrainer, features: datasets.Dataset) -> np.ndarray:
    """Per-turn `persona_metrics.STAT_COLUMNS` of `features` ([N, 8], in `features` order) from the Trainer's
    evaluation step.

    Turns are ordered by candidate count, longest first within a count, so each batch pads little and memory runs out
    (if it does) at once; the result is put back in `features` order.
    """
    last_tokens = features["mc_token_ids"]  # [N][C]: each candidate's length - 1
    counts = np.array([len(ids) for ids in last_tokens])
    longest = np.array([max(ids) for ids in last_tokens])
    order = np.lexsort((-longest, counts))  # by count, then longest first (stable)
    stats = trainer.predict(features.select(order)).predictions  # [N, 8]
    out = np.empty_like(stats)
    out[order] = stats
    return out


def generate_for_turns(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    turns: list[dict],
    accelerator: Accelerator,
    *,
    max_history: int,
    batch_size: int,
    **generation_options,
) -> list[str]:
    """Replies of `persona_generation.generate_replies` to every turn's gold history, spread over the processes."""
    seed = generation_options.pop("seed", None)
    if seed is not None:
        # Once for the whole run: generate_replies would restart the random stream at every batch.
        set_seed(seed + accelerator.process_index)
    loader = accelerator.prepare_data_loader(DataLoader(range(len(turns)), batch_size=batch_size))
    replies = []
    for indices in tqdm(loader, desc="Generating replies", disable=not accelerator.is_local_main_process):
        contexts = [(turns[i]["persona"], turns[i]["history"]) for i in indices.tolist()]
        texts = generate_replies(
            model, tokenizer, contexts, max_history=max_history, batch_size=batch_size, **generation_options
        )
        replies.extend(accelerator.gather_for_metrics(list(zip(indices.tolist(), texts)), use_gather_object=True))
    by_turn = dict(replies)
    if sorted(by_turn) != list(range(len(turns))):
        raise RuntimeError(f"Generated {len(by_turn)} distinct replies for {len(turns)} turns.")
    return [by_turn[i] for i in range(len(turns))]


def reply_metrics(
    turns: list[dict], replies: list[str], *, max_history: int, nli: NLIScorer | None, accelerator, suffix: str = ""
) -> tuple[dict, list[list[int]] | None]:
    """Repetition, diversity and persona copying of one reply per turn (generated, or the gold with `suffix="_gold"`)
    and, with `nli`, its persona consistency; returns the metrics and the per-turn NLI labels (one per sentence)."""
    contexts = [history_window(t["history"], max_history) for t in turns]  # the turns the bot saw
    personas = [t["persona"] for t in turns]
    metrics = repetition_metrics(replies, contexts, [t["dialog"] for t in turns], suffix=suffix)
    metrics[f"persona_copy_rate{suffix}"] = persona_copy_rate(replies, personas)
    if nli is None:
        return metrics, None
    labels = nli.turn_labels(replies, personas, progress=accelerator.is_local_main_process, accelerator=accelerator)
    metrics.update(consistency_metrics(labels, suffix))
    return metrics, labels


def evaluate_convai2(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogs: datasets.Dataset,
    *,
    trainer: PersonaTrainer | None = None,
    max_history: int = 2,
    max_length: int | None = None,
    batch_size: int = 8,
    max_turns: int | None = None,
    f1: bool = True,
    generation_options: dict | None = None,
    cache_dir: str | None = None,
    return_predictions: bool = False,
    nli: NLIScorer | None = None,
    nli_penalty: float = 0.0,
) -> dict:
    """ConvAI2 metrics of `model` on a canonical dialogs split: hits@k (multiple-choice head), lm_hits@k and
    lm_hits@1_sum (LM log-probability of the reply: per token, summed), ppl (token-level), ppl_word, lm_loss, f1,
    repetition and diversity of the generated and gold replies, turns; with an `NLIScorer`, persona consistency.

    A model whose multiple-choice head was not loaded from its checkpoint (`persona_model.multiple_choice_head_loaded`,
    e.g. a plain instruct model) still gets every metric; its hits@k come from an untrained head, which a warning
    says; lm_hits@k is its ranking.

    `max_length` caps input lengths (default: the model's positions); `generation_options` go to
    `persona_generation.generate_replies` (default: persona-eval's, greedy). Candidates are ranked by `trainer` (a
    training run's own, with its batch size and processes) or by a fresh evaluation-only `PersonaTrainer` with
    `batch_size`.
    With `return_predictions`, the result also holds the generated replies under "predictions", in turn order: strings,
    or with `nli` a dict per turn (`reply`, `gold`, `persona`, `nli_labels`, `nli_labels_gold`: +1/0/-1 per persona
    sentence). With `nli_penalty` > 0 and `num_ranked` > 1 in `generation_options`, `nli` also re-ranks the sampled
    replies (`persona_ranking.nli_penalised`).
    """
    trainer = trainer or ranking_trainer(model, tokenizer, batch_size)
    batch_size = trainer.args.per_device_eval_batch_size
    dialogs, turns = flatten_turns(dialogs, max_turns)
    if not turns:
        raise UsageError("The evaluation split has no turns (no dialog with an utterance).")
    with trainer.args.main_process_first(desc="building evaluation features"):
        features = build_features(
            dialogs,
            tokenizer,
            num_candidates=None,
            max_history=max_history,
            max_length=input_budget(model, max_length),
            cache_dir=cache_dir,
            input_format=input_format_of(tokenizer),  # the checkpoint's own input format
        )
    features = features.select(range(len(turns)))

    stats = rank_candidates(trainer, features)
    ranking = ranking_metrics(stats, ks=HITS_KS)
    columns = stat_columns(stats)
    # A turn whose only candidate is the gold "hits" by construction: Hits@k counts the turns with a choice to make.
    ranked = columns["num_candidates"] > 1
    metrics = {key: value for key, value in ranking.items() if "hits@" in key}  # the head's, then the LM's
    if not multiple_choice_head_loaded(model) and "hits@1" in metrics:
        logger.warning(
            "The multiple-choice head of this model was not in its checkpoint (it is untrained): hits@k rank the "
            "candidates at random; lm_hits@k (the reply's LM log-probability) is this model's ranking."
        )
    metrics["hits_turns"] = int(ranked.sum())
    if not ranked.all():
        metrics["turns_one_candidate"] = int((~ranked).sum())
        logger.warning(
            "%d of %d turns have one candidate (the gold alone): left out of Hits@k, which counts %d turns.",
            metrics["turns_one_candidate"],
            len(ranked),
            metrics["hits_turns"],
        )
    words = sum(len(split_tokenize(t["gold"])) for t in turns)
    _, ppl_word = word_perplexity(columns["lm_nll"].sum() - columns["lm_end_nll"].sum(), words)
    metrics.update(ppl=ranking["ppl"], ppl_word=ppl_word, lm_loss=ranking["lm_loss"])
    golds, accelerator = [t["gold"] for t in turns], trainer.accelerator
    if nli is not None:
        nli.model.to(accelerator.device)
    predictions = labels = None
    if f1:
        options = {**EvalGenerationArguments().generation_options(), **(generation_options or {})}
        if nli is not None and nli_penalty > 0:
            options.update(nli_scorer=nli, nli_penalty=nli_penalty)
        predictions = generate_for_turns(
            model, tokenizer, turns, accelerator, max_history=max_history, batch_size=batch_size, **options
        )
        metrics["f1"] = mean_f1(predictions, golds)
        generated, labels = reply_metrics(turns, predictions, max_history=max_history, nli=nli, accelerator=accelerator)
        metrics.update(generated)
    gold, gold_labels = reply_metrics(
        turns, golds, max_history=max_history, nli=nli, accelerator=accelerator, suffix="_gold"
    )
    metrics.update(gold)
    metrics["turns"] = len(turns)
    if nli is not None:  # their C is 0: nothing to contradict
        metrics["turns_without_persona"] = sum(not t["persona"] for t in turns)
        if metrics["turns_without_persona"]:
            logger.warning("%d turns have no persona sentence: C-score 0.", metrics["turns_without_persona"])
    metrics["gold_reply_tokens"] = int(columns["lm_tokens"].sum())
    metrics["gold_reply_words"] = words
    metrics["candidates_per_turn"] = sorted(int(c) for c in np.unique(columns["num_candidates"]))
    if return_predictions and labels is not None:
        keys = ("reply", "gold", "persona", "nli_labels", "nli_labels_gold")
        rows = zip(predictions, golds, [t["persona"] for t in turns], labels, gold_labels)
        predictions = [dict(zip(keys, row)) for row in rows]
    if return_predictions:
        metrics["predictions"] = predictions
    return metrics
