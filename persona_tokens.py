"""The five persona special tokens: their names, their ids in a tokenizer, and adding them to a tokenizer and model.

This module sits below both the data and the model code (it imports neither), so the input builder and the
double-heads model read the same ids from one class.
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_errors import UsageError

# The reference's five tokens, in its order: checkpoints stay interchangeable with transfer-learning-conv-ai.
SPECIAL_TOKENS = ["<bos>", "<eos>", "<speaker1>", "<speaker2>", "<pad>"]
ATTR_TO_SPECIAL_TOKEN = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "additional_special_tokens": ["<speaker1>", "<speaker2>"],
}


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the persona special tokens in one tokenizer (`pad` is not needed to build inputs)."""

    bos: int
    eos: int
    speaker1: int
    speaker2: int
    pad: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokenIds:
        """The ids in `tokenizer`; a clear error when the persona tokens were never added."""
        ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        unknown = [tok for tok, i in zip(SPECIAL_TOKENS, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise UsageError(
                f"The tokenizer lacks the persona special tokens {unknown}: call "
                "persona_model.add_special_tokens(model, tokenizer) first."
            )
        return cls(*ids)


def add_special_tokens(model, tokenizer) -> int:
    """Add the persona special tokens to `tokenizer` (once) and resize `model`'s embeddings only if any was added.

    Returns the number of tokens added (0 for a checkpoint trained by this project). `model` may be None.
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    num_added = tokenizer.add_special_tokens(ATTR_TO_SPECIAL_TOKEN) if missing else 0
    if num_added > 0 and model is not None:
        model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        # generate() reads these; the persona tokens replace GPT-2's shared <|endoftext|>.
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, attr)
            setattr(model.config, attr, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, attr, value)
    return num_added
