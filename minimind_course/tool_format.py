"""MiniMind's tool-call text format, defined once: the parser, the grammars, the chat template, the client's history
and the training data all build on these names (upstream MiniMind-3's format, the Hermes / Qwen3 convention).

An assistant turn with calls is its text, then each call on its own line::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "东京", "unit": "celsius"}}
    </tool_call>

JSON is written as ``json.dumps(..., ensure_ascii=False)`` does: one line, ``", "`` and ``": "`` separators, no other
whitespace, non-ASCII text as itself. The grammars emit exactly these bytes, so what a model is trained on, what it
may write under the grammar and what it sees again in its history are the same text. Tool results go back in one
user turn, each as ``\\n<tool_response>\\n...\\n</tool_response>``.
"""

from __future__ import annotations

import json
from typing import Any

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
RESPONSE_START = "<tool_response>"
RESPONSE_END = "</tool_response>"
CALL_SEPARATOR = "\n"  # between an answer's text and its first call, and between parallel calls
CALL_TAIL = "}\n" + CALL_END  # closes the call object after its arguments

# The system-turn block that offers tools: header, one JSON line per tool, footer (how to answer with a call).
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                f'{CALL_START}{CALL_END} XML tags:\n{CALL_START}\n{{"name": <function-name>, "arguments": '
                f"<args-json-object>}}\n{CALL_END}")


def dumps(value: Any) -> str:
    """JSON as the format writes it (one line, ``", "`` and ``": "``, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def call_head(name: str) -> str:
    """Everything a call writes before its arguments: ``<tool_call>\\n{"name": "NAME", "arguments": ``."""
    return f'{CALL_START}\n{{"name": {dumps(name)}, "arguments": '


def canonical_arguments(arguments: str | dict[str, Any]) -> str:
    """Arguments as the format writes them; a string that is not a JSON object is kept as it was sent."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        if not isinstance(parsed, dict):
            return arguments
        arguments = parsed
    return dumps(arguments)


def render_call(name: str, arguments: str | dict[str, Any]) -> str:
    """One call block, exactly as the chat template writes it and the grammar lets a model write it."""
    return call_head(name) + canonical_arguments(arguments) + CALL_TAIL


def render_assistant(content: str, calls: list[tuple[str, str | dict[str, Any]]]) -> str:
    """An assistant turn's text: its content, then each (name, arguments) call after a newline."""
    blocks = [render_call(name, arguments) for name, arguments in calls]
    return CALL_SEPARATOR.join(([content] if content else []) + blocks)


def render_tool_response(content: str) -> str:
    """One tool result inside the user turn that carries the results."""
    return f"\n{RESPONSE_START}\n{content}\n{RESPONSE_END}"


def parse_call(block: str) -> tuple[str, str] | None:
    """(name, canonical arguments JSON) of the text between the call tags, or None when it is not a call.
    Lenient as vLLM's hermes parser: ``parameters`` for ``arguments``, arguments as a JSON string, none at all."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], dumps(arguments)
