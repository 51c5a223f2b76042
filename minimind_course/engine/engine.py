"""The generation engine: one worker thread runs the model, requests wait their turn in a bounded FIFO queue.

Why this shape: a CPU laptop has one model and a few cores, so requests are served one at a time (no
continuous batching as in vLLM), but never on the asyncio event loop, so the server keeps answering
``/health``, streams other bytes and notices disconnects while the model works. A full queue is refused at
once (the server turns that into HTTP 429) instead of letting waiting times grow without bound.

The decode loop is our own rather than ``model.generate``: it checks a cancel flag before every token (a
closed stream frees the worker at once), hands out every token as soon as it exists (no streamer thread),
draws from a per-request ``torch.Generator`` (``seed`` is reproducible; ``generate`` uses the global RNG),
and applies OpenAI's presence/frequency penalties. The logits pipeline itself is made of HF processors.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minimind_course.engine.detokenize import IncrementalDetokenizer
from minimind_course.engine.sampling import SamplingParams, build_logits_pipeline, make_generator, next_tokens
from minimind_course.engine.stop_strings import StopStringMatcher

DEFAULT_MAX_QUEUE = 64
TRACE_HISTORY = 1024  # how many finished requests ``Engine.traces()`` remembers
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


class Constraint(Protocol):
    """A per-sequence decoding constraint (e.g. a grammar): masks logits before the draw, follows the drawn token."""

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed tokens of a 1-D logits row to -inf, in place (before the sampling processors)."""

    def accept(self, token_id: int) -> None:
        """Advance by the token drawn for this sequence."""

    def done(self) -> bool:
        """True when the sequence is complete: it finishes with "stop"."""


ConstraintFactory = Callable[[], Constraint]  # called once per choice: each of n choices has its own state


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


class PromptError(ValueError):
    """The messages could not be turned into a prompt (bad role order, bad template argument...)."""


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
    still be held back (an incomplete character, a possible stop string) and arrive in a later delta."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


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
    for step in steps:
        for delta in step.choices:
            texts[delta.index] = texts.get(delta.index, "") + delta.text
            reasons[delta.index] = delta.finish_reason or reasons.get(delta.index)
            logprobs[delta.index] = logprobs.get(delta.index, ()) + delta.logprobs
    last = steps[-1]
    merged = [ChoiceDelta(i, texts[i], reasons[i], logprobs[i]) for i in texts]
    return StepOutput(merged, last.prompt_tokens, last.completion_tokens, last.finished)


@dataclass
class GenerationResult:
    """A finished request: full text and finish reason per choice, and token counts."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, when requested


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
    constraint: ConstraintFactory | None = None

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
        step = None
        async for step in self:
            for delta in step.choices:
                texts[delta.index] += delta.text
                logprobs[delta.index].extend(delta.logprobs)
                if delta.finish_reason:
                    reasons[delta.index] = delta.finish_reason
        return GenerationResult(texts, reasons, step.prompt_tokens, step.completion_tokens, logprobs)


class Engine:
    """A causal LM and its tokenizer behind a single worker thread and a bounded FIFO queue."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_model_len: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        if max_model_len is not None and not 0 < max_model_len <= context:
            raise ValueError(f"max_model_len must be between 1 and the model's max_position_embeddings ({context})")
        self.max_model_len = max_model_len or context
        self.eos_token_ids = self._eos_ids()
        self.sampling_defaults = self._generation_config_defaults()
        self._template_reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters)
        self.active: GenerationHandle | None = None  # the request the worker is generating right now
        self._traces: deque[RequestTrace] = deque(maxlen=TRACE_HISTORY)
        self._traces_lock = threading.Lock()
        self._jobs: queue.Queue[GenerationHandle | None] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._serve_forever, name="minimind-engine", daemon=True)
        self._worker.start()

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, device: str | None = None, dtype: str | None = None, **kwargs: Any
    ) -> Engine:
        """Load a model with ``minimind_course.loading.load_model`` (None = the bundled model) and wrap it."""
        from minimind_course.model.loading import load_model

        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    # ---- prompts -------------------------------------------------------------------------------------
    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages (and the tools the model may call) with the tokenizer's chat template, ending with the
        assistant generation prompt."""
        template_kwargs = dict(template_kwargs or {})
        clash = sorted(self._template_reserved & template_kwargs.keys())
        if clash:
            raise PromptError(f"chat_template_kwargs may not set {', '.join(clash)}")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=True, **template_kwargs
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
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        constraint: ConstraintFactory | None = None,
    ) -> GenerationHandle:
        """Queue a request (call from the event loop); raises EngineBusyError when the queue is full.
        ``constraint`` makes one ``Constraint`` per choice (grammar-constrained decoding)."""
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        handle = GenerationHandle(list(prompt_ids), params, asyncio.get_running_loop(), constraint=constraint)
        if request_id is not None:
            handle.request_id = request_id
        try:
            self._jobs.put_nowait(handle)
        except queue.Full:
            raise EngineBusyError(
                f"The server is busy: {self._jobs.maxsize} requests are already waiting. Retry shortly."
            ) from None
        return handle

    @property
    def queued(self) -> int:
        """Requests waiting for the worker (not counting the one it is running)."""
        return self._jobs.qsize()

    def traces(self) -> list[RequestTrace]:
        """The last ``TRACE_HISTORY`` requests the worker let go of, oldest first (how and when each ended)."""
        with self._traces_lock:
            return list(self._traces)

    def close(self) -> None:
        """Stop the worker after the request it is running; queued requests are dropped."""
        while True:
            try:
                self._jobs.get_nowait().cancel()
            except (queue.Empty, AttributeError):
                break
        self._jobs.put(None)
        self._worker.join(timeout=30)

    # ---- the worker thread ---------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        while (handle := self._jobs.get()) is not None:
            if handle.cancelled.is_set():  # its client left while it waited
                self._record(handle, "skipped", 0)
                continue
            self.active = handle
            outcome, tokens = "failed", 0
            try:
                outcome, tokens = self._generate(handle)
            except Exception as err:  # a bug or out-of-memory must not kill the worker
                handle.send(err)
            finally:
                self.active = None
                self._record(handle, outcome, tokens)

    def _record(self, handle: GenerationHandle, outcome: str, completion_tokens: int) -> None:
        cancelled_at = handle.cancelled_at if outcome in ("cancelled", "skipped") else None
        trace = RequestTrace(handle.request_id, outcome, completion_tokens, cancelled_at, time.monotonic())
        with self._traces_lock:
            self._traces.append(trace)

    @torch.inference_mode()
    def _generate(self, handle: GenerationHandle) -> tuple[str, int]:
        """Prefill the prompt once, then decode token by token with the KV cache until every choice ends.
        Returns "finished" or "cancelled" and the number of tokens generated."""
        params, prompt_len = handle.params, len(handle.prompt_ids)
        device = self.model.device
        sequences = torch.tensor([handle.prompt_ids] * params.n, dtype=torch.long, device=device)
        pipeline = build_logits_pipeline(params, prompt_len)
        generator = make_generator(params.seed, device)
        detokenizers = [IncrementalDetokenizer(self.tokenizer) for _ in range(params.n)]
        matchers = [StopStringMatcher(params.stop) for _ in range(params.n)]
        constraints = [handle.constraint() for _ in range(params.n)] if handle.constraint else None
        finish: list[str | None] = [None] * params.n
        generated = [0] * params.n

        out = self.model(input_ids=sequences, use_cache=True, logits_to_keep=1)
        while not handle.cancelled.is_set():
            logits = out.logits[:, -1, :]
            scores = logits
            if constraints:  # mask a copy: logprobs still report the model's own distribution
                scores = logits.float().clone()
                for i, constraint in enumerate(constraints):
                    if not finish[i]:
                        constraint.apply(scores[i])
            tokens = next_tokens(params, pipeline, sequences, scores, generator)
            logprobs = token_logprobs(logits, tokens, params.logprobs) if params.logprobs is not None else None
            sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            deltas = []
            for i, token in enumerate(tokens.tolist()):
                if finish[i]:
                    continue
                generated[i] += 1
                if constraints:
                    constraints[i].accept(token)
                text, finish[i] = self._advance(token, detokenizers[i], matchers[i], generated[i], params)
                if constraints and not finish[i] and constraints[i].done():
                    text += matchers[i].push(detokenizers[i].flush()) + matchers[i].flush()
                    finish[i] = "stop"
                if text or finish[i] or logprobs:
                    deltas.append(ChoiceDelta(i, text, finish[i], (logprobs[i],) if logprobs else ()))
            done = all(finish)
            handle.send(StepOutput(deltas, prompt_len, sum(generated), done))
            if done:
                return "finished", sum(generated)
            out = self.model(input_ids=tokens[:, None], past_key_values=out.past_key_values, use_cache=True)
        return "cancelled", sum(generated)

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
