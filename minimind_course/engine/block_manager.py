"""The block manager: which KV blocks are free, who holds each block (reference counts), and the prefix cache.

It only does the accounting; the keys and values themselves live in ``kv_cache.KVCache``. A sequence's block
table lists its blocks in order; token ``t`` sits in block ``block_table[t // block_size]``.

Automatic prefix caching (vLLM's): once a block is full and computed it gets a hash chained over its parent's
hash, its tokens and whatever else changes its keys/values (the LoRA adapter), so equal hashes mean equal
contents. A new sequence whose leading full blocks hash to cached ones holds those blocks instead of
recomputing them. A block nobody holds stays cached until its space is needed: plain free blocks are handed out
first, then cached ones, least recently freed first (a sequence's last blocks go before its first ones).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence


def block_hash(parent: bytes | None, tokens: Sequence[int], extra: int) -> bytes:
    """SHA-256 over the parent block's hash, this block's token ids and ``extra`` (the LoRA adapter id)."""
    data = b"".join(token.to_bytes(8, "little", signed=True) for token in (*tokens, extra))
    return hashlib.sha256((parent or b"") + data).digest()


class BlockManager:
    """Free blocks, reference counts and cached block hashes of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, on_take: Callable[[list[int]], None] | None = None,
                 enable_caching: bool = True):
        """``on_take`` is called with blocks taken from the free list, before anything is written to them."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.on_take = on_take
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks  # the hash of a full, computed block
        self.cached: dict[bytes, int] = {}  # hash -> the block that holds those tokens
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached ones nobody holds count: they are evicted on demand)."""
        return len(self.free_blocks) + len(self.evictable)

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
        new = [self._take() for _ in range(max(missing, 0))]
        if new and self.on_take is not None:
            self.on_take(new)
        block_table.extend(new)
        return True

    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:  # evict the least recently freed cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hashes[block]]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def free(self, block_table: list[int]) -> None:
        """A sequence lets go of its blocks (finished, cancelled or preempted); unshared ones become free,
        cached ones stay cached until their space is needed."""
        for block in reversed(block_table):  # the tail first: it is evicted before the prefix it extends
            self.ref_counts[block] -= 1
            if self.ref_counts[block] > 0:
                continue
            digest = self.hashes[block]
            if digest is not None and self.cached.get(digest) == block:
                self.evictable[block] = None
            else:
                self.hashes[block] = None
                self.free_blocks.append(block)
        block_table.clear()

    def cached_prefix(self, token_ids: Sequence[int], extra: int) -> list[int]:
        """The cached blocks holding the longest run of leading full blocks of ``token_ids[:-1]`` (the last
        token is always recomputed, so that its logits exist)."""
        if not self.enable_caching:
            return []
        blocks: list[int] = []
        parent = None
        for start in range(0, (len(token_ids) - 1) // self.block_size * self.block_size, self.block_size):
            parent = block_hash(parent, token_ids[start:start + self.block_size], extra)
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_hold(self, cached: list[int], num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` fits when it holds the ``cached`` blocks and takes the rest."""
        reclaimed = sum(1 for block in cached if self.ref_counts[block] == 0)  # evictable now, held then
        return self.blocks_for(num_tokens) - len(cached) <= self.num_free - reclaimed

    def hold(self, block_table: list[int], cached: list[int]) -> None:
        """Start an empty block table with cached blocks (a prefix-cache hit); they are not evictable while held."""
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        block_table.extend(cached)

    def commit(self, block_table: list[int], token_ids: Sequence[int], num_computed: int, extra: int) -> None:
        """Hash the blocks that are full and computed, so later sequences can find them."""
        if not self.enable_caching:
            return
        full = start = num_computed // self.block_size
        while start > 0 and self.hashes[block_table[start - 1]] is None:  # hashed blocks are a leading run
            start -= 1
        parent = self.hashes[block_table[start - 1]] if start else None
        for i in range(start, full):
            block = block_table[i]
            parent = self.hashes[block] = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size],
                                                     extra)
            self.cached.setdefault(parent, block)  # a twin computed at the same time stays plain
