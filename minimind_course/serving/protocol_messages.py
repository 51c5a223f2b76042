"""Anthropic's Messages wire format: the ``POST /v1/messages`` request (validated by pydantic), its conversion into
chat-template messages, tools and sampling, and Anthropic's error shape.

Every field a client may send is either honoured or refused with a 400 that names it: the models forbid unknown
fields (Anthropic's own API answers "Extra inputs are not permitted"), and blocks this text-only model cannot read
(images, documents, server tools) are refused by name. Responses are built from the ``anthropic`` SDK's types in
``messages_render``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from minimind_course.engine.sampling import SamplingParams
from minimind_course.serving.protocol import SAMPLING_EPS, OpenAIError, ParamError, Schema, Text

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}
ToolId = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,256}$")]
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]  # Anthropic's rule for tool names
UNSUPPORTED_BLOCKS = {"image": "images", "document": "documents", "search_result": "search results",
                      "container_upload": "container uploads"}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, Anthropic's shape for every failure."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def is_messages_path(path: str) -> bool:
    """Routes whose errors travel in Anthropic's shape (the Messages API and everything under it)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


class _Strict(BaseModel):
    """Unknown fields are a 400 naming them, as Anthropic's API does; numbers must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CacheControl(_Strict):
    """A prompt-caching hint: accepted (there is no prompt cache here, so it changes nothing but the
    ``cache_*_input_tokens`` counts, which stay 0)."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Strict):
    type: Literal["text"]
    text: Text
    cache_control: CacheControl | None = None
    citations: None = None  # the SDK sends back ``citations: null`` with a response's text block


class ToolUseBlock(_Strict):
    """A call the assistant made, in the history."""

    type: Literal["tool_use"]
    id: ToolId
    name: ToolName
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: dict[str, Literal["direct"]] | None = None  # the SDK sends back ``{"type": "direct"}`` or null
    toolset_name: None = None


def _text_blocks(value: Any, what: str) -> Any:
    """A string is shorthand for one text block; non-text blocks are refused by name."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        for j, block in enumerate(value):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in UNSUPPORTED_BLOCKS:
                raise ValueError(f"block {j} is a `{kind}` block: {UNSUPPORTED_BLOCKS[kind]} are not supported "
                                 f"by this text-only model; {what} takes text blocks")
    return value


class ToolResultBlock(_Strict):
    """The result of a call, in the next user message; ``is_error`` marks a failed call ("Error: " before it)."""

    type: Literal["tool_result"]
    tool_use_id: ToolId
    content: list[TextBlock] = Field(default_factory=list)
    is_error: bool = False
    cache_control: CacheControl | None = None
    toolset_name: None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _text_blocks(value, "a tool_result's content")

    def text(self) -> str:
        text = "\n".join(block.text for block in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Strict):
    """Earlier reasoning sent back by a client: dropped from the prompt, as Anthropic drops earlier turns' thinking."""

    type: Literal["thinking"]
    thinking: Text
    signature: str


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
                  Field(discriminator="type")]
ROLE_BLOCKS = {"user": {"text", "tool_result"}, "assistant": {"text", "tool_use", "thinking", "redacted_thinking"}}


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _text_blocks(value, "a message")

    @field_validator("content")
    @classmethod
    def _blocks_fit_the_role(cls, content: list[Block], info: ValidationInfo) -> list[Block]:
        role = info.data.get("role")
        for j, block in enumerate(content if role in ROLE_BLOCKS else []):
            if block.type not in ROLE_BLOCKS[role]:
                raise ValueError(f"block {j}: a {role} message cannot carry a `{block.type}` block "
                                 f"(allowed: {', '.join(sorted(ROLE_BLOCKS[role]))})")
        return content

    def text(self) -> str:
        return "".join(block.text for block in self.content if isinstance(block, TextBlock))

    def tool_uses(self) -> list[ToolUseBlock]:
        return [block for block in self.content if isinstance(block, ToolUseBlock)]

    def tool_results(self) -> list[ToolResultBlock]:
        return [block for block in self.content if isinstance(block, ToolResultBlock)]


class Tool(_Strict):
    """A client tool (``type`` "custom" or absent); server tools (web search, bash, ...) are refused by name."""

    name: ToolName
    input_schema: Schema
    description: Text | None = None
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None  # forced calls always follow the schema; in auto mode calls are parsed as written

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise ValueError(f"`{value.get('type')}` is a server tool, which this server does not run; send client "
                             "tools (name, description, input_schema)")
        return value

    @field_validator("input_schema")
    @classmethod
    def _schema_is_an_object(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("type") != "object":
            raise ValueError('input_schema must be a JSON Schema with "type": "object"')
        return schema

    def for_template(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function, which the chat template and the tool grammar read."""
        function = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: ToolName
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
                       Field(discriminator="type")]


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)  # Anthropic's minimum; a target within max_tokens, as Anthropic treats it
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


Thinking = Annotated[Union[ThinkingEnabled, ThinkingAdaptive, ThinkingDisabled], Field(discriminator="type")]


class Metadata(_Strict):
    """``user_id`` identifies the end user to the provider; it does not change the answer."""

    user_id: Text | None = Field(None, max_length=256)


class JsonOutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: Schema = Field(alias="schema")


class OutputConfig(_Strict):
    format: JsonOutputFormat | None = None


class CountTokensRequest(_Strict):
    """Body of ``POST /v1/messages/count_tokens``: what a Messages request puts into the prompt."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system(cls, value: Any) -> Any:
        return _text_blocks(value, "system")

    @model_validator(mode="after")
    def _fits_together(self) -> CountTokensRequest:
        names = [tool.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ParamError("tools", "tools: every tool needs a different name")
        choice = self.tool_choice
        if isinstance(choice, (ToolChoiceAny, ToolChoiceTool)) and not self.tools:
            raise ParamError("tool_choice", f"tool_choice {choice.type} needs tools: send the tools the model may use")
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise ParamError("tool_choice.name", f"tool_choice names `{choice.name}`, which is not in tools "
                                                 f"({', '.join(names)})")
        if self.forced_tools() and self.output_config and self.output_config.format:
            raise ParamError("output_config.format", "output_config.format cannot be combined with tool_choice "
                                                     "any or tool (the answer is a tool call)")
        self._check_tool_ids()
        return self

    def _check_tool_ids(self) -> None:
        """Each tool_use is answered by a tool_result in the very next user message, and each result answers one."""
        seen: set[str] = set()
        for i, message in enumerate(self.messages):
            calls = [call.id for call in message.tool_uses()]
            if dup := (set(calls) & seen) or {c for c in calls if calls.count(c) > 1}:
                raise ParamError(f"messages.{i}.content", f"messages.{i}: tool_use id `{sorted(dup)[0]}` is used "
                                                          "more than once")
            seen.update(calls)
            previous = self.messages[i - 1].tool_uses() if i else []
            open_ids = {call.id for call in previous}
            for j, block in enumerate(message.content):
                if isinstance(block, ToolResultBlock) and block.tool_use_id not in open_ids:
                    raise ParamError(f"messages.{i}.content.{j}.tool_use_id",
                                     f"messages.{i}.content.{j}: tool_result answers `{block.tool_use_id}`, which is "
                                     "not an unanswered tool_use id of the previous assistant message")
                if isinstance(block, ToolResultBlock):
                    open_ids.discard(block.tool_use_id)  # each call is answered once
            if calls:
                answered = ({r.tool_use_id for r in self.messages[i + 1].tool_results()}
                            if i + 1 < len(self.messages) else set())
                if missing := [c for c in calls if c not in answered]:
                    raise ParamError(f"messages.{i}.content", f"messages.{i}: tool_use id `{missing[0]}` has no "
                                     f"tool_result block in the next user message (messages.{i + 1})")

    def forced_tools(self) -> list[Tool]:
        """The tools the answer must call: all of them for "any", the named one for "tool", else []."""
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceAny):
            return list(self.tools or [])
        if isinstance(choice, ToolChoiceTool):
            return [tool for tool in self.tools or [] if tool.name == choice.name]
        return []

    def parallel(self) -> bool:
        """Whether the answer may hold more than one call (Anthropic's default: yes)."""
        return not getattr(self.tool_choice, "disable_parallel_tool_use", False)

    def template_messages(self) -> tuple[list[dict[str, Any]], str]:
        """The chat template's messages, and the prefill: the text of a final assistant turn, which the answer
        continues (Anthropic's rule). Tool results become ``tool`` messages, tool_use blocks ``tool_calls``, and
        consecutive turns of one role one turn; thinking blocks of earlier turns are left out, as Anthropic does."""
        messages: list[dict[str, Any]] = []
        system = "\n".join(block.text for block in self.system or [])
        if system:
            messages.append({"role": "system", "content": system})
        history, prefill = self.messages, ""
        if history[-1].role == "assistant":
            history, prefill = history[:-1], history[-1].text()
        for message in history:
            for result in message.tool_results():  # results first: they answer the previous turn
                messages.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": result.text()})
            text, calls = message.text(), message.tool_uses()
            if not text and not calls and message.tool_results():
                continue
            turn: dict[str, Any] = {"role": message.role, "content": text}
            if calls:
                turn["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                    "name": call.name, "arguments": json.dumps(call.input, ensure_ascii=False)}} for call in calls]
            last = messages[-1] if messages else None
            if last and last["role"] == message.role and not last.get("tool_calls") and not calls:
                last["content"] += "\n\n" + text
            else:
                messages.append(turn)
        return messages, prefill

    def template_tools(self) -> list[dict[str, Any]]:
        return [tool.for_template() for tool in self.tools or []]

    def output_schema(self) -> dict[str, Any] | None:
        fmt = self.output_config.format if self.output_config else None
        return fmt.schema_ if fmt else None

    def thinking_kwargs(self, switches: list[str]) -> dict[str, Any]:
        """The chat template's reasoning switches for ``thinking`` (none sent: the template's default); a model
        whose template cannot think refuses ``enabled`` and ``adaptive``."""
        if self.thinking is None:
            return {}
        wants = self.thinking.type != "disabled"
        if wants and not switches:
            raise OpenAIError(400, f"thinking: type `{self.thinking.type}` needs a model that can think, and this "
                                   "model's chat template has no reasoning switch; leave thinking out or disable it",
                              "thinking")
        return {switch: wants for switch in switches}


class MessagesRequest(CountTokensRequest):
    """Body of ``POST /v1/messages``."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[Text, Field(min_length=1)]] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)  # Anthropic's range
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: both mean it

    @model_validator(mode="after")
    def _thinking_fits(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ParamError("thinking.budget_tokens", "thinking.budget_tokens must be less than max_tokens")
        return self

    def sampling_params(self, max_tokens: int, defaults: dict[str, float]) -> SamplingParams:
        """Request values, else the model's generation_config defaults, else Anthropic's (temperature 1)."""

        def pick(name: str, fallback: float) -> float:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        temperature = float(pick("temperature", 1.0))
        return SamplingParams(temperature=temperature if temperature >= SAMPLING_EPS else 0.0,
                              top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", 0)),
                              repetition_penalty=float(defaults.get("repetition_penalty", 1.0)),
                              max_tokens=max_tokens, stop=tuple(self.stop_sequences or ()))
