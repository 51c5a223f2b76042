"""The engine core: requests in (``add``), out (``abort``), and ``step()`` — no threads, no event loop.

Every step admits waiting requests while seats and KV blocks allow, runs one forward pass for the scheduled
prompt chunks and one for the decode batch, samples a token per ready row and turns it into text. It returns
one ``RequestUpdate`` per request that has news (text, an error, or its end), keyed by request id; whoever
drives the core (``engine.Engine``'s worker thread, a notebook cell) hands them on.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minimind_course.engine import sampler
from minimind_course.engine.block_manager import BlockManager
from minimind_course.engine.config import EngineConfig
from minimind_course.engine.errors import RequestTooLargeError
from minimind_course.engine.kv_cache import KVCache
from minimind_course.engine.output_processor import OutputProcessor, eos_token_ids
from minimind_course.engine.outputs import ChoiceDelta, FinishedRequestStats, RequestUpdate, StepOutput, StepStats
from minimind_course.engine.runner import ModelRunner
from minimind_course.engine.sampling import SamplingParams, build_logits_pipeline
from minimind_course.engine.scheduler import Scheduler
from minimind_course.engine.sequence import EngineRequest, Request, Sequence


class EngineCore:
    """A model, its paged KV cache and the scheduler; requests waiting (FIFO) and admitted, by id."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: EngineConfig):
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        if config.max_model_len is not None and not 0 < config.max_model_len <= context:
            raise ValueError(f"max_model_len must be between 1 and the model's max_position_embeddings ({context})")
        self.config = config
        self.max_model_len = config.max_model_len or context
        dtype = next(model.parameters()).dtype
        self.kv_cache = KVCache(model.config, config.kv_cache_memory, dtype=dtype, device=model.device,
                                block_size=config.block_size)
        if self.kv_cache.capacity_tokens < self.max_model_len:
            raise ValueError(
                f"a KV cache of {config.kv_cache_memory / 2**20:.0f} MiB holds {self.kv_cache.capacity_tokens} "
                f"tokens, fewer than one sequence of max_model_len {self.max_model_len}: give it more memory or "
                "lower max_model_len")
        self.block_manager = BlockManager(self.kv_cache.num_blocks, config.block_size, on_take=self.kv_cache.zero,
                                          enable_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache)
        self.output = OutputProcessor(tokenizer, eos_token_ids(model, tokenizer))
        self.waiting: deque[EngineRequest] = deque()
        self.requests: dict[str, Request] = {}  # admitted and not yet ended, in admission order
        self._seq_ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.scheduler.num_seqs)

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse at once a request that could never be scheduled (RequestTooLargeError)."""
        seats = self.scheduler.max_num_seqs
        if params.n > seats:
            raise RequestTooLargeError(f"n={params.n} is more than the {seats} sequences this server runs at once",
                                       "n")
        if params.n * self.block_manager.blocks_for(prompt_len + 1) > self.block_manager.num_blocks:
            raise RequestTooLargeError(
                f"{params.n} copies of a {prompt_len}-token prompt do not fit in the KV cache "
                f"({self.kv_cache.capacity_tokens} tokens)", "n")

    def add(self, request: EngineRequest) -> None:
        """Queue a request; it joins the batch at a step where seats and blocks for its prompt are free."""
        self.waiting.append(request)

    def abort(self, request_id: str, error: BaseException | None = None) -> RequestUpdate | None:
        """Drop a request wherever it is (skipped while queued, cancelled once admitted); None if unknown."""
        for queued in self.waiting:
            if queued.request_id == request_id:
                self.waiting.remove(queued)
                return RequestUpdate(request_id, error=error, outcome="skipped")
        request = self.requests.get(request_id)
        return self._end(request, "cancelled", error) if request is not None else None

    def step(self) -> tuple[list[RequestUpdate], StepStats | None]:
        """Admit, run one step, sample and detokenize; the updates, and the step's stats (None: nothing ran)."""
        queries, hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits
        updates = self._admit()
        if not self.scheduler.num_seqs:
            return updates, None
        stats = StepStats()
        try:
            self._run(stats, updates)
        except Exception as err:  # a bug in the engine itself: end every running request, keep serving
            updates += [self._end(request, "failed", err) for request in list(self.requests.values())]
        stats.prefix_cache_queries = self.scheduler.prefix_queries - queries
        stats.prefix_cache_hits = self.scheduler.prefix_hits - hits
        return updates, stats

    def _admit(self) -> list[RequestUpdate]:
        """Move waiting requests into the batch, oldest first, while ``Scheduler.can_admit`` says they fit."""
        updates = []
        while self.waiting and self.scheduler.can_admit(len(self.waiting[0].prompt_ids), self.waiting[0].params.n):
            queued = self.waiting.popleft()
            try:
                request = self._new_request(queued)
            except Exception as err:  # e.g. a constraint factory that raised
                updates.append(RequestUpdate(queued.request_id, error=err, outcome="failed"))
                continue
            self.scheduler.add(request)
            self.requests[request.request_id] = request
        return updates

    def _new_request(self, queued: EngineRequest) -> Request:
        params, prompt_len, constraint = queued.params, len(queued.prompt_ids), queued.constraint
        request = Request(queued.request_id, params, build_logits_pipeline(params, prompt_len), prompt_len,
                          arrived=queued.arrived, lora_id=queued.lora_id)
        for index in range(params.n):
            own = constraint() if constraint is not None and not hasattr(constraint, "apply") else constraint
            request.sequences.append(Sequence(
                next(self._seq_ids), request, index, list(queued.prompt_ids),
                sampler.choice_generator(params.seed, index, self.runner.device),
                *self.output.text_state(params), own))
        return request

    def _run(self, stats: StepStats, updates: list[RequestUpdate]) -> None:
        """Schedule, run the prefill chunks and the decode batch, sample and hand out the new text."""
        plan = self.scheduler.schedule()
        scheduled = [seq for seq, _ in plan.prefills] + plan.decodes
        stats.preemptions = plan.preempted
        stats.request_ids = tuple(dict.fromkeys(seq.request.request_id for seq in scheduled))
        ready: list[tuple[Sequence, torch.Tensor]] = []
        if plan.prefills:
            ready += self._forward([seq for seq, _ in plan.prefills], [n for _, n in plan.prefills], updates)
        if plan.decodes:
            ready += self._forward(plan.decodes, [1] * len(plan.decodes), updates)
        if ready:
            self._sample(ready, stats, updates)

    def _forward(self, seqs: list[Sequence], query_lens: list[int],
                 updates: list[RequestUpdate]) -> list[tuple[Sequence, torch.Tensor]]:
        """Run one pass; rows whose tokens are all computed come back with their logits. When a pass with
        several requests fails, each request's rows run alone, so only the one at fault ends with the error
        (rewriting the same cache slots is harmless)."""
        try:
            logits = self.runner.forward(seqs, query_lens)
        except Exception as err:
            requests = list(dict.fromkeys(seq.request for seq in seqs))
            if len(requests) == 1:
                updates.append(self._end(requests[0], "failed", err))
                return []
            rows = [[i for i, seq in enumerate(seqs) if seq.request is request] for request in requests]
            return [pair for own in rows
                    for pair in self._forward([seqs[i] for i in own], [query_lens[i] for i in own], updates)]
        for seq, n in zip(seqs, query_lens):
            self.scheduler.computed(seq, n)
        return [(seq, logits[i]) for i, seq in enumerate(seqs) if seq.uncomputed == 0]

    def _sample(self, ready: list[tuple[Sequence, torch.Tensor]], stats: StepStats,
                updates: list[RequestUpdate]) -> None:
        """Append each row's token, turn it into text, and give each request its step's output."""
        deltas: dict[Request, list[ChoiceDelta]] = {}
        now = time.monotonic()
        for (seq, _), sampled in zip(ready, sampler.sample(ready)):
            request = seq.request
            if request.request_id not in self.requests:
                continue  # ended by an error on an earlier row of this step
            try:
                if isinstance(sampled, Exception):
                    raise sampled
                delta = self._append(seq, *sampled)
            except Exception as err:  # its constraint or sampling failed: only this request ends
                updates.append(self._end(request, "failed", err))
                continue
            deltas.setdefault(request, [])
            stats.generation_tokens += 1
            if delta is not None:
                deltas[request].append(delta)
        for request, items in deltas.items():
            if request.request_id not in self.requests:
                continue
            if request.first_token_at is None:
                request.first_token_at = now
                stats.prompt_tokens += request.prompt_len
                stats.time_to_first_token_s.append(now - request.arrived)
            else:
                stats.inter_token_latency_s.append(now - request.last_token_at)
            request.last_token_at = now
            items.sort(key=lambda delta: delta.index)
            output = StepOutput(items, request.prompt_len, request.completion_tokens, request.finished)
            if not request.finished:
                updates.append(RequestUpdate(request.request_id, output))
                continue
            reason = next(seq.finish_reason for seq in request.sequences)
            stats.finished.append(FinishedRequestStats(now - request.arrived, reason, request.prompt_len,
                                                       request.completion_tokens))
            end = self._end(request, "finished")
            updates.append(RequestUpdate(request.request_id, output, outcome=end.outcome,
                                         completion_tokens=end.completion_tokens))

    def _append(self, seq: Sequence, token: int, logprob) -> ChoiceDelta | None:
        """Append one sampled token to a sequence; its text delta. A finished sequence leaves the batch now."""
        seq.token_ids.append(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        delta = self.output.process(seq, token, logprob)
        if seq.finish_reason:
            self.scheduler.remove(seq)  # its blocks are free for others at once
        return delta

    def _end(self, request: Request, outcome: str, error: BaseException | None = None) -> RequestUpdate:
        """Take a request out of the core: free its sequences; the update that says how it left."""
        for seq in request.sequences:
            self.scheduler.remove(seq)
        self.requests.pop(request.request_id, None)
        return RequestUpdate(request.request_id, error=error, outcome=outcome,
                             completion_tokens=request.completion_tokens)
