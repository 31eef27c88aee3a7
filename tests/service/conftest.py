"""Fixtures of the service tests: a Flat index of the tiny bundle, settings, Redis prefixes."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from service_fixtures import SHARED_REDIS_URL, build_flat_index, delete_prefix

from service.settings import ServiceSettings


@pytest.fixture(scope="session")
def tiny_index(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An index root whose CURRENT is a Flat version of the tiny catalog (do not modify)."""
    root = tmp_path_factory.mktemp("tiny-index") / "index"
    build_flat_index(tiny_bundle, tiny_dataset, root)
    return root


@pytest.fixture
def index_copy(tiny_index: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny index root (for swap tests)."""
    root = tmp_path / "index"
    shutil.copytree(tiny_index, root, ignore=shutil.ignore_patterns(".lock"))
    return root


@pytest.fixture
def make_settings(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path
) -> Callable[..., ServiceSettings]:
    """Settings for the tiny artifacts; keyword arguments override fields."""

    def make(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {
            "model_dir": tiny_bundle,
            "index_root": tiny_index,
            "data_dir": tiny_dataset,
            "index_poll_s": 0.1,
            "max_wait_ms": 1.0,
        }
        values.update(overrides)
        return ServiceSettings(**values)

    return make


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """(url, key prefix) on the shared Redis; every key under the prefix is deleted after."""
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"the shared Redis at {SHARED_REDIS_URL} is not reachable: {exc}")
    prefix = f"test-service-{uuid.uuid4().hex[:12]}:"
    try:
        yield SHARED_REDIS_URL, prefix
    finally:
        delete_prefix(client, prefix)
        client.close()
