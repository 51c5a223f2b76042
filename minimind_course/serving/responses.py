"""From engine output to OpenAI objects: whole responses, and the SSE stream written by hand (the course teaches it).

Chat and legacy completions share one stream path (``sse_stream``); what differs is how a step of one choice is
rendered (``ChatRenderer``: role first, ``<think>`` split into ``reasoning_content``, ``<tool_call>`` blocks into
``tool_calls`` deltas, logprobs; ``CompletionRenderer``: plain text). The objects are the openai SDK's own types, so
strict clients parse them, and a streamed answer accumulates into exactly the non-streamed message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat import ChatCompletionMessageToolCall
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationHandle, GenerationResult, TokenLogprob
from minimind_course.serving.protocol import error_body
from minimind_course.serving.reasoning import ThinkParser
from minimind_course.serving.tool_parser import ParsedToolCall, ToolCallParser

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def sse(payload: str) -> str:
    """One Server-Sent Event: a ``data:`` line and a blank line. JSON has no raw newlines, so one line does."""
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats: a unique id, the creation time, the served model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


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


# ---- one choice's text -----------------------------------------------------------------------------------
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


# ---- whole responses -------------------------------------------------------------------------------------
def chat_completion(result: GenerationResult, meta: ResponseMeta, thinking: bool, tokens: TokenText | None,
                    call_finish: str | None = None) -> ChatCompletion:
    """A ``chat.completion``: one message per choice, ``<think>`` split off as ``reasoning_content``, tool calls
    parsed into ``tool_calls`` (then an empty content is null, as OpenAI sends it)."""
    choices = []
    for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons)):
        parser = AnswerParser(thinking, call_finish)
        reasoning, content, calls = parser.push(text, last=True)
        fields = {"role": "assistant", "content": content}
        if parser.thought:
            fields.update(content=content or None, reasoning_content=reasoning)
        if call_finish:
            fields["content"] = content or None
        if calls:
            fields["tool_calls"] = [tool_call_message(call) for call in calls]
        message = ChatCompletionMessage(**fields)
        logprobs = ChoiceLogprobs(content=tokens.logprobs(result.logprobs[i])) if tokens else None
        choices.append(Choice(index=i, message=message, logprobs=logprobs, finish_reason=parser.finish_reason(reason)))
    return ChatCompletion(id=meta.id, object="chat.completion", created=meta.created, model=meta.model,
                          choices=choices, usage=usage(result.prompt_tokens, result.completion_tokens))


def completion(result: GenerationResult, meta: ResponseMeta) -> Completion:
    """A ``text_completion`` for ``/v1/completions``."""
    choices = [CompletionChoice(index=i, text=text, logprobs=None, finish_reason=reason)
               for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
    return Completion(id=meta.id, object="text_completion", created=meta.created, model=meta.model,
                      choices=choices, usage=usage(result.prompt_tokens, result.completion_tokens))


# ---- the stream ------------------------------------------------------------------------------------------
def delta_choice(index: int, delta: ChoiceDelta, finish_reason: str | None = None) -> ChunkChoice:
    """A chunk's choice with ``logprobs`` and ``finish_reason`` always present (null until the end), as OpenAI sends."""
    return ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=finish_reason)


class ChatRenderer:
    """Chat chunks: a role chunk per choice, text deltas (reasoning split, logprobs), tool-call deltas (the first of
    each call with index, id, type and name; then its arguments under the same index), a finish chunk per choice."""

    def __init__(self, meta: ResponseMeta, include_usage: bool, n: int, thinking: bool, tokens: TokenText | None,
                 call_finish: str | None = None):
        self.meta, self.include_usage, self.n, self.tokens = meta, include_usage, n, tokens
        self.call_finish = call_finish
        self.parsers = [AnswerParser(thinking, call_finish) for _ in range(n)]

    def chunk(self, choices: list[ChunkChoice], usage_: CompletionUsage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.meta.id, object="chat.completion.chunk", created=self.meta.created,
                                    model=self.meta.model, choices=choices)
        if self.include_usage:  # OpenAI: with include_usage every chunk has a usage field, null but on the last
            chunk.usage = usage_
        return sse(chunk.model_dump_json(exclude_unset=True))

    def start(self) -> Iterator[str]:
        for i in range(self.n):  # with tools, content stays null until text comes (it may be calls only)
            delta = ChoiceDelta(role="assistant") if self.call_finish else ChoiceDelta(role="assistant", content="")
            yield self.chunk([delta_choice(i, delta)])

    def step(self, out: EngineDelta) -> Iterator[str]:
        parser = self.parsers[out.index]
        reasoning, content, calls = parser.push(out.text, last=bool(out.finish_reason))
        if reasoning or content or (self.tokens and out.logprobs):
            delta = ChoiceDelta(reasoning_content=reasoning) if reasoning else ChoiceDelta()
            if content or not (reasoning or self.call_finish):  # with tools an empty content stays null
                delta.content = content
            choice = delta_choice(out.index, delta)
            if self.tokens:  # the tokens of this step; their text may come in a later chunk (held back)
                choice.logprobs = ChunkChoiceLogprobs(content=self.tokens.logprobs(out.logprobs))
            yield self.chunk([choice])
        for call in calls:
            head = ChoiceDeltaToolCall(index=call.index, id=call.id, type="function",
                                       function=ChoiceDeltaToolCallFunction(name=call.name, arguments=""))
            body = ChoiceDeltaToolCall(index=call.index, function=ChoiceDeltaToolCallFunction(arguments=call.arguments))
            for part in (head, body):
                yield self.chunk([delta_choice(out.index, ChoiceDelta(tool_calls=[part]))])
        if out.finish_reason:
            yield self.chunk([delta_choice(out.index, ChoiceDelta(), parser.finish_reason(out.finish_reason))])

    def usage(self, usage_: CompletionUsage) -> str:
        return self.chunk([], usage_)


class CompletionRenderer:
    """Legacy completion chunks: the text of each step, with its finish reason on the last."""

    def __init__(self, meta: ResponseMeta, include_usage: bool):
        self.meta, self.include_usage = meta, include_usage

    def chunk(self, choices: list[CompletionChoice], usage_: CompletionUsage | None = None) -> str:
        chunk = Completion(id=self.meta.id, object="text_completion", created=self.meta.created,
                           model=self.meta.model, choices=choices)
        if self.include_usage:
            chunk.usage = usage_
        return sse(chunk.model_dump_json(exclude_unset=True))

    def start(self) -> Iterator[str]:
        return iter(())

    def step(self, out: EngineDelta) -> Iterator[str]:
        yield self.chunk([CompletionChoice.model_construct(index=out.index, text=out.text, logprobs=None,
                                                           finish_reason=out.finish_reason)])

    def usage(self, usage_: CompletionUsage) -> str:
        return self.chunk([], usage_)


async def sse_stream(handle: GenerationHandle, renderer: ChatRenderer | CompletionRenderer) -> AsyncIterator[str]:
    """The event sequence: the renderer's opening chunks, one or more per engine step, usage, then ``[DONE]``."""
    for event in renderer.start():
        yield event
    try:
        step = None
        async for step in handle:
            for out in step.choices:
                for event in renderer.step(out):
                    yield event
        if renderer.include_usage and step is not None:
            yield renderer.usage(usage(step.prompt_tokens, step.completion_tokens))
    except Exception as err:  # once the 200 header is sent, an error can only travel as an event
        yield sse(json.dumps(error_body(500, f"generation failed: {type(err).__name__}: {err}")))
    yield SSE_DONE
