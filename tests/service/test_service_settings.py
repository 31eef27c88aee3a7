"""Settings that protect the service from itself: secrets never dumped, combinations that
could never serve refused at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import ServiceSettings

BASE: dict[str, Any] = {"model_dir": "m", "index_root": "i"}
PASSWORD = "s3cret-redis-pw"
URL = f"redis://:{PASSWORD}@127.0.0.1:6379/0"


def test_a_batch_call_larger_than_the_admission_limit_is_refused_at_start() -> None:
    """A full /v1/retrieve/batch call takes `max_batch_queries` admissions at once: above
    `max_in_flight` it would be answered 429 forever, so the settings refuse it."""
    with pytest.raises(ValidationError, match=r"max_batch_queries.*max_in_flight"):
        ServiceSettings(**BASE, max_batch_queries=300, max_in_flight=256)
    ok = ServiceSettings(**BASE, max_batch_queries=256, max_in_flight=256)
    assert ok.max_batch_queries == ok.max_in_flight
    # A lowered admission limit alone lowers the batch-call cap with it.
    assert ServiceSettings(**BASE, max_in_flight=2).max_batch_queries == 2


def test_the_redis_url_is_a_secret_in_every_dump() -> None:
    settings = ServiceSettings(**BASE, redis_url=URL)
    for text in (
        settings.model_dump_json(),
        repr(settings),
        str(settings),
        str(settings.model_dump()),
    ):
        assert PASSWORD not in text
    assert settings.redis_url_value == URL


def test_the_redis_url_can_come_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "redis-url"
    path.write_text(URL + "\n")
    assert ServiceSettings(**BASE, redis_url_file=path).redis_url_value == URL
    monkeypatch.setenv("RETRIEVAL_REDIS_URL_FILE", str(path))
    from_env = ServiceSettings(**BASE)
    assert from_env.redis_url_value == URL and PASSWORD not in from_env.model_dump_json()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"redis_url": URL, "redis_url_file": "x"}, "not both"),
        ({"redis_url_file": "/nonexistent/redis-url"}, "cannot be read"),
        ({"redis_url": "http://:pw@host"}, "must be redis://"),
    ],
)
def test_bad_redis_settings_are_refused_without_echoing_the_url(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(**BASE, **given)
    assert message in str(caught.value)
    for error in caught.value.errors():
        assert "pw" not in error["msg"] and PASSWORD not in error["msg"]


def test_an_empty_redis_url_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        ServiceSettings(**BASE, redis_url_file=path)
