"""Shared fixtures: a tiny MovieLens-shaped dataset with learnable structure, and a model
bundle trained on it for a few steps (session-scoped: built once per test run)."""

from __future__ import annotations

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
