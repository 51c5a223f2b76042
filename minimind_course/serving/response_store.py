"""The bounded in-memory store behind ``previous_response_id`` and ``GET /v1/responses/{id}``.

Least recently used entries are evicted once either bound is passed (entries, or bytes of their JSON), so a
server that runs for weeks keeps a fixed amount of memory; a restart forgets everything. ``store: false``
requests never reach it. An unknown or evicted id is a 404 in OpenAI's error shape.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from openai.types.responses import Response


DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class StoredResponse:
    """A finished response and the conversation that continues from it (chat messages, without instructions)."""

    response: Response
    messages: list[dict[str, Any]]
    size: int


class ResponseStore:
    """An LRU map from response id to ``StoredResponse``, bounded by entries and by bytes."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the response store needs room for at least one response")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, response: Response, messages: list[dict[str, Any]]) -> None:
        """Keep a response (one larger than the whole byte bound is not kept at all)."""
        size = len(response.model_dump_json()) + len(json.dumps(messages, ensure_ascii=False))
        self.delete(response.id)
        if size > self.max_bytes:
            return
        self.entries[response.id] = StoredResponse(response, messages, size)
        self.bytes += size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.size

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response (now the most recently used), else a 404 naming ``param``."""
        entry = self.entries.get(response_id)
        if entry is None:
            from minimind_course.serving.protocol import OpenAIError  # here: `serve --help` reads this module

            raise OpenAIError(404, f"Response with id '{response_id}' not found.", param)
        self.entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self.entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry is not None
