"""From a request body to an answer: checks, feature lookup, cache, micro-batch, deadline.

`RetrievalEngine.prepare` turns a `RetrieveRequest` into a `PreparedQuery` (every check
that can fail with 422 or 404 happens here, before anything is queued); `execute` looks
the answer up in the cache or submits it to the micro-batcher and waits for it. The
route handlers add the admission limit and the request deadline around both. `embed`
(POST /v1/embed) submits the same prepared query as an embed-only job: same checks,
feature lookup, micro-batches and query tower, no search and no cache.

A `user_id` request is built exactly like the offline evaluation's query: the stored
raw features and the last N train+valid items (most recent first) go through the same
checks and the bundle's encoder as an inline query, and `exclude_seen` drops the user's
train+valid items: the most recent `ServiceSettings.max_seen_ids` of them (`seen_to_exclude`),
so one user with a long past cannot make a search arbitrarily deep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from service.batcher import BatcherClosedError, MicroBatcher
from service.cache import ResponseCache
from service.errors import (
    InvalidRequestError,
    NotReadyError,
    UnknownUserError,
)
from service.feature_store import FeatureStore, UserRecord
from service.index_manager import IndexManager
from service.metrics import ServiceMetrics
from service.query import QueryFeatures, QuerySchema, normalize_query
from service.retriever import RetrievalJob, RetrievalResult
from service.schemas import RetrieveRequest
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def seen_to_exclude(record: UserRecord, max_seen_ids: int) -> Sequence[str]:
    """The seen items an `exclude_seen` query drops: the last `max_seen_ids` of
    `record.seen` (kept in first-seen order, so these are the most recent).

    >>> record = UserRecord(features={}, history=(), seen=("a", "b", "c"))
    >>> seen_to_exclude(record, 2), seen_to_exclude(record, 0), seen_to_exclude(record, 5)
    (('b', 'c'), (), ('a', 'b', 'c'))
    """
    seen = record.seen
    return seen[max(0, len(seen) - max_seen_ids) :]


@dataclass(frozen=True)
class PreparedQuery:
    """A checked request, ready for the batcher.

    Args:
        job: what the batch worker runs.
        cache_request: the canonical request (cache key material).
    """

    job: RetrievalJob
    cache_request: dict[str, Any]


class RetrievalEngine:
    """Everything a retrieval request needs, shared by the route handlers.

    Args:
        settings: the service settings.
        model_version: the loaded bundle's version (named in every answer).
        schema: what queries may hold.
        batcher: the micro-batcher running `Retriever.run_batch`.
        index_manager: holds the serving index version.
        feature_store: where `user_id` queries get features (None: `user_id` refused).
        cache: the response cache (None: no caching).
        metrics: the service metrics.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        model_version: str,
        schema: QuerySchema,
        batcher: MicroBatcher[RetrievalJob, RetrievalResult],
        index_manager: IndexManager,
        feature_store: FeatureStore | None,
        cache: ResponseCache | None,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.model_version = model_version
        self.schema = schema
        self.batcher = batcher
        self.index_manager = index_manager
        self.feature_store = feature_store
        self.cache = cache
        self.metrics = metrics

    # ------------------------------------------------------------------ checks

    def _check_k(self, k: int | None, field: str) -> int:
        if k is None:
            return self.settings.default_k
        if not 1 <= k <= self.settings.max_k:
            raise InvalidRequestError(
                f"`{field}` must be in [1, {self.settings.max_k}]; got {k}", field=field
            )
        return k

    async def _user(self, user_id: str, field: str) -> UserRecord:
        if self.feature_store is None:
            raise InvalidRequestError(
                "`user_id` queries need a feature store: start the service with --data or "
                "--redis-url",
                field=field,
            )
        record = await self.feature_store.get_user(user_id)
        if record is None:
            raise UnknownUserError(
                f"user {user_id!r} is not in the feature store ({self.feature_store.kind})",
                field=field,
            )
        return record

    async def prepare(self, request: RetrieveRequest, prefix: str = "") -> PreparedQuery:
        """Check `request` and build its job (features looked up for a `user_id`).

        Raises:
            InvalidRequestError: a field is wrong (named in the message).
            UnknownUserError: `user_id` is not in the feature store.
            DependencyError: the feature store is unreachable.
        """
        k = self._check_k(request.k, f"{prefix}k")
        if request.query is None and request.user_id is None:
            raise InvalidRequestError(
                "a request needs `query` (inline features) or `user_id`", field=f"{prefix}query"
            )
        if request.exclude_seen and request.user_id is None:
            raise InvalidRequestError(
                "`exclude_seen` needs `user_id` (whose seen items to exclude)",
                field=f"{prefix}exclude_seen",
            )
        if len(request.exclude_ids) > self.settings.max_exclude_ids:
            raise InvalidRequestError(
                f"`{prefix}exclude_ids` must hold at most {self.settings.max_exclude_ids} ids; "
                f"got {len(request.exclude_ids)}",
                field=f"{prefix}exclude_ids",
            )
        features: QueryFeatures | None = None
        if request.query is not None:
            features = normalize_query(
                request.query,
                self.schema,
                field=f"{prefix}query",
                max_history=self.settings.max_history,
            )
        record: UserRecord | None = None
        if request.user_id is not None and (features is None or request.exclude_seen):
            record = await self._user(request.user_id, f"{prefix}user_id")
        if features is None:
            assert record is not None
            raw = dict(record.features)
            if self.schema.history_name is not None:
                raw[self.schema.history_name] = list(record.history)
            features = normalize_query(
                raw, self.schema, field=f"feature store record of {request.user_id!r}"
            )
        exclude = set(request.exclude_ids)
        if request.exclude_seen and record is not None:
            exclude.update(seen_to_exclude(record, self.settings.max_seen_ids))
        cache_request = {
            "q": features.canonical() if request.query is not None else None,
            "u": request.user_id,
            "k": k,
            "x": sorted(set(request.exclude_ids)),
            "s": request.exclude_seen,
        }
        return PreparedQuery(
            job=RetrievalJob(features=features, k=k, exclude=frozenset(exclude)),
            cache_request=cache_request,
        )

    # ------------------------------------------------------------------ execution

    def _serving_version(self) -> str:
        current = self.index_manager.current
        if current is None:
            raise NotReadyError("no index version is loaded yet", retry_after_s=1)
        return current.version

    async def execute(self, prepared: PreparedQuery) -> tuple[RetrievalResult, bool]:
        """The answer of one prepared query and whether it came from the cache."""
        key = None
        if self.cache is not None:
            key = self.cache.key(
                self.model_version, self._serving_version(), prepared.cache_request
            )
            cached = await self.cache.get(key)
            if cached is not None and {"ids", "scores", "index_version"} <= cached.keys():
                return (
                    RetrievalResult(
                        ids=cached["ids"],
                        scores=cached["scores"],
                        index_version=str(cached["index_version"]),
                    ),
                    True,
                )
        result = await self._submit(prepared.job)
        if self.cache is not None:
            key = self.cache.key(self.model_version, result.index_version, prepared.cache_request)
            self.cache.put(
                key,
                {"ids": result.ids, "scores": result.scores, "index_version": result.index_version},
            )
        return result, False

    async def _submit(self, job: RetrievalJob) -> RetrievalResult:
        """`job`'s answer from the micro-batcher (the job is dropped if the caller is cancelled)."""
        try:
            future = self.batcher.submit(job)
        except BatcherClosedError as exc:
            raise NotReadyError("the service is shutting down", retry_after_s=1) from exc
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def execute_many(
        self, prepared: Sequence[PreparedQuery]
    ) -> list[tuple[RetrievalResult, bool]]:
        """Answers of several prepared queries (they share batches with everyone else)."""
        return await _gather_or_cancel([self.execute(p) for p in prepared])

    async def embed(self, prepared: PreparedQuery) -> RetrievalResult:
        """The query embedding of one prepared query (`RetrievalResult.embedding`, no ids).

        The job goes through the micro-batcher like a retrieval (same encoder, same query
        tower pass, possibly in the same batch as retrievals) but is not searched, and the
        response cache is neither read nor written.
        """
        return await self._submit(dataclasses.replace(prepared.job, search=False))

    async def embed_many(self, prepared: Sequence[PreparedQuery]) -> list[RetrievalResult]:
        """Embeddings of several prepared queries, in order (see `embed`)."""
        return await _gather_or_cancel([self.embed(p) for p in prepared])

    def response(self, result: RetrievalResult, cached: bool, started: float) -> dict[str, Any]:
        return {
            "ids": result.ids,
            "scores": result.scores,
            "model_version": self.model_version,
            "index_version": result.index_version,
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
            "cached": cached,
        }


async def _gather_or_cancel(calls: Sequence[Awaitable[T]]) -> list[T]:
    """The results of `calls`, run concurrently; on the first failure (or cancellation)
    the others are cancelled, so their jobs leave the queue."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
