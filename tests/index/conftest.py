"""Fixtures of the index tests (see index_fixtures.py): catalog and random model bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from index_fixtures import make_index_dataset, make_random_bundle


@pytest.fixture(scope="session")
def index_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_index_dataset(tmp_path_factory.mktemp("index-data") / "data")


@pytest.fixture(scope="session")
def index_bundle(index_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_bundle(index_data, tmp_path_factory.mktemp("index-model") / "model")
