"""Decoding options: the reference's flags (`GenerationArguments`) plus ranking and repetition control, their checks,
the `GenerationConfig` they map to and the tokens that end a reply.

The reference's options (interact.py) keep their defaults, except that the reply budget is called `max_new_tokens`
(the input budget is `max_length` in training and evaluation). `num_ranked`, `no_repeat_ngram_size` and
`repetition_penalty` act around `generate` (`persona_generation`, `persona_repetition`), not through its config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from transformers import GenerationConfig, PreTrainedTokenizerBase

from persona_errors import UsageError
from persona_formats import input_format_of
from persona_process import say

# The most replies `num_ranked` samples for one context.
MAX_RANKED = 64
# The widest beam: each beam is a sequence decoded per context (memory and time grow with it), and widths past a few
# dozen bring nothing to a short reply; 100000 would run for minutes before failing.
MAX_BEAMS = 32
# Options only sampling reads: under `no_sample` they are checked all the same, and a value set is said to be ignored.
SAMPLING_ONLY = ("temperature", "top_k", "top_p")


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
    num_ranked: int = field(
        default=1,
        metadata={
            "help": f"Sample N replies and answer with the one the multiple-choice head scores best (1..{MAX_RANKED})."
        },
    )
    no_repeat_ngram_size: int = field(
        default=0,
        metadata={
            "help": "Never repeat an n-gram of the reply or of the bot's earlier turns (persona exempt; 0: off)."
        },
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalise tokens of the reply and of the bot's earlier turns (persona exempt; 1.0: off)."},
    )
    seed: int | None = field(default=None, metadata={"help": "Random seed for sampling (and a random persona)."})

    def __post_init__(self):
        check_generation_options(**{name: getattr(self, name) for name in GENERATION_FIELDS}, flags=True)
        defaults = {f.name: f.default for f in fields(self)}
        ignored = [f"--{n}" for n in SAMPLING_ONLY if self.no_sample and getattr(self, n) != defaults[n]]
        if ignored:
            one = len(ignored) == 1
            say(
                f"warning: {', '.join(ignored)} only shape{'s' if one else ''} sampling; --no_sample decodes greedily "
                f"and ignores {'it' if one else 'them'}."
            )
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}.")

    def generation_options(self) -> dict:
        """The options as keyword arguments of `generate_replies` / `PersonaBot`."""
        return {name: getattr(self, name) for name in GENERATION_DEFAULTS}


GENERATION_FIELDS = (
    "max_new_tokens",
    "min_length",
    "temperature",
    "top_k",
    "top_p",
    "no_sample",
    "num_beams",
    "num_ranked",
    "no_repeat_ngram_size",
    "repetition_penalty",
)


def check_generation_options(
    *,
    max_new_tokens,
    min_length,
    temperature,
    top_k,
    top_p,
    no_sample,
    num_beams,
    num_ranked=1,
    no_repeat_ngram_size=0,
    repetition_penalty=1.0,
    flags: bool = False,
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
    if not 1 <= num_beams <= MAX_BEAMS:
        raise UsageError(f"{name('num_beams')} must be between 1 and {MAX_BEAMS}, got {num_beams}.")
    if not 1 <= num_ranked <= MAX_RANKED:
        raise UsageError(f"{name('num_ranked')} must be between 1 and {MAX_RANKED}, got {num_ranked}.")
    if num_ranked > 1 and (no_sample or num_beams > 1):
        raise UsageError(
            f"{name('num_ranked')} {num_ranked} ranks sampled replies; greedy decoding and beam search give one, so "
            f"sample ({name('no_sample')} false, {name('num_beams')} 1) or use {name('num_ranked')} 1."
        )
    if no_repeat_ngram_size < 0:
        raise UsageError(f"{name('no_repeat_ngram_size')} must be >= 0 (0 turns it off), got {no_repeat_ngram_size}.")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise UsageError(
            f"{name('repetition_penalty')} must be a number > 0 (1.0 turns it off), got {repetition_penalty}."
        )
    # Checked whatever the mode: a value that is wrong under --no_sample is wrong the day sampling is turned on.
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(
            f"{name('temperature')} must be a number > 0, got {temperature}; {name('no_sample')} decodes greedily."
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
    return input_format_of(tokenizer).stop_ids


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
    input_format = input_format_of(tokenizer)
    pad, bos = input_format.pad_id, input_format.bos_id
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


def split_options(options: dict) -> tuple[dict, int | None]:
    """Every decoding option (the defaults filled in) and the seed, apart; a `TypeError` for an unknown name."""
    unknown = set(options) - set(GENERATION_DEFAULTS)
    if unknown:
        raise TypeError(f"Unknown generation options {sorted(unknown)}; known: {sorted(GENERATION_DEFAULTS)}.")
    merged = {**GENERATION_DEFAULTS, **options}
    seed = merged.pop("seed")
    return merged, seed


# Options applied around `generate` (sampling several replies, the repetition processors), not by its config.
AROUND_GENERATE = ("num_ranked", "no_repeat_ngram_size", "repetition_penalty")


@dataclass
class NLIRankingArguments:
    """The NLI contradiction penalty on ranked replies (Welleck et al., 2019): `--nli_model`, `--nli_penalty`."""

    nli_model: str | None = field(
        default=None,
        metadata={"help": "NLI sequence classifier (folder or Hub id) whose contradictions lower a candidate's score."},
    )
    nli_penalty: float = field(
        default=0.0,
        metadata={
            "help": "lambda of s_i - lambda * (s_1 - s_N) * c_i, c_i the top contradiction probability (0: off)."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.nli_penalty) and self.nli_penalty >= 0):
            raise UsageError(f"--nli_penalty must be a finite number >= 0, got {self.nli_penalty}.")
        if (self.nli_model is None) != (self.nli_penalty == 0):
            given, missing = (
                ("--nli_model", "--nli_penalty > 0") if self.nli_model else ("--nli_penalty", "--nli_model")
            )
            raise UsageError(f"{given} needs {missing}: the penalty is lambda times an NLI model's contradictions.")

    def check_with(self, num_ranked: int) -> None:
        """A `UsageError` when the penalty has nothing to re-rank."""
        if self.nli_model is not None and num_ranked < 2:
            raise UsageError(f"--nli_model re-ranks sampled replies; set --num_ranked > 1 (got {num_ranked}).")

    def load_scorer(self, device: str | None = None):
        """The NLI scorer (`persona_nli.NLIScorer`), or None without `--nli_model`."""
        if self.nli_model is None:
            return None
        from persona_nli import NLIScorer  # only where a penalty asks for an NLI model

        return NLIScorer.from_pretrained(self.nli_model, device=device)


@dataclass
class EvalGenerationArguments(GenerationArguments):
    """persona-eval's decoding options: persona-chat's, greedy and seeded by default for a reproducible F1."""

    no_sample: bool = field(default=True, metadata={"help": "Greedy decoding; `--no_sample false` samples."})
    seed: int | None = field(default=0, metadata={"help": "Random seed for sampling (each process adds its rank)."})
