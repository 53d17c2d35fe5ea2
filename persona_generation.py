"""Persona-conditioned generation: the generation context, batched (and ranked) replies and `PersonaBot`.

The context is the training input builder's (`persona_inputs.build_inputs`) with an empty reply, so it ends with the
bot's `<speaker1>` reply prefix; `model.generate` then extends it token by token with the library's cache and logits
processors. Every generated token carries the reply segment's token type because `generate()` repeats the last
`token_type_ids` value, and the last context token is the reply prefix itself. A chat-template checkpoint's context is
its template's rendering of the system message and the history with the assistant header.

The decoding options live in `persona_decoding`. With `num_ranked` N > 1 the context is encoded once, N replies are
sampled behind it and the multiple-choice head picks one, scoring the candidates' rows on the key/value cache sampling
built (`persona_ranking.score_on_cache`); the repetition options are logits processors that never count the persona
(`persona_repetition`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from persona_decoding import (  # noqa: F401 (the decoding options stay importable from here)
    AROUND_GENERATE,
    GENERATION_DEFAULTS,
    MAX_RANKED,
    GenerationArguments,
    check_generation_options,
    generation_config_from_options,
    split_options,
    stop_token_ids,
)
from persona_errors import UsageError
from persona_formats import input_format_of
from persona_inputs import history_window
from persona_model import load_model_and_tokenizer, max_positions
from persona_process import check_device, resolve_device
from persona_ranking import (
    RankedReply,
    best_first,
    check_can_rank,
    continuation,
    forward_without_vocabulary,
    reply_rows,
    score_on_cache,
    score_replies,
)
from persona_repetition import repetition_processors
from persona_text import decode_reply, encode_texts

logger = logging.getLogger(__name__)


def build_context(
    tokenizer: PreTrainedTokenizerBase,
    persona: Sequence[str],
    history: Sequence[str],
    max_history: int = 2,
    *,
    max_length: int | None = None,
    reply_budget: int = 0,
) -> dict[str, torch.Tensor]:
    """The generation context as 1-row tensors `input_ids`, `token_type_ids`, `attention_mask` ([1, T]).

    Built by the training builder with an empty reply and no eos, so it ends with the `<speaker1>` reply prefix.
    For a chat-template model it is the template's rendering of the system message and the history with the
    assistant header (`ChatFormat.context_ids`, what a serving engine sends), without `token_type_ids`.
    `history` is cut to its last `2*max_history+1` turns; with `max_length` (the model's positions) the context is
    cut by the training rule (`persona_inputs.fit_context`) so that it plus `reply_budget` new tokens fit.
    """
    history = history_window(history, max_history)
    inputs = input_format_of(tokenizer).generation_inputs(
        persona, history, max_length=max_length, reply_budget=reply_budget
    )
    batch = {key: torch.tensor([ids]) for key, ids in inputs.items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def _left_pad(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack 1-row contexts into [B, T] with padding on the left, so every row's next token is at the end."""
    width = max(r["input_ids"].size(1) for r in rows)
    pad_values = {key: value for key, value in (("input_ids", pad_id), ("token_type_ids", pad_id)) if key in rows[0]}
    pad_values["attention_mask"] = 0
    out = {key: [] for key in pad_values}
    for r in rows:
        pad = width - r["input_ids"].size(1)
        for key, value in pad_values.items():
            out[key].append(torch.cat([torch.full((1, pad), value, dtype=torch.long), r[key]], dim=1))
    batch = {key: torch.cat(v) for key, v in out.items()}
    # Positions count real tokens only, as in training (right padding); pads get 0 and are masked anyway. generate()
    # extends explicit position_ids itself; it would not build them because the double-heads forward takes **kwargs.
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def _bot_turns(history: Sequence[str]) -> list[str]:
    """The bot's turns of a history that ends with the user's turn: every second turn back from the last but one."""
    return list(history[-2::-2])


def _generate_rows(model, batch: dict[str, torch.Tensor], config, processors, num_ranked: int):
    """`model.generate` on a [B, T] batch, `num_ranked` sampled rows per context: the sequences [B * num_ranked,
    T + new] and the key/value cache of every token fed (None when the model keeps none)."""
    options = {"generation_config": config, "logits_processor": processors}
    if num_ranked == 1:
        output = model.generate(**batch, **options)
    else:
        # The context is encoded once and its key/value cache repeated for the samples (generate's
        # num_return_sequences would encode it num_ranked times); generate() then runs the last context token and
        # the replies only.
        cache = DynamicCache(config=model.config)
        # No logit of the prefix is read: its keys and values only.
        forward_without_vocabulary(model, {key: value[:, :-1] for key, value in batch.items()}, cache)
        cache.batch_repeat_interleave(num_ranked)
        rows = {key: value.repeat_interleave(num_ranked, dim=0) for key, value in batch.items()}
        output = model.generate(**rows, cache=cache, **options)
    return output.sequences, getattr(output, "cache", None)


@dataclass
class _SampledBatch:
    """One `generate()` call: its contexts (left-padded `batch`, `width` wide), the samples of each context (token ids
    without the stop token), the sequences and the cache of every token fed (None when the model keeps none)."""

    start: int
    batch: dict[str, torch.Tensor]
    width: int
    samples: list[list[list[int]]]
    sequences: torch.Tensor
    cache: object | None


def _sample(
    model, tokenizer, contexts, *, max_history: int = 2, batch_size: int = 8, own_turns=None, **generation_options
):
    """Yield a `_SampledBatch` per `batch_size` contexts (see `generate_candidate_ids`)."""
    options, seed = split_options(generation_options)
    check_generation_options(**options)
    if seed is not None:
        set_seed(seed)
    around = {name: options.pop(name) for name in AROUND_GENERATE}
    config = generation_config_from_options(tokenizer, **options)
    config.return_dict_in_generate = True  # the sequences and the cache (ranking scores on it)
    stops = set(config.eos_token_id)
    window = max_positions(model)
    own_turns = [_bot_turns(h) for _, h in contexts] if own_turns is None else own_turns
    n = around["num_ranked"]
    for start in range(0, len(contexts), batch_size):
        rows = [
            build_context(tokenizer, p, h, max_history, max_length=window, reply_budget=config.max_new_tokens)
            for p, h in contexts[start : start + batch_size]
        ]
        batch = {k: v.to(model.device) for k, v in _left_pad(rows, config.pad_token_id).items()}
        width = batch["input_ids"].size(1)
        processors = repetition_processors(
            width,
            [encode_texts(tokenizer, turns) for turns in own_turns[start : start + batch_size]],
            no_repeat_ngram_size=around["no_repeat_ngram_size"],
            repetition_penalty=around["repetition_penalty"],
            # n-grams of words as printed, not of re-encoded ids (a reply's tokens are not its text's encoding)
            tokenizer=tokenizer,
            own_texts=own_turns[start : start + batch_size],
            max_new_tokens=config.max_new_tokens,
            stop_token_ids=sorted(stops),
        )
        sequences, cache = _generate_rows(model, batch, config, processors, n)  # [B * N, T + new]
        if options["num_beams"] > 1 or any(
            getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())
        ):
            cache = None  # beams: its rows are the last step's beams, not the sequences; a window: not every key kept
        replies = []
        for new_tokens in sequences[:, width:].tolist():
            # Cut at the first stop token: finished rows are padded with <pad> while the others go on.
            end = next((i for i, t in enumerate(new_tokens) if t in stops), len(new_tokens))
            replies.append(new_tokens[:end])
        samples = [replies[i : i + n] for i in range(0, len(replies), n)]
        yield _SampledBatch(start, batch, width, samples, sequences, cache)


@torch.inference_mode()
def generate_candidate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    max_history: int = 2,
    batch_size: int = 8,
    own_turns: Sequence[Sequence[str]] | None = None,
    **generation_options,
) -> list[list[list[int]]]:
    """The `num_ranked` sampled replies (token ids without the stop token) of each `(persona, history)` context.

    `own_turns[i]`: the bot's earlier turns in context i that `no_repeat_ngram_size` and `repetition_penalty` count
    (default: the bot's turns in its history); the persona and the partner's turns are never counted.
    """
    sampled = _sample(
        model, tokenizer, contexts, max_history=max_history, batch_size=batch_size, own_turns=own_turns,
        **generation_options,
    )  # fmt: skip
    return [samples for part in sampled for samples in part.samples]


def _rank_batch(model, tokenizer, contexts, part: _SampledBatch, *, max_history, nli_scorer, nli_penalty):
    """The ranked replies of each context of one sampled batch: every distinct sample's row scored on the sampling
    cache (`persona_ranking.score_on_cache`), or, for a context whose rows do not continue it, by the reference
    forward (`score_replies`)."""
    n = len(part.samples[0])
    cache_len = part.cache.get_seq_length() if part.cache is not None else 0
    fed = part.sequences[:, part.width : cache_len].tolist()  # [B * N, generated tokens fed]
    mask = part.batch["attention_mask"]
    types = part.batch.get("token_type_ids")
    per_context, continuations = [], []
    for b, samples in enumerate(part.samples):
        persona, history = contexts[part.start + b]
        texts = [decode_reply(tokenizer, ids) for ids in samples]
        distinct = list(dict.fromkeys(texts))  # a duplicate sample is scored once
        first = [texts.index(text) for text in distinct]  # the first sample of each
        rows = reply_rows(model, tokenizer, persona, history, distinct, max_history=max_history)
        real = mask[b].bool()
        context_ids = part.batch["input_ids"][b][real].tolist()
        context_types = types[b][real].tolist() if types is not None else None
        planned = None
        if part.cache is not None:
            planned = [
                continuation(rows, c, b * n + j, context_ids, context_types, fed[b * n + j])
                for c, j in enumerate(first)
            ]
            planned = None if None in planned else planned
        per_context.append((persona, history, distinct, [samples[j] for j in first], rows, len(continuations), planned))
        continuations += planned or []
    if continuations:
        key_mask = torch.cat(
            [mask.repeat_interleave(n, dim=0), mask.new_ones(mask.size(0) * n, cache_len - part.width)], 1
        )
        cached_scores = score_on_cache(model, part.cache, key_mask, part.width, continuations)
    ranked = []
    for persona, history, distinct, ids, rows, offset, planned in per_context:
        if planned is not None:
            scores = cached_scores[offset : offset + len(planned)]
        else:
            scores = score_replies(model, tokenizer, persona, history, distinct, rows=rows)
        ranked.append(best_first(distinct, scores, persona, ids=ids, nli_scorer=nli_scorer, nli_penalty=nli_penalty))
    return ranked


@torch.inference_mode()
def generate_ranked_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    max_history: int = 2,
    nli_scorer=None,
    nli_penalty: float = 0.0,
    **generation_options,
) -> list[list[RankedReply]]:
    """For each context, its `num_ranked` sampled replies (each distinct one once) as `persona_ranking.RankedReply`s
    (text, multiple-choice score, token ids), best first; `nli_scorer`/`nli_penalty` subtract Welleck et al.'s
    contradiction penalty (`persona_ranking.rank_replies`). With `num_ranked=1` the one reply, scored. The rows are
    scored on the cache sampling built (`persona_ranking.score_on_cache`): the context and the replies are not
    encoded again. Other options: those of `generate_candidate_ids`."""
    check_can_rank(model)
    ranked = []
    for part in _sample(model, tokenizer, contexts, max_history=max_history, **generation_options):
        ranked += _rank_batch(
            model, tokenizer, contexts, part, max_history=max_history, nli_scorer=nli_scorer, nli_penalty=nli_penalty
        )
    return ranked


def generate_ranked(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    max_history: int = 2,
    nli_scorer=None,
    nli_penalty: float = 0.0,
    **generation_options,
) -> list[list[tuple[str, float]]]:
    """For each context, its `num_ranked` sampled replies (each distinct one once) with their multiple-choice scores,
    best first: `generate_ranked_replies` as `(reply, score)` pairs."""
    ranked = generate_ranked_replies(
        model,
        tokenizer,
        contexts,
        max_history=max_history,
        nli_scorer=nli_scorer,
        nli_penalty=nli_penalty,
        **generation_options,
    )
    return [[(r.reply, r.score) for r in candidates] for candidates in ranked]


def generate_reply_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    max_history: int = 2,
    nli_scorer=None,
    nli_penalty: float = 0.0,
    **generation_options,
) -> list[list[int]]:
    """Reply token ids (without the stop token) for `(persona, history)` pairs; see `generate_replies`. With
    `num_ranked` > 1, those of the first sample that decoded to the best reply."""
    if generation_options.get("num_ranked", 1) == 1:
        samples = generate_candidate_ids(model, tokenizer, contexts, max_history=max_history, **generation_options)
        return [ids for (ids,) in samples]
    ranked = generate_ranked_replies(
        model,
        tokenizer,
        contexts,
        max_history=max_history,
        nli_scorer=nli_scorer,
        nli_penalty=nli_penalty,
        **generation_options,
    )
    return [list(candidates[0].ids) for candidates in ranked]


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    max_history: int = 2,
    batch_size: int = 8,
    **generation_options,
) -> list[str]:
    """Replies to `(persona, history)` pairs, `batch_size` at a time with left padding and a KV cache.

    `history` holds the turns before the reply, the user's last (as in the dataset). `generation_options`:
    max_new_tokens, min_length, temperature, top_k, top_p, no_sample, num_beams, num_ranked, no_repeat_ngram_size,
    repetition_penalty, seed (`GENERATION_DEFAULTS`; see `generation_config_from_options`), and `own_turns`,
    `nli_scorer`, `nli_penalty` (see `generate_candidate_ids`, `generate_ranked`). With `num_ranked` N > 1 each
    reply is the best of N samples by the multiple-choice head. Greedy results do not depend on `batch_size`.
    """
    kwargs = {"max_history": max_history, "batch_size": batch_size, **generation_options}
    if generation_options.get("num_ranked", 1) > 1:
        return [ranked[0].reply for ranked in generate_ranked_replies(model, tokenizer, contexts, **kwargs)]
    return [decode_reply(tokenizer, ids) for ids in generate_reply_ids(model, tokenizer, contexts, **kwargs)]


class PersonaBot:
    """A conversation with one persona: `bot.reply("hi!")` answers and remembers both turns.

    `generation_options` are those of `generate_replies` (max_new_tokens, min_length, temperature, top_k, top_p,
    no_sample, num_beams, num_ranked, no_repeat_ngram_size, repetition_penalty, seed, nli_scorer, nli_penalty) plus
    `max_history`. Setting `persona` starts a new conversation. The repetition options count every reply of the
    conversation (`own_replies`), not only those in the context.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, persona: Sequence[str] = (), **opts):
        self.model = model
        self.tokenizer = tokenizer
        self.max_history = opts.pop("max_history", 2)
        self.ranking = {"nli_scorer": opts.pop("nli_scorer", None), "nli_penalty": opts.pop("nli_penalty", 0.0)}
        seed = opts.pop("seed", None)
        if seed is not None:
            set_seed(seed)  # once per conversation: a seed per reply would repeat the same random draws
        options, _ = split_options(opts)  # fail early on a misspelt option
        check_generation_options(**options)
        if options["num_ranked"] > 1:
            check_can_rank(model)
        self.generation_options = opts
        self._persona = [s for s in persona]
        self.history: list[str] = []
        self.own_replies: list[str] = []

    @property
    def persona(self) -> list[str]:
        return list(self._persona)

    @persona.setter
    def persona(self, sentences: Sequence[str]) -> None:
        self._persona = [s.strip() for s in sentences if s.strip()]
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the persona stays)."""
        self.history = []
        self.own_replies = []

    def reply(self, text: str, return_ranked: bool = False) -> str | list[tuple[str, float]]:
        """Answer `text` in character and add both turns to the history. With `return_ranked`, every distinct
        sampled reply with its multiple-choice score, best first (`[(reply, score), ...]`; the first is the answer)."""
        self.history.append(text)
        kwargs = {"max_history": self.max_history, "own_turns": [self.own_replies], **self.generation_options}
        if return_ranked or self.generation_options.get("num_ranked", 1) > 1:
            (ranked,) = generate_ranked(
                self.model, self.tokenizer, [(self._persona, self.history)], **kwargs, **self.ranking
            )
            answer = ranked[0][0]
        else:
            ranked = None
            (answer,) = generate_replies(self.model, self.tokenizer, [(self._persona, self.history)], **kwargs)
        self.history.append(answer)
        self.own_replies.append(answer)
        # The context only ever uses the last 2*max_history+1 turns (the reference trimmed likewise).
        self.history = history_window(self.history, self.max_history)
        return ranked if return_ranked else answer


def load_for_chat(
    name_or_path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint written by `persona-train` (or any supported backbone) for inference, on `device`.

    `dtype`: None (the checkpoint's), "auto", "float32", "bfloat16", "float16" or a torch dtype. Extra keyword
    arguments (revision, token, cache_dir, ...) go to `persona_model.load_model_and_tokenizer`. A device this
    machine does not have is a `UsageError`, before anything loads.
    """
    if device is not None and not isinstance(device, torch.device):
        check_device(device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model, tokenizer = load_model_and_tokenizer(name_or_path, dtype=dtype, **kwargs)
    model.to(resolve_device(device if device is None else str(device)))
    model.eval()
    return model, tokenizer


def check_reply_budget(model: PreTrainedModel, max_new_tokens: int) -> None:
    """A `UsageError` when `--max_new_tokens` leaves no room for a context in the model's window."""
    window = max_positions(model)
    if window is not None and max_new_tokens > window - 3:
        raise UsageError(
            f"--max_new_tokens {max_new_tokens} does not fit the model's {window} positions with any context; "
            f"use at most {window - 3}."
        )
