"""Turn ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks in a model's text into OpenAI tool calls.

The format (``minimind_course.tool_format``) is upstream MiniMind-3's (Hermes / Qwen3 convention, vLLM's ``hermes``
parser). The parser works on text, not token ids: on the bundled model ``<tool_call>`` is several tokens. It is fed
streamed pieces; a tag split across pieces is held back until it is complete, a call is held until its
``</tool_call>``, so tags never leak into the content and streaming and non-streaming give exactly the same message.
Whitespace next to a call is dropped. A block that is not a valid call (bad JSON, no name) is returned as content,
as vLLM does, and logged.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from minimind_course.engine.stop_strings import held_suffix_len
from minimind_course.tool_format import CALL_END, CALL_START, parse_call

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParsedToolCall:
    """One call: ``index`` among this answer's calls, a unique ``id``, the function name, arguments as JSON text."""

    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    """A unique call id (uuid-based, as vLLM; upstream's time-based ids collide)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Feed text pieces with ``push``; each call returns (content delta, calls completed in this piece)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.in_call = False
        self.strip_leading = False  # right after a call: drop the whitespace before what follows
        self.calls: list[ParsedToolCall] = []

    def push(self, piece: str) -> tuple[str, list[ParsedToolCall]]:
        self.buffer += piece
        content, done = "", []
        while self.buffer:
            if self.in_call:
                end = self.buffer.find(CALL_END)
                if end < 0:
                    break
                block, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_END):]
                self.in_call, self.strip_leading = False, True
                parsed = parse_call(block.strip())
                if parsed is None:
                    log.warning("model wrote a malformed tool call; returned as content: %r", block[:200])
                    content += CALL_START + block + CALL_END
                    continue
                call = ParsedToolCall(len(self.calls), new_call_id(), *parsed)
                self.calls.append(call)
                done.append(call)
                continue
            if self.strip_leading:
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    break
                self.strip_leading = False
            start = self.buffer.find(CALL_START)
            if start >= 0:
                content += self.buffer[:start].rstrip()
                self.buffer, self.in_call = self.buffer[start + len(CALL_START):], True
                continue
            keep = held_suffix_len(self.buffer, (CALL_START,))
            text = self.buffer[: len(self.buffer) - keep]
            held_space = len(text) - len(text.rstrip())  # may turn out to stand before a call
            content += text[: len(text) - held_space]
            self.buffer = self.buffer[len(text) - held_space:]
            break
        return content, done

    def flush(self) -> str:
        """At the end: held text is content (an unfinished call too: the answer was cut before ``</tool_call>``)."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            log.warning("model's tool call was cut off before %s; returned as content", CALL_END)
            return CALL_START + rest
        return "" if self.strip_leading else rest


def extract_tool_calls(text: str) -> tuple[str, list[ParsedToolCall]]:
    """Non-streaming: (content, calls), exactly what streaming the same text would accumulate to."""
    parser = ToolCallParser()
    content, _ = parser.push(text)
    return content + parser.flush(), parser.calls
