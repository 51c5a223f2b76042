"""A request and its sequences, as plain data keyed by request id: what the scheduler moves around.

A request with ``n`` choices becomes ``n`` sequences that share its prompt and sampling parameters; each has its
own tokens, random generator, text state and KV blocks, so each can finish, be cancelled or preempted alone.
Nothing here points back at the caller: the engine's front end maps request ids to whoever waits for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import LogitsProcessorList

from minimind_course.engine.detokenize import IncrementalDetokenizer
from minimind_course.engine.sampling import SamplingParams
from minimind_course.engine.stop_strings import StopStringMatcher


class Constraint(Protocol):
    """A per-sequence rule on which tokens may come next (a grammar, a JSON schema...)."""

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed entries of this sequence's 1-D logits row to -inf, in place."""

    def accept(self, token_id: int) -> None:
        """Advance the rule's state past the chosen token."""

    def done(self) -> bool:
        """True once the rule is complete: the sequence then ends with finish_reason "stop"."""


@dataclass(frozen=True)
class EngineRequest:
    """A request as the core receives it (vLLM's ``EngineCoreRequest``); ``constraint`` is one object for
    ``n == 1`` or a zero-argument factory that makes one per choice."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    constraint: Constraint | Callable[[], Constraint] | None = None
    lora_id: int = -1  # index into Engine.lora_names, -1 = the base model
    arrived: float = 0.0  # time.monotonic() at submit


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its tokens, how many of them have keys/values in the cache, its blocks."""

    seq_id: int
    request: Request
    index: int  # the choice index in the response
    token_ids: list[int]
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    constraint: Constraint | None = None
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.request.prompt_len

    @property
    def uncomputed(self) -> int:
        """Tokens still to feed the model before the next token can be sampled (1 while decoding)."""
        return len(self.token_ids) - self.num_computed


@dataclass(eq=False)
class Request:
    """An admitted request inside the core: its id, shared sampling state and its sequences."""

    request_id: str
    params: SamplingParams
    pipeline: LogitsProcessorList
    prompt_len: int
    arrived: float  # when it was submitted
    lora_id: int = -1  # its LoRA adapter (index into Engine.lora_names), -1 = the base model
    sequences: list[Sequence] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason for seq in self.sequences)

    @property
    def completion_tokens(self) -> int:
        return sum(seq.num_generated for seq in self.sequences)

    @property
    def simple_greedy(self) -> bool:
        """Greedy with nothing to apply per row: the whole batch can take one argmax."""
        return (self.params.greedy and not self.pipeline and self.params.logprobs is None
                and all(seq.constraint is None for seq in self.sequences))
