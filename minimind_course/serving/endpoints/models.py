"""``GET /v1/models`` and ``GET /v1/models/{id}``: the served name(s) and LoRA adapters, with ``max_model_len``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from openai.types import Model

from minimind_course.serving.generation import Generation, get_generation

router = APIRouter()


def model_card(request: Request, name: str, parent: str | None = None) -> dict[str, object]:
    """A /v1/models entry; a LoRA adapter names its base model in ``parent`` (None for a base model), as vLLM."""
    card = Model(id=name, object="model", created=request.app.state.started, owned_by="minimind-course",
                 max_model_len=request.app.state.engine.max_model_len, parent=parent)
    return card.model_dump()


@router.get("/v1/models")
async def list_models(request: Request, generation: Generation = Depends(get_generation)) -> dict[str, object]:
    cards = [model_card(request, name) for name in generation.names]
    cards += [model_card(request, name, parent=generation.names[0]) for name in generation.adapters]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request,
                         generation: Generation = Depends(get_generation)) -> dict[str, object]:
    generation.check_model(model_id)
    return model_card(request, model_id, parent=generation.names[0] if model_id in generation.adapters else None)
