"""A stand-in causal LM that emits a fixed token script: lets engine/server tests force exact outputs
(split UTF-8 bytes, think tags, endless text) whatever the bundled model has learned."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from torch import nn
from transformers.convert_slow_tokenizer import bytes_to_unicode


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (byte-level BPE's base vocabulary): every multi-byte character is split."""
    to_unicode = bytes_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([to_unicode[b] for b in text.encode("utf-8")])
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None
    return ids


class ScriptedLM(nn.Module):
    """Always puts all probability on the next token of ``script``; repeats its last token after the end.

    A prompt containing ``FAIL_TOKEN`` makes the forward pass raise, like a real fault (out of memory)."""

    FAIL_TOKEN = 3

    def __init__(self, script: list[int], vocab_size: int, max_len: int = 4096, step_delay: float = 0.0):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.step_delay = step_delay
        self.config = SimpleNamespace(max_position_embeddings=max_len, eos_token_id=None, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=64)
        self.prompt_lens: dict[int, int] = {}  # first cache slot of a sequence -> its prompt length
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, position_ids, past_key_values, logits_to_keep=0, **kwargs):
        """Rows are sequences of the engine's batch; a row's next token is script[tokens generated so far].
        Rows may be right-padded: padding tokens write to the cache's scratch slot."""
        time.sleep(self.step_delay)
        rows, width = input_ids.shape
        real = (past_key_values.slot_mapping.view(rows, width) != past_key_values.cache.scratch_slot).sum(1).tolist()
        if any((input_ids[row, :n] == self.FAIL_TOKEN).any() for row, n in enumerate(real)):
            raise RuntimeError("scripted failure")
        logits = torch.full((rows, 1 if logits_to_keep == 1 else width, self.vocab_size), -1e4)
        for row, (positions, table, n) in enumerate(zip(position_ids.tolist(), past_key_values.block_tables.tolist(),
                                                        real)):
            last = positions[n - 1]
            if positions[0] == 0 or n > 1:  # a prompt chunk (decode rows feed one token): the prompt reaches here
                self.prompt_lens[table[0]] = last + 1  # (a last chunk of exactly one token would look like decode)
            generated = last + 1 - self.prompt_lens[table[0]]
            logits[row, :, self.script[min(generated, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)
