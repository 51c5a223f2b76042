"""The model runner: turns scheduled sequences into one forward pass and hands back next-token logits.

Each row is one sequence: a decode row feeds one token, a prefill row a chunk of its prompt; rows of different
lengths are right-padded. Every row carries its own positions and a mask that lets each new token see its own
sequence's context only. ``ModelRunner.forward`` is the only place the model is called.
"""

from __future__ import annotations

import torch

from minimind_course.engine.kv_cache import KVCache
from minimind_course.engine.sequence import Sequence


class ModelRunner:
    """A model and its paged KV cache."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], query_lens: list[int]) -> torch.Tensor:
        """Feed ``query_lens[i]`` uncomputed tokens of row i; return the logits after each row's last real token
        [rows, vocab]. The caller advances ``num_computed`` once the pass succeeded."""
        width = max(query_lens)
        starts = [seq.num_computed for seq in seqs]
        input_ids = torch.tensor([seq.token_ids[s : s + n] + [0] * (width - n)
                                  for seq, s, n in zip(seqs, starts, query_lens)], device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(width, device=self.device)
        kv = self.kv_cache.batch_view([seq.block_table for seq in seqs], starts, query_lens)
        mask = None
        if width > 1 or len(set(starts)) > 1:  # a token sees keys up to its own position, in its own row
            mask = (torch.arange(kv.kv_len, device=self.device) <= positions[:, :, None])[:, None]
        ragged = len(set(query_lens)) > 1
        lora_ids = [seq.request.lora_id for seq in seqs]  # each row's LoRA adapter, -1 = the base model
        adapters = {"lora_ids": torch.tensor(lora_ids, device=self.device)} if max(lora_ids) >= 0 else {}
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=kv,
                         use_cache=True, logits_to_keep=0 if ragged else 1, **adapters)
        if not ragged:
            return out.logits[:, -1, :]
        last = torch.tensor(query_lens, device=self.device) - 1
        return out.logits[torch.arange(len(seqs), device=self.device), last]
