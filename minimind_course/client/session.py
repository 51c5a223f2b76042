"""ChatSession: a conversation with any OpenAI-compatible server (ours, vLLM), built on the official SDK.

The server is stateless, so the session keeps the conversation and sends a window of it with every question
(see :mod:`minimind_course.client.history`). Streaming yields content and ``reasoning_content`` deltas, skips the
final usage chunk (``choices == []``) after recording its token counts, and stores the pair only once the
answer is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from openai import OpenAI
from openai.types import CompletionUsage

from minimind_course.client.history import (
    Message,
    PromptTooLongError,
    QAPair,
    TokenCounter,
    build_window,
    estimate_tokens,
    messages_to_pairs,
    pairs_to_messages,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8998/v1"
DEFAULT_MODEL = "minimind"
DEFAULT_API_KEY = "EMPTY"  # local servers accept any key; the SDK only insists that there is one
DEFAULT_HISTORY_PAIRS = 3


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed answer: visible text and/or reasoning text (either may be empty)."""

    content: str = ""
    reasoning_content: str = ""


@dataclass(frozen=True)
class Reply:
    """A finished answer, with what was sent to get it."""

    content: str
    reasoning_content: str
    finish_reason: str | None
    usage: CompletionUsage | None
    sent: list[Message]


def _reasoning(part: Any) -> str:
    """Reasoning text of a message or delta: ``reasoning_content`` (DeepSeek, ours) or ``reasoning`` (newer vLLM)."""
    return getattr(part, "reasoning_content", None) or getattr(part, "reasoning", None) or ""


class ChatSession:
    """One conversation: holds the pairs, builds the window, asks the server, records answers and usage.

    ``options`` go to every ``chat.completions.create`` call (``temperature``, ``max_tokens``, ``seed``, ...);
    ``timeout`` and ``max_retries`` configure the SDK client made here when no ``client`` is given.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        api_key: str = DEFAULT_API_KEY,
        *,
        system: str | None = None,
        max_pairs: int | None = DEFAULT_HISTORY_PAIRS,
        max_history_tokens: int | None = None,
        count_tokens: TokenCounter = estimate_tokens,
        client: OpenAI | None = None,
        timeout: float = 600.0,
        max_retries: int = 2,
        **options: Any,
    ) -> None:
        self.client = client or OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.model = model
        self.system = system
        self.max_pairs = max_pairs
        self.max_history_tokens = max_history_tokens
        self.count_tokens = count_tokens
        self.options = options
        self.pairs: list[QAPair] = []
        self.last_reply: Reply | None = None
        self.total_usage = CompletionUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)

    @property
    def messages(self) -> list[Message]:
        """The whole conversation so far as OpenAI messages (more than is sent when the window is small)."""
        return pairs_to_messages(self.pairs, self.system)

    def window(self, question: str) -> list[Message]:
        """The messages that asking ``question`` now would send."""
        return build_window(
            question,
            self.pairs,
            system=self.system,
            max_pairs=self.max_pairs,
            max_tokens=self.max_history_tokens,
            count_tokens=self.count_tokens,
        )

    def carried_pairs(self, question: str = "") -> int:
        """How many of the stored pairs asking ``question`` would carry (0 when even it does not fit)."""
        try:
            return len(messages_to_pairs(self.window(question)[:-1])[1])
        except PromptTooLongError:
            return 0

    def stream(self, question: str) -> Iterator[Delta]:
        """Ask with streaming and yield deltas; the pair is recorded when the stream ends (not if abandoned)."""
        sent = self.window(question)
        content: list[str] = []
        reasoning: list[str] = []
        finish_reason = None
        usage = None
        response = self.client.chat.completions.create(
            model=self.model,
            messages=sent,
            stream=True,
            stream_options={"include_usage": True},
            **self.options,
        )
        with response:  # closing early (break, exception) closes the connection, so the server stops generating
            for chunk in response:
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:  # the usage chunk: no choices at all
                    continue
                choice = chunk.choices[0]
                finish_reason = choice.finish_reason or finish_reason
                delta = Delta(choice.delta.content or "", _reasoning(choice.delta))
                if delta.content or delta.reasoning_content:
                    content.append(delta.content)
                    reasoning.append(delta.reasoning_content)
                    yield delta
        self._record(question, Reply("".join(content), "".join(reasoning), finish_reason, usage, sent))

    def ask(self, question: str, *, stream: bool = True, on_delta: Callable[[Delta], None] | None = None) -> Reply:
        """Ask and return the finished reply; with ``stream`` each delta also goes to ``on_delta``."""
        if stream:
            for delta in self.stream(question):
                if on_delta is not None:
                    on_delta(delta)
            assert self.last_reply is not None
            return self.last_reply
        sent = self.window(question)
        completion = self.client.chat.completions.create(model=self.model, messages=sent, **self.options)
        choice = completion.choices[0]
        reply = Reply(
            choice.message.content or "", _reasoning(choice.message), choice.finish_reason, completion.usage, sent
        )
        self._record(question, reply)
        return reply

    def _record(self, question: str, reply: Reply) -> None:
        self.pairs.append(QAPair(question, reply.content))
        self.last_reply = reply
        if reply.usage is not None:
            self.total_usage = CompletionUsage(
                prompt_tokens=self.total_usage.prompt_tokens + reply.usage.prompt_tokens,
                completion_tokens=self.total_usage.completion_tokens + reply.usage.completion_tokens,
                total_tokens=self.total_usage.total_tokens + reply.usage.total_tokens,
            )

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.pairs = []
        self.last_reply = None

    def save(self, path: str | PathLike[str]) -> None:
        """Write the conversation as a JSON list of OpenAI messages (UTF-8, Chinese kept readable)."""
        text = json.dumps(self.messages, ensure_ascii=False, indent=2)
        Path(path).write_text(text + "\n", encoding="utf-8")

    def load(self, path: str | PathLike[str]) -> None:
        """Replace the conversation with one saved by :meth:`save`; its system prompt wins when it has one."""
        messages = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{path}: expected a JSON list of chat messages")
        system, self.pairs = messages_to_pairs(messages)
        self.system = system if system is not None else self.system
        self.last_reply = None
