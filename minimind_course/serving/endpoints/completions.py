"""``POST /v1/completions``: the same path without the chat template (a string or token ids)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from minimind_course.serving.generation import Generation, get_generation
from minimind_course.serving.internal import InternalRequest, WireNames
from minimind_course.serving.protocol import CompletionRequest
from minimind_course.serving.render_completion import CompletionRenderer
from minimind_course.serving.rendering import ResponseMeta

router = APIRouter()


def to_internal(body: CompletionRequest, defaults: dict[str, float]) -> InternalRequest:
    """The completion body as the neutral request."""
    return InternalRequest(
        sampling=body.sampling_params(body.max_tokens or 1, defaults),  # max_tokens: set by the budget
        prompt=body.single_prompt(),
        model=body.model,
        max_tokens=body.max_tokens,
        stream=body.stream,
        include_usage=body.include_usage,
        names=WireNames(prompt="prompt"),
    )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      generation: Generation = Depends(get_generation)) -> Response:
    req = to_internal(body, generation.engine.sampling_defaults)
    meta = ResponseMeta.new("cmpl", generation.check_model(req.model))
    submitted = await generation.submit(req, meta.id)
    return await generation.respond(submitted, CompletionRenderer(meta, req.include_usage), request, req.stream)
