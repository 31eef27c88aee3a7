"""Shared objects of the running service, handed to routes through `Depends`.

Tests replace any of these with ``app.dependency_overrides[get_engine] = ...``. The
providers are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies on a
thread pool, a thread hop per dependency per request. A plain Starlette endpoint gets
the same objects, overrides included, through `resolve_dependency`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from retrieval.bundle import ModelBundle
from service.batcher import MicroBatcher
from service.cache import ResponseCache
from service.engine import RetrievalEngine
from service.errors import NotReadyError, UnauthorizedError
from service.feature_store import FeatureStore
from service.index_manager import IndexManager
from service.metrics import ServiceMetrics
from service.middleware import UNAUTHORIZED_MESSAGE, AdmissionLimiter, api_key_matches
from service.query import QuerySchema
from service.redis_link import RedisLink
from service.retriever import RetrievalJob, RetrievalResult, Retriever
from service.settings import ServiceSettings


@dataclass
class Services:
    """Everything the lifespan loads once and the routes share."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    bundle: ModelBundle
    schema: QuerySchema
    retriever: Retriever
    index_manager: IndexManager
    batcher: MicroBatcher[RetrievalJob, RetrievalResult]
    engine: RetrievalEngine
    limiter: AdmissionLimiter
    feature_store: FeatureStore | None
    redis: RedisLink | None
    cache: ResponseCache | None
    query_tower_mode: str
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    draining: bool = False

    @property
    def ready(self) -> bool:
        return not self.draining and self.index_manager.current is not None and self.batcher.running


async def get_settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReadyError("the model and index are not loaded yet", retry_after_s=1)
    return services


async def get_engine(request: Request) -> RetrievalEngine:
    return (await get_services(request)).engine


async def get_limiter(request: Request) -> AdmissionLimiter:
    return (await get_services(request)).limiter


T = TypeVar("T")


async def resolve_dependency(request: Request, provider: Callable[[Request], Awaitable[T]]) -> T:
    """What ``Depends(provider)`` gives a FastAPI route, for a plain Starlette endpoint.

    ``app.dependency_overrides[provider]`` is used when set: called with the request when
    it takes an argument, without one otherwise, and awaited when it returns an awaitable
    (the forms tests use; sub-dependencies of an override are not resolved).
    """
    override = request.app.dependency_overrides.get(provider)
    if override is None:
        return await provider(request)
    value = override(request) if inspect.signature(override).parameters else override()
    if inspect.isawaitable(value):
        value = await value
    return value


# Declared in the OpenAPI document (a security scheme on every /v1 route); checked below,
# not by FastAPI, so a missing key gets the same 401 body as a wrong one.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Required on /v1/* when the service is started with RETRIEVAL_API_KEY.",
)


async def require_api_key(
    request: Request, given: Annotated[str | None, Security(API_KEY_HEADER)] = None
) -> None:
    """401 unless `X-API-Key` matches the configured key (constant-time comparison).

    `service.middleware.APIKeyMiddleware` has already refused a wrong key from the headers
    (before the body was read); this check keeps every route safe on its own.
    """
    expected = (await get_settings(request)).api_key
    if not api_key_matches(given.encode() if given is not None else None, expected):
        raise UnauthorizedError(UNAUTHORIZED_MESSAGE)
