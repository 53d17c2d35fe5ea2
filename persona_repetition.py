"""Repetition control that spares the persona: logits processors counting only the reply and the bot's earlier turns.

transformers' own `no_repeat_ngram_size` and `repetition_penalty` read the whole `input_ids` of a decoder-only model,
prompt included, so they forbid (or penalise) restating the persona and answering in the partner's words: the one
thing a persona bot must be free to do. These processors see the reply being generated (the tokens after the
prompt) and the token ids of the bot's own earlier turns, given per context; the persona, the partner's turns and
the template text are never counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor


def _ngram_table(sequences: Sequence[Sequence[int]], n: int) -> dict[tuple[int, ...], set[int]]:
    """{first n-1 tokens: the tokens that complete an n-gram} over n-grams lying inside one sequence each."""
    table: dict[tuple[int, ...], set[int]] = {}
    for seq in sequences:
        for start in range(len(seq) - n + 1):
            table.setdefault(tuple(seq[start : start + n - 1]), set()).add(seq[start + n - 1])
    return table


def _rows(per_context: list, num_rows: int) -> list:
    """`per_context` spread over `num_rows` rows: generate() repeats each context's row (beams, samples) in place."""
    if num_rows % len(per_context):
        raise ValueError(f"{num_rows} generation rows for {len(per_context)} contexts.")
    return [per_context[i // (num_rows // len(per_context))] for i in range(num_rows)]


class OwnTurnsNoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbid a token that would complete an n-gram already in the reply or in one of the bot's earlier turns.

    Our own rather than the library's `NoRepeatNGramLogitsProcessor`, which counts every n-gram of the prompt (the
    persona among them) and n-grams spanning two turns. `prompt_length`: the width of the (left-padded) prompt, after
    which `input_ids` hold the reply; `own_turns[i]`: the token ids of context i's earlier bot turns.
    """

    def __init__(self, ngram_size: int, prompt_length: int, own_turns: Sequence[Sequence[Sequence[int]]]):
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {ngram_size}.")
        self.n = ngram_size
        self.prompt_length = prompt_length
        self.own_tables = [_ngram_table(turns, ngram_size) for turns in own_turns]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        replies = input_ids[:, self.prompt_length :].tolist()
        banned_rows, banned_tokens = [], []
        for row, (reply, own) in enumerate(zip(replies, _rows(self.own_tables, len(replies)))):
            if len(reply) < self.n - 1:
                continue
            prefix = tuple(reply[len(reply) - self.n + 1 :])
            banned = own.get(prefix, set()) | _ngram_table([reply], self.n).get(prefix, set())
            banned_rows += [row] * len(banned)
            banned_tokens += sorted(banned)
        if banned_rows:
            scores = scores.clone()
            scores[banned_rows, banned_tokens] = -float("inf")
        return scores


class OwnTurnsRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """The library's repetition penalty (CTRL's rule: a seen token's positive logit divided by `penalty`, a negative
    one multiplied) over the reply and the bot's earlier turns only.

    The library's processor counts every token of `input_ids`; it is handed the earlier turns' ids in place of the
    prompt, left-padded, with `prompt_ignore_length` masking each row's padding.
    """

    def __init__(self, penalty: float, prompt_length: int, own_turns: Sequence[Sequence[Sequence[int]]]):
        if not penalty > 0:
            raise ValueError(f"penalty must be > 0, got {penalty}.")
        self.penalty = float(penalty)
        self.prompt_length = prompt_length
        self.own_ids = [[t for turn in turns for t in turn] for turns in own_turns]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        own = _rows(self.own_ids, input_ids.size(0))
        width = max(map(len, own))
        padded = torch.tensor([[0] * (width - len(ids)) + ids for ids in own], dtype=torch.long)
        ignore = torch.tensor([width - len(ids) for ids in own], dtype=torch.long)
        seen = torch.cat([padded.to(input_ids.device), input_ids[:, self.prompt_length :]], dim=1)
        library = RepetitionPenaltyLogitsProcessor(self.penalty, prompt_ignore_length=ignore)
        return library(seen, scores)


def repetition_processors(
    prompt_length: int,
    own_turns: Sequence[Sequence[Sequence[int]]],
    *,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
) -> LogitsProcessorList:
    """The processors the options ask for (none by default): `no_repeat_ngram_size` 0 and `repetition_penalty` 1.0
    are off."""
    processors = LogitsProcessorList()
    if no_repeat_ngram_size > 0:
        processors.append(OwnTurnsNoRepeatNGramLogitsProcessor(no_repeat_ngram_size, prompt_length, own_turns))
    if repetition_penalty != 1.0:
        processors.append(OwnTurnsRepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_length, own_turns))
    return processors
