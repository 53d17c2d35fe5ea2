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

from collections.abc import Sequence
from itertools import chain

from persona_errors import UsageError
from persona_tokens import SpecialTokenIds


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


def fit_to_length(
    persona: list[list[int]], history: list[list[int]], longest_reply: int, max_length: int | None
) -> tuple[list[list[int]], list[list[int]], int, bool]:
    """Shorten a context so bos + persona + speaker-prefixed turns + speaker + reply + eos fits `max_length`.

    Oldest history turns go first (the last one stays), then persona sentences from the end; if that is not enough
    the reply budget shrinks (to 1 token at least), and at last the final turn loses its oldest tokens. Shared by
    every candidate of a turn so they keep one common context.

    Returns ``(persona, history, budget, cut)``: the shortened persona and history, the reply budget and whether
    anything was cut (context or budget). The contract: ``build_inputs(persona, history, reply[:budget], ids)`` is at
    most `max_length` tokens long, eos included; a generation context (``build_inputs(..., [], with_eos=False)``)
    plus `budget` new tokens fits too, with a position to spare. The caller must cut its reply (or ask generation
    for no more than `budget` new tokens): `budget` < `longest_reply` means the reply does not fit whole.
    Linear in the number of sentences and turns. Raises `ValueError` when even one reply token cannot fit.
    """
    if max_length is None:
        return persona, history, longest_reply, False
    # bos + persona; each turn +1 speaker; the reply +1 speaker +1 eos.
    persona_len = sum(map(len, persona))
    history_len = sum(len(h) + 1 for h in history)
    excess = 1 + persona_len + history_len + longest_reply + 2 - max_length
    if excess <= 0:
        return persona, history, longest_reply, False
    first = 0  # oldest turns first, the last one stays
    while excess > 0 and first < len(history) - 1:
        excess -= len(history[first]) + 1
        first += 1
    kept = len(persona)  # then persona sentences from the end
    while excess > 0 and kept:
        kept -= 1
        excess -= len(persona[kept])
    persona, history = list(persona[:kept]), list(history[first:])
    budget = longest_reply
    if excess > 0:
        budget = max(1, longest_reply - excess)
        excess -= longest_reply - budget
    if excess > 0 and history:
        keep = max(0, len(history[-1]) - excess)
        excess -= len(history[-1]) - keep
        history[-1] = history[-1][len(history[-1]) - keep :]
    if excess > 0:
        raise UsageError(
            f"max_length={max_length} is too small to hold even the special tokens and one reply token; raise it."
        )
    return persona, history, budget, True
