"""Persona-conditioned generation: decoding options, the generation context, batched replies and `PersonaBot`.

The context is the training input builder's (`persona_inputs.build_inputs`) with an empty reply, so it ends with the
bot's `<speaker1>` reply prefix; `model.generate` then extends it token by token with the library's cache and logits
processors. Every generated token carries the reply segment's token type because `generate()` repeats the last
`token_type_ids` value, and the last context token is the reply prefix itself. A chat-template checkpoint's context is
its template's rendering of the system message and the history with the assistant header.

Decoding options are the reference's (interact.py) with their defaults, except that the reply budget is called
`max_new_tokens` (the input budget is `max_length` in training and evaluation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from persona_chat_template import chat_format_of
from persona_cli import UsageError, max_positions
from persona_inputs import build_inputs, fit_to_length
from persona_model import load_model_and_tokenizer
from persona_tokens import SpecialTokenIds

logger = logging.getLogger(__name__)


@dataclass
class GenerationArguments:
    """Decoding options: the reference's (interact.py) names and defaults, the reply budget named `max_new_tokens`."""

    max_new_tokens: int = field(default=20, metadata={"help": "Most reply tokens."})
    min_length: int = field(default=1, metadata={"help": "Fewest reply tokens (no special token before them)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens (0: no limit)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    no_sample: bool = field(default=False, metadata={"help": "Greedy decoding (beam search with --num_beams)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: none)."})
    seed: int | None = field(default=None, metadata={"help": "Random seed for sampling (and a random persona)."})

    def __post_init__(self):
        check_generation_options(**{name: getattr(self, name) for name in GENERATION_FIELDS}, flags=True)
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}.")

    def generation_options(self) -> dict:
        """The options as keyword arguments of `generate_replies` / `PersonaBot`."""
        return {name: getattr(self, name) for name in GENERATION_DEFAULTS}


GENERATION_FIELDS = ("max_new_tokens", "min_length", "temperature", "top_k", "top_p", "no_sample", "num_beams")


def check_generation_options(
    *, max_new_tokens, min_length, temperature, top_k, top_p, no_sample, num_beams, flags: bool = False
) -> None:
    """A `UsageError` (a ValueError) for decoding options `generate` would reject or silently misuse; `flags` names
    them as command-line flags."""
    name = (lambda n: f"--{n}") if flags else (lambda n: n)  # noqa: E731
    if max_new_tokens < 1:
        raise UsageError(f"{name('max_new_tokens')} must be >= 1, got {max_new_tokens}.")
    if not 0 <= min_length <= max_new_tokens:
        raise UsageError(
            f"{name('min_length')} must be between 0 and {name('max_new_tokens')} ({max_new_tokens}), got {min_length}."
        )
    if num_beams < 1:
        raise UsageError(f"{name('num_beams')} must be >= 1, got {num_beams}.")
    if not no_sample:
        if not (math.isfinite(temperature) and temperature > 0):
            raise UsageError(
                f"{name('temperature')} must be a number > 0 when sampling, got {temperature}; "
                f"{name('no_sample')} decodes greedily."
            )
        if not 0 < top_p <= 1:
            raise UsageError(f"{name('top_p')} must be in (0, 1] (1 turns it off), got {top_p}.")
        if top_k < 0:
            raise UsageError(f"{name('top_k')} must be >= 0 (0 turns it off), got {top_k}.")


# The one table of decoding defaults: every caller (chat, evaluation, demo, the library) reads it.
GENERATION_DEFAULTS = asdict(GenerationArguments())


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a reply. Speaker tokens: every special token (the reference stopped at its five persona
    tokens). Chat template: the template's end-of-turn tokens and the eos, as the saved generation config says."""
    chat_format = chat_format_of(tokenizer)
    if chat_format is not None:
        return chat_format.stop_ids
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    persona_ids = [ids.bos, ids.eos, ids.speaker1, ids.speaker2, ids.pad]
    return sorted(set(persona_ids) | set(tokenizer.all_special_ids))


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


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
    history = history[-(2 * max_history + 1) :] if history else []
    chat_format = chat_format_of(tokenizer)
    if chat_format is not None:
        ids = chat_format.context_ids(persona, history, max_length=max_length, reply_budget=reply_budget)
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    persona_ids = _encode(tokenizer, persona)
    history_ids = _encode(tokenizer, history)
    # The training rule (`persona_inputs.fit_to_length`) for a reply of `reply_budget` tokens, its last one the eos
    # slot: the context equals the training input of the same turn without its reply.
    reply = max(reply_budget - 1, 0)
    persona_ids, history_ids, budget, cut = fit_to_length(persona_ids, history_ids, reply, max_length)
    if budget < reply:
        raise UsageError(
            f"a reply of {reply_budget} new tokens leaves no room for the context in the model's {max_length} "
            "positions; lower --max_new_tokens."
        )
    if cut:
        logger.warning("The context was shortened to fit %d positions with a %d-token reply.", max_length, reply_budget)
    row = build_inputs(persona_ids, history_ids, [], SpecialTokenIds.from_tokenizer(tokenizer), with_eos=False)
    input_ids = torch.tensor([row["input_ids"]])
    return {
        "input_ids": input_ids,
        "token_type_ids": torch.tensor([row["token_type_ids"]]),
        "attention_mask": torch.ones_like(input_ids),
    }


def generation_config_from_options(
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int = GENERATION_DEFAULTS["max_new_tokens"],
    min_length: int = GENERATION_DEFAULTS["min_length"],
    temperature: float = GENERATION_DEFAULTS["temperature"],
    top_k: int = GENERATION_DEFAULTS["top_k"],
    top_p: float = GENERATION_DEFAULTS["top_p"],
    no_sample: bool = GENERATION_DEFAULTS["no_sample"],
    num_beams: int = GENERATION_DEFAULTS["num_beams"],
) -> GenerationConfig:
    """Map the reference's decoding options to a `GenerationConfig`.

    `max_new_tokens`/`min_length` count reply tokens. Every special token is an eos, so any of them ends the
    reply, and `min_new_tokens` makes the library's `MinNewTokensLengthLogitsProcessor` forbid all of them before
    `min_length`: the reference resampled until it drew a non-special token, which never ends when a special token
    has probability 1.
    """
    check_generation_options(
        max_new_tokens=max_new_tokens,
        min_length=min_length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        no_sample=no_sample,
        num_beams=num_beams,
    )
    do_sample = not no_sample
    if chat_format_of(tokenizer) is not None:
        pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    else:
        ids = SpecialTokenIds.from_tokenizer(tokenizer)
        pad, bos = ids.pad, ids.bos
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_length,
        do_sample=do_sample,
        num_beams=num_beams,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=pad,
        bos_token_id=bos,
        use_cache=True,
        **sampling,
    )


def _split_options(options: dict) -> tuple[dict, int | None]:
    unknown = set(options) - set(GENERATION_DEFAULTS)
    if unknown:
        raise TypeError(f"Unknown generation options {sorted(unknown)}; known: {sorted(GENERATION_DEFAULTS)}.")
    merged = {**GENERATION_DEFAULTS, **options}
    seed = merged.pop("seed")
    return merged, seed


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


@torch.inference_mode()
def generate_reply_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    max_history: int = 2,
    batch_size: int = 8,
    **generation_options,
) -> list[list[int]]:
    """Reply token ids (without the stop token) for `(persona, history)` pairs; see `generate_replies`."""
    options, seed = _split_options(generation_options)
    if seed is not None:
        set_seed(seed)
    config = generation_config_from_options(tokenizer, **options)
    stops = set(config.eos_token_id)
    window = max_positions(model)
    replies = []
    for start in range(0, len(contexts), batch_size):
        rows = [
            build_context(tokenizer, p, h, max_history, max_length=window, reply_budget=config.max_new_tokens)
            for p, h in contexts[start : start + batch_size]
        ]
        batch = {k: v.to(model.device) for k, v in _left_pad(rows, config.pad_token_id).items()}
        output = model.generate(**batch, generation_config=config)  # [B, T + new]
        for new_tokens in output[:, batch["input_ids"].size(1) :].tolist():
            # Cut at the first stop token: finished rows are padded with <pad> while the others go on.
            end = next((i for i, t in enumerate(new_tokens) if t in stops), len(new_tokens))
            replies.append(new_tokens[:end])
    return replies


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
    max_new_tokens, min_length, temperature, top_k, top_p, no_sample, num_beams, seed (`GENERATION_DEFAULTS`; see
    `generation_config_from_options`). Greedy results do not depend on `batch_size`.
    """
    ids = generate_reply_ids(
        model, tokenizer, contexts, max_history=max_history, batch_size=batch_size, **generation_options
    )
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]


class PersonaBot:
    """A conversation with one persona: `bot.reply("hi!")` answers and remembers both turns.

    `generation_options` are those of `generate_replies` (max_new_tokens, min_length, temperature, top_k, top_p,
    no_sample, num_beams, seed) plus `max_history`. Setting `persona` starts a new conversation.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, persona: Sequence[str] = (), **opts):
        self.model = model
        self.tokenizer = tokenizer
        self.max_history = opts.pop("max_history", 2)
        seed = opts.pop("seed", None)
        if seed is not None:
            set_seed(seed)  # once per conversation: a seed per reply would repeat the same random draws
        _split_options(opts)  # fail early on a misspelt option
        self.generation_options = opts
        self._persona = [s for s in persona]
        self.history: list[str] = []

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

    def reply(self, text: str) -> str:
        """Answer `text` in character and add both turns to the history."""
        self.history.append(text)
        (answer,) = generate_replies(
            self.model,
            self.tokenizer,
            [(self._persona, self.history)],
            max_history=self.max_history,
            **self.generation_options,
        )
        self.history.append(answer)
        # The context only ever uses the last 2*max_history+1 turns (the reference trimmed likewise).
        self.history = self.history[-(2 * self.max_history + 1) :]
        return answer


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


RUNNABLE_DEVICES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | None, flag: str = "--device") -> None:
    """A `UsageError` for a device string torch does not know or an accelerator this machine does not have."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type not in RUNNABLE_DEVICES:
        raise UsageError(f"{flag} {device}: not a device to run a model on here; use cpu, cuda, cuda:1, mps or xpu.")
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise UsageError(f"{flag} {device}: this machine has {found}; use --device cpu (or leave --device out).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} mps: MPS is not available here; use --device cpu.")
    if parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"{flag} {device}: this machine has no XPU; use --device cpu (or leave --device out).")


def check_reply_budget(model: PreTrainedModel, max_new_tokens: int) -> None:
    """A `UsageError` when `--max_new_tokens` leaves no room for a context in the model's window."""
    window = max_positions(model)
    if window is not None and max_new_tokens > window - 3:
        raise UsageError(
            f"--max_new_tokens {max_new_tokens} does not fit the model's {window} positions with any context; "
            f"use at most {window - 3}."
        )
