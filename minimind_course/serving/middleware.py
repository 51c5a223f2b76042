"""Everything between the socket and a route: OpenAI-shaped error handlers and the pure-ASGI middleware
(API key, body size limit, CORS) that lets streaming and disconnect detection pass through untouched.

Every error leaves in OpenAI's envelope ``{"error": {...}}`` (on the Messages routes in Anthropic's shape
``{"type": "error", "error": {...}}``); user mistakes are 4xx, never 500 (the openai SDK
retries 5xx twice, so a bad request would run the model three times). Every 4xx is logged (status, param,
message) on the ``minimind_course.serving`` logger, so a server log says why a client was refused.

CORS by default as Ollama: pages served from this machine (``localhost``, ``127.0.0.1``, ``[::1]``, any port)
and browser extensions may call the server; any other website only when ``cors_origins`` names it (``*``: all).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minimind_course.serving.protocol_messages import anthropic_error_body, is_messages_path
from minimind_course.serving.protocol import OpenAIError, ParamError, error_body

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # a full 32k-token context of Chinese text is under 200 KB of JSON
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")  # what --api-key guards (/health, /metrics stay open)
LOCAL_ORIGINS = (r"^(https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
                 r"|(chrome-extension|moz-extension|safari-web-extension)://[^/]+)$")  # Ollama's default set
logger = logging.getLogger("minimind_course.serving")


def log_client_error(status: int, message: str, param: str | None = None) -> None:
    """One log line per refused request (4xx): status, param, message."""
    if 400 <= status < 500:
        logger.warning("%d param=%s %s", status, param, message)


def error_payload(path: str, status: int, message: str, param: str | None = None) -> dict:
    """Anthropic's error shape on the Messages routes (the message names the field), OpenAI's envelope elsewhere."""
    return anthropic_error_body(status, message) if is_messages_path(path) else error_body(status, message, param)


def error_response(path: str, status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error as a response for a request to ``path``, logged when it is the client's fault."""
    log_client_error(status, message, param)
    return JSONResponse(error_payload(path, status, message, param), status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Turn every error (ours, FastAPI's 422, Starlette's HTTP errors, crashes) into the route's error shape."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, err: OpenAIError) -> JSONResponse:
        return error_response(request.url.path, err.status, err.message, err.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        """FastAPI says 422; OpenAI clients expect 400 with a readable message (as vLLM does)."""
        content_type = request.headers.get("content-type")
        if not _is_json_media_type(content_type):  # FastAPI did not even try to parse the body as JSON
            message = (f"The body must be JSON sent with `Content-Type: application/json` (got "
                       f"{f'`{content_type}`' if content_type else 'no Content-Type'}; with curl add "
                       "-H 'Content-Type: application/json').")
            return error_response(request.url.path, 415, message)
        problems, param = [], None
        for item in err.errors():
            loc = [str(part) for part in item.get("loc", ()) if part != "body"]
            if item.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})")
                continue
            if not loc and item.get("type") == "missing":
                problems.append("the body is empty (or null): send a JSON object")
                continue
            cause = item.get("ctx", {}).get("error")  # a model-level check names its own parameter
            param = param or (cause.param if isinstance(cause, ParamError) else ".".join(loc)) or None
            message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
            problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
        return error_response(request.url.path, 400, "; ".join(problems) or "invalid request", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        parse_error = err.status_code == 400 and err.__cause__ is not None  # FastAPI could not read the body
        message = _body_parse_error(err.__cause__) if parse_error else str(err.detail)
        return error_response(request.url.path, err.status_code, message, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_payload(request.url.path, 500, f"internal error: {type(err).__name__}"),
                            status_code=500)


def _is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, parameters such as charset allowed (FastAPI's rule)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _body_parse_error(cause: BaseException) -> str:
    """Why FastAPI could not read the body (it only says "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON (arrays or objects nested too deeply)"
    detail = str(cause).strip().splitlines()
    return f"the body is not valid JSON ({detail[0].split('; ')[0] if detail else type(cause).__name__})"


async def _send_error(scope: Scope, send: Send, status: int, message: str,
                      headers: dict[str, str] | None = None) -> None:
    log_client_error(status, message)
    body = json.dumps(error_payload(scope["path"], status, message)).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (Anthropic's header) on /v1, /tokenize and
    /detokenize (constant-time compare); preflights pass. (vLLM guards /v1 only; the tokenizer routes reveal the template and tools, so they are guarded
    here too.)"""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode("utf-8")
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES) and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
            if not (bearer or hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)):
                await _send_error(scope, send, 401, "Invalid or missing API key: send `Authorization: Bearer <key>` "
                                  "or `x-api-key: <key>`.", {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuse request bodies above ``max_bytes`` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = f"Request body too large: the limit is {self.max_bytes} bytes."
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(scope, send, 413, too_big)
            return
        chunks, size, more = [], 0, True
        while more:  # read the body here (bounded), then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await _send_error(scope, send, 413, too_big)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for http.disconnect as usual

        await self.app(scope, replay, send)


def add_middleware(app: FastAPI, *, api_key: str | None, max_body_bytes: int,
                   cors_origins: Sequence[str] | None) -> None:
    """API key (innermost, only when set), body size limit, then CORS outermost so browsers see its headers.
    ``cors_origins`` None: local pages and browser extensions (``LOCAL_ORIGINS``); else exactly those named."""
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    origins = {"allow_origin_regex": LOCAL_ORIGINS} if cors_origins is None else {"allow_origins": list(cors_origins)}
    app.add_middleware(CORSMiddleware, **origins, allow_methods=["*"], allow_headers=["*"])
