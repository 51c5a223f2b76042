"""``POST /v1/chat/completions``: the body → ``InternalRequest`` → the shared path → ``ChatRenderer``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from minimind_course.serving.generation import Generation, get_generation
from minimind_course.serving.internal import InternalRequest, WireNames
from minimind_course.serving.protocol import ChatCompletionRequest, JsonSchemaFormat, NamedToolChoice
from minimind_course.serving.render_chat import ChatRenderer
from minimind_course.serving.rendering import ResponseMeta

router = APIRouter()


def to_internal(body: ChatCompletionRequest, defaults: dict[str, float]) -> InternalRequest:
    """The chat body as the neutral request (``defaults``: the model's generation_config sampling values)."""
    choice = body.tool_choice
    requested = body.requested_max_tokens()
    return InternalRequest(
        sampling=body.sampling_params(requested or 1, defaults),  # max_tokens: set by the budget
        messages=body.template_messages(),
        model=body.model,
        max_tokens=requested,
        template_kwargs=dict(body.chat_template_kwargs or {}),
        reasoning_effort=body.reasoning_effort,
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []],
        tool_choice="function" if isinstance(choice, NamedToolChoice) else (choice or "auto"),
        tool_name=choice.function.name if isinstance(choice, NamedToolChoice) else None,
        parallel_tool_calls=body.parallel_tool_calls,
        output_schema=body.json_format(),
        schema_strict=isinstance(body.response_format, JsonSchemaFormat),
        stream=body.stream,
        include_usage=body.include_usage,
        names=WireNames(max_tokens="max_completion_tokens" if body.max_completion_tokens is not None
                        else "max_tokens"),
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           generation: Generation = Depends(get_generation)) -> Response:
    req = to_internal(body, generation.engine.sampling_defaults)
    meta = ResponseMeta.new("chatcmpl", generation.check_model(req.model))
    submitted = await generation.submit(req, meta.id)
    renderer = ChatRenderer(meta, req.sampling.n, submitted.thinking, generation.tokens if body.logprobs else None,
                            req.call_finish, req.include_usage)
    return await generation.respond(submitted, renderer, request, req.stream)
