"""Anthropic Messages' wire objects: a whole ``message``, or its named SSE events.

The stream is ``message_start`` (usage with the input tokens), then per content block ``content_block_start`` /
``content_block_delta`` (``thinking_delta``, ``text_delta``, ``input_json_delta``) / ``content_block_stop``, then
``message_delta`` (stop reason, stop sequence, output tokens) and ``message_stop``; a failure after the header is an
``error`` event. ``<think>`` becomes a thinking block, ``<tool_call>`` blocks become ``tool_use`` blocks. Every
object is the ``anthropic`` SDK's own type, so ``client.messages.stream`` accumulates exactly the whole message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta
from pydantic import BaseModel

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationResult, StepOutput
from minimind_course.serving.protocol_messages import anthropic_error_body
from minimind_course.serving.rendering import AnswerParser, Renderer, ResponseMeta
from minimind_course.serving.sse import sse
from minimind_course.serving.tool_parser import ParsedToolCall

TOOL_USE = "tool_use"


def stop_reason(engine_reason: str, stop_string: str | None, called: bool, cut_by_context: bool = False) -> str:
    """Anthropic's stop reason for how the engine ended the answer (``cut_by_context``: the length limit was the
    context window, a ``max_tokens`` beyond it having been clamped)."""
    if engine_reason == "length":
        return "model_context_window_exceeded" if cut_by_context else "max_tokens"
    if called:
        return TOOL_USE
    return "stop_sequence" if stop_string else "end_turn"


def tool_use_block(call: ParsedToolCall) -> ToolUseBlock:
    """A parsed call as a ``tool_use`` block (``toolu_`` ids, as Anthropic's)."""
    return ToolUseBlock(type="tool_use", id="toolu_" + call.id.removeprefix("call_"), name=call.name,
                        input=json.loads(call.arguments))


def event(model: BaseModel) -> str:
    """One named SSE event: its ``type`` is the event name."""
    return sse(model.model_dump_json(exclude_unset=True), event=model.type)


class MessagesRenderer(Renderer):
    """Engine output as Anthropic messages. ``tools``: parse ``<tool_call>`` blocks; ``parallel`` False keeps only
    the first call (``disable_parallel_tool_use``); ``max_tokens``: as requested (a shorter cut is the context's)."""

    def __init__(self, meta: ResponseMeta, input_tokens: int, thinking: bool, tools: bool, parallel: bool = True,
                 max_tokens: int | None = None):
        self.meta, self.input_tokens, self.thinking, self.max_tokens = meta, input_tokens, thinking, max_tokens
        self.tools, self.parallel = tools, parallel
        self.parser = AnswerParser(thinking, TOOL_USE if tools else None)
        self.blocks = 0  # content blocks started so far
        self.open: str | None = None  # the type of the block being streamed
        self.calls = 0
        self.reason: str | None = None
        self.stop_string: str | None = None

    def _kept(self, calls: list[ParsedToolCall], before: int = 0) -> list[ParsedToolCall]:
        return calls if self.parallel else calls[: max(0, 1 - before)]

    def _cut(self, output_tokens: int) -> bool:
        return self.max_tokens is not None and output_tokens < self.max_tokens

    def usage(self, output_tokens: int) -> Usage:
        return Usage(input_tokens=self.input_tokens, output_tokens=output_tokens, cache_creation_input_tokens=0,
                     cache_read_input_tokens=0, service_tier="standard")

    def message(self, content: list, reason: str | None, stop_string: str | None, output_tokens: int) -> Message:
        return Message(id=self.meta.id, type="message", role="assistant", model=self.meta.model, content=content,
                       stop_reason=reason, stop_sequence=stop_string, usage=self.usage(output_tokens))

    def response(self, result: GenerationResult) -> Message:
        """The whole message: a thinking block (if the model thought), a text block, then tool_use blocks."""
        parser = AnswerParser(self.thinking, TOOL_USE if self.tools else None)
        reasoning, content, calls = parser.push(result.texts[0], last=True)
        calls = self._kept(calls)
        blocks: list = [ThinkingBlock(type="thinking", thinking=reasoning, signature="")] if parser.thought else []
        if content or not (blocks or calls):  # an empty answer is one empty text block
            blocks.append(TextBlock(type="text", text=content))
        blocks += [tool_use_block(call) for call in calls]
        stop_string = result.stop_strings[0] if result.stop_strings else None
        reason = stop_reason(result.finish_reasons[0], stop_string, bool(calls), self._cut(result.completion_tokens))
        return self.message(blocks, reason, stop_string if reason == "stop_sequence" else None,
                            result.completion_tokens)

    # ---- the stream --------------------------------------------------------------------------------------------
    def start(self) -> Iterator[str]:
        yield event(RawMessageStartEvent(type="message_start", message=self.message([], None, None, 0)))

    def _open(self, block: BaseModel) -> Iterator[str]:
        yield from self._close()
        self.open = block.type
        yield event(RawContentBlockStartEvent(type="content_block_start", index=self.blocks, content_block=block))

    def _close(self) -> Iterator[str]:
        if self.open is not None:
            yield event(RawContentBlockStopEvent(type="content_block_stop", index=self.blocks))
            self.blocks += 1
            self.open = None

    def _delta(self, delta: BaseModel) -> str:
        return event(RawContentBlockDeltaEvent(type="content_block_delta", index=self.blocks, delta=delta))

    def step(self, out: EngineDelta) -> Iterator[str]:
        reasoning, content, calls = self.parser.push(out.text, last=bool(out.finish_reason))
        if reasoning:
            if self.open != "thinking":
                yield from self._open(ThinkingBlock(type="thinking", thinking="", signature=""))
            yield self._delta(ThinkingDelta(type="thinking_delta", thinking=reasoning))
        if content:
            if self.open != "text":
                yield from self._open(TextBlock(type="text", text=""))
            yield self._delta(TextDelta(type="text_delta", text=content))
        for call in self._kept(calls, self.calls):
            self.calls += 1
            yield from self._open(ToolUseBlock(type="tool_use", id="toolu_" + call.id.removeprefix("call_"),
                                               name=call.name, input={}))
            yield self._delta(InputJSONDelta(type="input_json_delta", partial_json=call.arguments))
            yield from self._close()
        if out.finish_reason:
            self.stop_string = out.stop_string
            self.reason = out.finish_reason

    def end(self, last: StepOutput | None) -> Iterator[str]:
        if self.blocks == 0 and self.open is None:  # an empty answer is one empty text block, as in ``response``
            yield from self._open(TextBlock(type="text", text=""))
        yield from self._close()
        output_tokens = last.completion_tokens if last else 0
        reason = stop_reason(self.reason or "stop", self.stop_string, bool(self.calls), self._cut(output_tokens))
        stop_string = self.stop_string if reason == "stop_sequence" else None
        usage = MessageDeltaUsage(input_tokens=self.input_tokens, output_tokens=output_tokens)
        yield event(RawMessageDeltaEvent(type="message_delta", usage=usage,
                                         delta=Delta(stop_reason=reason, stop_sequence=stop_string)))
        yield event(RawMessageStopEvent(type="message_stop"))

    def failure(self, message: str) -> Iterator[str]:
        yield sse(json.dumps(anthropic_error_body(500, message)), event="error")
