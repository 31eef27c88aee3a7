"""Publishing: rollback, list and verify through the real `retrieval` CLI, pruning, and the
Redis announcement received by a real subscriber."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pytest

from index.build import BuildOptions, build_index
from index.publish import announce_version, prune_versions, publish_current, rollback
from retrieval.cli import main as retrieval_main
from retrieval.index_store import (
    PUBLISH_CHANNEL,
    IndexStoreError,
    list_versions,
    read_current,
    write_index_version,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_versions(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        vectors = np.roll(np.eye(4, dtype=np.float32), i, axis=1)
        write_index_version(root, name, faiss.IndexFlatIP(4), vectors, pa.array(list("abcd")))


def test_rollback_defaults_to_the_previous_version(tmp_path: Path) -> None:
    make_versions(tmp_path, ["v1", "v2", "v3"])
    publish_current(tmp_path, "v3")
    assert rollback(tmp_path) == ("v3", "v2")
    assert rollback(tmp_path) == ("v2", "v1")
    with pytest.raises(IndexStoreError, match="no version older than CURRENT"):
        rollback(tmp_path)
    assert rollback(tmp_path, "v3") == ("v1", "v3")
    with pytest.raises(IndexStoreError, match="not found"):
        rollback(tmp_path, "v9")
    assert read_current(tmp_path) == "v3"


def test_rollback_refuses_a_corrupt_target(tmp_path: Path) -> None:
    make_versions(tmp_path, ["v1", "v2"])
    publish_current(tmp_path, "v2")
    (tmp_path / "versions" / "v1" / "ids.parquet").write_bytes(b"garbage")
    with pytest.raises(IndexStoreError, match="checksum mismatch"):
        rollback(tmp_path)
    assert read_current(tmp_path) == "v2"


def test_prune_keeps_newest_and_current(tmp_path: Path) -> None:
    make_versions(tmp_path, ["v1", "v2", "v3", "v4"])
    publish_current(tmp_path, "v1")  # e.g. after a rollback to the oldest
    assert prune_versions(tmp_path, keep=2) == ["v2"]
    assert [v.name for v in list_versions(tmp_path)] == ["v1", "v3", "v4"]
    assert not list((tmp_path / "versions").glob(".tmp-*"))
    with pytest.raises(ValueError, match="`keep` must be >= 1"):
        prune_versions(tmp_path, keep=0)


def test_cli_list_rollback_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_versions(tmp_path, ["v1", "v2"])
    publish_current(tmp_path, "v2")
    assert retrieval_main(["index", "list", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  v1 ") and lines[2].startswith("* v2 ")
    assert lines[0].split()[-1] == "shards" and lines[2].split()[-1] == "1"
    assert retrieval_main(["index", "rollback", "--root", str(tmp_path)]) == 0
    assert "CURRENT: v2 -> v1" in capsys.readouterr().out
    assert read_current(tmp_path) == "v1"
    assert retrieval_main(["index", "verify", "--root", str(tmp_path)]) == 0
    assert "v1: ok" in capsys.readouterr().out
    (tmp_path / "versions" / "v1" / "index.faiss").write_bytes(b"x")
    assert retrieval_main(["index", "verify", "--root", str(tmp_path)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert retrieval_main(["index", "rollback", "--root", str(tmp_path), "--to", "../v2"]) == 2
    assert "version name" in capsys.readouterr().err


def test_cli_build_index(
    index_bundle: Path, index_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(index_bundle), "--data", str(index_data), "--out", str(tmp_path)]
    assert retrieval_main(["build-index", *args, "--no-progress", "--recall-queries", "20"]) == 0
    out = capsys.readouterr().out
    assert f"published {read_current(tmp_path)}" in out and "recall@600" in out
    assert retrieval_main(["build-index", *args, "--factory", "IVF32,Flat", "--search-params",
                           "nprobe=1", "--no-progress"]) == 1  # fmt: skip
    assert "below the floor" in capsys.readouterr().err


def _redis_or_skip():
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"the Redis server on 127.0.0.1:6379 does not answer ({exc})")
    return client


class Subscriber:
    """A real Redis subscriber on the publish channel (messages queue on its socket)."""

    def __init__(self, client: Any) -> None:
        self.client = client  # keep it alive: collecting it closes the pool, pubsub included
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(PUBLISH_CHANNEL)
        confirmation = self.pubsub.get_message(timeout=2.0)  # subscribed before we publish
        assert confirmation is not None and confirmation["type"] == "subscribe"

    def wait_for(self, expected: str, timeout: float = 5.0) -> list[str]:
        """Messages received until `expected` arrives (or `timeout` passes)."""
        messages: list[str] = []
        deadline = time.monotonic() + timeout
        while expected not in messages and time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                messages.append(message["data"].decode())
        self.pubsub.close()
        return messages


@pytest.mark.redis
def test_build_announces_the_version_on_redis(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    subscriber = Subscriber(_redis_or_skip())
    options = BuildOptions(progress=False, recall_queries=20, redis_url=REDIS_URL)
    result = build_index(index_bundle, index_data, tmp_path, options)
    assert result.version in subscriber.wait_for(result.version)


@pytest.mark.redis
def test_announce_reaches_a_subscriber_and_failures_are_not_fatal() -> None:
    subscriber = Subscriber(_redis_or_skip())
    receivers = announce_version(REDIS_URL, "v-test-1")
    assert receivers is not None and receivers >= 1  # ours, maybe other tests' listeners
    assert "v-test-1" in subscriber.wait_for("v-test-1")
    # nothing listens on port 1: logged, None, no exception
    assert announce_version("redis://127.0.0.1:1/0", "v-test-2", timeout_s=0.5) is None
