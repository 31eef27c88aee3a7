"""Fixtures of the reliability suite: settings for the tiny artifacts on a free port.

The same artifacts as tests/service (built from the test run's tiny dataset and bundle);
the helpers live in tests/service/service_fixtures.py and reliability_fixtures.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from service_fixtures import settings_factory

from service.settings import ServiceSettings


@pytest.fixture
def make_settings(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path
) -> Callable[..., ServiceSettings]:
    """Settings for the tiny artifacts on a free loopback port; keyword arguments override."""
    return settings_factory(
        tiny_bundle, tiny_index, tiny_dataset, own_port=True, index_poll_s=0.05, max_wait_ms=1.0
    )
