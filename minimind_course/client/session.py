"""ChatSession: a conversation with any OpenAI-compatible server (ours, vLLM), built on the official SDK.

The server is stateless, so the session keeps the conversation and sends a window of it with every question
(see :mod:`minimind_course.client.history`). Streaming yields content and ``reasoning_content`` deltas, skips the
final usage chunk (``choices == []``) after recording its token counts, and stores the pair only once the
answer is complete.

With Python functions registered as tools the session runs the tool loop: ask, run the calls the model makes,
send their results back, until the model answers in text (at most ``max_tool_rounds`` rounds of calls).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, get_type_hints

from openai import OpenAI
from openai.types import CompletionUsage
from pydantic import BaseModel, Field, ValidationError, create_model

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
class ToolRun:
    """A call the model made and what the registered function returned (as sent back to the model)."""

    id: str
    name: str
    arguments: str
    result: str


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed answer: visible text and/or reasoning text (either may be empty), or a tool run."""

    content: str = ""
    reasoning_content: str = ""
    tool_run: ToolRun | None = None


@dataclass(frozen=True)
class Reply:
    """A finished answer, with what was sent to get it (and the tool calls run on the way)."""

    content: str
    reasoning_content: str
    finish_reason: str | None
    usage: CompletionUsage | None
    sent: list[Message]
    tool_runs: tuple[ToolRun, ...] = ()


@dataclass(frozen=True)
class Tool:
    """A Python function the model may call: its OpenAI schema and how to run it with the model's arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    func: Callable[..., Any]
    model: type[BaseModel]  # validates the arguments
    takes_model: bool  # the function takes one pydantic model instead of keyword arguments

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def run(self, arguments: str) -> str:
        """Call the function; bad arguments or a failing function give an error text for the model, not a crash."""
        try:
            values = self.model.model_validate_json(arguments or "{}")
        except ValidationError as err:
            return f"error: invalid arguments for {self.name}: {err.errors()[0]['msg']}"
        try:
            result = self.func(values) if self.takes_model else self.func(**dict(values))
        except Exception as err:  # the model sees what went wrong and may try again
            return f"error: {self.name} failed: {type(err).__name__}: {err}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, per-parameter descriptions) from a docstring with an optional Google-style ``Args:`` block."""
    text, _, args = inspect.cleandoc(doc or "").partition("\nArgs:")
    params = dict(re.findall(r"^\s+(\w+)(?: \([^)]*\))?: (.+)$", args, flags=re.MULTILINE))
    return " ".join(text.split()), params


def function_tool(func: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
    """A Tool from a function: parameters from its signature and type hints (a single pydantic-model parameter
    gives that model's schema), the description and parameter descriptions from its docstring."""
    doc, param_docs = _doc_parts(func.__doc__ or "")
    hints = get_type_hints(func, include_extras=True)
    params = list(inspect.signature(func).parameters.values())
    takes_model = len(params) == 1 and inspect.isclass(hints.get(params[0].name)) and issubclass(
        hints[params[0].name], BaseModel)
    if takes_model:
        model = hints[params[0].name]
    else:
        fields = {}
        for param in params:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"{func.__name__}: *args/**kwargs cannot be described to the model")
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hints.get(param.name, Any), Field(default, description=param_docs.get(param.name)))
        model = create_model(f"{func.__name__}_arguments", **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return Tool(name or func.__name__, description or doc or (model.__doc__ or "").strip(), schema, func, model,
                takes_model)


@dataclass
class _Turn:
    """What one request returned: text, reasoning, the tool calls (OpenAI dicts), finish reason, usage."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: CompletionUsage | None = None


def _sum_usage(usages: list[CompletionUsage]) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                           completion_tokens=sum(u.completion_tokens for u in usages),
                           total_tokens=sum(u.total_tokens for u in usages))


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
        tools: Sequence[Callable[..., Any] | Tool] = (),
        tool_choice: str | dict[str, Any] = "auto",
        max_tool_rounds: int = 5,
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
        self.tools: dict[str, Tool] = {}
        self.tool_choice = tool_choice
        self.max_tool_rounds = max_tool_rounds
        for tool in tools:
            self.register(tool)

    def register(self, func: Callable[..., Any] | Tool, *, name: str | None = None,
                 description: str | None = None) -> Tool:
        """Let the model call ``func`` (see :func:`function_tool`); returns the tool as the model sees it."""
        tool = func if isinstance(func, Tool) else function_tool(func, name, description)
        self.tools[tool.name] = tool
        return tool

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
        """Ask with streaming and yield deltas (and tool runs); the pair is recorded when the answer is complete."""
        yield from self._converse(question, stream=True)

    def ask(self, question: str, *, stream: bool = True, on_delta: Callable[[Delta], None] | None = None) -> Reply:
        """Ask and return the finished reply; each delta (streamed text, tool runs) also goes to ``on_delta``."""
        for delta in self._converse(question, stream=stream):
            if on_delta is not None:
                on_delta(delta)
        assert self.last_reply is not None
        return self.last_reply

    def _converse(self, question: str, stream: bool) -> Iterator[Delta]:
        """One question: model rounds until an answer in text, running the tool calls in between."""
        sent = self.window(question)
        steps: list[Message] = []
        runs: list[ToolRun] = []
        usages: list[CompletionUsage] = []
        for round_ in range(self.max_tool_rounds + 1):
            choice = self.tool_choice if round_ < self.max_tool_rounds else "none"  # the last round must answer
            turn = yield from self._turn(sent + steps, stream, choice)
            if turn.usage is not None:
                usages.append(turn.usage)
            if not turn.tool_calls:
                break
            steps.append({"role": "assistant", "content": turn.content or None, "tool_calls": turn.tool_calls})
            for call in turn.tool_calls:
                run = self._run(call)
                runs.append(run)
                steps.append({"role": "tool", "tool_call_id": run.id, "content": run.result})
                yield Delta(tool_run=run)
        usage = _sum_usage(usages) if usages else None
        reply = Reply(turn.content, turn.reasoning, turn.finish_reason, usage, sent, tuple(runs))
        self._record(question, reply, tuple(steps))

    def _turn(self, messages: list[Message], stream: bool, tool_choice: Any) -> Generator[Delta, None, _Turn]:
        """One request; streamed text is yielded as it comes, tool-call deltas are joined by their ``index``."""
        extra: dict[str, Any] = dict(self.options)
        if self.tools:
            extra.update(tools=[tool.to_openai() for tool in self.tools.values()], tool_choice=tool_choice)
        if not stream:
            completion = self.client.chat.completions.create(model=self.model, messages=messages, **extra)
            choice = completion.choices[0]
            calls = [call.model_dump(include={"id", "type", "function"}) for call in choice.message.tool_calls or []]
            return _Turn(choice.message.content or "", _reasoning(choice.message), calls, choice.finish_reason,
                         completion.usage)
        turn = _Turn()
        calls: dict[int, dict[str, Any]] = {}
        response = self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, stream_options={"include_usage": True}, **extra)
        with response:  # closing early (break, exception) closes the connection, so the server stops generating
            for chunk in response:
                if chunk.usage is not None:
                    turn.usage = chunk.usage
                if not chunk.choices:  # the usage chunk: no choices at all
                    continue
                choice = chunk.choices[0]
                turn.finish_reason = choice.finish_reason or turn.finish_reason
                for part in choice.delta.tool_calls or []:
                    call = calls.setdefault(part.index, {"id": "", "type": "function",
                                                         "function": {"name": "", "arguments": ""}})
                    call["id"] = part.id or call["id"]
                    if part.function is not None:
                        call["function"]["name"] += part.function.name or ""
                        call["function"]["arguments"] += part.function.arguments or ""
                delta = Delta(choice.delta.content or "", _reasoning(choice.delta))
                if delta.content or delta.reasoning_content:
                    turn.content += delta.content
                    turn.reasoning += delta.reasoning_content
                    yield delta
        turn.tool_calls = [calls[i] for i in sorted(calls)]
        return turn

    def _run(self, call: dict[str, Any]) -> ToolRun:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        tool = self.tools.get(name)
        result = tool.run(arguments) if tool else f"error: there is no function named {name!r}"
        return ToolRun(call["id"], name, arguments, result)

    def _record(self, question: str, reply: Reply, steps: tuple[Message, ...] = ()) -> None:
        self.pairs.append(QAPair(question, reply.content, steps))
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
