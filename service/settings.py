"""The service's settings: one pydantic-settings class, read from `RETRIEVAL_*` variables.

Every field can be set as an environment variable with the `RETRIEVAL_` prefix
(``RETRIEVAL_MODEL_DIR``, ``RETRIEVAL_MAX_BATCH_SIZE``...) or passed to the constructor;
`retrieval serve` passes its command-line flags as constructor arguments, which win over
the environment. Validators refuse unsafe values (unbounded k or batches, no timeouts,
a public bind address without an API key, a Redis URL with an unknown scheme).

Example:
    >>> settings = ServiceSettings(model_dir="m", index_root="i", max_k=100)
    >>> settings.max_k, settings.default_k, settings.host
    (100, 100, '127.0.0.1')
    >>> from pydantic import ValidationError
    >>> try:
    ...     ServiceSettings(model_dir="m", index_root="i", max_k=5000)
    ... except ValidationError as exc:
    ...     print(exc.errors()[0]["loc"], exc.errors()[0]["msg"])
    ('max_k',) Input should be less than or equal to 2048
"""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.urls import read_url_file

# The largest k any deployment may configure (FAISS GPU k-selection caps at 2048 too).
HARD_MAX_K = 2048
ENV_PREFIX = "RETRIEVAL_"


class ServiceSettings(BaseSettings):
    """Everything the HTTP service reads at start-up (env prefix `RETRIEVAL_`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    # ------------------------------------------------------------------ artifacts
    model_dir: Path = Field(description="Model bundle directory (written by `retrieval train`).")
    index_root: Path = Field(
        description="Index root (versions/ + CURRENT, written by `retrieval build-index`)."
    )
    data_dir: Path | None = Field(
        default=None,
        description="Dataset directory for the embedded feature store (no Redis): users' "
        "features, history and seen items come from its train+valid interactions.",
    )

    # ------------------------------------------------------------------ network
    host: str = Field(default="127.0.0.1", description="Bind address.")
    port: int = Field(default=8000, ge=1, le=65535, description="Bind port.")
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, /v1/* requires header `X-API-Key` with this value (401 otherwise).",
    )
    allow_public_without_api_key: bool = Field(
        default=False,
        description="Allow binding a non-loopback address without an API key (refused by default).",
    )

    # ------------------------------------------------------------------ request limits
    default_k: int = Field(
        default=1000, ge=1, le=HARD_MAX_K, description="k when a request omits it."
    )
    max_k: int = Field(default=HARD_MAX_K, ge=1, le=HARD_MAX_K, description="Largest k accepted.")
    max_batch_queries: int = Field(
        default=64, ge=1, le=1024, description="Most queries in one /v1/retrieve/batch call."
    )
    max_exclude_ids: int = Field(
        default=10_000, ge=0, le=1_000_000, description="Most ids in one `exclude_ids` list."
    )
    max_history: int = Field(
        default=1000, ge=1, le=100_000, description="Most items in an inline `history` list."
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description="Largest request body; larger ones get 413 before parsing (chunked too).",
    )
    max_seen_ids: int = Field(
        default=10_000,
        ge=0,
        le=1_000_000,
        description="Most seen items one `exclude_seen` query excludes: a stored seen set "
        "longer than this is cut to its most recent ids, so one heavy user cannot inflate a "
        "search (the over-fetch is k + exclusions).",
    )
    code_cache_size: int = Field(
        default=100_000,
        ge=0,
        le=10_000_000,
        description="Codes kept per feature for values outside the prefilled vocabulary "
        "(hashed features, and every value when `prefill_codes` is off), least recently used "
        "dropped first; unknown vocabulary values are never cached.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Longest time a request body may take to arrive once its headers are in; "
        "a slower body gets 408 and its connection is closed.",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        le=100_000,
        description="Open connections served at once (probes included): a request on "
        "one more is answered 503 at once and its connection closed (uvicorn's "
        "`limit_concurrency`, set to this + 1 as uvicorn counts the asking connection).",
    )
    max_in_flight: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Retrieval requests admitted at once; more get 429 with Retry-After.",
    )
    request_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="Per-request deadline; past it the answer is 504."
    )
    retry_after_s: int = Field(
        default=1, ge=1, le=60, description="Retry-After seconds sent with 429 and 503 answers."
    )

    # ------------------------------------------------------------------ micro-batching
    max_batch_size: int = Field(
        default=64, ge=1, le=4096, description="Most queries per query-tower pass / FAISS search."
    )
    max_wait_ms: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="How long a batch waits for more queries after its first one, and only "
        "while more admitted requests are on their way (0 = take only what is queued).",
    )
    batch_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Micro-batches that may run at once in one process, each on its own "
        "thread with its own `faiss_threads` (FAISS and torch release the GIL, so 2 workers "
        "search on 2 cores). Default 2 with one process, 1 per process with several "
        "`workers` (2 x 2 threads on 2 cores served less than 2 x 1: "
        "bench/results/bench_service_workers.md).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Server processes sharing the port (`service.workers`): each runs the "
        "whole service (model, index, micro-batcher, `batch_workers` threads) and takes its "
        "share of the connections; 1: this process serves alone. Limits such as "
        "`max_in_flight` apply per process.",
    )
    index_mmap: bool | None = Field(
        default=None,
        description="Read index versions memory-mapped: an IVF index's lists stay in the "
        "page cache, one copy for every process serving the version (versions are "
        "immutable once published). Default: on with several `workers`, off with one.",
    )
    torch_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="torch intra-op threads (process-wide: applied by `retrieval serve`).",
    )
    faiss_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="OpenMP threads of FAISS searches (applied on the batch worker thread).",
    )
    query_tower_mode: Literal["auto", "eager", "trace", "export", "onnxruntime"] = Field(
        default="auto",
        description="How the query tower is prepared (`export_query_tower`): `auto` (the "
        "mode `retrieval.towers.AUTO_EXPORT_MODE` names), `eager`, `trace` (torch.jit), "
        "`export` (torch.export) or `onnxruntime` (an ONNX export run by onnxruntime, one "
        "intra-op thread); checked against eager at start-up, falling back to `trace`, then "
        "`eager`.",
    )
    fast_path: bool = Field(
        default=True,
        description="Answer POST /v1/retrieve through a plain Starlette route "
        "(`service.routes.retrieve.LEAN_RETRIEVE_ROUTE`: the FastAPI route's dependencies, "
        "answers and errors, without FastAPI's dependency solving and body handling per "
        "request) instead of the FastAPI route.",
    )
    list_scanner: bool = Field(
        default=True,
        description="Search inner-product IVF-SQ8 indexes (the default above 200k items) with "
        "the built-in list scanner instead of FAISS's generic path: the same answers, 20-37 % "
        "less search time at k = 1000 (retrieval/ivf_scan.py), N x (D + 8) bytes more memory "
        "(N x 8 with `index_mmap`: the codes are read from the mapping); one thread per "
        "batch whatever `faiss_threads` says.",
    )
    prefill_codes: bool = Field(
        default=True,
        description="Look every vocabulary value (history item ids included, most frequent "
        "first, up to 1M per feature) up at start-up, so no request pays for a first lookup "
        "(~100 MB and a few seconds of start-up at 1M catalog items).",
    )

    # ------------------------------------------------------------------ index
    index_poll_s: float = Field(
        default=1.0, ge=0.05, le=3600, description="How often INDEX_ROOT/CURRENT is checked."
    )
    require_model_match: bool = Field(
        default=True,
        description="Refuse an index version whose manifest names another model bundle.",
    )

    # ------------------------------------------------------------------ Redis
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis for the feature store, the response cache and index announcements "
        "(redis://, rediss:// or unix://); when set, `data_dir` is not used for features. "
        "Unset: embedded feature store from `data_dir`, no cache, CURRENT polled only. A "
        "secret (it may hold the password): never logged or shown; prefer `redis_url_file`.",
    )
    redis_url_file: Path | None = Field(
        default=None,
        description="A file holding the Redis URL (e.g. a Docker secret), read at start-up: "
        "keeps the password out of the environment and of command lines. Exclusive with "
        "`redis_url`.",
    )
    redis_prefix: str = Field(
        default="retrieval:",
        min_length=1,
        max_length=64,
        description="Prefix of every key the service reads or writes.",
    )
    redis_socket_timeout_s: float = Field(
        default=0.05, gt=0, le=5, description="Redis socket read/write timeout."
    )
    redis_connect_timeout_s: float = Field(
        default=0.05, gt=0, le=5, description="Redis connect timeout."
    )
    redis_retries: int = Field(
        default=1, ge=0, le=5, description="Retries of a failed Redis command (backoff between)."
    )
    redis_max_connections: int = Field(
        default=32, ge=1, le=1024, description="Size of the Redis connection pool."
    )
    redis_down_backoff_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="After a Redis failure, skip Redis for this long (then try again).",
    )
    cache_enabled: bool = Field(default=True, description="Cache responses in Redis.")
    cache_ttl_s: int = Field(default=60, ge=1, le=86_400, description="Response cache TTL.")

    # ------------------------------------------------------------------ lifecycle
    shutdown_drain_s: float = Field(
        default=0.0,
        ge=0,
        le=300,
        description="On SIGTERM: answer /readyz 503 for this long before refusing new "
        "connections, so a load balancer stops routing first; in-flight requests always finish.",
    )
    graceful_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Longest wait for in-flight requests on shutdown."
    )
    access_log: bool = Field(default=False, description="uvicorn access log.")

    @model_validator(mode="before")
    @classmethod
    def _lowered_limits_lower_their_defaults(cls, data: Any) -> Any:
        # A lowered `max_k` alone also lowers the default k (an explicit default_k is checked).
        if isinstance(data, dict) and "max_k" in data and "default_k" not in data:
            data = {**data, "default_k": min(1000, int(data["max_k"]))}
        # Likewise a lowered `max_in_flight` alone lowers the batch-call cap (an explicit
        # `max_batch_queries` above it is refused by `_check_combination`).
        if isinstance(data, dict) and "max_in_flight" in data and "max_batch_queries" not in data:
            data = {**data, "max_batch_queries": min(64, int(data["max_in_flight"]))}
        return data

    @model_validator(mode="before")
    @classmethod
    def _workers_take_one_batch_thread_each(cls, data: Any) -> Any:
        # Several processes share the cores: one batch thread each unless told otherwise.
        if isinstance(data, dict) and "batch_workers" not in data:
            with contextlib.suppress(TypeError, ValueError):  # the field's check says why
                if int(data.get("workers", 1)) > 1:
                    data = {**data, "batch_workers": 1}
        return data

    @model_validator(mode="before")
    @classmethod
    def _read_redis_url_file(cls, data: Any) -> Any:
        # The file's content becomes `redis_url` (a secret from then on).
        if not isinstance(data, dict) or data.get("redis_url_file") in (None, ""):
            return data
        if data.get("redis_url") not in (None, ""):
            raise ValueError("set `redis_url` or `redis_url_file`, not both")
        return {**data, "redis_url": read_url_file(data["redis_url_file"])}

    @field_validator("redis_url", mode="before")
    @classmethod
    def _check_redis_url(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None or text == "":
            return None
        if not isinstance(text, str):
            raise ValueError("`redis_url` must be a string")
        scheme = urlparse(text).scheme
        if scheme not in ("redis", "rediss", "unix"):
            # The scheme only: the rest of the URL may hold the password.
            raise ValueError(f"`redis_url` must be redis://, rediss:// or unix://; got {scheme!r}")
        return text

    @field_validator("redis_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if any(c.isspace() or c in "*?[]" for c in value):
            raise ValueError(
                f"`redis_prefix` must hold no whitespace or glob characters; got {value!r}"
            )
        return value

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("`api_key` must be at least 16 characters")
        return value

    @property
    def index_mmap_enabled(self) -> bool:
        """`index_mmap`, its default resolved (on with several workers)."""
        return self.workers > 1 if self.index_mmap is None else self.index_mmap

    @property
    def redis_url_value(self) -> str | None:
        """The Redis URL in clear (for the client only: never log it; see `redact_url`)."""
        return self.redis_url.get_secret_value() if self.redis_url is not None else None

    @model_validator(mode="after")
    def _check_combination(self) -> ServiceSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"`default_k` ({self.default_k}) must be <= `max_k` ({self.max_k})")
        if self.max_batch_queries > self.max_in_flight:
            raise ValueError(
                f"`max_batch_queries` ({self.max_batch_queries}) must be <= `max_in_flight` "
                f"({self.max_in_flight}): a full batch call takes that many admissions and "
                "would be refused with 429 forever"
            )
        if (
            self.api_key is None
            and not self.allow_public_without_api_key
            and not _is_loopback(self.host)
        ):
            raise ValueError(
                f"`host` {self.host!r} is not a loopback address: set `api_key` "
                "(or `allow_public_without_api_key` to serve without one)"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
