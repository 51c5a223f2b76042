"""From generation output to a Responses ``Response`` and its event stream, built from the openai SDK's own types.

``ResponseBuilder`` grows one response's output items from the engine's text pieces: ``<think>`` text becomes a
``reasoning`` item, answer text a ``message`` item, each ``<tool_call>`` block a ``function_call`` item (the same
``AnswerParser`` as chat). Every change is also an event with its ``sequence_number``, so the stream and the whole
response are one path: a streamed answer accumulates into exactly the non-streamed ``Response``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from openai.types.responses import (
    FunctionTool,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextConfig,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_reasoning_item import Content as ReasoningText
from openai.types.shared import Reasoning
from pydantic import BaseModel

from minimind_course.engine.engine import ChoiceDelta as EngineDelta
from minimind_course.engine.engine import GenerationResult, StepOutput
from minimind_course.serving.rendering import AnswerParser, Renderer
from minimind_course.serving.protocol_responses import JsonSchemaFormat, ResponsesRequest
from minimind_course.serving.sse import sse
from minimind_course.serving.tool_parser import ParsedToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def new_response(body: ResponsesRequest, model: str) -> Response:
    """The response a request will fill (``in_progress``, no output yet), echoing the settings it runs with."""
    named = body.named_choice()
    fmt = body.text.format if body.text and body.text.format else None
    text_format = fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
    if isinstance(fmt, JsonSchemaFormat):
        text_format["schema"] = fmt.schema_
    return Response(
        id=new_id("resp"), object="response", created_at=int(time.time()), model=model, status="in_progress",
        output=[], instructions=body.instructions, metadata=body.metadata or {}, error=None, incomplete_details=None,
        parallel_tool_calls=body.parallel_tool_calls is not False, temperature=body.temperature, top_p=body.top_p,
        tool_choice={"type": "function", "name": named.name} if named else (body.tool_choice or "auto"),
        tools=[FunctionTool.model_validate(tool.model_dump(exclude_none=True)) for tool in body.function_tools],
        text=ResponseTextConfig.model_validate({"format": text_format}), max_output_tokens=body.max_output_tokens,
        previous_response_id=body.previous_response_id, truncation="disabled", usage=None, user=body.user,
        reasoning=Reasoning.model_validate(body.reasoning.model_dump(exclude_none=True)) if body.reasoning else None,
        service_tier="default", background=False, safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
    )


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> ResponseUsage:
    return ResponseUsage.model_validate({
        "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt_tokens + completion_tokens})


class ResponseBuilder:
    """One response's items and events: ``start``, ``push`` each piece of text, then ``finish`` (or ``fail``).

    ``count_tokens`` measures the reasoning text for ``usage.output_tokens_details.reasoning_tokens``."""

    def __init__(self, response: Response, thinking: bool, tools: bool, count_tokens: Callable[[str], int]):
        self.response = response
        self.parser = AnswerParser(thinking, "tool_calls" if tools else None)
        self.count_tokens = count_tokens
        self.sequence = 0
        self.open: ResponseOutputMessage | ResponseReasoningItem | None = None  # the item text is flowing into
        self.reasoning_text = ""

    # ---- events ------------------------------------------------------------------------------------------
    def _event(self, kind: type[BaseModel], type_: str, **fields: Any) -> BaseModel:
        event = kind(type=type_, sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    def _snapshot(self) -> Response:
        return self.response.model_copy(deep=True)

    def start(self) -> list[BaseModel]:
        return [self._event(ResponseCreatedEvent, "response.created", response=self._snapshot()),
                self._event(ResponseInProgressEvent, "response.in_progress", response=self._snapshot())]

    # ---- items -------------------------------------------------------------------------------------------
    def _add(self, item: BaseModel) -> list[BaseModel]:
        self.response.output.append(item)
        return [self._event(ResponseOutputItemAddedEvent, "response.output_item.added", item=item.model_copy(deep=True),
                            output_index=len(self.response.output) - 1)]

    def _open(self, kind: str) -> list[BaseModel]:
        """Open a reasoning or message item with one empty content part (closing the other kind first)."""
        if self.open is not None and self.open.type == kind:
            return []
        events = self._close("completed")
        if kind == "reasoning":
            self.open = ResponseReasoningItem(id=new_id("rs"), type="reasoning", summary=[], content=[],
                                              status="in_progress")
            part: BaseModel = ReasoningText(type="reasoning_text", text="")
        else:
            self.open = ResponseOutputMessage(id=new_id("msg"), type="message", role="assistant", content=[],
                                              status="in_progress")
            part = ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[])
        events += self._add(self.open)
        self.open.content.append(part)
        events.append(self._event(ResponseContentPartAddedEvent, "response.content_part.added",
                                  item_id=self.open.id, output_index=len(self.response.output) - 1, content_index=0,
                                  part=part.model_dump()))
        return events

    def _delta(self, text: str) -> list[BaseModel]:
        item, index = self.open, len(self.response.output) - 1
        item.content[0].text += text
        if item.type == "reasoning":
            self.reasoning_text += text
            return [self._event(ResponseReasoningTextDeltaEvent, "response.reasoning_text.delta", item_id=item.id,
                                output_index=index, content_index=0, delta=text)]
        return [self._event(ResponseTextDeltaEvent, "response.output_text.delta", item_id=item.id, output_index=index,
                            content_index=0, delta=text, logprobs=[])]

    def _close(self, status: str) -> list[BaseModel]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, part = len(self.response.output) - 1, item.content[0]
        if item.type == "reasoning":
            events = [self._event(ResponseReasoningTextDoneEvent, "response.reasoning_text.done", item_id=item.id,
                                  output_index=index, content_index=0, text=part.text)]
        else:
            events = [self._event(ResponseTextDoneEvent, "response.output_text.done", item_id=item.id,
                                  output_index=index, content_index=0, text=part.text, logprobs=[])]
        events.append(self._event(ResponseContentPartDoneEvent, "response.content_part.done", item_id=item.id,
                                  output_index=index, content_index=0, part=part.model_dump()))
        item.status = status
        events.append(self._event(ResponseOutputItemDoneEvent, "response.output_item.done",
                                  item=item.model_copy(deep=True), output_index=index))
        return events

    def _call(self, call: ParsedToolCall) -> list[BaseModel]:
        events = self._close("completed")
        item = ResponseFunctionToolCall(id=new_id("fc"), type="function_call", call_id=call.id, name=call.name,
                                        arguments="", status="in_progress")
        events += self._add(item)
        index = len(self.response.output) - 1
        item.arguments, item.status = call.arguments, "completed"
        events += [
            self._event(ResponseFunctionCallArgumentsDeltaEvent, "response.function_call_arguments.delta",
                        item_id=item.id, output_index=index, delta=call.arguments),
            self._event(ResponseFunctionCallArgumentsDoneEvent, "response.function_call_arguments.done",
                        item_id=item.id, output_index=index, name=call.name, arguments=call.arguments),
            self._event(ResponseOutputItemDoneEvent, "response.output_item.done", item=item.model_copy(deep=True),
                        output_index=index),
        ]
        return events

    # ---- the generation ----------------------------------------------------------------------------------
    def push(self, piece: str, last: bool = False) -> list[BaseModel]:
        """Events for one piece of generated text (``last``: the parsers release what they held back)."""
        reasoning, content, calls = self.parser.push(piece, last=last)
        events = []
        if reasoning:
            events += self._open("reasoning") + self._delta(reasoning)
        if content:
            events += self._open("message") + self._delta(content)
        for call in calls:
            events += self._call(call)
        return events

    def finish(self, engine_reason: str, prompt_tokens: int, completion_tokens: int) -> list[BaseModel]:
        """Close the open item and the response: ``completed``, or ``incomplete`` when the token budget ran out."""
        cut = engine_reason == "length"
        events = []
        if not any(item.type in ("message", "function_call") for item in self.response.output):
            events += self._open("message")  # an empty answer is still a message, as OpenAI sends it
        events += self._close("incomplete" if cut else "completed")
        reasoning_tokens = self.count_tokens(self.reasoning_text) if self.reasoning_text else 0
        self.response.usage = usage(prompt_tokens, completion_tokens, min(reasoning_tokens, completion_tokens))
        self.response.completed_at = None if cut else int(time.time())
        if cut:
            self.response.status = "incomplete"
            self.response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            return events + [self._event(ResponseIncompleteEvent, "response.incomplete", response=self._snapshot())]
        self.response.status = "completed"
        return events + [self._event(ResponseCompletedEvent, "response.completed", response=self._snapshot())]

    def fail(self, message: str) -> list[BaseModel]:
        """Generation broke after the stream began: an ``error`` event, then ``response.failed``."""
        events = self._close("incomplete")
        self.response.status = "failed"
        self.response.error = ResponseError(code="server_error", message=message)
        return events + [self._event(ResponseErrorEvent, "error", code="server_error", message=message, param=None),
                         self._event(ResponseFailedEvent, "response.failed", response=self._snapshot())]


class ResponsesRenderer(Renderer):
    """The engine's output as Responses events (SSE frames named by type) or as one ``Response``; ``keep`` is
    called with every finished response (the store)."""

    def __init__(self, builder: ResponseBuilder, keep: Callable[[Response], None] | None = None):
        self.builder, self.keep = builder, keep
        self.finish_reason = "stop"

    def response(self, result: GenerationResult) -> Response:
        self.builder.push(result.texts[0], last=True)
        self.builder.finish(result.finish_reasons[0], result.prompt_tokens, result.completion_tokens)
        return self._kept()

    def start(self) -> Iterator[str]:
        return _frames(self.builder.start())

    def step(self, out: EngineDelta) -> Iterator[str]:
        self.finish_reason = out.finish_reason or self.finish_reason
        return _frames(self.builder.push(out.text, last=bool(out.finish_reason)))

    def end(self, last: StepOutput | None) -> Iterator[str]:
        prompt_tokens, completion_tokens = (last.prompt_tokens, last.completion_tokens) if last else (0, 0)
        events = self.builder.finish(self.finish_reason, prompt_tokens, completion_tokens)
        self._kept()
        return _frames(events)

    def failure(self, message: str) -> Iterator[str]:
        return _frames(self.builder.fail(message))

    def _kept(self) -> Response:
        if self.keep is not None:
            self.keep(self.builder.response)
        return self.builder.response


def _frames(events: list[BaseModel]) -> Iterator[str]:
    """Each event as an SSE frame whose ``event:`` line is its type, as OpenAI sends them."""
    for event in events:
        yield sse(event.model_dump_json(exclude_unset=True), event.type)
