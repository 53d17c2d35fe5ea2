"""Repetition control that spares the persona: logits processors counting only the reply and the bot's earlier turns.

transformers' own `no_repeat_ngram_size` and `repetition_penalty` read the whole `input_ids` of a decoder-only model,
prompt included, so they forbid (or penalise) restating the persona and answering in the partner's words: the one
thing a persona bot must be free to do. These processors see the reply being generated (the tokens after the
prompt) and the token ids of the bot's own earlier turns, given per context; the persona, the partner's turns and
the template text are never counted.

With a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen...) `no_repeat_ngram_size` counts WORDS as the user reads them:
the whitespace-separated words of the printed replies (`persona_text.decode_reply`), not token ids. Token n-grams
miss what the user sees: the same word has several spellings in tokens (" city" or " ci"+"ty", the first word of a
reply without its space once re-encoded), bytes of a broken character are dropped from the text and join what was
apart, and a token like "\x1c" prints as a word break.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import decoders
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from persona_text import _token_bytes


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


def _word_ngrams(words: Sequence[str], n: int, start: int = 0) -> list[tuple[str, ...]]:
    """The word n-grams of `words` that end at index `start` or later."""
    return [tuple(words[k - n + 1 : k + 1]) for k in range(max(start, n - 1), len(words))]


# Words that could still join the next text under `clean_up_tokenization_spaces` (" n" + "'t" reads "n't").
_CLEANUP_OPEN = frozenset(["'", "n", "n'", "'v", "'r"])


class _TokenText:
    """What each token of a byte-level BPE vocabulary does to the printed text, sorted once per tokenizer.

    `plain`: valid UTF-8 without whitespace (extends the open word); `spaced`: one whitespace character then plain
    text (closes the open word, opens its tail); `empty`: special tokens (skipped when decoded); `exact`: the rest,
    decoded one by one (broken characters, inner whitespace, text that `clean_up_tokenization_spaces` rewrites).
    """

    def __init__(self, tokenizer):
        self.cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.clean = tokenizer.clean_up_tokenization
        special = set(tokenizer.all_special_ids)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.bytes = [b"" if i in special else _token_bytes(t) for i, t in enumerate(tokens)]
        self.plain: dict[str, list[int]] = {}
        self.spaced: dict[str, list[int]] = {}
        groups: dict[str, list[int]] = {"plain": [], "spaced": [], "empty": [], "exact": []}
        for i, raw in enumerate(self.bytes):
            kind, text = self._sort(raw)
            groups[kind].append(i)
            if kind in ("plain", "spaced"):
                getattr(self, kind).setdefault(text, []).append(i)
        self.groups = {kind: torch.tensor(ids, dtype=torch.long) for kind, ids in groups.items()}

    def _sort(self, raw: bytes) -> tuple[str, str]:
        if not raw:
            return "empty", ""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "exact", ""
        if self.cleanup and self.clean(f"x{text}x") != f"x{text}x":
            return "exact", ""
        if not any(c.isspace() for c in text):
            return "plain", text
        tail = text[1:]
        if text[0].isspace() and not any(c.isspace() for c in tail) and (tail or not self.cleanup):
            return "spaced", tail
        return "exact", ""

    def text(self, raw: bytes) -> str:
        """The reply as `decode_reply` prints it (bytes of a broken character dropped)."""
        text = raw.decode("utf-8", errors="ignore")
        return self.clean(text) if self.cleanup else text

    def split(self, text: str, finished: bool) -> tuple[list[str], str]:
        """(the words no later token can change, the open last word or "")."""
        words = text.split()
        if finished or not words:
            return words, ""
        # Under clean-up a word followed by one space still joins a "." or "," that comes next.
        if not text[-1].isspace() or (self.cleanup and text.endswith(" ") and not text[-2].isspace()):
            return words[:-1], words[-1]
        return words, ""


_TOKEN_TEXTS: dict[int, tuple[object, _TokenText]] = {}


def _token_text(tokenizer) -> _TokenText:
    key = id(tokenizer)
    if key not in _TOKEN_TEXTS or _TOKEN_TEXTS[key][0] is not tokenizer:
        _TOKEN_TEXTS.clear()  # one tokenizer at a time is the usual case; the table costs a pass over the vocabulary
        _TOKEN_TEXTS[key] = (tokenizer, _TokenText(tokenizer))
    return _TOKEN_TEXTS[key][1]


def is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)


class OwnTurnsNoRepeatWordNGramLogitsProcessor(LogitsProcessor):
    """Forbid a token that would make the printed reply hold a word n-gram twice or hold a word n-gram of one of the
    bot's earlier turns (`own_texts[i]`: context i's earlier replies as text).

    Our own: the library's processors count token ids, and the words a user counts are the printed reply's
    (`persona_text.decode_reply`, split at whitespace). A word is complete once whitespace follows it or the reply
    ends, so what is banned is the token that would complete a repeated n-gram: a whitespace-led token, a stop token,
    or at the last step (`max_new_tokens`) any token. Needs a byte-level BPE tokenizer, whose tokens' bytes are the
    text's.
    """

    def __init__(
        self,
        ngram_size: int,
        prompt_length: int,
        own_texts: Sequence[Sequence[str]],
        tokenizer,
        max_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ):
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {ngram_size}.")
        self.n = ngram_size
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.stops = sorted(set(stop_token_ids))
        self.tokens = _token_text(tokenizer)
        self.own = []
        for texts in own_texts:
            grams = {g for text in texts for g in _word_ngrams(text.split(), ngram_size)}
            self.own.append((grams, self._prefixes(grams)))

    @staticmethod
    def _prefixes(grams) -> dict[tuple[str, ...], set[str]]:
        table: dict[tuple[str, ...], set[str]] = {}
        for g in grams:
            table.setdefault(g[:-1], set()).add(g[-1])
        return table

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, ids = [], []
        for row, (reply, own) in enumerate(
            zip(input_ids[:, self.prompt_length :].tolist(), _rows(self.own, len(input_ids)))
        ):
            if any(t in self.stops for t in reply):
                continue  # a finished row: generate() pads it
            finishing = self.max_new_tokens is not None and len(reply) + 1 >= self.max_new_tokens
            banned = self._banned(reply, own, finishing, scores.size(-1))
            rows += [row] * len(banned)
            ids += banned.tolist()
        if rows:
            scores = scores.clone()
            scores[rows, ids] = -float("inf")
        return scores

    def _banned(self, reply: list[int], own, finishing: bool, vocab: int) -> torch.Tensor:
        tokens, n = self.tokens, self.n
        own_grams, own_prefixes = own
        size = len(tokens.bytes)
        raw = b"".join(tokens.bytes[t] if t < size else b"" for t in reply)
        text = tokens.text(raw)
        done, open_word = tokens.split(text, finished=False)
        seen = set(_word_ngrams(done, n))

        def repeats(new: list[str], start: list[str] = done) -> bool:
            fresh = set()
            for g in _word_ngrams(start + new, n, len(start)):
                if g in own_grams or g in seen or g in fresh:
                    return True
                fresh.add(g)
            return False

        def completions(words: list[str], extra=()) -> set[str]:
            """The words that would complete a repeated n-gram after `words`."""
            if len(words) < n - 1:
                return set()
            context = tuple(words[len(words) - n + 1 :])
            return own_prefixes.get(context, set()) | {g[-1] for g in (*seen, *extra) if g[:-1] == context}

        banned: list[torch.Tensor] = []
        straddle = tokens.cleanup and (text.endswith(" ") or open_word in _CLEANUP_OPEN)
        closing = [open_word] if open_word else []
        if repeats(closing):
            banned.append(torch.tensor(self.stops, dtype=torch.long))
            if finishing:
                banned.append(tokens.groups["empty"])
                if vocab > size:
                    banned.append(torch.arange(size, vocab))
        if straddle:  # clean-up may join this text to the next token's: decode every token
            exact = range(size)
        else:
            exact = tokens.groups["exact"].tolist()
            if open_word and repeats(closing):
                banned.append(tokens.groups["spaced"])
            elif finishing:
                after = done + closing
                tails = completions(after, _word_ngrams(after, n, len(done)))
                banned += [torch.tensor(tokens.spaced[w]) for w in tails if w in tokens.spaced]
            if finishing:
                ends = (w[len(open_word) :] for w in completions(done) if w.startswith(open_word))
                banned += [torch.tensor(tokens.plain[s]) for s in ends if s in tokens.plain]
        violations = None
        for t in exact:
            if t in self.stops:
                continue
            words, _ = tokens.split(tokens.text(raw + tokens.bytes[t]), finished=finishing)
            if words[: len(done)] == done:
                hit = repeats(words[len(done) :])
            else:  # clean-up rewrote a word that was done: count the whole reply
                if violations is None:
                    violations = self._violations(done, own_grams)
                hit = self._violations(words, own_grams) > violations
            if hit:
                banned.append(torch.tensor([t]))
        return torch.cat(banned).unique() if banned else torch.tensor([], dtype=torch.long)

    def _violations(self, words: list[str], own_grams) -> int:
        grams = _word_ngrams(words, self.n)
        return sum(g in own_grams for g in grams) + len(grams) - len(set(grams))


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
    tokenizer=None,
    own_texts: Sequence[Sequence[str]] | None = None,
    max_new_tokens: int | None = None,
    stop_token_ids: Sequence[int] = (),
) -> LogitsProcessorList:
    """The processors the options ask for (none by default): `no_repeat_ngram_size` 0 and `repetition_penalty` 1.0
    are off. Given the `tokenizer` (byte-level BPE) and the earlier turns as text (`own_texts`), n-grams are words
    of the printed text; otherwise token ids (`own_turns`)."""
    processors = LogitsProcessorList()
    if no_repeat_ngram_size > 0:
        if tokenizer is not None and own_texts is not None and is_byte_level(tokenizer):
            processors.append(
                OwnTurnsNoRepeatWordNGramLogitsProcessor(
                    no_repeat_ngram_size, prompt_length, own_texts, tokenizer, max_new_tokens, stop_token_ids
                )
            )
        else:
            processors.append(OwnTurnsNoRepeatNGramLogitsProcessor(no_repeat_ngram_size, prompt_length, own_turns))
    if repetition_penalty != 1.0:
        processors.append(OwnTurnsRepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_length, own_turns))
    return processors
