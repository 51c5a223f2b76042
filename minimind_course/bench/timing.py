"""One timed streaming chat request, the single definition every benchmark driver uses.

* **TTFT**: from sending the request to the first chunk that carries text, content *or* reasoning
  (a MiniMind-3 answer starts inside ``<think>``, and that text is the first token the user could see).
* **Latency**: from sending to the end of the stream (``[DONE]``).
* **ITL**: inter-token latency *per token*, ``(latency - TTFT) / (completion_tokens - 1)`` with the server's own
  token count (``stream_options.include_usage``). Per chunk would mislead: a server may send several tokens in one
  chunk (vLLM on CPU streams in bursts; ours merges steps for a slow reader), so chunk gaps are not token gaps.

The openai SDK parses the stream (and raises on an ``error`` event), so no driver parses SSE by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import openai


@dataclass(frozen=True)
class TimedStream:
    """One streamed request as the client saw it; times in seconds from when it was sent."""

    ok: bool
    ttft: float | None = None
    latency: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    request_id: str = ""
    chunks: int = 0  # chunks that carried text
    left_at: float | None = None  # time.monotonic() when the client hung up on purpose (``leave_after``)
    error: str | None = None

    @property
    def itl(self) -> float | None:
        """Mean time between output tokens after the first (None with fewer than two tokens)."""
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: how a failed request is reported."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


async def timed_stream(client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int, *,
                       ignore_eos: bool = False, leave_after: int | None = None) -> TimedStream:
    """Stream one greedy chat completion and time it; failures become ``ok=False`` with the error's first line.

    ``leave_after=k`` closes the connection after k text chunks, as a user closing the tab (a disconnect test)."""
    sent = time.perf_counter()
    ttft, usage, text, chunks, finish, request_id = None, None, "", 0, None, ""
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True} if ignore_eos else None,
        )  # fmt: skip
        async with stream:
            async for chunk in stream:
                request_id = chunk.id
                usage = chunk.usage or usage
                for choice in chunk.choices:  # the usage chunk has no choices
                    piece = (getattr(choice.delta, "reasoning_content", None) or "") + (choice.delta.content or "")
                    if piece:
                        text, chunks = text + piece, chunks + 1
                        ttft = ttft if ttft is not None else time.perf_counter() - sent
                    finish = choice.finish_reason or finish
                if leave_after is not None and chunks >= leave_after:
                    return TimedStream(True, ttft, time.perf_counter() - sent, text=text, request_id=request_id,
                                       chunks=chunks, left_at=time.monotonic())  # leaving closes the connection
        latency = time.perf_counter() - sent
    except (openai.OpenAIError, OSError) as err:
        return TimedStream(False, request_id=request_id, text=text, error=first_line(err))
    if usage is None:
        return TimedStream(False, error="the stream carried no usage (stream_options.include_usage ignored)")
    if ttft is None:
        return TimedStream(False, error="the answer was empty")
    return TimedStream(True, ttft, latency, usage.prompt_tokens, usage.completion_tokens, text, finish, request_id,
                       chunks)
