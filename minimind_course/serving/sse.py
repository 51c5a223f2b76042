"""Server-Sent Events framing, written by hand because the course teaches it: the one definition every stream uses.

An event is optional ``event:`` line, one ``data:`` line per line of the payload, and a blank line. OpenAI's chat
and completion streams send ``data:`` only and end with ``data: [DONE]``; the Responses and Messages APIs name
each event (``event: response.output_text.delta``).
"""

from __future__ import annotations

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
MEDIA_TYPE = "text/event-stream"


def sse(data: str, event: str | None = None) -> str:
    """One event: ``event: NAME`` when given, then the payload as ``data:`` lines (JSON has no raw newlines, so
    one line), then a blank line."""
    head = f"event: {event}\n" if event else ""
    return head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


DONE = sse("[DONE]")  # OpenAI's end of a chat or completion stream
