"""GET /healthz (alive), GET /readyz (model and index loaded), GET /metrics (Prometheus)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from service.dependencies import Services, get_metrics
from service.metrics import ServiceMetrics

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    summary="Liveness: the process answers (503 only when the model or index failed to load)",
    responses={503: {"description": "the model or index failed to load; the process stops"}},
)
async def healthz(request: Request) -> Response:
    if request.app.state.load_error is not None:
        return JSONResponse({"status": "failed", "reason": "model or index failed to load"}, 503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: model and index loaded, not shutting down (503 otherwise)",
    responses={503: {"description": "not ready"}},
)
async def readyz(request: Request) -> Response:
    services: Services | None = getattr(request.app.state, "services", None)
    body: dict[str, Any] = {"ready": False}
    if services is None:
        body["reason"] = "model and index not loaded"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    index = services.index_manager.current
    body.update(
        {
            "ready": services.ready,
            "model_version": services.bundle.version,
            "index_version": index.version if index is not None else None,
            "draining": services.draining,
            "redis_reachable": services.redis.reachable if services.redis is not None else None,
        }
    )
    if not services.ready:
        body["reason"] = "shutting down" if services.draining else "index not loaded"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: Annotated[ServiceMetrics, Depends(get_metrics)]) -> Response:
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
