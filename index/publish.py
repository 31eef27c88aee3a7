"""Making an index version current: CURRENT, rollback, pruning, the build lock, Redis.

`INDEX_ROOT/CURRENT` is the source of truth: it is replaced atomically (temp file, fsync,
rename), only after the version it names is complete on disk. A Redis message on
`retrieval.index_format.PUBLISH_CHANNEL` tells running services to reload sooner; losing it
loses nothing but latency, so a failed publish is logged, never fatal.

Example:
    >>> import tempfile, pathlib, faiss, numpy as np, pyarrow as pa
    >>> from retrieval.index_format import write_index_version
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("v1", "v2", "v3"):
    ...     _ = write_index_version(root, name, faiss.IndexFlatIP(2), np.eye(2, dtype=np.float32),
    ...                             pa.array(["a", "b"]))
    >>> publish_current(root, "v3") is None
    True
    >>> rollback(root)
    ('v3', 'v2')
    >>> prune_versions(root, keep=1)  # keeps the newest (v3) and CURRENT (v2)
    ['v1']
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from retrieval.atomic import TMP_PREFIX, atomic_write_text, fsync_directory
from retrieval.index_format import (
    CURRENT_FILE,
    PUBLISH_CHANNEL,
    IndexStoreError,
    check_version_name,
    list_versions,
    read_current,
    verify_index_version,
    version_path,
    versions_dir,
)
from retrieval.urls import redact_url

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
REDIS_TIMEOUT_S = 2.0


class IndexBuildError(ValueError):
    """The index job cannot build or publish; CURRENT is left as it was."""


@contextlib.contextmanager
def root_lock(root: str | Path) -> Iterator[None]:
    """Hold the index root's exclusive lock (one build, rollback or prune at a time).

    Raises:
        IndexBuildError: another process holds it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise IndexBuildError(
                    f"{root}: another index build or rollback is running (lock {LOCK_FILE} held)"
                ) from exc
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def current_or_none(root: str | Path) -> str | None:
    try:
        return read_current(root)
    except FileNotFoundError:
        return None


def publish_current(root: str | Path, version: str) -> str | None:
    """Point CURRENT at `version` (atomically); returns the version it named before."""
    path = version_path(root, check_version_name(version))
    if not path.is_dir():
        raise IndexStoreError(f"cannot publish {version!r}: {path} does not exist")
    previous = current_or_none(root)
    atomic_write_text(Path(root) / CURRENT_FILE, version + "\n")
    logger.info("CURRENT -> %s (was %s)", version, previous)
    return previous


def rollback(root: str | Path, to: str | None = None, *, verify: bool = True) -> tuple[str, str]:
    """Point CURRENT at `to`, or at the newest version older than CURRENT.

    Args:
        root: the index root.
        to: target version name (default: the one listed just before CURRENT).
        verify: check the target's checksums before switching (a corrupt target is refused).

    Returns:
        (previous CURRENT, new CURRENT).
    """
    current = read_current(root)
    names = [info.name for info in list_versions(root) if info.manifest is not None]
    if to is None:
        if current not in names:
            raise IndexStoreError(f"CURRENT names {current!r}, which is not a complete version")
        position = names.index(current)
        if position == 0:
            raise IndexStoreError(f"no version older than CURRENT ({current}) to roll back to")
        to = names[position - 1]
    check_version_name(to)
    if to not in names:
        raise IndexStoreError(f"version {to!r} not found under {versions_dir(root)}; have {names}")
    if verify:
        verify_index_version(version_path(root, to))
    publish_current(root, to)
    return current, to


def prune_versions(root: str | Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the one CURRENT names.

    A version is first renamed to a temporary name (so it vanishes from listings in one
    step), then removed. Returns the names deleted.
    """
    if keep < 1:
        raise ValueError(f"`keep` must be >= 1; got {keep}")
    current = current_or_none(root)
    infos = list_versions(root)
    protected = {info.name for info in infos[-keep:]} | ({current} if current else set())
    removed = []
    parent = versions_dir(root)
    for info in infos:
        if info.name in protected:
            continue
        doomed = parent / f"{TMP_PREFIX}{info.name}.deleted"
        os.replace(info.path, doomed)
        fsync_directory(parent)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(info.name)
    if removed:
        logger.info("pruned versions %s (keep %d, CURRENT %s)", removed, keep, current)
    return removed


def announce_version(
    redis_url: str,
    version: str,
    *,
    channel: str = PUBLISH_CHANNEL,
    timeout_s: float = REDIS_TIMEOUT_S,
) -> int | None:
    """Publish `version` on the Redis channel; returns the receiver count, None on failure.

    Failures are logged, not raised: CURRENT is the source of truth and services also
    poll it.
    """
    try:
        import redis

        client = redis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            receivers = int(client.publish(channel, version))
        finally:
            client.close()
    except Exception as exc:  # redis errors, bad URLs, DNS: never fatal here
        logger.warning(
            "could not publish version %s on redis %s: %s", version, redact_url(redis_url), exc
        )
        return None
    logger.info("published %s on redis channel %s (%d receivers)", version, channel, receivers)
    return receivers
