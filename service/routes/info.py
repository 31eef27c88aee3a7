"""GET /v1/info: versions, catalog size, query schema, serving configuration."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from service.dependencies import Services, get_services, require_api_key
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1", tags=["retrieval"], dependencies=[Depends(require_api_key)])


@router.get(
    "/info",
    summary="Model and index versions, catalog size, query schema",
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid API key"},
        503: {"model": ErrorResponse, "description": "the model and index are not loaded yet"},
    },
)
async def info(services: Annotated[Services, Depends(get_services)]) -> dict[str, Any]:
    settings = services.settings
    manager = services.index_manager
    index = manager.current
    index_info: dict[str, Any] | None = None
    if index is not None:
        index_info = {
            "version": index.version,
            "num_items": index.num_items,
            "dim": index.dim,
            "factory": index.loaded.factory,
            "search_params": index.loaded.search_params,
            "search_path": index.loaded.device,
            "created": index.manifest.get("created"),
            "recall": (index.manifest.get("recall") or {}).get("recall"),
        }
    timings = services.retriever.timings
    return {
        "model": {
            "version": services.bundle.version,
            "checksum": services.bundle.checksum,
            "output_dim": services.bundle.model.output_dim,
            "dataset": services.bundle.encoder.schema.name,
            "query_tower_mode": services.query_tower_mode,
        },
        "index": index_info,
        "index_swaps": {
            "ok": manager.swaps_ok,
            "failed": manager.swaps_failed,
            "last_attempted": manager.last_attempted,
            "last_error": manager.last_error,
        },
        "catalog_size": index.num_items if index is not None else None,
        "schema": services.schema.describe(),
        "feature_store": services.feature_store.kind if services.feature_store else None,
        "redis": services.redis.describe() if services.redis is not None else None,
        "cache": services.cache is not None,
        "limits": {
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "max_batch_queries": settings.max_batch_queries,
            "max_body_bytes": settings.max_body_bytes,
            "max_in_flight": settings.max_in_flight,
            "request_timeout_s": settings.request_timeout_s,
            "max_seen_ids": settings.max_seen_ids,
            "code_cache_size": settings.code_cache_size,
        },
        "code_cache_values": services.retriever.batch_encoder.cached_values(),
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "queue_depth": services.batcher.queue_depth,
            "batches": timings.batches,
            "mean_batch_size": (
                sum(services.batcher.batch_sizes) / len(services.batcher.batch_sizes)
                if services.batcher.batch_sizes
                else None
            ),
            "stage_seconds": {
                "encode": round(timings.encode, 4),
                "embed": round(timings.embed, 4),
                "search": round(timings.search, 4),
                "ids": round(timings.ids, 4),
            },
        },
    }
