"""The model runner: turns scheduled sequences into one forward pass and hands back next-token logits.

Rows of one pass all feed the same number of tokens (``query_len``): a decode batch feeds one token per
sequence, a prefill chunk feeds a slice of the prompt. Each row carries its own positions and a mask that lets
every new token see its own sequence's context only (rows have different lengths; padding is masked out).
``ModelRunner.forward`` is the only place the model is called.
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
    def forward(self, seqs: list[Sequence], query_len: int) -> torch.Tensor:
        """Feed ``query_len`` uncomputed tokens of every row; return the logits after each row's last one
        [rows, vocab]. The caller advances ``num_computed`` once the pass succeeded."""
        starts = [seq.num_computed for seq in seqs]
        input_ids = torch.tensor([seq.token_ids[s : s + query_len] for seq, s in zip(seqs, starts)],
                                 device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(query_len, device=self.device)
        kv = self.kv_cache.batch_view([seq.block_table for seq in seqs], starts, query_len)
        mask = None
        if query_len > 1 or len(set(starts)) > 1:  # a token sees keys up to its own position, in its own row
            mask = (torch.arange(kv.kv_len, device=self.device) <= positions[:, :, None])[:, None]
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=kv,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]
