"""The two input formats behind one interface, and which one a tokenizer's model reads.

A persona example becomes token ids in one of two ways: the reference's speaker tokens (`SpeakerTokens`: the rows of
`persona_inputs`, with token types) or a chat template (`persona_chat_template.ChatFormat`: the persona in the system
turn, no token types). Both answer the same questions, so no caller branches on the format:

- `kind`, `record` (what the tokenizer's config records), `columns` (the feature columns), `token_types`,
  `adds_tokens` (whether the format adds tokens to the vocabulary), `min_length`, `signature` (what keys the features'
  cache), `pad_id`, `bos_id`, `stop_ids` (the tokens that end a reply);
- `row_builder(batch, max_history, num_candidates)`: the rows of a batch of dialogs (`persona_data.build_features`);
- `generation_inputs(persona, history, max_length=..., reply_budget=...)`: the generation context, exactly the
  training input of the same turn without its reply;
- `prepare_model(model)`: what a model needs for the format (the persona tokens added, or the template's stop ids).

`input_format_of(tokenizer)` is the one answer to "which format": the recorded one (`load_model_and_tokenizer` and
`persona-train` record it in the tokenizer's config), else the tokenizer's default; `resolve_input_format` decides and
records it from the options a user gives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from itertools import chain
from typing import Any

from persona_chat_options import DEFAULT_SYSTEM_PROMPT, check_system_prompt
from persona_chat_template import ChatFormat
from persona_errors import UsageError
from persona_inputs import MIN_INPUT_LENGTH, build_inputs, fit_to_length, history_window
from persona_text import encode_texts
from persona_tokens import SpecialTokenIds, add_special_tokens

logger = logging.getLogger(__name__)


class SpeakerTokens:
    """The reference's input format: `<bos>` persona, the turns behind alternating `<speaker1>`/`<speaker2>` tokens,
    token types, the reply and `<eos>` (`persona_inputs.build_inputs`)."""

    kind = "speaker_tokens"
    columns = ("input_ids", "token_type_ids", "mc_token_ids", "labels", "mc_labels")
    token_types = True
    adds_tokens = True  # the five persona tokens: embeddings grow to the tokenizer
    min_length = MIN_INPUT_LENGTH
    record = {"input_format": "speaker_tokens"}

    signature = ()  # the tokenizer's own signature keys the features' cache

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @cached_property
    def ids(self) -> SpecialTokenIds:
        return SpecialTokenIds.from_tokenizer(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.ids.pad

    @property
    def bos_id(self) -> int:
        return self.ids.bos

    @property
    def stop_ids(self) -> list[int]:
        """Every special token ends a reply (the reference stopped at its five persona tokens)."""
        ids = self.ids
        return sorted({ids.bos, ids.eos, ids.speaker1, ids.speaker2, ids.pad} | set(self.tokenizer.all_special_ids))

    def row_builder(self, batch: dict[str, list], max_history: int, num_candidates: int | None):
        """Encode every text of the batch once; the persona converter and the row builder of speaker tokens."""
        texts = set(chain.from_iterable(batch["personality"]))
        for utterances in batch["utterances"]:
            for u in utterances:
                texts.update(history_window(u["history"], max_history))
                texts.update(u["candidates"] if num_candidates is None else u["candidates"][-num_candidates:])
        texts = sorted(texts)
        encoded = dict(zip(texts, encode_texts(self.tokenizer, texts)))  # "<speaker1>" typed in a turn stays text
        ids, columns = self.ids, self.columns[:-1]

        def build(persona, history, candidates, max_length):
            history = [encoded[h] for h in history]
            replies = [encoded[c] for c in candidates]
            p, h, budget, _ = fit_to_length(persona, history, max(map(len, replies)), max_length)
            last = len(replies) - 1
            rows = [build_inputs(p, h, r[:budget], ids, lm_labels=(i == last)) for i, r in enumerate(replies)]
            cuts = {
                "cut_context": len(p) != len(persona) or len(h) != len(history) or h[-1:] != history[-1:],
                "cut_gold": len(replies[-1]) > budget,
                "cut_distractor": any(len(r) > budget for r in replies[:-1]),
                "reply_budget": budget,
            }
            return {key: [row[key] for row in rows] for key in columns}, cuts

        return (lambda sentences: [encoded[s] for s in sentences]), build

    def generation_inputs(
        self, persona: Sequence[str], history: Sequence[str], *, max_length: int | None = None, reply_budget: int = 0
    ) -> dict[str, list[int]]:
        """The training builder's input with an empty reply and no eos: it ends with the `<speaker1>` reply prefix,
        so every generated token carries the bot's token type. Cut by the training rule for a reply of
        `reply_budget` tokens, its last one the eos slot (a UsageError when no context fits)."""
        persona_ids = encode_texts(self.tokenizer, persona)
        history_ids = encode_texts(self.tokenizer, history)
        reply = max(reply_budget - 1, 0)
        persona_ids, history_ids, budget, cut = fit_to_length(persona_ids, history_ids, reply, max_length)
        if budget < reply:
            raise UsageError(
                f"a reply of {reply_budget} new tokens leaves no room for the context in the model's {max_length} "
                "positions; lower --max_new_tokens."
            )
        if cut:
            logger.warning(
                "The context was shortened to fit %d positions with a %d-token reply.", max_length, reply_budget
            )
        row = build_inputs(persona_ids, history_ids, [], self.ids, with_eos=False)
        return {"input_ids": row["input_ids"], "token_type_ids": row["token_type_ids"]}

    def prepare_model(self, model) -> str:
        """Add the five persona tokens to the tokenizer and the model's embeddings (only what is missing)."""
        return f"{add_special_tokens(model, self.tokenizer)} persona special tokens added"


InputFormat = SpeakerTokens | ChatFormat


# The two ways persona examples become token ids; the chosen one is recorded in the tokenizer's config.
CHAT_TEMPLATE, SPEAKER_TOKENS = "chat_template", "speaker_tokens"
INPUT_FORMATS = (CHAT_TEMPLATE, SPEAKER_TOKENS)
# Key in tokenizer_config.json: the tokenizer (and its chat template) is saved with every checkpoint, full or LoRA.
FORMAT_KEY = "persona_input_format"
# Backbones whose checkpoints keep the reference's speaker-token layout unless told otherwise.
SPEAKER_TOKEN_MODEL_TYPES = ("gpt2", "openai-gpt")


def recorded_input_format(tokenizer) -> dict | None:
    """`{"input_format": ..., "system_prompt": ...}` recorded by `record_input_format` (saved with the tokenizer)."""
    record = getattr(tokenizer, "init_kwargs", {}).get(FORMAT_KEY)
    return dict(record) if isinstance(record, dict) else None


def record_input_format(tokenizer, input_format: str, system_prompt: str | None = None) -> None:
    """Record the input format (and the system prompt) so that `tokenizer.save_pretrained` writes it."""
    record = {"input_format": input_format}
    if input_format == CHAT_TEMPLATE:
        record["system_prompt"] = system_prompt or DEFAULT_SYSTEM_PROMPT
    tokenizer.init_kwargs[FORMAT_KEY] = record


def default_input_format(tokenizer, model_type: str | None) -> str:
    """`speaker_tokens` for GPT / GPT-2 / DialoGPT / openai-gpt, for a tokenizer that already has the persona tokens
    (a checkpoint trained with them) or one without a chat template; `chat_template` otherwise."""
    has_speaker_tokens = "<speaker1>" in tokenizer.get_vocab()
    if model_type in SPEAKER_TOKEN_MODEL_TYPES or has_speaker_tokens or not getattr(tokenizer, "chat_template", None):
        return SPEAKER_TOKENS
    return CHAT_TEMPLATE


def resolve_input_format(
    tokenizer,
    model_type: str | None = None,
    *,
    input_format: str | None = None,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    chat_template_name: str | None = None,
) -> InputFormat:
    """Decide and record how `tokenizer`'s model reads persona examples: `SpeakerTokens` or a `ChatFormat`.

    Explicit options win; then what the checkpoint recorded; then `default_input_format`. `chat_template`
    (template text, see `load_chat_template`; `chat_template_name` names it in errors) replaces the tokenizer's own
    and is stored in it, so it is saved with the model.
    """
    recorded = recorded_input_format(tokenizer) or {}
    if input_format is None and (system_prompt is not None or chat_template is not None):
        input_format = CHAT_TEMPLATE
    input_format = input_format or recorded.get("input_format") or default_input_format(tokenizer, model_type)
    if input_format not in INPUT_FORMATS:
        raise UsageError(f"--input_format must be one of {list(INPUT_FORMATS)}, got {input_format!r}.")
    if input_format == SPEAKER_TOKENS:
        if system_prompt is not None or chat_template is not None:
            raise UsageError("--system_prompt and --chat_template apply to --input_format chat_template only.")
        record_input_format(tokenizer, SPEAKER_TOKENS)
        return SpeakerTokens(tokenizer)
    check_system_prompt(system_prompt)  # the user's (None: the recorded one, which the model was trained with)
    system_prompt = system_prompt or recorded.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
    fmt = ChatFormat.from_tokenizer(
        tokenizer, chat_template=chat_template, template_name=chat_template_name, system_prompt=system_prompt
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    record_input_format(tokenizer, CHAT_TEMPLATE, system_prompt)
    return fmt


def input_format_of(tokenizer) -> InputFormat:
    """The input format of `tokenizer`'s model, one answer for every caller: the recorded one (`resolve_input_format`
    records it, and the saved tokenizer config keeps it), else `default_input_format`. A chat format is built once
    per template and system prompt and kept on the tokenizer."""
    record = recorded_input_format(tokenizer) or {"input_format": default_input_format(tokenizer, None)}
    if record.get("input_format") != CHAT_TEMPLATE:
        return SpeakerTokens(tokenizer)
    key = (tokenizer.chat_template, record.get("system_prompt"))
    cached = getattr(tokenizer, "_persona_chat_format", None)
    if cached is None or cached[0] != key:
        fmt = ChatFormat.from_tokenizer(tokenizer, system_prompt=record.get("system_prompt") or DEFAULT_SYSTEM_PROMPT)
        cached = (key, fmt)
        tokenizer._persona_chat_format = cached
    return cached[1]
