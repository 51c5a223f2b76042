"""The shared path every endpoint hands its ``InternalRequest`` to: model → prompt → context budget → grammar →
engine queue, then a whole response or an SSE stream, the request cancelled when the client hangs up.

One ``Generation`` per app (``app.state.generation``); an endpoint converts its wire body, calls ``submit`` and
``respond`` with its protocol's ``Renderer``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
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
from minimind_course.serving.internal import InternalRequest
from minimind_course.serving.protocol import OpenAIError
from minimind_course.serving.reasoning import THINK_START
from minimind_course.serving.rendering import Renderer, TokenText
from minimind_course.serving.sse import MEDIA_TYPE, SSE_HEADERS
from minimind_course.serving.structured_output import (
    ConstraintFactory,
    GrammarError,
    StructuredOutput,
    needs_grammar,
    request_grammar,
)

CLIENT_GONE = Response(status_code=499)  # nginx's "client closed request"; nobody reads it
THINKING_SWITCHES = ("enable_thinking", "open_thinking")  # Qwen3's and MiniMind-3's chat template variables
NO_THINKING_EFFORTS = ("none", "minimal")  # reasoning_effort values that turn thinking off
Overflow = Literal["clamp", "error"]


@dataclass
class Submitted:
    """A queued request: its handle, and whether the prompt opened ``<think>`` (the answer starts in reasoning)."""

    handle: GenerationHandle
    thinking: bool


class Generation:
    """The engine behind every endpoint, with the served names, the grammar compiler and the overflow policy.

    ``overflow``: a ``max_tokens`` beyond what the context leaves is clamped to it ("clamp", llama.cpp's way; the
    answer ends with ``finish_reason "length"``) or refused with vLLM's 400 ("error"); ``tool_grammar``: "lazy"
    constrains a call the model starts under ``tool_choice`` auto, "off" leaves auto free (see structured_output)."""

    def __init__(self, engine: Engine, names: Sequence[str], overflow: Overflow = "clamp", tool_grammar: str = "lazy"):
        if overflow not in ("clamp", "error"):
            raise ValueError(f"overflow must be clamp or error, not {overflow!r}")
        self.engine, self.names, self.overflow, self.tool_grammar = engine, list(names), overflow, tool_grammar
        self.adapters = engine.lora_names  # LoRA adapters are models of their own, with the base as parent (vLLM)
        if clash := set(self.names) & set(self.adapters):
            raise ValueError(f"LoRA adapter names clash with the served model name: {', '.join(sorted(clash))}")
        self.tokens = TokenText(engine.tokenizer)
        template = engine.tokenizer.chat_template if isinstance(engine.tokenizer.chat_template, str) else ""
        self.thinking_switches = [name for name in THINKING_SWITCHES if name in (template or "")]
        self._grammars: StructuredOutput | None = None  # built on first use (it reads the whole vocabulary)

    def check_model(self, requested: str | None) -> str:
        """The model name a response reports: the requested adapter, else the first base name (as vLLM)."""
        if requested is not None and requested not in self.names and requested not in self.adapters:
            raise OpenAIError(404, f"The model `{requested}` does not exist.", "model")
        return requested if requested in self.adapters else self.names[0]

    # ---- prompt ----------------------------------------------------------------------------------------
    def template_kwargs(self, req: InternalRequest) -> dict[str, object]:
        """``chat_template_kwargs`` plus the thinking switch ``reasoning_effort`` sets (explicit kwargs win); an
        effort that asks for thinking from a template that cannot think is a 400."""
        kwargs = dict(req.template_kwargs)
        effort = req.reasoning_effort
        if effort is None or (effort in NO_THINKING_EFFORTS and not self.thinking_switches):
            return kwargs
        if not self.thinking_switches:
            raise OpenAIError(400, f"reasoning_effort `{effort}`: this model's chat template cannot think (it has "
                                   f"no {' or '.join(THINKING_SWITCHES)} switch); leave reasoning_effort out or send "
                                   "`none`", req.names.reasoning_effort)
        for name in self.thinking_switches:
            kwargs.setdefault(name, effort not in NO_THINKING_EFFORTS)
        return kwargs

    def chat_prompt(self, req: InternalRequest, add_generation_prompt: bool = True,
                    tools: list[dict[str, object]] | None = None) -> str:
        """The chat template's text for the request's messages (``tools``: default the active tools)."""
        tools = req.active_tools() if tools is None else tools
        try:
            return self.engine.chat_prompt(req.messages or [], self.template_kwargs(req), tools,
                                           add_generation_prompt=add_generation_prompt)
        except PromptError as err:
            raise OpenAIError(400, str(err), req.names.prompt) from err

    def chat_prompt_ids(self, req: InternalRequest) -> tuple[list[int], bool]:
        """The token ids of the request's chat prompt (its ``prefill`` after the generation prompt), and whether
        the template pre-filled an open ``<think>`` (the answer then starts in reasoning)."""
        prompt = self.chat_prompt(req)
        return self.engine.encode(prompt + req.prefill), prompt.rstrip().endswith(THINK_START)

    def prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        """Text encoded as is, or token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.engine.encode(prompt)
        vocab = len(self.engine.tokenizer)
        if any(not 0 <= token < vocab for token in prompt):
            raise OpenAIError(400, f"{param}: token ids must be in [0, {vocab})", param)
        return prompt

    # ---- submit ----------------------------------------------------------------------------------------
    async def submit(self, req: InternalRequest, request_id: str) -> Submitted:
        """Check model, prompt, budget and grammar (each failure the user's 4xx), then queue the request."""
        model = self.check_model(req.model)
        if req.messages is not None:
            prompt_ids, thinking = self.chat_prompt_ids(req)
        else:
            thinking, prompt_ids = False, self.prompt_ids(req.prompt if req.prompt is not None else "", "prompt")
        if not prompt_ids:
            raise OpenAIError(400, "The prompt is empty.", req.names.prompt)
        max_tokens = self.budget(req, len(prompt_ids))
        constraint = await self.constraint(req, thinking)
        params = dataclasses.replace(req.sampling, max_tokens=max_tokens)
        vocab = len(self.engine.tokenizer)
        if any(token >= vocab for token in params.logit_bias):
            raise OpenAIError(400, f"logit_bias: token ids must be in [0, {vocab})", "logit_bias")
        lora = model if model in self.adapters else None
        try:
            handle = self.engine.submit(prompt_ids, params, request_id, constraint=constraint, lora=lora)
        except RequestTooLargeError as err:
            raise OpenAIError(400, str(err), err.param) from err
        except EngineBusyError as err:
            raise OpenAIError(429, str(err)) from err
        return Submitted(handle, thinking)

    def budget(self, req: InternalRequest, prompt_tokens: int) -> int:
        """Tokens the answer may take: the request's max (clamped to what the context leaves, unless the policy
        is "error"), else what the context leaves. A prompt that leaves no room is a 400 naming its cause."""
        requested = req.max_tokens
        left = self.engine.max_model_len - prompt_tokens
        if requested is not None and self.overflow == "clamp" and left > 0:
            requested = min(requested, left)
        try:
            return self.engine.completion_budget(prompt_tokens, requested)
        except ContextLengthError as err:
            param = req.names.max_tokens if left > 0 else req.names.prompt
            raise OpenAIError(400, str(err) + self.tools_note(req, prompt_tokens), param) from err

    def tools_note(self, req: InternalRequest, prompt_tokens: int) -> str:
        """When tool definitions make most of a prompt too long: how many tokens they take, and what to do."""
        tools = req.active_tools()
        if not tools or req.messages is None:
            return ""
        without = len(self.engine.encode(self.chat_prompt(req, tools=[])))
        share = prompt_tokens - without
        if share * 2 < prompt_tokens:
            return ""
        return (f" {share:,} of them for {len(tools)} tool definitions: send fewer tools (turn off the client's "
                f"built-in tools for this model) or serve with a larger --max-model-len.")

    async def constraint(self, req: InternalRequest, thinking: bool) -> ConstraintFactory | None:
        """The grammar a forced tool call or JSON output needs, compiled off the event loop; a schema xgrammar
        cannot compile is the user's 400."""
        if not needs_grammar(req, self.tool_grammar):
            return None

        def compile_() -> ConstraintFactory:
            if self._grammars is None:
                vocab = getattr(self.engine.model.config, "vocab_size", None) or len(self.engine.tokenizer)
                self._grammars = StructuredOutput(self.engine.tokenizer, vocab, self.engine.eos_token_ids)
            forced = req.forced_tools()  # a grammar that does not compile is blamed on what it came from
            param = req.names.tool_parameters.format(index=forced[0][0]) if len(forced) == 1 else (
                "tools" if forced else req.names.output_schema)
            return self._grammars.factory(request_grammar(req, thinking, self.tool_grammar), param)

        try:
            return await asyncio.to_thread(compile_)
        except GrammarError as err:
            raise OpenAIError(400, str(err), err.param) from err

    # ---- respond ---------------------------------------------------------------------------------------
    async def respond(self, submitted: Submitted, renderer: Renderer, request: Request, stream: bool) -> Response:
        """The SSE stream, or the whole response once generation ended (499 when the client hung up first)."""
        handle = submitted.handle
        if stream:
            return StreamingResponse(sse_stream(handle, renderer), media_type=MEDIA_TYPE, headers=SSE_HEADERS,
                                     background=BackgroundTask(_cancel, handle))
        result = await result_unless_disconnected(handle, request)
        if result is None:
            return CLIENT_GONE
        return Response(renderer.response(result).model_dump_json(exclude_unset=True), media_type="application/json")


async def sse_stream(handle: GenerationHandle, renderer: Renderer) -> AsyncIterator[str]:
    """The event sequence: the renderer's opening events, its events for every engine step, its closing events."""
    for event in renderer.start():
        yield event
    step = None
    try:
        async for step in handle:
            for out in step.choices:
                for event in renderer.step(out):
                    yield event
    except Exception as err:  # once the 200 header is sent, an error can only travel as an event
        for event in renderer.failure(f"generation failed: {type(err).__name__}: {err}"):
            yield event
        return
    for event in renderer.end(step):
        yield event


async def _cancel(handle: GenerationHandle) -> None:
    handle.cancel()  # when the stream ends (finished, or the client hung up); a no-op on a finished request


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_unless_disconnected(handle: GenerationHandle, request: Request) -> GenerationResult | None:
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


async def get_generation(request: Request) -> Generation:
    """FastAPI dependency: the app's shared generation path (async: a sync one would take a pool thread)."""
    return request.app.state.generation
