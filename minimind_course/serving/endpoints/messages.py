"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's body → ``InternalRequest`` → the shared
path → ``MessagesRenderer``. Errors on these routes leave in Anthropic's shape (``middleware``)."""

from __future__ import annotations

from anthropic.types import MessageTokensCount
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from minimind_course.engine.sampling import SamplingParams
from minimind_course.serving.generation import Generation, get_generation
from minimind_course.serving.internal import InternalRequest, WireNames
from minimind_course.serving.protocol_messages import (
    CountTokensRequest,
    MessagesRequest,
    ToolChoiceTool,
)
from minimind_course.serving.render_messages import MessagesRenderer
from minimind_course.serving.rendering import ResponseMeta

router = APIRouter()
NAMES = WireNames(prompt="messages", max_tokens="max_tokens", output_schema="output_config.format",
                  tool_parameters="tools.{index}.input_schema", reasoning_effort="thinking")
TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}


def to_internal(body: CountTokensRequest, generation: Generation) -> InternalRequest:
    """The Messages body as the neutral request (a count_tokens body has no sampling: it is never generated)."""
    messages, prefill = body.template_messages()
    choice = body.tool_choice
    generated = isinstance(body, MessagesRequest)
    sampling = body.sampling_params(body.max_tokens, generation.engine.sampling_defaults) if generated else None
    return InternalRequest(
        sampling=sampling or SamplingParams(),
        messages=messages,
        prefill=prefill,
        model=body.model,
        max_tokens=body.max_tokens if generated else None,
        template_kwargs=body.thinking_kwargs(generation.thinking_switches),
        tools=body.template_tools(),
        tool_choice=TOOL_CHOICES[choice.type] if choice else "auto",
        tool_name=choice.name if isinstance(choice, ToolChoiceTool) else None,
        parallel_tool_calls=body.parallel(),
        output_schema=body.output_schema(),
        schema_strict=True,
        stream=generated and body.stream,
        names=NAMES,
    )


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request,
                   generation: Generation = Depends(get_generation)) -> Response:
    req = to_internal(body, generation)
    meta = ResponseMeta.new("msg", generation.check_model(req.model))
    submitted = await generation.submit(req, meta.id)
    renderer = MessagesRenderer(meta, len(submitted.handle.prompt_ids), submitted.thinking,
                                tools=bool(req.active_tools()), parallel=req.parallel_tool_calls,
                                max_tokens=body.max_tokens)
    return await generation.respond(submitted, renderer, request, req.stream)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, generation: Generation = Depends(get_generation)) -> Response:
    """The input tokens a Messages request with this body reports in ``usage.input_tokens``."""
    req = to_internal(body, generation)
    generation.check_model(req.model)
    count = MessageTokensCount(input_tokens=len(generation.chat_prompt_ids(req)[0]))
    return Response(count.model_dump_json(), media_type="application/json")
