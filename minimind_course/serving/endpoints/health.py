"""``GET /health`` (``{"status": "ok", "queued": N}``, even while the engine is busy) and ``GET /metrics``
(Prometheus text under vLLM's metric names); neither needs the API key, as in vLLM."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from minimind_course.serving.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, object]:
    return {"status": "ok", "queued": request.app.state.engine.queued}


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
