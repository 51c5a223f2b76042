"""The engine's settings and their defaults, in one torch-free place: ``serve`` and ``bench`` read them here."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class EngineConfig:
    """What an ``Engine`` is built with (vLLM's flag names); the class attributes are the defaults."""

    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_queue: int = 64  # requests that may wait for a seat; more are refused (HTTP 429)
    max_num_seqs: int = 32  # sequences decoded together (n choices count n)
    kv_cache_memory: int = 512 * MIB  # bytes of keys/values; the bundled model needs 4 KiB per token (fp32)
    max_num_batched_tokens: int = 256  # prompt tokens prefilled per step (longer prompts are chunked)
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # reuse the keys/values of full blocks of prompts seen before
    trace_history: int = 1024  # finished requests ``Engine.traces()`` remembers

    def __post_init__(self):
        for name in ("max_num_seqs", "kv_cache_memory", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
