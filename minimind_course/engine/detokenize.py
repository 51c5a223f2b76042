"""Turn generated token ids into text one token at a time, never emitting half a character.

A byte-level BPE token can hold part of a UTF-8 character (a Chinese character is 3 bytes, an emoji 4):
decoding such a token alone gives U+FFFD. We hold those tokens back until the character is complete.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids with ``push``; get back only text that is complete; ``flush`` at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is still incomplete)."""
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        """Return whatever is still held back (a truly broken byte sequence comes out as U+FFFD)."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        self.pending.clear()
        return text
