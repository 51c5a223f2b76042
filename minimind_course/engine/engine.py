"""The public ``Engine``: the thread-free ``EngineCore`` on one worker thread, fed from asyncio callers.

Every step is one forward pass over all running sequences (plus prompt chunks of newly admitted ones), so 16
users cost little more than one: a decode step reads every weight once whatever the batch size. A request joins
the batch at the next step once a seat (``max_num_seqs``) and KV blocks are free; a sequence that finishes, hits
a stop string or is cancelled leaves at once. A full queue is refused at once (the server turns that into HTTP
429). The worker never runs on the asyncio event loop, so the server keeps answering while the model works.

This module is only the bridge: ``submit`` checks a request and queues it, the worker thread moves queued
requests into the core, aborts cancelled ones, calls ``EngineCore.step()`` and hands each request's updates to
its ``GenerationHandle`` (``handle.py``) on the caller's event loop. The pieces, in nano-vllm's style, are
``core`` (the step), ``scheduler``, ``block_manager``, ``kv_cache``, ``runner``, ``sampler``,
``output_processor`` and ``sequence`` (requests as data).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minimind_course.engine.config import EngineConfig
from minimind_course.engine.core import EngineCore
from minimind_course.engine.errors import (
    ContextLengthError,
    EngineBusyError,
    PromptError,
    RequestTooLargeError,
    UnknownAdapterError,
)
from minimind_course.engine.handle import GenerationHandle, merge_steps
from minimind_course.engine.outputs import (
    ChoiceDelta,
    FinishedRequestStats,
    GenerationResult,
    RequestTrace,
    RequestUpdate,
    StepOutput,
    StepStats,
    TokenLogprob,
)
from minimind_course.engine.sampling import SamplingParams, generation_config_defaults
from minimind_course.engine.sequence import Constraint, EngineRequest

__all__ = [  # the engine's public names, importable from here wherever they live
    "ChoiceDelta", "ContextLengthError", "Engine", "EngineBusyError", "FinishedRequestStats", "GenerationHandle",
    "GenerationResult", "PromptError", "RequestTooLargeError", "RequestTrace", "StepOutput", "StepStats",
    "TokenLogprob", "UnknownAdapterError", "merge_steps",
]

logger = logging.getLogger(__name__)


class Engine:
    """A causal LM and its tokenizer behind one worker thread that batches all running requests."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_model_len: int | None = EngineConfig.max_model_len,
        max_queue: int = EngineConfig.max_queue,
        max_num_seqs: int = EngineConfig.max_num_seqs,
        kv_cache_memory: int = EngineConfig.kv_cache_memory,
        max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
        enable_prefix_caching: bool = EngineConfig.enable_prefix_caching,
    ):
        """``max_num_seqs``: sequences decoded together; ``kv_cache_memory``: bytes of keys/values (blocks of
        16 tokens); ``max_num_batched_tokens``: prompt tokens prefilled per step (longer prompts are chunked);
        ``enable_prefix_caching``: reuse the cached blocks of prompt prefixes seen before."""
        self.config = EngineConfig(max_model_len=max_model_len, max_queue=max_queue, max_num_seqs=max_num_seqs,
                                   kv_cache_memory=kv_cache_memory, max_num_batched_tokens=max_num_batched_tokens,
                                   enable_prefix_caching=enable_prefix_caching)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.core = EngineCore(self.model, tokenizer, self.config)
        self.max_model_len = self.core.max_model_len
        self.max_queue = max_queue
        self.kv_cache, self.block_manager = self.core.kv_cache, self.core.block_manager
        self.scheduler, self.runner = self.core.scheduler, self.core.runner
        self.eos_token_ids = self.core.output.eos_ids
        self.sampling_defaults = generation_config_defaults(model)
        self.stats_listeners: list[Callable[[StepStats], None]] = []
        self._template_reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters)
        self._handles: dict[str, GenerationHandle] = {}  # queued or running, by request id
        self._inbox: deque[GenerationHandle] = deque()  # submitted, not yet handed to the core; guarded by _wake
        self._traces: deque[RequestTrace] = deque(maxlen=self.config.trace_history)
        self._traces_lock = threading.Lock()
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
        vocab = getattr(self.model.config, "vocab_size", None)
        if vocab is not None and any(token >= vocab for token in params.logit_bias):
            raise ValueError(f"logit_bias names token ids outside the vocabulary (0..{vocab - 1})")
        self.core.check(len(prompt_ids), params)
        handle = GenerationHandle(list(prompt_ids), params, asyncio.get_running_loop(), constraint=constraint)
        handle.lora_id = self.lora_names.index(lora) if lora is not None else -1
        if request_id is not None:
            handle.request_id = request_id
        with self._wake:
            if handle.request_id in self._handles:
                raise ValueError(f"request id {handle.request_id!r} is already queued or running")
            if self.queued >= self.max_queue:
                raise EngineBusyError(
                    f"The server is busy: {self.max_queue} requests are already waiting. Retry shortly.")
            self._handles[handle.request_id] = handle
            self._inbox.append(handle)
            self._wake.notify()
        return handle

    @property
    def queued(self) -> int:
        """Requests waiting for a seat in the batch (not counting the running ones)."""
        return len(self._inbox) + len(self.core.waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running batch (a request with ``n`` choices counts once)."""
        return len(self.core.requests)

    @property
    def active(self) -> GenerationHandle | None:
        """A request the worker is generating right now (the oldest running one), None when idle."""
        running = list(self.core.requests)
        return self._handles.get(running[0]) if running else None

    def traces(self) -> list[RequestTrace]:
        """The last ``trace_history`` requests the worker let go of, oldest first (how and when each ended)."""
        with self._traces_lock:
            return list(self._traces)

    def close(self) -> None:
        """Stop the worker after its current step; queued and running requests end with an error."""
        with self._wake:
            for handle in list(self._handles.values()):
                handle.cancel()
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout=30)

    # ---- the worker thread ---------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        while self._take_new():
            for request_id, handle in list(self._handles.items()):
                if handle.cancelled.is_set():  # clients that left: queued ones free their place at once
                    self._deliver(self.core.abort(request_id))
            updates, stats = self.core.step()
            for update in updates:
                self._deliver(update)
            for listener in self.stats_listeners if stats is not None else ():
                try:
                    listener(stats)
                except Exception:  # a broken metrics listener must not end the requests
                    logger.exception("an engine stats listener failed")
        closed = RuntimeError("the engine was closed")  # nobody waits forever for a request that will not run
        for request_id in [*self.core.requests, *(queued.request_id for queued in self.core.waiting)]:
            self._deliver(self.core.abort(request_id, closed))
        for handle in self._inbox:
            self._deliver(RequestUpdate(handle.request_id, error=closed, outcome="skipped"))

    def _take_new(self) -> bool:
        """Wait until there is work; hand submitted requests to the core. False once ``close`` was called."""
        with self._wake:
            while not self._inbox and not self._closing and not self.core.has_work:
                self._wake.wait()
            if self._closing:
                return False
            while self._inbox:
                handle = self._inbox.popleft()
                self.core.add(EngineRequest(handle.request_id, handle.prompt_ids, handle.params, handle.constraint,
                                            handle.lora_id, handle.arrived))
            return True

    def _deliver(self, update: RequestUpdate | None) -> None:
        """Hand one update to its caller; a request that left is traced and forgotten first."""
        handle = self._handles.get(update.request_id) if update is not None else None
        if handle is None:
            return
        if update.outcome is not None:
            del self._handles[update.request_id]
            cancelled_at = handle.cancelled_at if update.outcome in ("cancelled", "skipped") else None
            trace = RequestTrace(handle.request_id, update.outcome, update.completion_tokens, cancelled_at,
                                 time.monotonic())
            with self._traces_lock:
                self._traces.append(trace)
        if update.output is not None:
            handle.send(update.output)
        if update.error is not None:
            handle.send(update.error)
