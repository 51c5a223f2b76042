"""What every protocol's renderer shares: the ``Renderer`` interface the shared stream path drives, response ids,
usage, logprob token text, and ``AnswerParser`` (one choice's text split into reasoning, content and tool calls).

A protocol adds one renderer (``render_chat``, ``render_completion``): ``response`` builds the whole object,
``start`` / ``step`` / ``end`` / ``failure`` write its SSE events (through ``sse.sse``). The objects are the SDKs'
own types, so strict clients parse them, and a streamed answer accumulates into exactly the non-streamed one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageToolCall, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from pydantic import BaseModel

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationResult, StepOutput, TokenLogprob
from minimind_course.serving.protocol import error_body
from minimind_course.serving.reasoning import ThinkParser
from minimind_course.serving.sse import DONE, sse
from minimind_course.serving.tool_parser import ParsedToolCall, ToolCallParser


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats: a unique id, the creation time, the served model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


class Renderer:
    """Engine output → one protocol's wire objects; the stream path calls start, step per choice delta, end."""

    def response(self, result: GenerationResult) -> BaseModel:
        """The whole (non-streamed) response object."""
        raise NotImplementedError

    def start(self) -> Iterator[str]:
        """Events sent before the model has produced anything (none by default)."""
        return iter(())

    def step(self, out: EngineDelta) -> Iterator[str]:
        """Events for one choice's new text."""
        raise NotImplementedError

    def end(self, last: StepOutput | None) -> Iterator[str]:
        """Closing events once generation ended (``last``: the final step with token counts, None if there was none)."""
        raise NotImplementedError

    def failure(self, message: str) -> Iterator[str]:
        """Events that report a failure after the 200 header was sent (it can only travel as an event)."""
        raise NotImplementedError


class ChunkRenderer(Renderer):
    """OpenAI's chunk streams (chat and completions): ``data:`` chunks, usage in a last chunk, then ``[DONE]``."""

    include_usage: bool = False

    def chunk(self, choices: list, usage_: CompletionUsage | None = None) -> str:
        """One ``data:`` frame holding ``choices`` (and ``usage_`` when given)."""
        raise NotImplementedError

    def end(self, last: StepOutput | None) -> Iterator[str]:
        if self.include_usage and last is not None:
            yield self.chunk([], usage(last.prompt_tokens, last.completion_tokens))
        yield DONE

    def failure(self, message: str) -> Iterator[str]:
        yield sse(json.dumps(error_body(500, message)))
        yield DONE


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


class TokenText:
    """Token strings and raw bytes for OpenAI's ``logprobs`` entries (``bytes`` shows split UTF-8 characters)."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet

    def token(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and all(char in self.byte_of for char in piece):
            raw = bytes(self.byte_of[char] for char in piece)
        else:  # not a byte-level token (e.g. SentencePiece): the decoded text is the best we have
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs(self, items: Sequence[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
        entries = []
        for item in items:
            token, raw = self.token(item.token_id)
            top = []
            for alt_id, alt_logprob in item.top:
                alt_token, alt_raw = self.token(alt_id)
                top.append(TopLogprob(token=alt_token, bytes=alt_raw, logprob=alt_logprob))
            entries.append(ChatCompletionTokenLogprob(token=token, bytes=raw, logprob=item.logprob, top_logprobs=top))
        return entries


class AnswerParser:
    """One choice's text, streamed or whole, split into reasoning, content and tool calls (when tools are on).

    ``call_finish`` None: no tool parsing; else the finish reason of an answer that made calls ("tool_calls", or
    "stop" for a call forced by name, as OpenAI and vLLM report it)."""

    def __init__(self, thinking: bool, call_finish: str | None = None):
        self.think = ThinkParser(thinking)
        self.tools = ToolCallParser() if call_finish else None
        self.call_finish = call_finish

    def push(self, piece: str, last: bool = False) -> tuple[str, str, list[ParsedToolCall]]:
        """(reasoning, content, completed calls) released by this piece; ``last`` flushes what was held back."""
        reasoning, content = self.think.push(piece)
        if last:
            tail = self.think.flush()
            reasoning, content = reasoning + tail[0], content + tail[1]
        if self.tools is None:
            return reasoning, content, []
        content, calls = self.tools.push(content)
        return reasoning, content + (self.tools.flush() if last else ""), calls

    @property
    def thought(self) -> bool:
        return self.think.thought

    def finish_reason(self, engine_reason: str) -> str:
        return self.call_finish if self.tools and self.tools.calls and engine_reason == "stop" else engine_reason


def tool_call_message(call: ParsedToolCall) -> ChatCompletionMessageToolCall:
    return ChatCompletionMessageToolCall.model_validate(call.to_openai())
