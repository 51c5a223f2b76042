"""The generation engine: continuous batching on one worker thread, requests wait in a bounded FIFO queue.

Every step is one forward pass over all running sequences (plus prompt chunks of newly admitted ones), so 16
users cost little more than one: a decode step reads every weight once whatever the batch size. A request joins
the batch at the next step once a seat (``max_num_seqs``) and KV blocks are free; a sequence that finishes, hits
a stop string or is cancelled leaves at once. A full queue is refused at once (the server turns that into HTTP
429). The worker never runs on the asyncio event loop, so the server keeps answering while the model works.

The pieces live next to this module in the style of nano-vllm: ``sequence`` (a request and its
sequences), ``kv_cache`` (paged keys/values), ``scheduler`` (who runs next, chunked prefill, preemption) and
``runner`` (the forward pass). This module turns logits into tokens and text and hands them to the callers.
Sampling is per sequence: HF logits processors, a private ``torch.Generator`` per choice (``seed`` reproduces
the same text whatever else runs), OpenAI's penalties, stop strings and an optional constraint hook.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minimind_course.engine.detokenize import IncrementalDetokenizer
from minimind_course.engine.kv_cache import KVCache
from minimind_course.engine.runner import ModelRunner
from minimind_course.engine.sampling import SamplingParams, build_logits_pipeline, make_generator, next_tokens
from minimind_course.engine.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, Scheduler
from minimind_course.engine.sequence import Constraint, Request, Sequence
from minimind_course.engine.stop_strings import StopStringMatcher

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64
DEFAULT_KV_CACHE_MEMORY = 512 * 2**20  # bytes; the bundled model needs 4 KiB per token (fp32)
TRACE_HISTORY = 1024  # how many finished requests ``Engine.traces()`` remembers
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


class EngineBusyError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


class ContextLengthError(ValueError):
    """Prompt plus requested completion do not fit in the model's context (HTTP 400)."""

    def __init__(self, max_model_len: int, prompt_tokens: int, completion_tokens: int):
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, {completion_tokens} in "
            "the completion). Please reduce the length of the messages or completion."
        )


class UnknownAdapterError(KeyError):
    """A request named a LoRA adapter the engine has not loaded (HTTP 404, like an unknown model)."""


class PromptError(ValueError):
    """The messages could not be turned into a prompt (bad role order, bad template argument...)."""


class RequestTooLargeError(ValueError):
    """The request can never be scheduled (more choices than seats, or prompts bigger than the KV cache)."""

    def __init__(self, message: str, param: str):
        self.param = param
        super().__init__(message)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice in one step; ``finish_reason`` is set on its last delta ("stop" or "length").

    ``logprobs`` holds the tokens generated in this step when the request asked for them; their text may
    still be held back (an incomplete character, a possible stop string) and arrive in a later delta.
    ``stop_string`` is the stop string that ended the choice (None for end-of-sequence, length or a grammar)."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_string: str | None = None


@dataclass(frozen=True)
class StepOutput:
    """What one decode step produced, plus running token counts for ``usage``."""

    choices: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens under the model's own distribution (before temperature and
    penalties, as vLLM reports them by default), with the ``top`` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    best = logp.topk(top, dim=-1) if top else None
    rows = []
    for i, (token, value) in enumerate(zip(tokens.tolist(), chosen)):
        alternatives = tuple(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else ()
        rows.append(TokenLogprob(token, value, alternatives))
    return rows


def merge_steps(steps: list[StepOutput]) -> StepOutput:
    """Consecutive steps as one: text joined per choice, the last finish reason and token counts."""
    if len(steps) == 1:
        return steps[0]
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    logprobs: dict[int, tuple[TokenLogprob, ...]] = {}
    stops: dict[int, str | None] = {}
    for step in steps:
        for delta in step.choices:
            texts[delta.index] = texts.get(delta.index, "") + delta.text
            reasons[delta.index] = delta.finish_reason or reasons.get(delta.index)
            logprobs[delta.index] = logprobs.get(delta.index, ()) + delta.logprobs
            stops[delta.index] = delta.stop_string or stops.get(delta.index)
    last = steps[-1]
    merged = [ChoiceDelta(i, texts[i], reasons[i], logprobs[i], stops[i]) for i in texts]
    return StepOutput(merged, last.prompt_tokens, last.completion_tokens, last.finished)


@dataclass
class GenerationResult:
    """A finished request: full text and finish reason per choice, and token counts."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, when requested
    stop_strings: list[str | None] = field(default_factory=list)  # per choice: the stop string that ended it


@dataclass(frozen=True)
class RequestTrace:
    """How the worker let go of one request. ``outcome``: finished (stop/length), cancelled (mid-generation),
    skipped (cancelled while queued) or failed. Times are ``time.monotonic()`` seconds."""

    request_id: str
    outcome: str
    completion_tokens: int
    cancelled_at: float | None  # when cancel() was first called, for cancelled and skipped requests
    finished_at: float  # when the worker stopped generating for it


@dataclass
class GenerationHandle:
    """A submitted request: iterate it (async) for ``StepOutput``s; ``cancel()`` stops its generation."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancelled_at: float | None = None
    constraint: Constraint | Callable[[], Constraint] | None = None
    arrived: float = field(default_factory=time.monotonic)  # submit time: time to first token counts from here
    lora_id: int = -1  # the LoRA adapter this request runs with (index into Engine.lora_names), -1 = the base model

    def cancel(self) -> None:
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        self.cancelled.set()

    def send(self, item: StepOutput | BaseException) -> None:
        """Called from the worker thread: hand an item to the waiting coroutine on its event loop."""
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        """Steps as they come; steps that piled up while the consumer was busy arrive merged into one, so a
        slow reader gets fewer, larger chunks instead of falling further behind (as vLLM's output coalescing)."""
        try:
            while True:
                items = [await self.outputs.get()]
                while not self.outputs.empty() and not isinstance(items[-1], BaseException):
                    items.append(self.outputs.get_nowait())
                error = items.pop() if isinstance(items[-1], BaseException) else None
                if items:
                    step = merge_steps(items)
                    yield step
                    if step.finished:
                        return
                if error is not None:
                    raise error
        finally:  # the consumer left early (client disconnect, error): free the worker
            self.cancel()

    async def result(self) -> GenerationResult:
        """Wait for the whole answer."""
        texts = [""] * self.params.n
        reasons = [""] * self.params.n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.params.n)]
        stops: list[str | None] = [None] * self.params.n
        step = None
        async for step in self:
            for delta in step.choices:
                texts[delta.index] += delta.text
                logprobs[delta.index].extend(delta.logprobs)
                if delta.finish_reason:
                    reasons[delta.index] = delta.finish_reason
                    stops[delta.index] = delta.stop_string
        return GenerationResult(texts, reasons, step.prompt_tokens, step.completion_tokens, logprobs, stops)


@dataclass(frozen=True)
class FinishedRequestStats:
    """One request that ended normally, for metrics: latency from arrival, finish reason, token counts."""

    e2e_latency_s: float
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StepStats:
    """What one engine step did, handed to ``Engine.stats_listeners`` (the Prometheus metrics read these)."""

    prompt_tokens: int = 0  # prompts whose prefill completed in this step
    generation_tokens: int = 0
    time_to_first_token_s: list[float] = field(default_factory=list)
    inter_token_latency_s: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    preemptions: int = 0
    request_ids: tuple[str, ...] = ()  # the requests that had sequences in this step's forward passes


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index``: the request's seed for the first, a distinct mix of both for the others."""
    if seed is None or index == 0:
        return seed
    return hash((seed, index)) & (2**63 - 1)


class Engine:
    """A causal LM and its tokenizer behind one worker thread that batches all running requests."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_model_len: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    ):
        """``max_num_seqs``: sequences decoded together; ``kv_cache_memory``: bytes of keys/values (blocks of
        16 tokens); ``max_num_batched_tokens``: prompt tokens prefilled per step (longer prompts are chunked)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        if max_model_len is not None and not 0 < max_model_len <= context:
            raise ValueError(f"max_model_len must be between 1 and the model's max_position_embeddings ({context})")
        self.max_model_len = max_model_len or context
        dtype = next(model.parameters()).dtype
        self.kv_cache = KVCache(model.config, kv_cache_memory, dtype=dtype, device=model.device)
        if self.kv_cache.capacity_tokens < self.max_model_len:
            raise ValueError(
                f"a KV cache of {kv_cache_memory / 2**20:.0f} MiB holds {self.kv_cache.capacity_tokens} tokens, "
                f"fewer than one sequence of max_model_len {self.max_model_len}: give it more memory or lower "
                "max_model_len")
        self.scheduler = Scheduler(self.kv_cache, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_cache)
        self.eos_token_ids = self._eos_ids()
        self.sampling_defaults = self._generation_config_defaults()
        self.stats_listeners: list[Callable[[StepStats], None]] = []
        self._template_reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters)
        self._requests: list[Request] = []  # admitted and not yet ended, in admission order
        self._seq_ids = itertools.count()
        self._traces: deque[RequestTrace] = deque(maxlen=TRACE_HISTORY)
        self._traces_lock = threading.Lock()
        self.max_queue = max_queue
        self._waiting: deque[GenerationHandle] = deque()  # the bounded FIFO queue, guarded by _wake
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._serve_forever, name="minimind-engine", daemon=True)
        self._worker.start()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        rope_scaling: str | None = None,
        lora: dict[str, str | Path] | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Load a model with ``minimind_course.model.loading.load_model`` (None = the bundled model) and wrap it;
        ``lora`` {name: adapter .pth} makes each adapter selectable per request."""
        from minimind_course.model.loading import load_model

        model, tokenizer = load_model(path, device=device, dtype=dtype, rope_scaling=rope_scaling, lora=lora or None)
        return cls(model, tokenizer, **kwargs)

    # ---- prompts -------------------------------------------------------------------------------------
    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render messages (and the tools the model may call) with the tokenizer's chat template, ending with the
        assistant generation prompt (unless ``add_generation_prompt`` is False)."""
        template_kwargs = dict(template_kwargs or {})
        clash = sorted(self._template_reserved & template_kwargs.keys())
        if clash:
            raise PromptError(f"chat_template_kwargs may not set {', '.join(clash)}")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
                **template_kwargs
            )
        except Exception as err:  # jinja2 raises TemplateError (e.g. raise_exception in the template)
            raise PromptError(f"the chat template rejected these messages: {err}") from err

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt string, exactly as written (the template already placed special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False, verbose=False)  # length is checked by us

    def completion_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """How many tokens may be generated: the request's max, else what is left of the context (OpenAI's rule;
        generation_config's ``max_new_tokens`` is not a server-wide cap). Never truncates the prompt."""
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(self.max_model_len, prompt_tokens, max_tokens)
        if max_tokens is None and prompt_tokens >= self.max_model_len:
            raise ContextLengthError(self.max_model_len, prompt_tokens, 1)
        return max_tokens if max_tokens is not None else self.max_model_len - prompt_tokens

    # ---- requests ------------------------------------------------------------------------------------
    @property
    def lora_names(self) -> list[str]:
        """Names of the LoRA adapters loaded next to the base model, in adapter-id order."""
        return list(getattr(self.model, "lora_names", []))

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        constraint: Constraint | Callable[[], Constraint] | None = None,
        lora: str | None = None,
    ) -> GenerationHandle:
        """Queue a request (call from the event loop); raises EngineBusyError when the queue is full.

        ``lora`` names the LoRA adapter the request runs with (None: the base model; UnknownAdapterError if it is
        not loaded): requests for different adapters share batches, each row carrying its adapter id.

        ``constraint`` limits which tokens each choice may take (see ``engine.sequence.Constraint``): an
        object with ``apply``/``accept``/``done`` when ``n == 1``, or a zero-argument factory that makes one
        per choice (required when ``n > 1``, since every choice walks its own state)."""
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if lora is not None and lora not in self.lora_names:
            raise UnknownAdapterError(lora)
        if constraint is not None and params.n > 1 and hasattr(constraint, "apply"):
            raise ValueError("with n > 1, pass a zero-argument factory that makes one constraint per choice")
        if params.n > self.scheduler.max_num_seqs:
            raise RequestTooLargeError(
                f"n={params.n} is more than the {self.scheduler.max_num_seqs} sequences this server runs at once",
                "n")
        if params.n * self.kv_cache.blocks_for(len(prompt_ids) + 1) > self.kv_cache.num_blocks:
            raise RequestTooLargeError(
                f"{params.n} copies of a {len(prompt_ids)}-token prompt do not fit in the KV cache "
                f"({self.kv_cache.capacity_tokens} tokens)", "n")
        handle = GenerationHandle(list(prompt_ids), params, asyncio.get_running_loop(), constraint=constraint)
        handle.lora_id = self.lora_names.index(lora) if lora is not None else -1
        if request_id is not None:
            handle.request_id = request_id
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise EngineBusyError(
                    f"The server is busy: {self.max_queue} requests are already waiting. Retry shortly.")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def queued(self) -> int:
        """Requests waiting for a seat in the batch (not counting the running ones)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running batch (a request with ``n`` choices counts once)."""
        return len(self._requests)

    @property
    def active(self) -> GenerationHandle | None:
        """A request the worker is generating right now (the oldest running one), None when idle."""
        running = list(self._requests)
        return running[0].handle if running else None

    def traces(self) -> list[RequestTrace]:
        """The last ``TRACE_HISTORY`` requests the worker let go of, oldest first (how and when each ended)."""
        with self._traces_lock:
            return list(self._traces)

    def close(self) -> None:
        """Stop the worker after its current step; queued and running requests end with an error."""
        with self._wake:
            for handle in [*self._waiting, *(request.handle for request in list(self._requests))]:
                handle.cancel()
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout=30)

    # ---- the worker thread ---------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        while self._admit():
            if self.scheduler.num_seqs:
                try:
                    self._step()
                except Exception as err:  # a bug in the engine itself: end every running request, keep serving
                    for request in list(self._requests):
                        self._end(request, "failed", err)
        closed = RuntimeError("the engine was closed")  # nobody waits forever for a request that will not run
        for request in list(self._requests):
            self._end(request, "cancelled", closed)
        with self._wake:
            left, self._waiting = list(self._waiting), deque()
        for handle in left:
            handle.send(closed)
            self._record(handle, "skipped", 0)

    def _admit(self) -> bool:
        """Move queued requests into the batch while seats and blocks allow; wait when there is nothing to do.
        Returns False when ``close`` asked the worker to stop."""
        while True:
            with self._wake:
                while not self._waiting and not self._closing and not self.scheduler.num_seqs:
                    self._wake.wait()
                if self._closing:
                    return False
                left = [handle for handle in self._waiting if handle.cancelled.is_set()]
                for handle in left:  # clients that left while waiting free their place in the queue at once
                    self._waiting.remove(handle)
                    self._record(handle, "skipped", 0)
                if not self._waiting:
                    return True
                handle = self._waiting[0]
                if not self.scheduler.can_admit(len(handle.prompt_ids), handle.params.n):
                    return True  # it stays first in line until sequences leave
                self._waiting.popleft()
            try:
                request = self._new_request(handle)
            except Exception as err:  # e.g. a constraint factory that raised
                handle.send(err)
                self._record(handle, "failed", 0)
                continue
            self.scheduler.add(request)
            self._requests.append(request)

    def _new_request(self, handle: GenerationHandle) -> Request:
        params, prompt_len = handle.params, len(handle.prompt_ids)
        request = Request(handle, params, build_logits_pipeline(params, prompt_len), prompt_len, arrived=handle.arrived,
                          lora_id=handle.lora_id)
        constraint = handle.constraint
        for index in range(params.n):
            own = constraint() if constraint is not None and not hasattr(constraint, "apply") else constraint
            request.sequences.append(Sequence(
                next(self._seq_ids), request, index, list(handle.prompt_ids),
                make_generator(choice_seed(params.seed, index), self.runner.device),
                IncrementalDetokenizer(self.tokenizer), StopStringMatcher(params.stop), own))
        return request

    def _step(self) -> None:
        """Drop cancelled requests, run the scheduled prefill chunks and the decode batch, sample, hand out."""
        for request in list(self._requests):
            if request.handle.cancelled.is_set():
                self._end(request, "cancelled")
        plan = self.scheduler.schedule()
        scheduled = [seq for seq, _ in plan.prefills] + plan.decodes
        stats = StepStats(preemptions=plan.preempted,
                          request_ids=tuple(dict.fromkeys(seq.request.handle.request_id for seq in scheduled)))
        ready: list[tuple[Sequence, torch.Tensor]] = []
        if plan.prefills:
            ready += self._forward([seq for seq, _ in plan.prefills], [n for _, n in plan.prefills])
        if plan.decodes:
            ready += self._forward(plan.decodes, [1] * len(plan.decodes))
        if ready:
            self._sample(ready, stats)
        for listener in self.stats_listeners:
            try:
                listener(stats)
            except Exception:  # a broken metrics listener must not end the requests
                logger.exception("an engine stats listener failed")

    def _forward(self, seqs: list[Sequence], query_lens: list[int]) -> list[tuple[Sequence, torch.Tensor]]:
        """Run one pass; rows whose tokens are all computed come back with their logits. When a pass with
        several requests fails, each request's rows run alone, so only the one at fault ends with the error
        (rewriting the same cache slots is harmless)."""
        try:
            logits = self.runner.forward(seqs, query_lens)
        except Exception as err:
            requests = list(dict.fromkeys(seq.request for seq in seqs))
            if len(requests) == 1:
                self._end(requests[0], "failed", err)
                return []
            rows = [[i for i, seq in enumerate(seqs) if seq.request is request] for request in requests]
            return [pair for own in rows
                    for pair in self._forward([seqs[i] for i in own], [query_lens[i] for i in own])]
        for seq, n in zip(seqs, query_lens):
            seq.num_computed += n
        return [(seq, logits[i]) for i, seq in enumerate(seqs) if seq.uncomputed == 0]

    def _sample(self, ready: list[tuple[Sequence, torch.Tensor]], stats: StepStats) -> None:
        """Pick each row's next token (one argmax for all plain greedy rows), turn it into text, send the steps."""
        logits = torch.stack([row for _, row in ready])
        tokens: list[int | None] = [None] * len(ready)
        plain = [i for i, (seq, _) in enumerate(ready) if seq.request.simple_greedy]
        if plain:
            for i, token in zip(plain, logits[plain].argmax(dim=-1).tolist()):
                tokens[i] = token
        deltas: dict[Request, list[ChoiceDelta]] = {}
        now = time.monotonic()
        for i, (seq, row) in enumerate(ready):
            request = seq.request
            if request not in self._requests:
                continue  # ended by an error on an earlier row of this step
            try:
                delta = self._append(seq, tokens[i], row)
            except Exception as err:  # its constraint or sampling failed: only this request ends
                self._end(request, "failed", err)
                continue
            deltas.setdefault(request, [])
            stats.generation_tokens += 1
            if delta is not None:
                deltas[request].append(delta)
        for request, items in deltas.items():
            if request not in self._requests:
                continue
            if request.first_token_at is None:
                request.first_token_at = now
                stats.prompt_tokens += request.prompt_len
                stats.time_to_first_token_s.append(now - request.arrived)
            else:
                stats.inter_token_latency_s.append(now - request.last_token_at)
            request.last_token_at = now
            finished = request.finished
            items.sort(key=lambda delta: delta.index)
            request.handle.send(StepOutput(items, request.prompt_len, request.completion_tokens, finished))
            if finished:
                reason = next(seq.finish_reason for seq in request.sequences)
                stats.finished.append(FinishedRequestStats(now - request.arrived, reason, request.prompt_len,
                                                           request.completion_tokens))
                self._end(request, "finished")

    def _append(self, seq: Sequence, token: int | None, logits: torch.Tensor) -> ChoiceDelta | None:
        """Choose (unless already chosen) and append one token to a sequence; its new text and finish reason."""
        params = seq.request.params
        logprob = None
        if token is None:
            scores = logits[None].float().clone()
            if seq.constraint is not None:
                seq.constraint.apply(scores[0])
            ids = torch.tensor([seq.token_ids], device=scores.device)
            token = int(next_tokens(params, seq.request.pipeline, ids, scores, seq.generator)[0])
            if params.logprobs is not None:
                logprob = token_logprobs(logits[None], torch.tensor([token]), params.logprobs)[0]
        seq.token_ids.append(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        text, reason = self._advance(token, seq.detokenizer, seq.matcher, seq.num_generated, params)
        if reason is None and seq.constraint is not None and seq.constraint.done():
            text += seq.matcher.push(seq.detokenizer.flush()) + seq.matcher.flush()
            reason = "stop"
        if reason:
            seq.finish_reason = reason
            self.scheduler.remove(seq)  # it leaves the batch now and its blocks are free for others
        if text or reason or logprob:
            stop_string = seq.matcher.matched if reason == "stop" else None
            return ChoiceDelta(seq.index, text, reason, (logprob,) if logprob else (), stop_string)
        return None

    def _end(self, request: Request, outcome: str, error: BaseException | None = None) -> None:
        """Take a request out of the worker: free its sequences, tell its caller about an error, trace it."""
        for seq in request.sequences:
            self.scheduler.remove(seq)
        if request in self._requests:
            self._requests.remove(request)
        if error is not None:
            request.handle.send(error)
        self._record(request.handle, outcome, request.completion_tokens)

    def _record(self, handle: GenerationHandle, outcome: str, completion_tokens: int) -> None:
        cancelled_at = handle.cancelled_at if outcome in ("cancelled", "skipped") else None
        trace = RequestTrace(handle.request_id, outcome, completion_tokens, cancelled_at, time.monotonic())
        with self._traces_lock:
            self._traces.append(trace)

    def _advance(
        self, token: int, detok: IncrementalDetokenizer, matcher: StopStringMatcher, count: int, params: SamplingParams
    ) -> tuple[str, str | None]:
        """Text this token releases for one choice, and its finish reason if the choice just ended."""
        if token in self.eos_token_ids and not params.ignore_eos:
            return matcher.push(detok.flush()) + matcher.flush(), "stop"
        text = matcher.push(detok.push(token))
        if matcher.stopped:
            return text, "stop"
        if count >= params.max_tokens:
            text += matcher.push(detok.flush())
            return text + matcher.flush(), "stop" if matcher.stopped else "length"
        return text, None

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
        return ids

    def _generation_config_defaults(self) -> dict[str, float]:
        """Values the model's generation_config.json sets on purpose, used when a request leaves them out
        (as vLLM's ``--generation-config auto``); ``do_sample: false`` there means greedy by default."""
        config = getattr(self.model, "generation_config", None)
        if config is None:
            return {}
        diff = config.to_diff_dict()
        defaults = {key: diff[key] for key in SAMPLING_DEFAULT_KEYS if diff.get(key) is not None}
        if diff.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return defaults
