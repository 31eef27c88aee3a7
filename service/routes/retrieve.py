"""POST /v1/retrieve and POST /v1/retrieve/batch.

Both are FastAPI routes (they make the OpenAPI document). With the `fast_path` setting
(the default), POST /v1/retrieve is answered by `LEAN_RETRIEVE_ROUTE` instead, a plain
Starlette route registered ahead of the FastAPI one: the same dependency providers, work,
answers and errors, without FastAPI's dependency solving and body handling per request
(the two measure within noise of each other at ~1.3 ms of server CPU per request,
bench/results/bench_fast_path_ab.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from service.dependencies import (
    get_engine,
    get_limiter,
    get_settings,
    require_api_key,
    resolve_dependency,
)
from service.engine import RetrievalEngine
from service.errors import DeadlineExceededError, InvalidRequestError
from service.middleware import AdmissionLimiter
from service.schemas import (
    BatchRetrieveRequest,
    BatchRetrieveResponse,
    ErrorResponse,
    RetrieveRequest,
    RetrieveResponse,
)
from service.settings import ServiceSettings

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (401, "missing or invalid API key"),
        (404, "`user_id` not in the feature store"),
        (413, "request body too large"),
        (422, "invalid request (the message names the field)"),
        (429, "overloaded: retry after `Retry-After` seconds"),
        (503, "not ready, shutting down, or the feature store is unavailable"),
        (504, "the request ran past the server's deadline"),
    )
}

router = APIRouter(prefix="/v1", tags=["retrieval"], dependencies=[Depends(require_api_key)])


def json_response(payload: dict[str, Any]) -> Response:
    """JSON without a second validation pass over 1000-element lists (orjson: compact UTF-8,
    ~10x faster than `json` on an answer of 1000 ids and scores; scores are finite cosines)."""
    return Response(content=orjson.dumps(payload), media_type="application/json")


def deadline_error(engine: RetrievalEngine, timeout_s: float) -> DeadlineExceededError:
    engine.metrics.rejected.labels(reason="timeout").inc()
    return DeadlineExceededError(f"the request did not finish within {timeout_s:g} s")


def check_batch_size(count: int, settings: ServiceSettings) -> None:
    """A batch route's `queries` within `max_batch_queries` (422 naming the field)."""
    if count > settings.max_batch_queries:
        raise InvalidRequestError(
            f"`queries` must hold at most {settings.max_batch_queries} queries; got {count}",
            field="queries",
        )


@contextlib.asynccontextmanager
async def admitted(
    engine: RetrievalEngine,
    limiter: AdmissionLimiter,
    settings: ServiceSettings,
    queries: int = 1,
) -> AsyncIterator[None]:
    """The work of one request: `queries` admission slots (429 when full), and the request
    deadline (504 past `request_timeout_s`)."""
    with limiter.admit(queries):
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                yield
        except TimeoutError as exc:
            raise deadline_error(engine, settings.request_timeout_s) from exc


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    responses=ERRORS,
    summary="Top-k catalog items for one query",
)
async def retrieve(
    body: RetrieveRequest,
    engine: Annotated[RetrievalEngine, Depends(get_engine)],
    limiter: Annotated[AdmissionLimiter, Depends(get_limiter)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> Response:
    """Inline `query` features and/or a `user_id`; ids best first with their scores."""
    return await retrieve_one(body, engine, limiter, settings)


async def retrieve_one(
    body: RetrieveRequest,
    engine: RetrievalEngine,
    limiter: AdmissionLimiter,
    settings: ServiceSettings,
) -> Response:
    """One retrieval under the admission limit and the deadline (the work of both routes of
    POST /v1/retrieve); errors are raised as `ServiceError`s."""
    started = time.perf_counter()
    async with admitted(engine, limiter, settings):
        prepared = await engine.prepare(body)
        result, cached = await engine.execute(prepared)
    return json_response(engine.response(result, cached, started))


def _is_plain_json(content_type: str | None) -> bool:
    return content_type is not None and (
        content_type.split(";", 1)[0].strip().lower() == "application/json"
    )


_NO_BODY = object()  # an empty body (FastAPI: the body parameter is missing)


def _decode_body(body: bytes, content_type: str | None) -> Any:
    """What FastAPI validates for a JSON body parameter: the decoded JSON for a JSON content
    type (``application/json`` or ``*/*+json``), the raw bytes for any other or none,
    `_NO_BODY` for an empty body. A body that is not JSON raises what FastAPI raises."""
    if not body:
        return _NO_BODY
    if content_type is None:
        return body
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        return body
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "input": {}, "ctx": {"error": exc.msg}}]) from exc
    except Exception as exc:  # not UTF-8, ...
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc


def _validate_body(value: Any) -> RetrieveRequest:
    """`value` (from `_decode_body`) as the request, or the `RequestValidationError` FastAPI
    raises for it (so the 422 names the field the same way)."""
    if value is _NO_BODY:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    try:
        return RetrieveRequest.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc


async def lean_retrieve(request: Request) -> Response:
    """POST /v1/retrieve without FastAPI's request machinery: what `retrieve` answers.

    A JSON body is validated straight from its bytes (`model_validate_json`); anything that
    fails there (another content type, bad JSON, a field pydantic refuses) is decoded and
    validated again the way FastAPI does it, so answers and 422 messages match the FastAPI
    route's, and so does the order of the checks (an undecodable body before the
    dependencies, a refused field after). The dependencies are the FastAPI route's
    providers, `app.dependency_overrides` included; errors go to the app's handlers
    (`service.errors`). The API key was checked by `APIKeyMiddleware`.
    """
    body = await request.body()
    content_type = request.headers.get("content-type")
    query: RetrieveRequest | None = None
    if _is_plain_json(content_type):
        with contextlib.suppress(ValidationError):  # decoded again below, as FastAPI does
            query = RetrieveRequest.model_validate_json(body)
    value = _decode_body(body, content_type) if query is None else None
    engine = await resolve_dependency(request, get_engine)
    limiter = await resolve_dependency(request, get_limiter)
    settings = await resolve_dependency(request, get_settings)
    if query is None:
        query = _validate_body(value)
    return await retrieve_one(query, engine, limiter, settings)


class _LabelledRoute(Route):
    """A Starlette route that names itself in the scope, as FastAPI's routes do (the
    metrics' route label, `service.middleware.MetricsMiddleware`)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self
        return match, child_scope


LEAN_RETRIEVE_ROUTE = _LabelledRoute(
    "/v1/retrieve", lean_retrieve, methods=["POST"], include_in_schema=False
)


@router.post(
    "/retrieve/batch",
    response_model=BatchRetrieveResponse,
    responses=ERRORS,
    summary="Several retrievals in one call",
)
async def retrieve_batch(
    body: BatchRetrieveRequest,
    engine: Annotated[RetrievalEngine, Depends(get_engine)],
    limiter: Annotated[AdmissionLimiter, Depends(get_limiter)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> Response:
    """Each query as in /v1/retrieve; answers in request order. Any bad query fails the call."""
    started = time.perf_counter()
    check_batch_size(len(body.queries), settings)
    async with admitted(engine, limiter, settings, len(body.queries)):
        prepared = [
            await engine.prepare(query, prefix=f"queries[{i}].")
            for i, query in enumerate(body.queries)
        ]
        answers = await engine.execute_many(prepared)
    results = [engine.response(result, cached, started) for result, cached in answers]
    took_ms = round((time.perf_counter() - started) * 1000, 3)
    return json_response({"results": results, "took_ms": took_ms})
