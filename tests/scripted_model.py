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
        self.config = SimpleNamespace(max_position_embeddings=max_len, eos_token_id=None)
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0, **kwargs):
        time.sleep(self.step_delay)
        if (input_ids == self.FAIL_TOKEN).any():
            raise RuntimeError("scripted failure")
        if past_key_values is None:  # prefill: remember where the prompt ended
            past_key_values = {"prompt_len": input_ids.shape[1], "seen": input_ids.shape[1]}
        else:
            past_key_values["seen"] += input_ids.shape[1]
        position = min(past_key_values["seen"] - past_key_values["prompt_len"], len(self.script) - 1)
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -1e4)
        logits[:, :, self.script[position]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)
