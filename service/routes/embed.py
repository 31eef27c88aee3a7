"""POST /v1/embed and POST /v1/embed/batch: the query embedding, without the search.

For clients that search elsewhere or want to see what the service searches with. A query
is read exactly as /v1/retrieve reads it (`RetrievalEngine.prepare`: the same checks, the
same feature store lookup for a `user_id`, 404 for an unknown one) and embedded on the
same path: the micro-batcher, the bundle's encoder and the serving query tower, in the
same batches as retrievals (`RetrievalEngine.embed`). Nothing is searched and the response
cache is not used. The same guards hold as for retrieval: the API key, the body size and
time limits, the admission limit and the request deadline, per-query errors (a query
whose embedding is not finite answers 500 `embedding_failed` alone), and the metrics
(counted under the route's path).

Usage::

    curl -s -X POST localhost:8000/v1/embed -H 'content-type: application/json' \\
        -d '{"user_id": "196"}'
    # {"embedding": [0.0132, ...], "dim": 64, "model_version": "...",
    #  "index_version": "...", "normalized": true, "took_ms": 1.2}
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from service.dependencies import get_engine, get_limiter, get_settings, require_api_key
from service.engine import RetrievalEngine
from service.middleware import AdmissionLimiter
from service.retriever import RetrievalResult
from service.routes.retrieve import ERRORS, admitted, check_batch_size, json_response
from service.schemas import (
    BatchEmbedRequest,
    BatchEmbedResponse,
    EmbedRequest,
    EmbedResponse,
    RetrieveRequest,
)
from service.settings import ServiceSettings

router = APIRouter(prefix="/v1", tags=["retrieval"], dependencies=[Depends(require_api_key)])


def as_retrieve_request(body: EmbedRequest) -> RetrieveRequest:
    """The retrieval request whose query `body` describes (what `RetrievalEngine.prepare`
    checks and looks up; its `k` and exclusions are the defaults and go unused)."""
    return RetrieveRequest(query=body.query, user_id=body.user_id)


def embedding_answer(
    result: RetrievalResult, engine: RetrievalEngine, started: float
) -> dict[str, Any]:
    """The `EmbedResponse` body of an embed-only job's result."""
    assert result.embedding is not None, "an embed-only job answers with its embedding"
    return {
        "embedding": result.embedding,
        "dim": len(result.embedding),
        "model_version": engine.model_version,
        "index_version": result.index_version,
        "normalized": True,
        "took_ms": round((time.perf_counter() - started) * 1000, 3),
    }


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERRORS,
    summary="The query embedding of one query",
)
async def embed(
    body: EmbedRequest,
    engine: Annotated[RetrievalEngine, Depends(get_engine)],
    limiter: Annotated[AdmissionLimiter, Depends(get_limiter)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> Response:
    """Inline `query` features and/or a `user_id`, read as /v1/retrieve reads them; the
    L2-normalised query embedding the index would be searched with."""
    started = time.perf_counter()
    async with admitted(engine, limiter, settings):
        prepared = await engine.prepare(as_retrieve_request(body))
        result = await engine.embed(prepared)
    return json_response(embedding_answer(result, engine, started))


@router.post(
    "/embed/batch",
    response_model=BatchEmbedResponse,
    responses=ERRORS,
    summary="Several query embeddings in one call",
)
async def embed_batch(
    body: BatchEmbedRequest,
    engine: Annotated[RetrievalEngine, Depends(get_engine)],
    limiter: Annotated[AdmissionLimiter, Depends(get_limiter)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> Response:
    """Each query as in /v1/embed; answers in request order. Any bad query fails the call."""
    started = time.perf_counter()
    check_batch_size(len(body.queries), settings)
    async with admitted(engine, limiter, settings, len(body.queries)):
        prepared = [
            await engine.prepare(as_retrieve_request(query), prefix=f"queries[{i}].")
            for i, query in enumerate(body.queries)
        ]
        results = await engine.embed_many(prepared)
    answers = [embedding_answer(result, engine, started) for result in results]
    took_ms = round((time.perf_counter() - started) * 1000, 3)
    return json_response({"results": answers, "took_ms": took_ms})
