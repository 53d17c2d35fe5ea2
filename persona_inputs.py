"""The model inputs of one candidate reply: the reference's segments, speaker tokens, token types and labels.

Shared by training (`persona_data.build_features`) and generation (`persona_generation`), so a chat context is exactly a
training input without its reply. The rules and a worked example are in docs/architecture.md (the data contract).

>>> from persona_tokens import SpecialTokenIds
>>> ids = SpecialTokenIds(bos=1, eos=2, speaker1=3, speaker2=4)
>>> out = build_inputs([[10]], [[20]], [30], ids, lm_labels=True)  # persona, history, reply
>>> out["input_ids"], out["token_type_ids"]
([1, 10, 4, 20, 3, 30, 2], [3, 3, 4, 4, 3, 3, 3])
>>> out["mc_token_ids"], out["labels"]
(6, [-100, -100, -100, -100, -100, 30, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate, chain
from typing import NamedTuple

from persona_errors import UsageError
from persona_tokens import SpecialTokenIds

# The shortest input (`--max_length`): bos, one turn's speaker (its tokens may all be cut), the reply's speaker, one
# token of reply, eos.
MIN_INPUT_LENGTH = 5


def history_window(history: Sequence, max_history: int) -> list:
    """The turns a context keeps: the last `2*max_history+1` (the partner's message and `max_history` exchanges
    before it), as the reference cut them.

    >>> history_window(["a", "b", "c", "d"], 1), history_window(["a"], 0), history_window([], 2)
    (['b', 'c', 'd'], ['a'], [])
    """
    return list(history[-(2 * max_history + 1) :]) if history else []


def build_inputs(
    persona: Sequence[Sequence[int]],
    history: Sequence[Sequence[int]],
    reply: Sequence[int],
    ids: SpecialTokenIds,
    *,
    lm_labels: bool = False,
    with_eos: bool = True,
) -> dict[str, list[int]]:
    """Model inputs of one candidate, exactly as the reference `build_input_from_segments`.

    The reply segment is prefixed by speaker1 (the bot); earlier segments alternate backwards. `token_type_ids`
    follow segment parity from the persona segment. With `lm_labels`, only the reply tokens (and eos) are labelled.
    """
    sequence = [[ids.bos, *chain.from_iterable(persona)], *history, [*reply, *([ids.eos] if with_eos else [])]]
    n = len(sequence)
    sequence = [sequence[0]] + [
        [ids.speaker1 if (n - j) % 2 else ids.speaker2, *s] for j, s in enumerate(sequence[1:], start=1)
    ]
    out = {
        "input_ids": list(chain.from_iterable(sequence)),
        "token_type_ids": [ids.speaker2 if j % 2 else ids.speaker1 for j, s in enumerate(sequence) for _ in s],
    }
    out["mc_token_ids"] = len(out["input_ids"]) - 1
    if lm_labels:
        context_len = len(out["input_ids"]) - len(sequence[-1])
        out["labels"] = [-100] * (context_len + 1) + sequence[-1][1:]
    else:
        out["labels"] = [-100] * len(out["input_ids"])
    return out


class Kept(NamedTuple):
    """What of a context is kept: the first `persona` sentences, the history from turn `first_turn` on, and the last
    `last_turn` tokens of the final turn (None: all of it)."""

    persona: int
    first_turn: int
    last_turn: int | None = None


def fit_context(
    fits: Callable[[Kept], bool],
    persona_tokens: Sequence[int],
    num_turns: int,
    last_turn_tokens: int,
    max_length: int,
) -> tuple[Kept, bool]:
    """The one rule deciding what of a context is kept when a row does not fit `max_length` positions.

    Training rows, evaluation rows and generation contexts of both input formats are cut by it, so a chat context is
    exactly a training input without its reply. `fits(kept)` says whether the row (context, reply prefix and the reply
    or the generation budget) fits; `persona_tokens` are the sentences' token counts. The persona is the point of a
    persona bot, so it goes last, but it may not crowd out the conversation:

    1. the oldest history turns go; the last turn (the partner's message) stays;
    2. persona sentences go from the end while the persona takes more than half of `max_length`;
    3. the last turn loses its oldest tokens (its end, next to the reply, stays);
    4. the remaining persona sentences go from the end.

    Returns what is kept and whether anything was cut; the caller then cuts the reply if the row still does not fit
    (training) or reports that the reply budget leaves no room (generation). Each step is a binary search over a
    monotone condition: O(log n) calls of `fits`, so a persona of 10,000 sentences costs a handful of renderings.
    """
    num_persona = len(persona_tokens)
    kept = Kept(num_persona, 0)
    if fits(kept):
        return kept, False
    if num_turns > 1:
        first = _first(0, num_turns - 1, lambda f: fits(Kept(num_persona, f)))
        kept = Kept(num_persona, num_turns - 1 if first is None else first)
        if fits(kept):
            return kept, True
    prefix = list(accumulate(persona_tokens, initial=0))
    half = max_length // 2
    persona = _last(0, num_persona, lambda k: prefix[k] <= half or fits(kept._replace(persona=k)))
    kept = kept._replace(persona=persona)
    if fits(kept):
        return kept, True
    if num_turns:
        last = _last(0, last_turn_tokens, lambda t: fits(kept._replace(last_turn=t)))
        kept = kept._replace(last_turn=0 if last is None else last)
        if fits(kept):
            return kept, True
    persona = _last(0, kept.persona, lambda k: fits(kept._replace(persona=k)))
    return kept._replace(persona=0 if persona is None else persona), True


def _first(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest x in [lo, hi] with ok(x), for ok false then true as x grows; None if there is none."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def _last(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest x in [lo, hi] with ok(x), for ok true then false as x grows; None if there is none."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def fit_to_length(
    persona: list[list[int]], history: list[list[int]], longest_reply: int, max_length: int | None
) -> tuple[list[list[int]], list[list[int]], int, bool]:
    """Shorten a speaker-token context (`fit_context`'s rule) so bos + persona + speaker-prefixed turns + speaker +
    reply + eos fits `max_length`; if the context alone cannot make room, the reply budget shrinks (to 1 token).

    Returns ``(persona, history, budget, cut)``. The contract: ``build_inputs(persona, history, reply[:budget], ids)``
    is at most `max_length` tokens long, eos included. Generation asks for the context of a reply of
    `max_new_tokens - 1` tokens plus eos, so its context is the training input's of the same turn, token for token.
    Shared by every candidate of a turn so they keep one common context. Raises `UsageError` when even one reply
    token cannot fit.
    """
    if max_length is None:
        return persona, history, longest_reply, False
    persona_tokens = [len(p) for p in persona]
    turn_tokens = [len(h) + 1 for h in history]  # each turn +1 speaker
    persona_sum, turn_sum = list(accumulate(persona_tokens, initial=0)), list(accumulate(turn_tokens, initial=0))
    last_len = len(history[-1]) if history else 0

    def length(kept: Kept, reply: int = longest_reply) -> int:  # bos + persona + turns + speaker + reply + eos
        turns = turn_sum[-1] - turn_sum[kept.first_turn]
        if kept.last_turn is not None:
            turns -= last_len - kept.last_turn
        return 1 + persona_sum[kept.persona] + turns + reply + 2

    kept, cut = fit_context(lambda k: length(k) <= max_length, persona_tokens, len(history), last_len, max_length)
    persona, history = list(persona[: kept.persona]), list(history[kept.first_turn :])
    if kept.last_turn is not None and history:
        history[-1] = history[-1][len(history[-1]) - kept.last_turn :]
    excess = length(kept) - max_length
    budget = longest_reply if excess <= 0 else max(1, longest_reply - excess)
    if length(kept, budget) > max_length:
        raise UsageError(
            f"max_length={max_length} is too small to hold even the special tokens and one reply token; raise it."
        )
    return persona, history, budget, cut or budget < longest_reply
