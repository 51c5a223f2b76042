"""The OpenAI-compatible HTTP server: FastAPI routes over the ``Engine``, SSE streaming written by hand.

``create_app(engine)`` returns an ASGI app with ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``
and ``/health``. Every error leaves in OpenAI's envelope ``{"error": {...}}``; user mistakes are 4xx, never 500
(the openai SDK retries 5xx twice, so a bad request would run the model three times).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkChoiceLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from transformers.convert_slow_tokenizer import bytes_to_unicode
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minimind_course.engine import (
    ContextLengthError,
    Engine,
    EngineBusyError,
    GenerationHandle,
    GenerationResult,
    PromptError,
    TokenLogprob,
)
from minimind_course.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, error_body
from minimind_course.reasoning import THINK_START, ThinkParser, split_reasoning

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # a full 32k-token context of Chinese text is under 200 KB of JSON
CLIENT_GONE = Response(status_code=499)  # nginx's "client closed request"; nobody reads it
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def sse(payload: str) -> str:
    """One Server-Sent Event: a ``data:`` line and a blank line. JSON has no raw newlines, so one line does."""
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats: a unique id, the creation time, the served model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def create_app(
    engine: Engine,
    *,
    served_model_name: str | Sequence[str] = "minimind",
    api_key: str | None = None,
    cors_origins: Sequence[str] = ("*",),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """Build the server around an engine. ``api_key`` None leaves /v1 open; ``/health`` is always open."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    app = FastAPI(title="MiniMind OpenAI-compatible server", docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.served_model_names = names
    app.state.started = int(time.time())
    token_text = TokenText(engine.tokenizer)
    _add_error_handlers(app)

    def check_model(requested: str | None) -> str:
        if requested is not None and requested not in names:
            raise OpenAIError(404, f"The model `{requested}` does not exist.", "model")
        return names[0]

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "queued": engine.queued}

    @app.get("/v1/models")
    async def list_models() -> dict[str, object]:
        return {"object": "list", "data": [_model_card(app, name) for name in names]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, object]:
        check_model(model_id)
        return _model_card(app, model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        meta = ResponseMeta.new("chatcmpl", check_model(body.model))
        prompt = _run_user_step(engine.chat_prompt, body.template_messages(), body.chat_template_kwargs)
        thinking = prompt.rstrip().endswith(THINK_START)  # the template pre-filled an open <think>
        handle = _submit(engine, engine.encode(prompt), body, meta.id)
        tokens = token_text if body.logprobs else None
        if body.stream:
            stream = _chat_stream(handle, meta, body.include_usage, thinking, tokens)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(_cancel, handle))
        result = await _result_unless_disconnected(handle, request)
        return _json(_chat_completion(result, meta, thinking, tokens)) if result else CLIENT_GONE

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        meta = ResponseMeta.new("cmpl", check_model(body.model))
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            prompt_ids = engine.encode(prompt)
        else:
            vocab = len(engine.tokenizer)
            if any(not 0 <= token < vocab for token in prompt):
                raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            prompt_ids = prompt
        handle = _submit(engine, prompt_ids, body, meta.id)
        if body.stream:
            stream = _completion_stream(handle, meta, body.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(_cancel, handle))
        result = await _result_unless_disconnected(handle, request)
        return _json(_completion(result, meta)) if result else CLIENT_GONE

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    return app


# ---- request handling ------------------------------------------------------------------------------------
def _run_user_step(func, *args):
    """Run a step whose failures are the user's fault (bad messages, template arguments): 400."""
    try:
        return func(*args)
    except PromptError as err:
        raise OpenAIError(400, str(err), "messages") from err


def _submit(engine: Engine, prompt_ids: list[int], body: ChatCompletionRequest | CompletionRequest, request_id: str):
    """Check the context budget, build sampling parameters, queue the request under the response's id."""
    if not prompt_ids:
        raise OpenAIError(400, "The prompt is empty.", "prompt")
    try:
        budget = engine.completion_budget(len(prompt_ids), body.requested_max_tokens())
        return engine.submit(prompt_ids, body.sampling_params(budget, engine.sampling_defaults), request_id)
    except ContextLengthError as err:
        raise OpenAIError(400, str(err), "messages" if isinstance(body, ChatCompletionRequest) else "prompt") from err
    except EngineBusyError as err:
        raise OpenAIError(429, str(err)) from err


async def _cancel(handle: GenerationHandle) -> None:
    handle.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result_unless_disconnected(handle: GenerationHandle, request: Request) -> GenerationResult | None:
    """The answer, or None when the client hung up first: then generation stops (vLLM's with_cancellation)."""
    result = asyncio.ensure_future(handle.result())
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            handle.cancel()
    if not result.done() or result.cancelled():
        return None
    try:
        return result.result()
    except Exception as err:  # the worker failed: a server fault, reported in the envelope
        raise OpenAIError(500, f"generation failed: {type(err).__name__}: {err}") from err


def _json(model) -> Response:
    return Response(model.model_dump_json(exclude_unset=True), media_type="application/json")


def _model_card(app: FastAPI, name: str) -> dict[str, object]:
    card = Model(id=name, object="model", created=app.state.started, owned_by="minimind-course",
                 max_model_len=app.state.engine.max_model_len)
    return card.model_dump()


# ---- chat responses --------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def _chat_completion(
    result: GenerationResult, meta: ResponseMeta, thinking: bool, tokens: TokenText | None
) -> ChatCompletion:
    choices = []
    for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons)):
        reasoning, content = split_reasoning(text, thinking)
        message = ChatCompletionMessage(role="assistant", content=content)
        if reasoning is not None:
            message = ChatCompletionMessage(role="assistant", content=content or None, reasoning_content=reasoning)
        logprobs = ChoiceLogprobs(content=tokens.logprobs(result.logprobs[i])) if tokens else None
        choices.append(Choice(index=i, message=message, logprobs=logprobs, finish_reason=reason))
    return ChatCompletion(id=meta.id, object="chat.completion", created=meta.created, model=meta.model,
                          choices=choices, usage=_usage(result.prompt_tokens, result.completion_tokens))


class TokenText:
    """Token strings and raw bytes for OpenAI's ``logprobs`` entries (``bytes`` shows split UTF-8 characters)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet

    def token(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and all(char in self.byte_of for char in piece):
            raw = bytes(self.byte_of[char] for char in piece)
        else:  # not a byte-level token (e.g. SentencePiece): the decoded text is the best we have
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs(self, items: Sequence[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
        entries = []
        for item in items:
            token, raw = self.token(item.token_id)
            top = []
            for alt_id, alt_logprob in item.top:
                alt_token, alt_raw = self.token(alt_id)
                top.append(TopLogprob(token=alt_token, bytes=alt_raw, logprob=alt_logprob))
            entries.append(ChatCompletionTokenLogprob(token=token, bytes=raw, logprob=item.logprob, top_logprobs=top))
        return entries


def _chat_chunk(meta: ResponseMeta, choices: list[ChunkChoice], include_usage: bool, usage=None) -> str:
    chunk = ChatCompletionChunk(id=meta.id, object="chat.completion.chunk", created=meta.created,
                                model=meta.model, choices=choices)
    if include_usage:  # OpenAI: with include_usage every chunk has a usage field, null but on the last one
        chunk.usage = usage
    return sse(chunk.model_dump_json(exclude_unset=True))


def _delta_choice(index: int, delta: ChoiceDelta, finish_reason: str | None = None) -> ChunkChoice:
    return ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=finish_reason)


async def _chat_stream(
    handle: GenerationHandle, meta: ResponseMeta, include_usage: bool, thinking: bool, tokens: TokenText | None
) -> AsyncIterator[str]:
    """The chunk sequence: role first, then text deltas, a finish chunk per choice, usage, then [DONE]."""
    n = handle.params.n
    parsers = [ThinkParser(thinking) for _ in range(n)]
    for i in range(n):
        yield _chat_chunk(meta, [_delta_choice(i, ChoiceDelta(role="assistant", content=""))], include_usage)
    try:
        step = None
        async for step in handle:
            for out in step.choices:
                reasoning, content = parsers[out.index].push(out.text)
                if out.finish_reason:
                    tail = parsers[out.index].flush()
                    reasoning, content = reasoning + tail[0], content + tail[1]
                if reasoning or content or (tokens and out.logprobs):
                    delta = ChoiceDelta(reasoning_content=reasoning) if reasoning else ChoiceDelta()
                    if content or not reasoning:
                        delta.content = content
                    choice = _delta_choice(out.index, delta)
                    if tokens:  # the tokens of this step; their text may come in a later chunk (held back)
                        choice.logprobs = ChunkChoiceLogprobs(content=tokens.logprobs(out.logprobs))
                    yield _chat_chunk(meta, [choice], include_usage)
                if out.finish_reason:
                    yield _chat_chunk(meta, [_delta_choice(out.index, ChoiceDelta(), out.finish_reason)], include_usage)
        if include_usage and step is not None:
            yield _chat_chunk(meta, [], True, _usage(step.prompt_tokens, step.completion_tokens))
    except Exception as err:  # once the 200 header is sent, an error can only travel as an event
        yield sse(json.dumps(error_body(500, f"generation failed: {type(err).__name__}: {err}")))
    yield SSE_DONE


# ---- legacy completions ----------------------------------------------------------------------------------
def _completion(result: GenerationResult, meta: ResponseMeta) -> Completion:
    choices = [CompletionChoice(index=i, text=text, logprobs=None, finish_reason=reason)
               for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
    return Completion(id=meta.id, object="text_completion", created=meta.created, model=meta.model,
                      choices=choices, usage=_usage(result.prompt_tokens, result.completion_tokens))


def _completion_chunk(meta: ResponseMeta, choices: list[CompletionChoice], include_usage: bool, usage=None) -> str:
    chunk = Completion(id=meta.id, object="text_completion", created=meta.created, model=meta.model, choices=choices)
    if include_usage:
        chunk.usage = usage
    return sse(chunk.model_dump_json(exclude_unset=True))


async def _completion_stream(handle: GenerationHandle, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[str]:
    try:
        step = None
        async for step in handle:
            for out in step.choices:
                choice = CompletionChoice.model_construct(index=out.index, text=out.text, logprobs=None,
                                          finish_reason=out.finish_reason)
                yield _completion_chunk(meta, [choice], include_usage)
        if include_usage and step is not None:
            yield _completion_chunk(meta, [], True, _usage(step.prompt_tokens, step.completion_tokens))
    except Exception as err:
        yield sse(json.dumps(error_body(500, f"generation failed: {type(err).__name__}: {err}")))
    yield SSE_DONE


# ---- errors ----------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        """FastAPI says 422; OpenAI clients expect 400 with a readable message (as vLLM does)."""
        content_type = request.headers.get("content-type")
        if not _is_json_media_type(content_type):  # FastAPI did not even try to parse the body as JSON
            message = (f"The body must be JSON sent with `Content-Type: application/json` (got "
                       f"{f'`{content_type}`' if content_type else 'no Content-Type'}; with curl add "
                       "-H 'Content-Type: application/json').")
            return JSONResponse(error_body(415, message), status_code=415)
        problems, param = [], None
        for item in err.errors():
            loc = [str(part) for part in item.get("loc", ()) if part != "body"]
            if item.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})")
                continue
            if not loc and item.get("type") == "missing":
                problems.append("the body is empty (or null): send a JSON object")
                continue
            param = param or ".".join(loc) or None
            message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
            problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
        return JSONResponse(error_body(400, "; ".join(problems) or "invalid request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        parse_error = err.status_code == 400 and err.__cause__ is not None  # FastAPI could not read the body
        message = _body_parse_error(err.__cause__) if parse_error else str(err.detail)
        return JSONResponse(error_body(err.status_code, message), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}"), status_code=500)


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


# ---- middleware (pure ASGI, so streaming and disconnect detection pass through untouched) -----------------
async def _send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on /v1 routes (constant-time compare); preflights pass."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _send_error(send, 401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                                  {"WWW-Authenticate": "Bearer"})
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
            await _send_error(send, 413, too_big)
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
                await _send_error(send, 413, too_big)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: wait for http.disconnect as usual

        await self.app(scope, replay, send)
