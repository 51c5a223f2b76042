"""The OpenAI-compatible HTTP server: ``create_app(engine)`` and its routes, each a few lines over the ``Engine``.

| route | what it does |
|---|---|
| ``GET /health`` | ``{"status": "ok", "queued": N}``, even while the engine is busy; never needs the API key |
| ``GET /metrics`` | Prometheus text format under vLLM's metric names (``metrics``); no API key, as in vLLM |
| ``GET /v1/models`` | the served name(s) with ``max_model_len`` |
| ``POST /v1/chat/completions`` | chat template (with tools) → grammar if the answer is forced → queue → ``chat.completion`` or an SSE stream of chunks |
| ``POST /v1/completions`` | the same without the template (a string or token ids) |

Response objects and the SSE stream live in ``responses``; errors and middleware in ``middleware``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from openai.types import Model
from starlette.background import BackgroundTask

from minimind_course.engine.engine import (
    ContextLengthError,
    Engine,
    EngineBusyError,
    GenerationHandle,
    GenerationResult,
    PromptError,
    RequestTooLargeError,
)
from minimind_course.serving.metrics import CONTENT_TYPE, EngineMetrics
from minimind_course.serving.middleware import DEFAULT_MAX_BODY_BYTES, add_error_handlers, add_middleware
from minimind_course.serving.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from minimind_course.serving.reasoning import THINK_START
from minimind_course.serving.structured_output import (
    ConstraintFactory,
    GrammarError,
    StructuredOutput,
    needs_grammar,
    request_grammar,
)
from minimind_course.serving.responses import (
    SSE_HEADERS,
    ChatRenderer,
    CompletionRenderer,
    ResponseMeta,
    TokenText,
    chat_completion,
    completion,
    sse_stream,
)

CLIENT_GONE = Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def create_app(
    engine: Engine,
    *,
    served_model_name: str | Sequence[str] = "minimind",
    api_key: str | None = None,
    cors_origins: Sequence[str] = ("*",),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tool_grammar: str = "lazy",
) -> FastAPI:
    """Build the server around an engine. ``api_key`` None leaves /v1 open; ``/health`` is always open.
    ``tool_grammar`` "lazy" constrains a call the model starts in ``tool_choice`` auto, "off" leaves auto free."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    adapters = engine.lora_names  # LoRA adapters are models of their own, with the base as parent (as vLLM)
    if clash := set(names) & set(adapters):
        raise ValueError(f"LoRA adapter names clash with the served model name: {', '.join(sorted(clash))}")
    app = FastAPI(title="MiniMind OpenAI-compatible server", docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.served_model_names = names
    app.state.started = int(time.time())
    app.state.tool_grammar = tool_grammar
    token_text = TokenText(engine.tokenizer)
    grammars: list[StructuredOutput] = []  # built on the first request that needs one (reads the whole vocabulary)
    metrics = EngineMetrics(engine, names[0])
    add_error_handlers(app)

    def check_model(requested: str | None) -> str:
        """The model name a response reports: the requested adapter, else the first base name (as vLLM)."""
        if requested is not None and requested not in names and requested not in adapters:
            raise OpenAIError(404, f"The model `{requested}` does not exist.", "model")
        return requested if requested in adapters else names[0]

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "queued": engine.queued}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, object]:
        cards = [_model_card(app, name) for name in names]
        cards += [_model_card(app, name, parent=names[0]) for name in adapters]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, object]:
        check_model(model_id)
        return _model_card(app, model_id, parent=names[0] if model_id in adapters else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        meta = ResponseMeta.new("chatcmpl", check_model(body.model))
        tools = body.active_tools()
        prompt = _run_user_step(engine.chat_prompt, body.template_messages(), body.chat_template_kwargs, tools)
        thinking = prompt.rstrip().endswith(THINK_START)  # the template pre-filled an open <think>
        constraint = await _constraint(engine, grammars, body, thinking, app.state.tool_grammar)
        handle = _submit(engine, engine.encode(prompt), body, meta.id, constraint, _adapter(meta.model, adapters))
        tokens = token_text if body.logprobs else None
        named = bool(body.forced_tools()) and body.tool_choice != "required"
        call_finish = ("stop" if named else "tool_calls") if tools else None
        if body.stream:
            return _streaming(handle, ChatRenderer(meta, body.include_usage, handle.params.n, thinking, tokens,
                                                   call_finish))
        result = await _result_unless_disconnected(handle, request)
        return _json(chat_completion(result, meta, thinking, tokens, call_finish)) if result else CLIENT_GONE

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        meta = ResponseMeta.new("cmpl", check_model(body.model))
        prompt_ids = _prompt_ids(engine, body.single_prompt())
        handle = _submit(engine, prompt_ids, body, meta.id, lora=_adapter(meta.model, adapters))
        if body.stream:
            return _streaming(handle, CompletionRenderer(meta, body.include_usage))
        result = await _result_unless_disconnected(handle, request)
        return _json(completion(result, meta)) if result else CLIENT_GONE

    add_middleware(app, api_key=api_key, max_body_bytes=max_body_bytes, cors_origins=list(cors_origins))
    return app


def _run_user_step(func, *args):
    """Run a step whose failures are the user's fault (bad messages, template arguments): 400."""
    try:
        return func(*args)
    except PromptError as err:
        raise OpenAIError(400, str(err), "messages") from err


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    """A completion prompt as token ids: text is encoded, ids must lie in the vocabulary."""
    if isinstance(prompt, str):
        return engine.encode(prompt)
    vocab = len(engine.tokenizer)
    if any(not 0 <= token < vocab for token in prompt):
        raise OpenAIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return prompt


def _adapter(model: str, adapters: list[str]) -> str | None:
    """The LoRA adapter a request's model name selects (None: the base model)."""
    return model if model in adapters else None


async def _constraint(engine: Engine, grammars: list[StructuredOutput], body: ChatCompletionRequest,
                      thinking: bool, tool_grammar: str) -> ConstraintFactory | None:
    """The grammar the request's tools or JSON output need, compiled off the event loop; a schema xgrammar cannot
    compile is the user's 400."""
    if not needs_grammar(body, tool_grammar):
        return None

    def compile_() -> ConstraintFactory:
        if not grammars:
            vocab = getattr(engine.model.config, "vocab_size", None) or len(engine.tokenizer)
            grammars.append(StructuredOutput(engine.tokenizer, vocab, engine.eos_token_ids))
        return grammars[0].factory(request_grammar(body, thinking, tool_grammar))

    try:
        return await asyncio.to_thread(compile_)
    except GrammarError as err:
        raise OpenAIError(400, str(err), err.param) from err


def _submit(
    engine: Engine,
    prompt_ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    request_id: str,
    constraint: ConstraintFactory | None = None,
    lora: str | None = None,
):
    """Check the context budget, build sampling parameters, queue the request under the response's id."""
    if not prompt_ids:
        raise OpenAIError(400, "The prompt is empty.", "prompt")
    try:
        budget = engine.completion_budget(len(prompt_ids), body.requested_max_tokens())
        return engine.submit(prompt_ids, body.sampling_params(budget, engine.sampling_defaults), request_id,
                             constraint=constraint, lora=lora)
    except ContextLengthError as err:
        raise OpenAIError(400, str(err), "messages" if isinstance(body, ChatCompletionRequest) else "prompt") from err
    except RequestTooLargeError as err:
        raise OpenAIError(400, str(err), err.param) from err
    except EngineBusyError as err:
        raise OpenAIError(429, str(err)) from err


def _streaming(handle: GenerationHandle, renderer: ChatRenderer | CompletionRenderer) -> StreamingResponse:
    """The SSE response; when it ends (finished, or the client hung up) the request is cancelled."""
    return StreamingResponse(sse_stream(handle, renderer), media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(_cancel, handle))


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


def _model_card(app: FastAPI, name: str, parent: str | None = None) -> dict[str, object]:
    """A /v1/models entry; a LoRA adapter names its base model in ``parent`` (None for a base model), as vLLM."""
    card = Model(id=name, object="model", created=app.state.started, owned_by="minimind-course",
                 max_model_len=app.state.engine.max_model_len, parent=parent)
    return card.model_dump()
