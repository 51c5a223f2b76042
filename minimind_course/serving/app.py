"""The OpenAI-compatible HTTP server: ``create_app(engine)`` assembles state, middleware and the endpoint routers.

| route | module |
|---|---|
| ``GET /health``, ``GET /metrics`` | ``endpoints/health.py`` (no API key, as in vLLM) |
| ``GET /v1/models``, ``GET /v1/models/{id}`` | ``endpoints/models.py`` |
| ``POST /v1/chat/completions`` | ``endpoints/chat_completions.py`` |
| ``POST /v1/completions`` | ``endpoints/completions.py`` |
| ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` | ``endpoints/responses.py`` (store: ``response_store``) |
| ``POST /v1/messages``, ``POST /v1/messages/count_tokens`` | ``endpoints/messages.py`` (Anthropic's Messages API) |
| ``POST /tokenize``, ``POST /detokenize`` | ``endpoints/tokenize.py`` |

Each endpoint converts its body into an ``InternalRequest`` (``internal``) for the shared path (``generation``)
and renders the engine's output with its protocol's renderer; errors and middleware live in ``middleware``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import FastAPI

from minimind_course.engine.engine import Engine
from minimind_course.serving.endpoints import (chat_completions, completions, health, messages, models, responses,
                                               tokenize)
from minimind_course.serving.generation import Generation, Overflow
from minimind_course.serving.metrics import EngineMetrics
from minimind_course.serving.middleware import DEFAULT_MAX_BODY_BYTES, add_error_handlers, add_middleware
from minimind_course.serving.response_store import DEFAULT_MAX_ENTRIES, ResponseStore

ROUTERS = (health.router, models.router, chat_completions.router, completions.router, responses.router,
           messages.router, tokenize.router)


def create_app(
    engine: Engine,
    *,
    served_model_name: str | Sequence[str] = "minimind",
    api_key: str | None = None,
    cors_origins: Sequence[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_overflow: Overflow = "clamp",
    tool_grammar: str = "lazy",
    max_stored_responses: int = DEFAULT_MAX_ENTRIES,
) -> FastAPI:
    """Build the server around an engine. ``api_key`` None leaves every route open; ``/health`` and ``/metrics``
    are always open. ``cors_origins`` None: local pages and browser extensions only (see ``middleware``).
    ``tool_grammar`` "lazy" constrains a call the model starts in ``tool_choice`` auto, "off" leaves auto free.
    ``max_stored_responses``: how many Responses API answers the in-memory store keeps for ``previous_response_id``."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    app = FastAPI(title="MiniMind OpenAI-compatible server", docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.served_model_names = names
    app.state.started = int(time.time())
    app.state.generation = Generation(engine, names, max_tokens_overflow, tool_grammar)
    app.state.metrics = EngineMetrics(engine, names[0])
    app.state.response_store = ResponseStore(max_stored_responses)
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    add_middleware(app, api_key=api_key, max_body_bytes=max_body_bytes, cors_origins=cors_origins)
    return app
