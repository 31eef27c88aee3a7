"""Fixtures of the service tests: settings for the tiny artifacts, Redis prefixes (the tiny
bundle, dataset and Flat index come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_fixtures import SHARED_REDIS_URL, settings_factory, shared_redis_prefix

from service.settings import ServiceSettings


@pytest.fixture
def make_settings(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path
) -> Callable[..., ServiceSettings]:
    """Settings for the tiny artifacts; keyword arguments override fields."""
    return settings_factory(
        tiny_bundle, tiny_index, tiny_dataset, index_poll_s=0.1, max_wait_ms=1.0
    )


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """(url, key prefix) on the shared Redis; every key under the prefix is deleted after."""
    with shared_redis_prefix("test-service") as (_, prefix):
        yield SHARED_REDIS_URL, prefix
