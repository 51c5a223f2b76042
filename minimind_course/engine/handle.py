"""The asyncio side of a request: the worker thread hands steps to the caller's event loop through its handle."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from minimind_course.engine.outputs import ChoiceDelta, GenerationResult, StepOutput, TokenLogprob
from minimind_course.engine.sampling import SamplingParams
from minimind_course.engine.sequence import Constraint


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
