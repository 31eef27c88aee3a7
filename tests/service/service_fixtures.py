"""Helpers of the service tests: index versions for the tiny bundle, a live uvicorn server on
loopback, a private redis-server process, and Redis key clean-up."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import redis
import torch

from retrieval.bundle import load_bundle
from retrieval.index_store import (
    CURRENT_FILE,
    INDEX_FILE,
    load_index_version,
    reconstruct_all,
    version_path,
    write_index_version,
)
from retrieval.row_encoding import encode_query_rows
from service.app import create_app
from service.feature_store import push_features
from service.query import QuerySchema, normalize_query
from service.server import ServiceServer, uvicorn_config
from service.settings import ServiceSettings

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
WAIT_S = 20.0  # upper bound of every wait loop in these tests


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Any, timeout_s: float = WAIT_S, interval_s: float = 0.02) -> bool:
    """Poll `condition()` until true or `timeout_s` passes (always bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


# --------------------------------------------------------------------------- index versions


def build_flat_index(model_dir: Path, data_dir: Path, root: Path) -> str:
    """A Flat index version of the tiny catalog through the index job; returns its name."""
    from index.build import BuildOptions, build_index

    options = BuildOptions(factory="Flat", progress=False, recall_queries=64, keep=20, threads=1)
    return build_index(model_dir, data_dir, root, options).version


def write_subset_version(
    root: Path, name: str, model_dir: Path, keep_every: int = 2, source: str | None = None
) -> str:
    """A version holding every `keep_every`-th item of `source` (default CURRENT): different
    answers from the same model."""
    loaded = load_index_version(root, source)
    vectors = reconstruct_all(loaded.index)
    rows = np.arange(0, loaded.num_items, keep_every)
    bundle = load_bundle(model_dir)
    write_index_version(
        root,
        name,
        faiss.IndexFlatIP(loaded.dim),
        vectors[rows],
        loaded.item_ids.take(pa.array(rows)),
        factory="Flat",
        manifest_extra={"model": {"checksum": bundle.checksum, "model_version": bundle.version}},
    )
    return name


def corrupt_copy(root: Path, source: str, name: str) -> str:
    """Copy version `source` to `name` with a manifest naming it, then flip a byte of its index."""
    import json

    src = version_path(root, source)
    dst = version_path(root, name)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((dst / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / INDEX_FILE).write_bytes(bytes(data))
    return name


def set_current(root: Path, name: str) -> None:
    tmp = root / f".tmp-current-{uuid.uuid4().hex}"
    tmp.write_text(name + "\n")
    tmp.replace(root / CURRENT_FILE)


def make_dense_artifacts(root: Path) -> tuple[Path, Path]:
    """A tiny dataset whose query tower has a dense feature, a random bundle, a Flat index."""
    from retrieval.bundle import save_bundle
    from retrieval.data.dataset import assign_splits, write_dataset
    from retrieval.encoders import FeatureEncoder
    from retrieval.features import DatasetSchema, FeatureKind, FeatureSpec
    from retrieval.towers import ModelConfig, TowerConfig, TwoTowerModel

    rng = np.random.default_rng(0)
    users = pa.table(
        {
            "user_id": [f"u{u}" for u in range(20)],
            "country": [["fr", "de", "it"][u % 3] for u in range(20)],
            "age": pa.array([20.0 + u if u % 4 else None for u in range(20)]),
        }
    )
    items = pa.table({"item_id": [f"i{j}" for j in range(50)]})
    events = pa.table(
        {
            "user_id": [f"u{u}" for u in range(20) for _ in range(6)],
            "item_id": [f"i{int(j)}" for j in rng.integers(0, 50, size=120)],
            "timestamp": pa.array([t for _ in range(20) for t in range(6)], pa.int64()),
        }
    )
    cat = FeatureKind.CATEGORICAL
    schema = DatasetSchema(
        name="dense-tiny",
        query_features=(
            FeatureSpec("country", cat, embedding_dim=4),
            FeatureSpec("age", FeatureKind.DENSE, missing_indicator=True),
            FeatureSpec(
                "history", FeatureKind.HISTORY, embedding_dim=8, max_length=4, shared_with="item_id"
            ),
        ),
        item_features=(FeatureSpec("item_id", cat, embedding_dim=8),),
    )
    data = write_dataset(
        root / "data", users, items, assign_splits(events, user_order=users["user_id"]), schema
    ).path
    assert data is not None
    encoder = FeatureEncoder.fit(
        schema, users, items, assign_splits(events, user_order=users["user_id"])
    )

    def tower(side: str) -> TowerConfig:
        return TowerConfig(
            features=encoder.feature_inputs(side),  # type: ignore[arg-type]
            cross_layers=1,
            mlp_hidden=(16,),
            head_hidden=(),
            output_dim=8,
        )

    model = TwoTowerModel(ModelConfig(query=tower("query"), item=tower("item")))
    bundle = save_bundle(root / "model", model.eval(), encoder, train_config={}, metrics={})
    index = root / "index"
    build_flat_index(bundle, data, index)
    return bundle, index


# --------------------------------------------------------------------------- live server


class LiveServer:
    """The real app under a real uvicorn on 127.0.0.1:<free port>, in a thread, loading its
    model and index in the background as `retrieval serve` does; `start` waits until it is
    ready unless `wait_ready` is false."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.app = create_app(settings, load_in_background=True)
        config = uvicorn_config(self.app, settings, log_level="warning")
        self.server = ServiceServer(config, self.app, settings.shutdown_drain_s)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def services(self) -> Any:
        return self.app.state.services

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        if not wait_until(lambda: self.server.started or not self.thread.is_alive(), 60):
            raise RuntimeError("uvicorn did not start")
        if not self.server.started:
            raise RuntimeError("uvicorn failed to start (see the log)")
        if wait_ready:
            state = self.app.state
            wait_until(lambda: state.services is not None or state.load_error is not None, 60)
            if state.services is None:
                self.stop()
                raise RuntimeError(f"the service did not load: {state.load_error}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT_S)


@contextlib.contextmanager
def live_server(settings: ServiceSettings) -> Iterator[LiveServer]:
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- redis


class RedisProcess:
    """A private `redis-server` (no persistence) on a fixed port, killable and restartable;
    with `password`, it requires that password (given in a config file, and in `url`)."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self._config: Path | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        config: list[str] = []
        if self.password is not None:
            if self._config is None:
                handle, name = tempfile.mkstemp(prefix="redis-", suffix=".conf")
                os.close(handle)
                self._config = Path(name)
            self._config.write_text(f"requirepass {self.password}\n")
            config = [str(self._config)]
        self.process = subprocess.Popen(
            [
                binary,
                *config,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        ok = wait_until(pings, 10)
        client.close()
        if not ok:
            self.kill()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        if self._config is not None:
            self._config.unlink(missing_ok=True)
            self._config = None


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


@contextlib.contextmanager
def shared_redis_prefix(tag: str) -> Iterator[tuple[redis.Redis, str]]:
    """(client, unique key prefix `tag-...:`) on the shared Redis, whose keys under the prefix
    are deleted afterwards; skips the test when that Redis does not answer."""
    import pytest

    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"the shared Redis at {SHARED_REDIS_URL} is not reachable: {exc}")
    prefix = f"{tag}-{uuid.uuid4().hex[:12]}:"
    try:
        yield client, prefix
    finally:
        delete_prefix(client, prefix)
        client.close()


def push(url: str, data: Path, model: Path, prefix: str) -> None:
    """Load the users of dataset `data` into the Redis at `url` under `prefix` (the
    features the bundle at `model` queries with)."""
    schema = QuerySchema.from_schema(load_bundle(model).encoder.schema)
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        push_features(client, data, list(schema.columns), schema.history_length, prefix=prefix)
    finally:
        client.close()


def settings_factory(
    model_dir: Path, index_root: Path, data_dir: Path, *, own_port: bool = False, **defaults: Any
) -> Callable[..., ServiceSettings]:
    """`make(**overrides)` -> settings for these artifacts: `defaults`, then `overrides`;
    with `own_port` every call gets a free loopback port."""

    def make(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {
            "model_dir": model_dir,
            "index_root": index_root,
            "data_dir": data_dir,
            **({"port": free_port()} if own_port else {}),
            **defaults,
        }
        values.update(overrides)
        return ServiceSettings(**values)

    return make


def slow_embed(services: Any, delay_s: float, batches: int | None = None) -> Callable[[], None]:
    """The query tower sleeps `delay_s` per batch (the first `batches` ones, or all); returns
    the undo function."""
    original = services.retriever.embed
    slowed = {"n": 0}

    def slow(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if batches is None or slowed["n"] < batches:
            slowed["n"] += 1
            time.sleep(delay_s)
        return original(batch)

    services.retriever.embed = slow

    def undo() -> None:
        services.retriever.embed = original

    return undo


def ids_by_version(
    model_dir: Path, root: Path, versions: list[str], k: int, queries: list[dict[str, Any]]
) -> dict[str, list[list[str]]]:
    """version -> the ids each query gets from it (eager tower + that version's search)."""
    bundle = load_bundle(model_dir)
    schema = QuerySchema.from_schema(bundle.encoder.schema)
    batch = encode_query_rows(bundle.encoder, [normalize_query(q, schema) for q in queries])
    with torch.inference_mode():
        emb = bundle.model.embed_queries(batch).numpy()
    return {v: load_index_version(root, v).search_ids(emb, k)[0] for v in versions}
