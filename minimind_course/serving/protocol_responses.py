"""The Responses API request (``POST /v1/responses``) and its conversion into the chat form the engine serves.

A Responses request is a conversation like a chat request: ``instructions`` and the ``input`` items (messages, the
model's earlier function calls and their outputs) become chat messages, function tools become chat tools,
``text.format`` the output schema, ``max_output_tokens`` the token budget. A field the openai SDK knows that this
server cannot honour is a 400 naming it; so is an item, content part or tool type it cannot serve.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from openai.types.responses.response_create_params import ResponseCreateParamsBase
from pydantic import BaseModel, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from minimind_course.serving.protocol import (
    FunctionName,
    JsonObjectFormat,
    OpenAIError,
    ParamError,
    Schema,
    Text,
    TextFormat,
    _Request,
)

SDK_FIELDS = frozenset(ResponseCreateParamsBase.__annotations__) | {"stream"}  # every field the installed SDK sends
HONOURED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "max_output_tokens",
    "temperature", "top_p", "store", "previous_response_id", "stream", "stream_options", "reasoning", "metadata",
    "include", "truncation", "top_logprobs", "background", "service_tier", "user", "safety_identifier",
    "prompt_cache_key",
})
INCLUDABLE = frozenset({"reasoning.encrypted_content"})  # answered: reasoning items carry their text, not a cipher
METADATA_LIMITS = (16, 64, 512)  # OpenAI's: keys per object, characters per key, characters per value
TEXT_ONLY = "this server's model reads text only"
NAME = re.compile(r"^(\w+|\d+)$")  # a field name or list index in an error location (not a union branch's tag)


# ---- input items ----------------------------------------------------------------------------------------------
class TextPart(_Request):
    """``input_text`` (what users write), ``output_text`` (an earlier answer sent back; annotations and logprobs
    describe it and are not shown to the model) or ``refusal``."""

    type: Literal["input_text", "output_text", "refusal"]
    text: Text = ""
    refusal: Text = ""

    def value(self) -> str:
        return self.refusal if self.type == "refusal" else self.text


def _content(parts: Any, where: str) -> list[TextPart]:
    """Text parts of a message or a function output; an image, file or audio part is a 400 naming it."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise ParamError(f"{where}.{j}.type", f"{where}.{j}: `{kind}` parts are not supported: {TEXT_ONLY}")
        out.append(_parse(TextPart, part, f"{where}.{j}"))
    return out


class MessageItem(_Request):
    """A message: ``content`` a string or text parts; ``developer`` is what newer clients call ``system``."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[dict[str, Any]]
    _parts: list[TextPart] | None = PrivateAttr(None)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.value() for part in self._parts or [])


class FunctionCallItem(_Request):
    """A call the model made in an earlier turn (sent back by the client, or kept by the store)."""

    type: Literal["function_call"]
    call_id: Text = Field(min_length=1)
    name: FunctionName
    arguments: Text


class FunctionCallOutputItem(_Request):
    """What the client's function returned for ``call_id``: a string, or text parts."""

    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1)
    output: Text | list[dict[str, Any]]
    _parts: list[TextPart] | None = PrivateAttr(None)

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "\n".join(part.value() for part in self._parts or [])


class ReasoningItem(_Request):
    """An earlier turn's reasoning, sent back by agent clients: accepted, not shown to the model (chat templates
    drop earlier turns' thinking too)."""

    type: Literal["reasoning"]


ITEM_TYPES: dict[str, type[_Request]] = {"message": MessageItem, "function_call": FunctionCallItem,
                                          "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}
InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


def _parse(model: type[BaseModel], value: Any, where: str):
    """Validate ``value`` as ``model``; the first error becomes a 400 naming the exact place (``input.2.call_id``)."""
    try:
        return TypeAdapter(model).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join([where, *(str(part) for part in first["loc"] if NAME.match(str(part)))])
        raise ParamError(loc, f"{loc}: {str(first['msg']).removeprefix('Value error, ')}") from None


def parse_item(raw: Any, i: int) -> InputItem:
    """One ``input`` item by its ``type`` (a message may omit it); any other type is a 400 naming it."""
    where = f"input.{i}"
    if not isinstance(raw, dict):
        raise ParamError(where, f"{where}: an input item must be an object")
    kind = raw.get("type", "message" if "role" in raw else None)
    if kind not in ITEM_TYPES:
        known = ", ".join(ITEM_TYPES)
        raise ParamError(f"{where}.type", f"{where}.type: item type `{kind}` is not supported (supported: {known})")
    item = _parse(ITEM_TYPES[kind], raw, where)
    if isinstance(item, MessageItem) and isinstance(item.content, list):
        item._parts = _content(item.content, f"{where}.content")
    if isinstance(item, FunctionCallOutputItem) and isinstance(item.output, list):
        item._parts = _content(item.output, f"{where}.output")
    return item


# ---- tools, tool choice, text format ---------------------------------------------------------------------------
class FunctionTool(_Request):
    """A function the model may call (Responses puts name and parameters at the top level, not under ``function``)."""

    type: Literal["function"]
    name: FunctionName
    description: Text | None = None
    parameters: Schema | None = None
    strict: bool | None = None

    def for_chat(self) -> dict[str, Any]:
        """The chat form, ``{"type": "function", "function": {...}}``."""
        function = self.model_dump(exclude_none=True, exclude={"type"})
        return {"type": "function", "function": function}


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: Text


class JsonSchemaFormat(_Request):
    """``text.format`` json_schema: Responses puts name and schema at the top level of the format."""

    type: Literal["json_schema"]
    name: FunctionName
    schema_: Schema = Field(alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = Field(None, discriminator="type")
    verbosity: Literal["medium"] | None = None  # the model has one way of writing: other verbosities are refused


class Reasoning(_Request):
    """``effort`` switches a thinking template on or off, as chat's ``reasoning_effort``; ``summary``: the
    reasoning item carries the whole reasoning text (``content``), not a summary."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    context: Literal["auto", "current_turn"] | None = None  # earlier turns' reasoning is never shown to the model
    mode: Literal["standard"] | None = None


class StreamOptions(_Request):
    include_obfuscation: Literal[False] | None = None  # no padding fields are sent: true is refused


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    keys, key_len, value_len = METADATA_LIMITS
    if value is not None and (len(value) > keys or any(len(k) > key_len or len(v) > value_len
                                                         for k, v in value.items())):
        raise ParamError("metadata", f"metadata: at most {keys} keys of up to {key_len} characters, values of up "
                                     f"to {value_len} characters")
    return value


# ---- the request ----------------------------------------------------------------------------------------------
class ResponsesRequest(_Request):
    """Body of ``POST /v1/responses``."""

    model: str | None = None
    input: Text | list[Any] | None = None
    instructions: Text | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    store: bool | None = None
    previous_response_id: Text | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    reasoning: Reasoning | None = None
    metadata: dict[str, Text] | None = None
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None  # "auto" would drop items silently: refused
    top_logprobs: Literal[0] | None = None
    background: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    _items: list[InputItem] = PrivateAttr(default_factory=list)
    _tools: list[FunctionTool] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _sdk_fields_we_cannot_honour(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in sorted(SDK_FIELDS - HONOURED):
                if data.get(name) is not None:
                    raise ParamError(name, f"{name} is not supported by this server")
        return data

    @model_validator(mode="after")
    def _parse_items_and_tools(self) -> ResponsesRequest:
        _metadata(self.metadata)
        if self.input is None and self.previous_response_id is None:
            raise ParamError("input", "input is required: a string or a list of items")
        if isinstance(self.input, list):
            self._items = [parse_item(raw, i) for i, raw in enumerate(self.input)]
        for i, raw in enumerate(self.tools or []):
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind != "function":
                raise ParamError(f"tools.{i}.type", f"tools.{i}.type: `{kind}` tools are not supported: this server "
                                                    "runs no hosted tools, only function tools")
            self._tools.append(_parse(FunctionTool, raw, f"tools.{i}"))
        names = [tool.name for tool in self._tools]
        if len(set(names)) < len(names):
            raise ParamError("tools", "tools: every function needs a different name")
        for name in self.include or []:
            if name not in INCLUDABLE:
                raise ParamError("include", f"include: `{name}` is not supported (supported: "
                                            f"{', '.join(sorted(INCLUDABLE))})")
        choice = self.named_choice()
        if self.tool_choice not in (None, "none") and not self._tools:
            raise ParamError("tool_choice", "tool_choice needs tools: send the functions the model may call")
        if choice is not None and choice.name not in names:
            raise ParamError("tool_choice", f"tool_choice names `{choice.name}`, which is not in tools "
                                            f"({', '.join(names)})")
        if self.output_format() is not None and (choice is not None or self.tool_choice == "required"):
            raise ParamError("text.format", "text.format json_object/json_schema cannot be combined with tool_choice "
                                            "required or a named function")
        return self

    def named_choice(self) -> NamedFunctionChoice | None:
        """``tool_choice`` {"type": "function", "name": ...}; other object choices (hosted tools, allowed_tools)
        are a 400."""
        if not isinstance(self.tool_choice, dict):
            return None
        if self.tool_choice.get("type") != "function":
            raise ParamError("tool_choice", f"tool_choice type `{self.tool_choice.get('type')}` is not supported "
                                            "(none, auto, required or a function by name)")
        return _parse(NamedFunctionChoice, self.tool_choice, "tool_choice")

    def output_format(self) -> JsonObjectFormat | JsonSchemaFormat | None:
        fmt = self.text.format if self.text else None
        return None if fmt is None or isinstance(fmt, TextFormat) else fmt

    @property
    def items(self) -> list[InputItem]:
        """``input`` as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return self._items

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._tools

    @property
    def stores(self) -> bool:
        return self.store is not False  # OpenAI's default: stored


# ---- into the chat form ---------------------------------------------------------------------------------------
def conversation(items: list[InputItem], known_calls: set[str]) -> list[dict[str, Any]]:
    """Items as chat messages: function calls join the assistant message before them, outputs become tool
    messages; an output must answer a call made earlier (here or in ``known_calls``, the stored history)."""
    messages: list[dict[str, Any]] = []
    calls = set(known_calls)
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role  # newer clients' name for system
            messages.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            try:
                json.loads(item.arguments)
            except ValueError:
                raise OpenAIError(400, f"input.{i}.arguments: not valid JSON", f"input.{i}.arguments") from None
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise OpenAIError(400, f"input.{i}: the function_call_output answers `{item.call_id}`, which no "
                                       "earlier function_call made", f"input.{i}.call_id")
            messages.append({"role": "tool", "content": item.text(), "tool_call_id": item.call_id})
    return messages


def call_ids(messages: list[dict[str, Any]]) -> set[str]:
    return {call["id"] for message in messages for call in message.get("tool_calls", [])}


def chat_messages(body: ResponsesRequest, history: list[dict[str, Any]]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chat messages of a Responses request after ``history`` (a stored conversation), and the conversation
    a stored answer continues from (``history`` + this input, without ``instructions``: OpenAI does not carry
    them over ``previous_response_id``). ``instructions`` and the system or developer messages that open the
    conversation become one system message, so templates that take one system prompt see all of them."""
    kept = history + conversation(body.items, call_ids(history))
    head, rest = [body.instructions] if body.instructions else [], list(kept)
    while rest and rest[0]["role"] == "system":
        head.append(rest.pop(0)["content"])
    messages = ([{"role": "system", "content": "\n\n".join(head)}] if head else []) + rest
    if not any(message["role"] in ("user", "tool") for message in messages):
        raise OpenAIError(400, "input: the conversation needs a user message (or a function_call_output)", "input")
    return messages, kept


def output_messages(output: list[Any]) -> list[dict[str, Any]]:
    """A response's output items (SDK objects) as the assistant message a continued conversation shows the model:
    message text and function calls; reasoning is dropped, as for earlier turns in chat templates."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item.type == "message":
            text = "".join(part.text for part in item.content if part.type == "output_text")
            message["content"] = "\n".join(filter(None, [message["content"], text]))
        elif item.type == "function_call":
            message.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
    return [message]
