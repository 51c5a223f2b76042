"""``/v1/responses``: the body (and the stored conversation it continues) → ``InternalRequest`` → the shared path →
``ResponsesRenderer``; ``GET`` and ``DELETE /v1/responses/{id}`` read the response store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from minimind_course.engine.sampling import SamplingParams
from minimind_course.serving.generation import Generation, get_generation
from minimind_course.serving.internal import InternalRequest, WireNames
from minimind_course.serving.protocol import SAMPLING_EPS
from minimind_course.serving.protocol_responses import ResponsesRequest, chat_messages, output_messages
from minimind_course.serving.render_responses import ResponseBuilder, ResponsesRenderer, new_response
from minimind_course.serving.response_store import ResponseStore

router = APIRouter()
NAMES = WireNames(prompt="input", max_tokens="max_output_tokens", output_schema="text.format",
                  tool_parameters="tools.{index}.parameters", reasoning_effort="reasoning.effort")


async def get_store(request: Request) -> ResponseStore:
    """FastAPI dependency: the app's response store."""
    return request.app.state.response_store


def to_internal(body: ResponsesRequest, messages: list[dict[str, Any]], defaults: dict[str, float]
                ) -> InternalRequest:
    """The Responses body as the neutral request (``defaults``: the model's generation_config sampling values)."""

    def pick(value: float | None, name: str, fallback: float) -> float:
        return float(value if value is not None else defaults.get(name, fallback))

    temperature = pick(body.temperature, "temperature", 1.0)
    sampling = SamplingParams(temperature=temperature if temperature >= SAMPLING_EPS else 0.0,
                              top_p=pick(body.top_p, "top_p", 1.0), top_k=int(defaults.get("top_k", 0)),
                              repetition_penalty=pick(None, "repetition_penalty", 1.0))
    named = body.named_choice()
    fmt = body.output_format()
    schema = getattr(fmt, "schema_", None)
    return InternalRequest(
        sampling=sampling, messages=messages, model=body.model, max_tokens=body.max_output_tokens,
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
        tools=[tool.for_chat() for tool in body.function_tools],
        tool_choice="function" if named else (body.tool_choice or "auto"),
        tool_name=named.name if named else None,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        output_schema=None if fmt is None else (schema if schema is not None else {"type": "object"}),
        schema_strict=schema is not None,
        stream=bool(body.stream), names=NAMES,
    )


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, generation: Generation = Depends(get_generation),
                          store: ResponseStore = Depends(get_store)) -> Response:
    previous = body.previous_response_id
    history = store.get(previous, "previous_response_id").messages if previous is not None else []
    messages, kept = chat_messages(body, history)
    req = to_internal(body, messages, generation.engine.sampling_defaults)
    response = new_response(body, generation.check_model(req.model))
    submitted = await generation.submit(req, response.id)

    def keep(done) -> None:
        store.put(done, kept + output_messages(done.output))

    builder = ResponseBuilder(response, submitted.thinking, bool(req.active_tools()),
                              lambda text: len(generation.engine.encode(text)))
    renderer = ResponsesRenderer(builder, keep if body.stores else None)
    return await generation.respond(submitted, renderer, request, req.stream)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, store: ResponseStore = Depends(get_store)) -> Response:
    stored = store.get(response_id)
    return Response(stored.response.model_dump_json(exclude_unset=True), media_type="application/json")


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, store: ResponseStore = Depends(get_store)) -> dict[str, object]:
    store.get(response_id)  # 404 for an unknown id
    store.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
