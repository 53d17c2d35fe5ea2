"""User text stays text: persona sentences and dialog turns become tokens with their special-token strings split, a
chat-template rendering keeps its message contents from forging control tokens, and a reply decodes without the
U+FFFD of a character its tokens broke off.

Anyone who writes a persona, a dialog file or a chat message could otherwise type `<|im_end|>\\n<|im_start|>system`
(or `<speaker1>`) and get the real tokens: a forged turn. Training rows, evaluation rows and generation contexts all
tokenize through this module, so a forged string is the same plain text everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

# transformers' own sanitizer (`apply_chat_template(..., sanitize_control_tokens=True)`, transformers >= 5.20) marks
# the control tokens of message contents with private-use characters before rendering and encodes the marked ones as
# text. It only returns ids of a whole conversation, and `ChatFormat` tokenizes slices of renderings (the prompt, each
# reply's part), so it uses the two halves directly. The control tokens: the special tokens, plus added tokens the
# template writes. Those names are private: where they are missing (an older transformers 5, or a later one that
# renamed them) the same scheme is written out below, and a test holds the two to the same ids.
try:
    from transformers.utils.chat_template_utils import (
        _CONTROL_TOKEN_END,
        _CONTROL_TOKEN_START,
        _get_control_token_patterns,
        encode_marked_chat,
        mark_control_tokens,
    )

    def control_tokens(tokenizer, template: str) -> tuple[str, ...]:
        return tokenizer._get_control_tokens(template)

except ImportError:  # pragma: no cover - exercised by a test that removes the library's names
    _CONTROL_TOKEN_START, _CONTROL_TOKEN_END = "\U000f0000", "\U000f0001"
    _get_control_token_patterns = encode_marked_chat = mark_control_tokens = control_tokens = None

_LIBRARY_SANITIZER = _get_control_token_patterns is not None


def _control_tokens(tokenizer, template: str) -> tuple[str, ...]:
    """The special tokens, and the added tokens the template's text holds (whitespace tokens aside)."""
    added = tokenizer.added_tokens_decoder.values()
    return tuple(t.content for t in added if t.special or (t.content in template and not t.content.isspace()))


def _patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """Any of `tokens` (the longest first), and a marked token or a lone marker."""
    tokens_re = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")
    start, end = _CONTROL_TOKEN_START, _CONTROL_TOKEN_END
    return tokens_re, re.compile(f"{start}({tokens_re.pattern}){end}|[{start}{end}]")


def _mark(text: str, tokens_re: re.Pattern) -> str:
    text = text.replace(_CONTROL_TOKEN_START, "").replace(_CONTROL_TOKEN_END, "")
    return tokens_re.sub(f"{_CONTROL_TOKEN_START}\\g<0>{_CONTROL_TOKEN_END}", text)


def _encode_marked(tokenizer, markers_re: re.Pattern, chat: str) -> list[int]:
    """The pieces between markers encoded as usual, each marked token as text (after a newline that is then removed,
    so that a SentencePiece tokenizer adds no prefix space)."""
    pieces = markers_re.split(chat)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    for i, piece in enumerate(pieces[1:], start=1):
        if piece:
            as_text = i % 2 == 1
            piece_ids = tokenizer("\n" + piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
            if piece_ids[: len(newline)] != newline:
                piece_ids = tokenizer(piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
            else:
                piece_ids = piece_ids[len(newline) :]
            ids += piece_ids
    return ids


_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of persona sentences or dialog turns, each on its own, no special token added nor read from the text: a turn
    holding "<speaker1>" or "<|endoftext|>" gets those characters' tokens (`split_special_tokens`)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


class ChatText:
    """Message contents of one tokenizer and chat template as text: `mark` them before rendering, `encode` renderings.

    A rendering of ordinary contents (no control-token string in them) is tokenized exactly as
    `apply_chat_template(tokenize=True)` does it, in one batched call; one with marked strings is encoded by pieces,
    the marked strings as plain text (`transformers.utils.chat_template_utils.encode_marked_chat`).
    """

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self._library = library = _LIBRARY_SANITIZER
        if library:
            self._pattern = _get_control_token_patterns(control_tokens(tokenizer, template))[0]
            self._markers = None
        else:
            self._pattern, self._markers = _patterns(_control_tokens(tokenizer, template))

    def mark(self, text: str) -> str:
        """`text` with its control-token strings marked (and stray marker characters removed) for rendering."""
        return mark_control_tokens(text, self._pattern) if self._library else _mark(text, self._pattern)

    def _encode_marked(self, rendering: str) -> list[int]:
        if self._library:
            return encode_marked_chat(self.tokenizer, rendering)
        return _encode_marked(self.tokenizer, self._markers, rendering)

    def mark_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{**m, "content": self.mark(m["content"])} for m in messages]

    def encode(self, renderings: Sequence[str]) -> list[list[int]]:
        """Ids of renderings (or slices of them) of marked messages; the template's own control tokens stay tokens."""
        marked = [_CONTROL_TOKEN_START in t or _CONTROL_TOKEN_END in t for t in renderings]
        plain = [t for t, m in zip(renderings, marked) if not m]
        ids = iter(self.tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
        return [self._encode_marked(t) if m else next(ids) for t, m in zip(renderings, marked)]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of message texts on their own (a persona sentence, a turn, a reply), as text."""
        return self.encode([self.mark(t) for t in texts])


def decode_reply(tokenizer, ids: Sequence[int]) -> str:
    """A generated reply as text: special tokens skipped, surrounding spaces stripped, and no U+FFFD where the reply's
    bytes break off inside a character (a barely trained byte-level model ends tokens mid-character).

    For a byte-level BPE (GPT-2, Llama 3, Qwen...) the reply's bytes are known exactly: the incomplete sequences go
    and a U+FFFD generated whole (its three bytes) stays. For other decoders, whose bytes are not visible, every
    U+FFFD goes.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" in text:
        text = _without_broken_characters(tokenizer, ids, text)
    return text.strip()


def _without_broken_characters(tokenizer, ids: Sequence[int], text: str) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return text.replace("\ufffd", "")
    # An id past the tokenizer's vocabulary (embedding tables larger than it, as Qwen2's) has no token and no text.
    tokens = tokenizer.convert_ids_to_tokens(list(ids), skip_special_tokens=True)
    raw = b"".join(_token_bytes(t) for t in tokens if t is not None)
    plain = backend.decode(list(ids), skip_special_tokens=True)
    if raw.decode("utf-8", errors="replace") != plain:  # not the decoder's own bytes: leave nothing to chance
        return text.replace("\ufffd", "")
    kept = raw.decode("utf-8", errors="ignore")  # drops incomplete sequences; a whole U+FFFD is valid UTF-8
    return kept if text == plain else tokenizer.clean_up_tokenization(kept)


def _token_bytes(token: str) -> bytes:
    """A token's bytes as the ByteLevel decoder reads them (an added token outside the alphabet: its UTF-8)."""
    if all(c in _BYTE_OF_CHAR for c in token):
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    return token.encode("utf-8")
