"""`retrieval serve` and `retrieval features push` (entry points of `retrieval.commands`).

Usage::

    retrieval serve --model artifacts/model --index artifacts/index --data data/ml-100k
    retrieval serve --model M --index R --redis-url redis://127.0.0.1:6379/0 --port 8000
    retrieval serve --model M --index R --data D --workers 2      # 2 processes, one port
    RETRIEVAL_REDIS_URL_FILE=/run/secrets/redis_url retrieval serve --model M --index R
    RETRIEVAL_API_KEY=... retrieval serve --model M --index R --host 0.0.0.0
    retrieval features push --data data/ml-100k --redis-url redis://127.0.0.1:6379/0 --model M
    RETRIEVAL_REDIS_URL=redis://:PASSWORD@host:6379/0 retrieval features push --data D --model M

Every `ServiceSettings` field can also come from a `RETRIEVAL_*` environment variable
(flags win). The API key is read from `RETRIEVAL_API_KEY` only, so it never shows in a
process listing. A Redis URL with a password belongs there too: `--redis-url` shows in
every process listing, so give it as `RETRIEVAL_REDIS_URL`, or as a file
(`--redis-url-file`, `RETRIEVAL_REDIS_URL_FILE`); `features push` reads the same
variables when neither flag is given. Heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from retrieval.urls import add_redis_url_arguments

logger = logging.getLogger(__name__)


def _settings_from_args(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from retrieval.cli import UsageError
    from service.settings import ServiceSettings

    given = {
        "model_dir": args.model,
        "index_root": args.index,
        "data_dir": args.data,
        "host": args.host,
        "port": args.port,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "batch_workers": args.batch_workers,
        "workers": args.workers,
        "torch_threads": args.torch_threads,
        "faiss_threads": args.faiss_threads,
    }
    given = {k: v for k, v in given.items() if v is not None}
    # A Redis flag wins over both Redis variables (the settings refuse a URL and a file).
    if args.redis_url is not None:
        given.update(redis_url=args.redis_url, redis_url_file=None)
    elif args.redis_url_file is not None:
        given.update(redis_url=None, redis_url_file=args.redis_url_file)
    try:
        return ServiceSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UsageError(f"invalid settings: {problems}") from exc


def run_serve(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    logger.info(
        "serve: %s",
        settings.model_dump_json(exclude={"api_key"}),
    )
    if settings.workers > 1:
        from service.workers import serve_workers

        serve_workers(settings)
    else:
        from service.server import serve

        serve(settings)
    return 0


def run_features_push(args: argparse.Namespace) -> int:
    import redis

    from retrieval.cli import CommandError, UsageError
    from retrieval.features import DatasetSchema
    from retrieval.urls import REDIS_URL_ENV, REDIS_URL_FILE_ENV, redact_url, resolve_redis_url
    from service.feature_store import push_features
    from service.query import QuerySchema

    url = resolve_redis_url(args.redis_url, args.redis_url_file)
    if url is None:
        raise UsageError(
            f"no Redis URL: set {REDIS_URL_ENV} or {REDIS_URL_FILE_ENV}, or give "
            "--redis-url-file (or --redis-url)"
        )
    model_version = None
    if args.model is not None:
        from retrieval.bundle import load_bundle

        bundle = load_bundle(args.model)
        schema = QuerySchema.from_schema(bundle.encoder.schema)
        model_version = bundle.version
    else:
        schema = QuerySchema.from_schema(DatasetSchema.load(args.data))
    history_length = (
        args.history_length if args.history_length is not None else schema.history_length
    )
    client = redis.Redis.from_url(
        url, socket_timeout=args.timeout, socket_connect_timeout=args.timeout
    )
    try:
        meta = push_features(
            client,
            args.data,
            list(schema.columns),
            history_length,
            prefix=args.prefix,
            model_version=model_version,
        )
    except redis.RedisError as exc:
        raise CommandError(f"redis {redact_url(url)}: {exc}") from exc
    finally:
        client.close()
    print(json.dumps(meta, indent=2))
    return 0


def register_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP retrieval service (FastAPI + uvicorn)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, help="model bundle directory")
    parser.add_argument("--index", type=Path, help="index root (versions/ + CURRENT)")
    parser.add_argument(
        "--data", type=Path, help="dataset for the embedded feature store (no Redis)"
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port (default 8000)")
    add_redis_url_arguments(parser, "Redis: feature store, cache, index announcements")
    parser.add_argument("--max-batch-size", type=int, help="queries per batch (default 64)")
    parser.add_argument("--max-wait-ms", type=float, help="batch wait after its first query")
    parser.add_argument(
        "--batch-workers", type=int, help="micro-batches run at once, a thread each (default 2)"
    )
    parser.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    parser.add_argument("--torch-threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--faiss-threads", type=int, help="FAISS OpenMP threads (default 1)")
    parser.set_defaults(func=run_serve)


def register_features(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "features", help="online feature store (Redis) administration", description=__doc__
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    push = actions.add_parser(
        "push",
        help="write users' features, history and seen items (train+valid) to Redis",
    )
    push.add_argument("--data", required=True, type=Path, help="dataset directory")
    add_redis_url_arguments(push, "redis://host:port/db to write to")
    push.add_argument(
        "--model", type=Path, help="model bundle: its columns and history length (default: schema)"
    )
    push.add_argument("--prefix", default="retrieval:", help="key prefix (as the service's)")
    push.add_argument("--history-length", type=int, help="history items kept (default: schema)")
    push.add_argument("--timeout", type=float, default=5.0, help="Redis socket timeout (s)")
    push.set_defaults(func=run_features_push)
