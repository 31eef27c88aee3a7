"""Shared fixtures: a tiny MovieLens-shaped dataset with learnable structure, a model
bundle trained on it for a few steps and a Flat index of its catalog (session-scoped:
built once per test run), and private copies of that index for tests that change it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_data import make_tiny_dataset, tiny_train_config


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.trainer import train

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    train(tiny_dataset, out, tiny_train_config(), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_index(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An index root whose CURRENT is a Flat version of the tiny catalog (do not modify)."""
    from service_fixtures import build_flat_index

    root = tmp_path_factory.mktemp("tiny-index") / "index"
    build_flat_index(tiny_bundle, tiny_dataset, root)
    return root


@pytest.fixture
def index_copy(tiny_index: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny index root (for swap and corruption tests)."""
    root = tmp_path / "index"
    shutil.copytree(tiny_index, root, ignore=shutil.ignore_patterns(".lock"))
    return root
