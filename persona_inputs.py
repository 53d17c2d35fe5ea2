"""The model inputs of one candidate reply: the reference's segments, speaker tokens, token types and labels.

Shared by training (`persona_data.build_features`) and generation (`persona_chat`), so a chat context is exactly a
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
    """Shorten a context so bos + persona + speaker-prefixed turns + reply + eos fits `max_length`.

    Oldest history turns go first (the last one stays), then persona sentences from the end; if that is not enough
    the reply budget shrinks, and at last the final turn loses its oldest tokens. Returns the shortened persona and
    history, the reply budget (tokens) and whether anything was cut. Shared by every candidate of a turn so they keep
    one common context.
    """
    if max_length is None:
        return persona, history, longest_reply, False
    # bos + persona; each turn +1 speaker; the reply +1 speaker +1 eos.
    length = lambda: 1 + sum(map(len, persona)) + sum(len(h) + 1 for h in history) + longest_reply + 2  # noqa: E731
    if length() <= max_length:
        return persona, history, longest_reply, False
    persona, history = list(persona), list(history)
    while length() > max_length and len(history) > 1:
        history.pop(0)
    while length() > max_length and persona:
        persona.pop()
    budget = longest_reply
    if length() > max_length:
        budget = max(1, longest_reply - (length() - max_length))
        longest_reply = budget
    if length() > max_length and history:
        keep = max(0, len(history[-1]) - (length() - max_length))
        history[-1] = history[-1][len(history[-1]) - keep :]
    if length() > max_length:
        raise ValueError(f"max_length={max_length} is too small to hold even the special tokens and one reply token.")
    return persona, history, budget, True
