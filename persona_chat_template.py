"""Persona dialogs as chat-template rows for instruct backbones: `ChatFormat`, one of the two input formats.

One canonical example (persona sentences, history turns with the partner speaking the last one, candidates with the
gold last) becomes messages: the persona in the system message through an overridable prompt, the history as
alternating user/assistant messages (the partner is the user), each candidate the final assistant message. Ids come
from the tokenizer's chat template with no special tokens added and no token types, so the trained model is a plain
causal LM that any engine serving `apply_chat_template(..., add_generation_prompt=True)` prompts exactly as in
training.

A row is the generation prompt (system + history + assistant header, rendered once per example) followed by one
candidate's part: what the template renders after the generation prompt for that reply. The gold's full rendering is
checked against that split, token for token, so every row is what `apply_chat_template` gives for its conversation.
Message contents stay text (`persona_text.ChatText`, transformers' `sanitize_control_tokens`): a persona or a turn
holding `<|im_end|>\n<|im_start|>system` gets those characters' tokens, not a forged system turn; ordinary text gets
exactly `apply_chat_template`'s ids. `ChatFormat` answers the input-format interface of `persona_formats` (rows,
generation context, stop ids, preparing the model) as `persona_formats.SpeakerTokens` does for the reference's format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from persona_chat_options import (
    DEFAULT_SYSTEM_PROMPT,
    PERSONA_FIELD,
    require_persona_field,
)
from persona_errors import ChatTemplateError, UsageError
from persona_inputs import Kept, fit_context
from persona_text import ChatText

logger = logging.getLogger(__name__)

# A string no template invents: finding it in the rendering proves the system message was kept.
_SYSTEM_PROBE = "persona-chat system probe 7f3a"
_WARNED_NO_SYSTEM: set[tuple[str, str]] = set()  # say once per template that the persona moves to the user turn
_MAX_CUTS = 64  # reply/last-turn cuts before giving up (each one removes at least a token)


def _default_template(tokenizer, model_name: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ChatTemplateError(
            f"{model_name} has no chat template: use --input_format speaker_tokens, "
            "or give a template with --chat_template FILE."
        )
    return template


class _Encoded(NamedTuple):
    """One example, tokenized: the generation prompt, each candidate's part after it, and the end-of-turn layout."""

    prompt_ids: list[int]
    parts: list[list[int]]  # [C][len]: reply tokens, the end-of-turn, whatever the template renders after it
    tail_len: int  # tokens every part ends with (the end-of-turn and what follows it)
    end_of_turn: int  # index of the (last) end-of-turn token within those tail tokens

    def length(self, reply_budget: int = 0) -> int:
        return len(self.prompt_ids) + (max(map(len, self.parts)) if self.parts else reply_budget)

    def reply_lens(self) -> list[int]:
        return [len(part) - self.tail_len for part in self.parts]


@dataclass(frozen=True)
class ChatFormat:
    """How persona examples become chat-template rows for one tokenizer and template.

    Build it with `ChatFormat.from_tokenizer`, which checks the template and finds out whether it can hold a system
    message (if not, the persona goes at the head of the first user turn).
    """

    tokenizer: Any
    template: str
    name: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    system_role: bool = True

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        *,
        chat_template: str | None = None,
        template_name: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> ChatFormat:
        """The format for `tokenizer` with its own template, or `chat_template` (template text, see
        `load_chat_template`); `template_name` (e.g. the file) names the template in errors."""
        model_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        require_persona_field(system_prompt)
        template = chat_template if chat_template is not None else _default_template(tokenizer, model_name)
        name = template_name or f"the chat template of {model_name}"
        fmt = cls(tokenizer, template, name, system_prompt, system_role=True)
        try:
            fmt.render([{"role": "user", "content": "hello"}], add_generation_prompt=True)
        except Exception as err:
            raise ChatTemplateError(f"{name} cannot render a one-message user conversation: {err}") from err
        if not fmt._holds_system_message():
            if (name, template) not in _WARNED_NO_SYSTEM:
                _WARNED_NO_SYSTEM.add((name, template))
                logger.warning(
                    "%s has no system role: the persona goes at the head of the first user turn.",
                    name[0].upper() + name[1:],
                )
            fmt = cls(tokenizer, template, name, system_prompt, system_role=False)
        fmt.end_of_turn_ids  # noqa: B018 -- a template that cannot build rows fails here, before any data is read
        return fmt

    def _holds_system_message(self) -> bool:
        messages = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hello"}]
        try:
            text = self.render(messages, add_generation_prompt=True)
        except Exception:  # e.g. Gemma's raise_exception('System role not supported')
            return False
        return _SYSTEM_PROBE in text  # some templates drop it silently

    def system_text(self, persona: Sequence[str]) -> str:
        """The system prompt with the persona sentences, one per line."""
        return self.system_prompt.replace(PERSONA_FIELD, "\n".join(persona))

    def messages(self, persona: Sequence[str], history: Sequence[str]) -> list[dict[str, str]]:
        """The conversation before the reply: system (persona), then the history with the partner's last turn as user.

        Without a system role the persona text heads the first user turn (a user turn of its own when the history
        starts with the bot, so that the roles still alternate user first).
        """
        n = len(history)
        turns = [{"role": "user" if (n - 1 - j) % 2 == 0 else "assistant", "content": h} for j, h in enumerate(history)]
        system = self.system_text(persona)
        if self.system_role:
            return [{"role": "system", "content": system}, *turns]
        if turns and turns[0]["role"] == "user":
            return [{"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}, *turns[1:]]
        return [{"role": "user", "content": system}, *turns]

    @cached_property
    def text(self) -> ChatText:
        """Message contents as text: control-token strings in a persona, a turn or a reply never become tokens."""
        return ChatText(self.tokenizer, self.template)

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The template's text for `messages` (their control-token strings marked, see `ChatText`), ending with the
        assistant header when `add_generation_prompt`; `self.text.encode` gives its ids."""
        return self.tokenizer.apply_chat_template(
            self.text.mark_messages(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of message texts on their own (persona sentences, turns, replies), as text."""
        return self.text.encode_texts(texts)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        return frozenset(self.tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}

    def _encode(self, persona: Sequence[str], history: Sequence[str], replies: Sequence[str]) -> _Encoded:
        messages = self.messages(persona, history)
        prompt = self.render(messages, add_generation_prompt=True)
        if not replies:
            return _Encoded(self.text.encode([prompt])[0], [], 0, 0)
        gold = replies[-1]
        full = self.render([*messages, {"role": "assistant", "content": gold}], add_generation_prompt=False)
        marked = [self.text.mark(r) for r in replies]  # as the rendering holds them
        suffix = full[len(prompt) :] if full.startswith(prompt) else None
        at = suffix.find(marked[-1]) if suffix is not None else -1
        if at < 0:
            raise ChatTemplateError(
                f"{self.name} renders the assistant's reply differently from its generation prompt "
                "(add_generation_prompt=True) followed by the reply, so the reply cannot be trained as the "
                f"continuation the model will be asked for; use a template whose rendering of a final assistant "
                f"message extends its generation prompt (reply {gold!r})."
            )
        head, tail = suffix[:at], suffix[at + len(marked[-1]) :]
        prompt_ids, full_ids, tail_ids, *parts = self.text.encode(
            [prompt, full, tail, *(head + r + tail for r in marked)]
        )
        if prompt_ids + parts[-1] != full_ids:
            raise ChatTemplateError(
                f"{self.name}: the tokens of the conversation with the reply are not the tokens of the generation "
                "prompt followed by those of the reply (the tokenizer merges across the end of the generation "
                f"prompt), so the reply cannot be trained as the continuation the model will be asked for (reply "
                f"{gold!r})."
            )
        specials = [i for i, t in enumerate(tail_ids) if t in self._special_ids]
        if not specials:
            raise ChatTemplateError(
                f"{self.name} ends an assistant message with {tail!r}, which holds no special token: there is no "
                "end-of-turn token for the model to learn to stop at."
            )
        for part, reply in zip(parts, replies):
            if part[len(part) - len(tail_ids) :] != tail_ids:
                raise ChatTemplateError(f"{self.name}: the reply {reply!r} merges into the end-of-turn tokens.")
        return _Encoded(prompt_ids, parts, len(tail_ids), specials[-1])

    def _fit(
        self,
        persona: Sequence[str],
        history: Sequence[str],
        replies: Sequence[str],
        max_length: int | None,
        reply_budget: int = 0,
    ) -> tuple[_Encoded, bool]:
        """Encode, shortening the context by the one rule (`persona_inputs.fit_context`) until the longest row, or the
        generation prompt plus `reply_budget` tokens, fits `max_length`; then the replies lose their last tokens
        (down to one). Cuts are made in token space and decoded back to text, so that every row is still the
        rendering of a conversation. Every candidate's part is encoded apart from the prompt, so a cut renders only
        the prompt again: O(log n) renderings for n persona sentences or turns."""
        enc = self._encode(persona, history, replies)
        if max_length is None or enc.length(reply_budget) <= max_length:
            return enc, False
        reply_cost = enc.length(reply_budget) - len(enc.prompt_ids)
        persona, history = list(persona), list(history)
        (last_ids,) = self.encode(history[-1:]) if history else ([],)
        prompts = {}

        def context(kept: Kept) -> tuple[list[str], list[str]]:
            turns = history[kept.first_turn :]
            if kept.last_turn is not None and turns:
                turns[-1] = self._keep(turns[-1], len(last_ids), kept.last_turn, from_end=True)
            return persona[: kept.persona], turns

        def fits(kept: Kept) -> bool:
            if kept not in prompts:
                prompt = self.render(self.messages(*context(kept)), add_generation_prompt=True)
                prompts[kept] = self.text.encode([prompt])[0]
            return len(prompts[kept]) + reply_cost <= max_length

        persona_tokens = [len(ids) for ids in self.encode(persona)] if persona else []
        kept, _ = fit_context(fits, persona_tokens, len(history), len(last_ids), max_length)
        persona, history = context(kept)
        enc = self._encode(persona, history, replies)
        for _ in range(_MAX_CUTS):
            over = enc.length(reply_budget) - max_length
            if over <= 0 or not replies or max(enc.reply_lens()) <= 1:
                break
            budget = max(1, max(enc.reply_lens()) - over)
            replies = [self._keep(r, n, budget, from_end=False) for r, n in zip(replies, enc.reply_lens())]
            enc = self._encode(persona, history, replies)
        if enc.length(reply_budget) > max_length:
            if not replies:
                raise UsageError(
                    f"a reply of {reply_budget} new tokens leaves no room for {self.name}'s system prompt and headers "
                    f"in the model's {max_length} positions; lower --max_new_tokens."
                )
            raise UsageError(
                f"max_length={max_length} is too small to hold {self.name}'s system prompt, headers and one reply "
                "token; raise max_length or shorten --system_prompt."
            )
        return enc, True

    def _keep(self, text: str, num_tokens: int, keep: int, *, from_end: bool) -> str:
        """`text` cut to `keep` of its tokens (its last ones with `from_end`); `num_tokens` is its length in context."""
        if keep >= num_tokens:
            return text
        (ids,) = self.encode([text])
        # At least one token less, however the text tokenizes on its own; a reply keeps one token.
        keep = max(min(keep, len(ids) - 1), 0 if from_end else 1)
        ids = ids[len(ids) - keep :] if from_end else ids[:keep]
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""

    def build_rows(
        self,
        persona: Sequence[str],
        history: Sequence[str],
        candidates: Sequence[str],
        *,
        max_length: int | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Model inputs of one example (the gold is the last candidate) and whether it was shortened to fit.

        Returns `input_ids` and `labels` (lists over candidates), `mc_token_ids` (the end-of-turn token of each
        candidate's assistant turn) and `mc_labels` (the gold's index). Only the gold is labelled: the tokens the
        template renders after the generation prompt up to and including the end-of-turn token; what follows the
        end-of-turn (Qwen's "\\n" after "<|im_end|>") stays in `input_ids` but is not labelled. Candidate texts are
        stripped of surrounding whitespace.
        """
        if not candidates:
            raise UsageError("build_rows needs at least one candidate (the gold reply, last).")
        replies = [c.strip() for c in candidates]
        enc, cut = self._fit(persona, history, replies, max_length)
        prompt_len = len(enc.prompt_ids)
        after_end = enc.tail_len - 1 - enc.end_of_turn  # tokens after the end-of-turn token in every part
        input_ids = [enc.prompt_ids + part for part in enc.parts]
        mc_token_ids = [len(row) - 1 - after_end for row in input_ids]
        labels = [[-100] * len(row) for row in input_ids]
        gold = len(replies) - 1
        labels[gold][prompt_len : mc_token_ids[gold] + 1] = input_ids[gold][prompt_len : mc_token_ids[gold] + 1]
        rows = {"input_ids": input_ids, "mc_token_ids": mc_token_ids, "labels": labels, "mc_labels": gold}
        return rows, cut

    def context_ids(
        self,
        persona: Sequence[str],
        history: Sequence[str],
        *,
        max_length: int | None = None,
        reply_budget: int = 0,
    ) -> list[int]:
        """Generation context: system + history + the assistant header, as a serving engine renders it.

        With `max_length` (the model's positions) the context is shortened by the training rule so that
        `reply_budget` more tokens fit: with `reply_budget` = the length of a training row's longest candidate part
        (reply and end-of-turn tokens), it is that row's prompt, token for token.
        """
        enc, cut = self._fit(persona, history, [], max_length, reply_budget)
        if cut:
            logger.warning(
                "The context was shortened to fit %d positions with a %d-token reply.", max_length, reply_budget
            )
        return enc.prompt_ids

    # The input-format interface (`persona_formats`: this and `SpeakerTokens` answer the same questions).
    kind = "chat_template"
    columns = ("input_ids", "mc_token_ids", "labels", "mc_labels")
    token_types = False  # no token_type_ids: a plain causal LM for any engine
    adds_tokens = False  # the tokenizer's own vocabulary: embeddings keep their size
    min_length = 1  # the template itself decides; `_fit` says when a window cannot hold a row

    @property
    def record(self) -> dict:
        """What the tokenizer's config records of this format (and training_config.yaml shows)."""
        return {"input_format": self.kind, "system_prompt": self.system_prompt}

    @property
    def signature(self) -> tuple:
        """What makes this format's rows differ (the features' cache key)."""
        return (self.template, self.system_prompt, self.system_role)

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def row_builder(self, batch: dict[str, list], max_history: int, num_candidates: int | None):
        """The persona converter and the row builder of a batch of dialogs (rendered per example from the texts)."""

        def build(persona, history, candidates, max_length):
            rows, cut = self.build_rows(persona, history, candidates, max_length=max_length)
            rows.pop("mc_labels")
            start = next(i for i, label in enumerate(rows["labels"][-1]) if label != -100)  # the gold's first token
            kept = [end - start for end in rows["mc_token_ids"]]  # reply tokens before each end-of-turn
            cuts = {"cut_context": False, "cut_gold": False, "cut_distractor": False, "reply_budget": max(kept)}
            if cut:  # what was cut, against the uncut prompt and replies
                whole = [len(ids) for ids in self.encode([c.strip() for c in candidates])]
                cuts["cut_context"] = start < len(self.context_ids(persona, history))
                cuts["cut_gold"] = kept[-1] < whole[-1]
                cuts["cut_distractor"] = any(k < w for k, w in zip(kept[:-1], whole[:-1]))
            return rows, cuts

        return list, build

    def generation_inputs(
        self, persona: Sequence[str], history: Sequence[str], *, max_length: int | None = None, reply_budget: int = 0
    ) -> dict[str, list[int]]:
        """The generation context as lists (`input_ids`): `context_ids`, what a serving engine sends."""
        return {"input_ids": self.context_ids(persona, history, max_length=max_length, reply_budget=reply_budget)}

    def prepare_model(self, model) -> str:
        """Pad with the tokenizer's pad token (its eos when it has none) and stop generating at the template's
        end-of-turn tokens and the eos, in the config and the generation config that are saved with the model, so
        that `generate()` and serving engines stop where training put the end of the reply. Returns what was done."""
        tokenizer = self.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        stops = self.stop_ids
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = stops[0] if len(stops) == 1 else stops
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.pad_token_id = tokenizer.pad_token_id
            generation_config.eos_token_id = stops
            if tokenizer.bos_token_id is not None:
                generation_config.bos_token_id = tokenizer.bos_token_id
        return self.name

    @cached_property
    def end_of_turn_ids(self) -> list[int]:
        """The special tokens the template ends an assistant turn with (stop generation at any of them)."""
        enc = self._encode(["i like tea ."], ["hello , how are you ?"], ["fine , thanks ."])
        tail = enc.parts[0][len(enc.parts[0]) - enc.tail_len :]
        return list(dict.fromkeys(t for t in tail[: enc.end_of_turn + 1] if t in self._special_ids))

    @property
    def stop_ids(self) -> list[int]:
        """The tokens that end a reply: the end-of-turn tokens, then the tokenizer's eos."""
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return list(dict.fromkeys([*self.end_of_turn_ids, *eos]))
