"""Fixtures of the reliability suite: the tiny bundle's Flat index, settings, private copies.

The same artifacts as tests/service (built from the session's tiny dataset and bundle);
the helpers live in tests/service/service_fixtures.py and reliability_fixtures.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import build_flat_index

from service.settings import ServiceSettings


@pytest.fixture(scope="session")
def tiny_index(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An index root whose CURRENT is a Flat version of the tiny catalog (do not modify)."""
    root = tmp_path_factory.mktemp("reliability-index") / "index"
    build_flat_index(tiny_bundle, tiny_dataset, root)
    return root


@pytest.fixture
def index_copy(tiny_index: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny index root (for swap and corruption tests)."""
    root = tmp_path / "index"
    shutil.copytree(tiny_index, root, ignore=shutil.ignore_patterns(".lock"))
    return root


@pytest.fixture
def make_settings(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path
) -> Callable[..., ServiceSettings]:
    """Settings for the tiny artifacts on a free loopback port; keyword arguments override."""
    from service_fixtures import free_port

    def make(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {
            "model_dir": tiny_bundle,
            "index_root": tiny_index,
            "data_dir": tiny_dataset,
            "port": free_port(),
            "index_poll_s": 0.05,
            "max_wait_ms": 1.0,
        }
        values.update(overrides)
        return ServiceSettings(**values)

    return make
