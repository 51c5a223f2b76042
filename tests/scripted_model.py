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
        self.slot_tokens: dict[int, int] = {}  # cache slot -> token written there (a shared block: equal tokens)
        self.generated: dict[int, int] = {}  # hash of a context it answered, answer included -> tokens generated
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
        slots, ids = past_key_values.slot_mapping.view(rows, width).tolist(), input_ids.tolist()
        for row, n in enumerate(real):
            self.slot_tokens.update(zip(slots[row][:n], ids[row][:n]))
        block_size = past_key_values.cache.block_size
        for row, (positions, table, n) in enumerate(zip(position_ids.tolist(), past_key_values.block_tables.tolist(),
                                                        real)):
            # the row's whole context, read back from the cache: its prompt is whatever this model did not write,
            # whether the engine computed it, found it in the prefix cache or recomputes it after a preemption
            context = tuple(self.slot_tokens[table[t // block_size] * block_size + t % block_size]
                            for t in range(positions[n - 1] + 1))
            generated = self.generated.get(hash(context), 0)
            token = self.script[min(generated, len(self.script) - 1)]
            self.generated[hash((*context, token))] = generated + 1
            logits[row, :, token] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)
