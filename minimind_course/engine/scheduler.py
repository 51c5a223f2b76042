"""The scheduler: which sequences run in the next step, and how much of each prompt is prefilled.

Every step it (1) takes back preempted sequences when blocks are free, (2) decodes one token for every running
sequence whose prompt is done, and (3) picks prompt chunks to prefill, at most ``max_num_batched_tokens`` tokens
per step, cut at fixed multiples of that size (chunked prefill: a long prompt is spread over several steps, so
running streams keep getting tokens). All chunks of a step go through the model as rows of one pass. When a
decoding sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are freed and it is recomputed later from its tokens (vLLM's recompute preemption). New requests are admitted by
the engine through ``can_admit``.

With prefix caching a sequence that gets blocks (admitted or resumed) first takes the cached blocks of its
longest cached prefix and starts computing after them. Choices 2..n of a request wait until choice 1 has
computed the prompt's full blocks, then find them in the cache: the ``n`` choices share their prompt blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from minimind_course.engine.block_manager import BlockManager
from minimind_course.engine.config import EngineConfig
from minimind_course.engine.sequence import Request, Sequence


@dataclass
class StepPlan:
    """One step's work: prompt chunks to prefill (sequence, tokens) and the decode batch."""

    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: int = 0


class Scheduler:
    """Running sequences, preempted ones waiting for blocks, and the rules that move them."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = EngineConfig.max_num_seqs,
                 max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.running: list[Sequence] = []  # hold blocks, in admission order
        self.preempted: deque[Sequence] = deque()  # lost their blocks, resumed first
        self.forks: list[Sequence] = []  # choices 2..n waiting for choice 1's prompt blocks
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries)
        self.prefix_hits = 0  # ... and found there

    @property
    def num_seqs(self) -> int:
        return len(self.running) + len(self.preempted) + len(self.forks)

    def can_admit(self, request_prompt_len: int, n: int) -> bool:
        """Admission rule: a seat for each of the ``n`` sequences under ``max_num_seqs``, nobody preempted
        waiting, and free blocks for each copy of the prompt plus its first generated token."""
        return (self.num_seqs + n <= self.max_num_seqs and not self.preempted and not self.forks
                and n * self.block_manager.blocks_for(request_prompt_len + 1) <= self.block_manager.num_free)

    def add(self, request: Request) -> None:
        """Give a newly admitted request's sequences their prompt blocks (``can_admit`` said they fit)."""
        for seq in request.sequences:
            if seq.index > 0 and self.block_manager.enable_caching and self._shared_len(seq):
                self.forks.append(seq)
            elif self._place(seq, first=True):
                self.running.append(seq)
            else:
                raise RuntimeError("admitted a request whose prompt does not fit in the free KV blocks")

    def computed(self, seq: Sequence, num_tokens: int) -> None:
        """A pass computed ``num_tokens`` more of the sequence: blocks that are now full can be cached."""
        seq.num_computed += num_tokens
        self.block_manager.commit(seq.block_table, seq.token_ids, seq.num_computed, seq.request.lora_id)

    def remove(self, seq: Sequence) -> None:
        """A sequence that finished, was cancelled or failed: it leaves the batch and its blocks are free."""
        for queue in (self.running, self.preempted, self.forks):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free(seq.block_table)

    def _shared_len(self, seq: Sequence) -> int:
        """Prompt tokens in full blocks before the last prompt token: what choices of a request can share."""
        return (seq.request.prompt_len - 1) // self.block_manager.block_size * self.block_manager.block_size

    def _place(self, seq: Sequence, first: bool) -> bool:
        """Give a sequence without blocks its longest cached prefix and fresh blocks for the rest (False: they
        do not fit); ``first`` placements count in the prefix-cache statistics."""
        blocks = self.block_manager
        cached = blocks.cached_prefix(seq.token_ids, seq.request.lora_id)
        if not blocks.can_hold(cached, seq.num_tokens):
            return False
        blocks.hold(seq.block_table, cached)
        blocks.allocate(seq.block_table, seq.num_tokens)
        seq.num_computed = len(cached) * blocks.block_size  # a hit only moves the start of the prefill
        if first:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed
        return True

    def schedule(self) -> StepPlan:
        """Decide the next step: resume preempted sequences, give decoders their blocks, pick prompt chunks."""
        plan = StepPlan()
        blocks = self.block_manager
        while self.preempted and self._place(self.preempted[0], first=False):
            self.running.append(self.preempted.popleft())
        for seq in list(self.forks):
            parent = seq.request.sequences[0]
            if parent.finish_reason is None and parent.num_computed < self._shared_len(seq):
                continue  # choice 1 has not computed the shared prompt blocks yet
            if not self._place(seq, first=True):
                break
            self.forks.remove(seq)
            self.running.append(seq)
        for seq in list(self.running):  # decodes first: each may need one more block for the token it feeds
            if seq.uncomputed != 1 or seq not in self.running:
                continue
            while not blocks.allocate(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted += 1
                if victim in plan.decodes:
                    plan.decodes.remove(victim)
                if victim is seq:
                    break
            else:
                plan.decodes.append(seq)
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.uncomputed <= 1:
                continue
            chunk = min(self.max_num_batched_tokens - seq.num_computed % self.max_num_batched_tokens,
                        seq.uncomputed)
            if chunk > budget:
                break  # first come, first served: a later prompt does not overtake this one
            plan.prefills.append((seq, chunk))
            budget -= chunk
        return plan

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.num_computed = 0
        self.preempted.appendleft(seq)
