"""The paged KV cache's storage: per layer, keys and values in fixed-size blocks of token slots.

vLLM's PagedAttention idea in plain PyTorch. Per layer, keys and values live in one tensor of
``num_blocks * block_size`` token slots. A sequence holds a list of blocks (its block table, handed out by
``block_manager.BlockManager``); token ``t`` of that sequence sits in slot
``block_table[t // block_size] * block_size + t % block_size``. Memory is allocated once, bounded by a byte
budget, and a sequence takes blocks as it grows, so short answers do not reserve room for the longest possible
one. Attention reads a row's context by gathering its blocks into one tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minimind_course.engine.config import EngineConfig


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers: 2 x layers x kv_heads x head_dim x dtype size."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


class KVCache:
    """Keys and values of every running sequence, in blocks (which block is whose: ``BlockManager``)."""

    def __init__(self, config, memory_bytes: int, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                 block_size: int = EngineConfig.block_size):
        self.block_size = block_size
        self.bytes_per_block = kv_bytes_per_token(config, dtype) * block_size
        self.num_blocks = memory_bytes // self.bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"a KV cache of {memory_bytes} bytes holds no block of {self.bytes_per_block} bytes")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # one block more than the budget pays for: the scratch block, where padding tokens write their keys/values
        # and which pads the block tables of shorter rows
        self.scratch_block = self.num_blocks
        self.scratch_slot = self.num_blocks * block_size
        shape = ((self.num_blocks + 1) * block_size, config.num_key_value_heads, head_dim)
        # empty: memory is only touched once blocks are used; a block is zeroed when it is handed out, because a
        # masked slot still enters the attention product (0 x NaN would be NaN)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.zero([self.scratch_block])

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def zero(self, blocks: list[int]) -> None:
        """Fill blocks with zeros before their first use (the block manager calls it when it hands them out)."""
        index = torch.tensor(blocks, device=self.keys[0].device)
        for store in (*self.keys, *self.values):
            store.view(-1, self.block_size, *store.shape[1:]).index_fill_(0, index, 0)

    def batch_view(self, block_tables: list[list[int]], starts: list[int], query_lens: list[int]) -> BatchKV:
        """The cache as one forward pass sees it: row i feeds ``query_lens[i]`` new tokens from ``starts[i]``,
        right-padded to the longest row (padding writes to the scratch slot)."""
        bs, width_q = self.block_size, max(query_lens)
        slots = [table[t // bs] * bs + t % bs if t < start + n else self.scratch_slot
                 for table, start, n in zip(block_tables, starts, query_lens) for t in range(start, start + width_q)]
        kv_len = max(start + n for start, n in zip(starts, query_lens))
        width = self.blocks_for(kv_len)
        tables = [table[:width] + [self.scratch_block] * (width - len(table[:width])) for table in block_tables]
        device = self.keys[0].device
        return BatchKV(self, torch.tensor(slots, device=device), torch.tensor(tables, device=device), kv_len)


@dataclass
class BatchKV:
    """Per forward pass: which slots receive the new keys/values, and which blocks make up each row's context.

    Passed to the model as ``past_key_values``; every attention layer calls ``update``, as with a transformers
    ``Cache``."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [rows * query_len] slot of each new token (padding: the scratch slot), row-major
    block_tables: torch.Tensor  # [rows, blocks] padded with the scratch block (masked out)
    kv_len: int  # longest context in the batch, new tokens included

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, ...]:
        """Write this step's keys/values [rows, kv_heads, q, head_dim] into their slots; return every row's
        context [rows, kv_heads, kv_len, head_dim] gathered from its blocks (padding beyond a row is masked)."""
        rows, heads, q, dim = keys.shape
        out = []
        for store, new in ((self.cache.keys[layer_idx], keys), (self.cache.values[layer_idx], values)):
            store.index_copy_(0, self.slot_mapping, new.transpose(1, 2).reshape(rows * q, heads, dim))
            blocks = store.view(-1, self.cache.block_size, heads, dim)[self.block_tables]
            out.append(blocks.view(rows, -1, heads, dim)[:, : self.kv_len].transpose(1, 2))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len
