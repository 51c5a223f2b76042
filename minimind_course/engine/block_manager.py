"""The block manager: which KV blocks are free, who holds each block (reference counts), block tables.

It only does the accounting; the keys and values themselves live in ``kv_cache.KVCache``. A sequence's block
table lists its blocks in order; token ``t`` sits in block ``block_table[t // block_size]``. A block goes back to
the free list when the last sequence holding it lets go.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class BlockManager:
    """Free list and reference counts of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, on_take: Callable[[list[int]], None] | None = None):
        """``on_take`` is called with blocks taken from the free list, before anything is written to them."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.on_take = on_take
        self.ref_counts = [0] * num_blocks
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's ``kv_cache_usage_perc``: 1.0 means full)."""
        return self.used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``num_tokens``; False (and nothing taken) when blocks run out."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing > self.num_free:
            return False
        new = [self.free_blocks.pop() for _ in range(max(missing, 0))]
        for block in new:
            self.ref_counts[block] = 1
        if new and self.on_take is not None:
            self.on_take(new)
        block_table.extend(new)
        return True

    def free(self, block_table: list[int]) -> None:
        """A sequence lets go of its blocks (finished, cancelled or preempted); unshared ones become free."""
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        block_table.clear()
