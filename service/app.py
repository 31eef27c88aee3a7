"""`create_app(settings)`: the FastAPI application, its lifespan and its middlewares.

The lifespan loads everything once (`retrieval serve` does it in a background task, so
the server answers /healthz during a cold start while /readyz says 503):

1. the model bundle (checksums verified) and its query tower, exported for serving
   (`export_query_tower`; an exported tower is compared with the eager one first, and
   export / onnxruntime fall back to trace, then eager);
2. the index version CURRENT names, checked against the model (`IndexManager`);
3. the feature store: Redis when `redis_url` is set (plus the response cache and the
   subscription to the index job's announcements), else the embedded store built from
   `data_dir` (train+valid interactions), else none (`user_id` queries refused);
4. the micro-batcher's worker, one warm-up batch, and the CURRENT watcher.

On shutdown (after the server has stopped taking connections and in-flight requests
have finished), readiness is already off; the watchers stop, the batcher drains its
queue, pending cache writes are flushed and Redis is closed.

Usage::

    app = create_app(ServiceSettings(model_dir="artifacts/model", index_root="artifacts/index"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `retrieval serve` does
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch
from fastapi import FastAPI

from retrieval.bundle import ModelBundle, load_bundle
from retrieval.index_store import PUBLISH_CHANNEL
from retrieval.row_encoding import encode_query_rows
from retrieval.towers import export_query_tower
from retrieval.urls import redact_url
from service.batcher import MicroBatcher
from service.cache import ResponseCache
from service.dependencies import Services
from service.engine import RetrievalEngine
from service.errors import install_error_handlers
from service.feature_store import (
    META_KEY,
    FeatureStore,
    InProcessFeatureStore,
    RedisFeatureStore,
)
from service.index_manager import IndexManager
from service.metrics import ServiceMetrics
from service.middleware import (
    PROTECTED_PREFIX,
    AdmissionGateMiddleware,
    AdmissionLimiter,
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
    MetricsMiddleware,
)
from service.openapi import install_openapi
from service.query import QueryFeatures, QuerySchema
from service.redis_link import RedisLink, RedisReplyError, RedisUnavailableError, make_client
from service.retriever import RetrievalJob, Retriever
from service.routes import embed as embed_routes  # `embed` names the query tower below
from service.routes import health, info, retrieve
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

API_VERSION = "1"
_TRACE_TOLERANCE = 1e-4  # max |traced - eager| accepted for the exported query tower


def export_checked_query_tower(
    bundle: ModelBundle, schema: QuerySchema, mode: str, *, threads: int = 1
) -> tuple[Callable[[Mapping[str, torch.Tensor]], torch.Tensor], str]:
    """The query tower prepared for serving, and the mode actually used.

    An exported tower (trace, torch.export, onnxruntime, compile) is compared with the
    eager tower on real-shaped queries, at batch 1 and 3 (histories of 3 items and none);
    on any disagreement or failure the next mode is tried: "export" and "onnxruntime"
    fall back to "trace", every mode to "eager". `threads`: the intra-op threads of an
    onnxruntime session (the torch modes follow `torch.set_num_threads`).
    """
    from retrieval.towers import AUTO_EXPORT_MODE  # read now: "auto" follows its value

    chosen = AUTO_EXPORT_MODE if mode == "auto" else mode
    candidates = [chosen, "trace"] if chosen in ("export", "onnxruntime") else [chosen]
    if chosen == "eager":
        return export_query_tower(bundle.model, "eager"), "eager"
    example = encode_query_rows(bundle.encoder, [QueryFeatures({})] * 4)
    history = tuple(bundle.encoder.item_ids[:3].to_pylist())
    probes = [
        encode_query_rows(bundle.encoder, [QueryFeatures({}, history=history)]),
        encode_query_rows(
            bundle.encoder,
            [QueryFeatures({}, history=history), QueryFeatures({}), QueryFeatures({})],
        ),
    ]
    for candidate in candidates:
        try:
            exported = export_query_tower(
                bundle.model,
                candidate,  # type: ignore[arg-type]
                example_batch=example,
                threads=threads,
            )
            for probe in probes:
                with torch.inference_mode():
                    eager = bundle.model.query_tower(probe)
                    got = exported(probe)
                if eager.shape != got.shape or float((eager - got).abs().max()) > _TRACE_TOLERANCE:
                    raise RuntimeError("the exported query tower disagrees with the eager one")
            return exported, exported.mode
        except Exception as exc:
            logger.warning("query tower export %r failed (%s)", candidate, exc)
    logger.warning("serving the eager query tower (asked for %r)", mode)
    return export_query_tower(bundle.model, "eager"), "eager"


def _load_blocking(settings: ServiceSettings, metrics: ServiceMetrics) -> dict[str, Any]:
    """The slow, blocking part of start-up (runs on a thread)."""
    started = time.perf_counter()
    bundle = load_bundle(settings.model_dir)
    schema = QuerySchema.from_encoder(bundle.encoder)  # with the dense train statistics
    embed, mode = export_checked_query_tower(
        bundle, schema, settings.query_tower_mode, threads=settings.torch_threads
    )
    manager = IndexManager(
        settings.index_root,
        model_dim=bundle.model.output_dim,
        model_checksum=bundle.checksum,
        require_model_match=settings.require_model_match,
        list_scanner=settings.list_scanner,
        mmap=settings.index_mmap_enabled,
        on_swap=lambda ok, version, items: _on_swap(metrics, ok, version, items),
    )
    manager.load_initial()
    store: FeatureStore | None = None
    if settings.redis_url is None and settings.data_dir is not None:
        store = InProcessFeatureStore.from_dataset(
            settings.data_dir, list(schema.columns), schema.history_length
        )
    retriever = Retriever(
        bundle.encoder,
        schema,
        embed,
        lambda: manager.current,
        faiss_threads=settings.faiss_threads,
        prefill_codes=settings.prefill_codes,
        code_cache_size=settings.code_cache_size,
    )
    # Warm-up: builds the lazy id lookups and touches the index before the first request.
    warm = retriever.run_batch([RetrievalJob(features=QueryFeatures({}), k=10)])
    if isinstance(warm[0], BaseException):
        raise warm[0]
    logger.info(
        "model %s (query tower %s) and index %s loaded in %.2fs",
        bundle.version,
        mode,
        manager.current.version if manager.current else None,
        time.perf_counter() - started,
    )
    return {
        "bundle": bundle,
        "schema": schema,
        "mode": mode,
        "manager": manager,
        "store": store,
        "retriever": retriever,
    }


async def check_pushed_features(link: RedisLink, prefix: str, schema: QuerySchema) -> None:
    """Warn when the pushed records cannot give the model's queries (too short a history).

    A meta key that cannot be read (not a JSON object, wrong types) is warned about and
    skipped: it only feeds these warnings, so the service starts all the same.
    """
    key = f"{prefix}{META_KEY}"
    try:
        raw = await link.call(lambda client: client.get(key))
    except RedisReplyError as exc:
        logger.warning("the push metadata %r cannot be read (%s); not checked", key, exc.reply)
        return
    except RedisUnavailableError:
        return
    if raw is None:
        logger.warning("no features pushed under prefix %r yet (`retrieval features push`)", prefix)
        return
    try:
        meta = json.loads(raw)
        pushed = int(meta.get("history_length", 0))
        columns = set(meta.get("columns", []))
    except (ValueError, TypeError, AttributeError) as exc:
        logger.warning(
            "the push metadata %r cannot be read (%s: %s); not checked against the model",
            key,
            type(exc).__name__,
            str(exc)[:200],
        )
        return
    if pushed < schema.history_length:
        logger.warning(
            "pushed histories hold %d items but the model reads %d: `user_id` queries will "
            "differ from offline evaluation; push again with --model",
            pushed,
            schema.history_length,
        )
    missing = sorted(set(schema.columns) - columns)
    if missing:
        logger.warning("pushed records lack query feature columns %s (they count as null)", missing)


def _on_swap(metrics: ServiceMetrics, ok: bool, version: str, num_items: int) -> None:
    metrics.swaps.labels(result="ok" if ok else "failed").inc()
    if ok:
        metrics.set_index_version(version, num_items)


async def start_services(settings: ServiceSettings, metrics: ServiceMetrics) -> Services:
    """Load model, index and feature store; start the batcher and the watchers."""
    loaded = await asyncio.to_thread(_load_blocking, settings, metrics)
    bundle: ModelBundle = loaded["bundle"]
    manager: IndexManager = loaded["manager"]
    retriever: Retriever = loaded["retriever"]
    metrics.set_model_version(bundle.version)

    link: RedisLink | None = None
    store: FeatureStore | None = loaded["store"]
    cache: ResponseCache | None = None
    redis_url = settings.redis_url_value  # the secret, for the clients only
    if redis_url is not None:
        client = make_client(
            redis_url,
            socket_timeout_s=settings.redis_socket_timeout_s,
            connect_timeout_s=settings.redis_connect_timeout_s,
            retries=settings.redis_retries,
            max_connections=settings.redis_max_connections,
        )
        link = RedisLink(
            client,
            down_backoff_s=settings.redis_down_backoff_s,
            on_state=lambda up: metrics.redis_up.set(1 if up else 0),
            max_concurrent=settings.redis_max_connections,
        )
        if not await link.ping():
            logger.warning(
                "redis at %s is not reachable at start-up; `user_id` queries answer 503 "
                "until it is",
                redact_url(redis_url),
            )
        store = RedisFeatureStore(link, settings.redis_prefix, loaded["schema"])
        await check_pushed_features(link, settings.redis_prefix, loaded["schema"])
        if settings.cache_enabled:
            cache = ResponseCache(
                link, settings.redis_prefix, settings.cache_ttl_s, observe=metrics.observe_cache
            )

    limiter = AdmissionLimiter(settings.max_in_flight, settings.retry_after_s, metrics)
    batcher = MicroBatcher(
        retriever.run_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        on_batch=metrics.observe_batch,
        expected=lambda: limiter.in_flight,  # admitted queries: the most that can still come
        workers=settings.batch_workers,
    )
    batcher.start()
    metrics.track_queue_depth(lambda: batcher.queue_depth)
    engine = RetrievalEngine(
        settings,
        model_version=bundle.version,
        schema=loaded["schema"],
        batcher=batcher,
        index_manager=manager,
        feature_store=store,
        cache=cache,
        metrics=metrics,
    )
    services = Services(
        settings=settings,
        metrics=metrics,
        bundle=bundle,
        schema=loaded["schema"],
        retriever=retriever,
        index_manager=manager,
        batcher=batcher,
        engine=engine,
        limiter=limiter,
        feature_store=store,
        redis=link,
        cache=cache,
        query_tower_mode=loaded["mode"],
    )
    loop = asyncio.get_running_loop()
    services.tasks.append(
        loop.create_task(manager.watch_current(settings.index_poll_s), name="watch-current")
    )
    if metrics.multiprocess_dir is not None:
        services.tasks.append(loop.create_task(metrics.refresh_forever(), name="metrics"))
    if redis_url is not None:
        subscriber = make_client(
            redis_url,
            socket_timeout_s=max(settings.redis_socket_timeout_s, 5.0),
            connect_timeout_s=settings.redis_connect_timeout_s,
            retries=0,
            max_connections=2,
        )
        services.tasks.append(
            loop.create_task(manager.watch_redis(subscriber, PUBLISH_CHANNEL), name="watch-redis")
        )
        services.closers.append(subscriber.aclose)
    return services


async def stop_services(services: Services) -> None:
    """Readiness off, watchers stopped, queue drained, Redis closed."""
    services.draining = True
    for task in services.tasks:
        task.cancel()
    for task in services.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await services.batcher.stop(drain=True)
    if services.cache is not None:
        await services.cache.flush()
    if services.feature_store is not None:
        await services.feature_store.close()
    if services.redis is not None:
        await services.redis.close()
    for close in services.closers:
        with contextlib.suppress(Exception):
            await close()
    logger.info("service stopped")


async def load_services(
    app: FastAPI,
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    on_loaded: Callable[[], None] | None = None,
) -> None:
    """`start_services` as a background task: sets `app.state.services` (then calls
    `on_loaded`), or `load_error`."""
    try:
        app.state.services = await start_services(settings, metrics)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("the model and index could not be loaded; the service stops")
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        return
    if on_loaded is not None:
        on_loaded()


def create_app(
    settings: ServiceSettings,
    *,
    load_in_background: bool = False,
    on_loaded: Callable[[], None] | None = None,
) -> FastAPI:
    """The application; model and index load in its lifespan (see the module docstring).

    With `load_in_background` (what `retrieval serve` does) the lifespan returns at once
    and the loading runs as a task: the server listens during a cold start, ``/healthz``
    answers 200 and ``/readyz`` (and every /v1 route) 503 until the loading is done. A
    failed loading is logged and kept in ``app.state.load_error``; ``/healthz`` then
    answers 503 and `service.server.ServiceServer` stops the process. `on_loaded` is called
    once the model and index are loaded (a worker process tells its supervisor).
    """
    metrics = ServiceMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not load_in_background:
            app.state.services = await start_services(settings, metrics)
            if on_loaded is not None:
                on_loaded()
        loading = (
            asyncio.get_running_loop().create_task(
                load_services(app, settings, metrics, on_loaded), name="load-services"
            )
            if load_in_background
            else None
        )
        try:
            yield
        finally:
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            services: Services | None = getattr(app.state, "services", None)
            if services is not None:
                await stop_services(services)

    app = FastAPI(
        title="Two-tower retrieval",
        version=API_VERSION,
        description="Top-k candidate retrieval: a two-tower query embedding searched in a "
        'FAISS index of the catalog. Errors are `{"error": {"code", "message", '
        '"field"}}`.',
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    app.state.load_error = None
    install_openapi(app, settings)
    install_error_handlers(app)
    if settings.fast_path:  # ahead of the FastAPI route of the same path: it answers
        app.router.routes.append(retrieve.LEAN_RETRIEVE_ROUTE)
    app.include_router(retrieve.router)
    app.include_router(embed_routes.router)
    app.include_router(info.router)
    app.include_router(health.router)
    app.add_middleware(AdmissionGateMiddleware)  # the body is already bounded
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
    )
    protected = frozenset(
        path
        for router in (retrieve.router, embed_routes.router, info.router)
        for route in router.routes
        if (path := getattr(route, "path", "")).startswith(PROTECTED_PREFIX)
    )
    # before any body byte is read: a wrong key costs the service no buffer and no wait
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, routes=protected)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 401/408/413s
    return app
