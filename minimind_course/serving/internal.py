"""The neutral request every endpoint converts its wire body into, and the shared path (``generation``) runs.

Chat completions, completions (and any further protocol) differ on the wire; once converted they are the same
thing: a prompt (chat messages for the template, or text / token ids), the tools the model is shown and whether
it must call one, an output schema, sampling parameters, ``n``, streaming options, the model or adapter asked for.
``WireNames`` says what the protocol calls each field, so a 400 names the field the client actually sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from minimind_course.engine.sampling import SamplingParams

ToolChoice = Literal["auto", "none", "required", "function"]  # "function": the one named in ``tool_name``


@dataclass(frozen=True)
class WireNames:
    """The wire name of each field an error can be about (defaults: chat completions)."""

    prompt: str = "messages"
    max_tokens: str = "max_tokens"
    output_schema: str = "response_format"
    tool_parameters: str = "tools.{index}.function.parameters"
    reasoning_effort: str = "reasoning_effort"


@dataclass
class InternalRequest:
    """One generation request, protocol-free. Exactly one of ``messages`` (rendered by the chat template) and
    ``prompt`` (text or token ids, sent as is) is set."""

    sampling: SamplingParams  # n, temperature, top_p, ..., stop, seed, logprobs; max_tokens is set by the budget
    messages: list[dict[str, Any]] | None = None  # the chat template's message dicts (role, content, tool_calls...)
    prompt: str | list[int] | None = None
    prefill: str = ""  # text after the generation prompt that the answer continues (Anthropic's final assistant turn)
    model: str | None = None  # the served name or LoRA adapter asked for (None: the first served name)
    max_tokens: int | None = None  # as requested; None: what the context leaves
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs, reasoning switches
    reasoning_effort: str | None = None  # OpenAI's effort: on or off for templates that can think (generation)
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI function tools: {"type", "function": {...}}
    tool_choice: ToolChoice = "auto"
    tool_name: str | None = None  # with tool_choice "function"
    parallel_tool_calls: bool = True
    output_schema: dict[str, Any] | None = None  # the JSON Schema the answer must follow (None: free text)
    schema_strict: bool = False  # strict xgrammar mode (json_schema) or lenient (json_object)
    stream: bool = False
    include_usage: bool = False  # streaming: send usage at the end
    names: WireNames = field(default_factory=WireNames)

    def active_tools(self) -> list[dict[str, Any]]:
        """The tools the model is shown: none with tool_choice "none" (as vLLM does without the flag)."""
        return [] if self.tool_choice == "none" else self.tools

    def forced_tools(self) -> list[tuple[int, dict[str, Any]]]:
        """(index in ``tools``, tool) of the functions the answer must call; [] when calling is optional."""
        if self.tool_choice == "required":
            return list(enumerate(self.tools))
        if self.tool_choice == "function":
            return [(i, tool) for i, tool in enumerate(self.tools) if tool["function"]["name"] == self.tool_name]
        return []

    @property
    def call_finish(self) -> str | None:
        """The finish reason of an answer that made calls: "tool_calls", or "stop" for a call forced by name (as
        OpenAI reports it); None when no tools are active (no tool-call parsing)."""
        if not self.active_tools():
            return None
        return "stop" if self.tool_choice == "function" else "tool_calls"
