"""The stage timer of the jobs: each long step of a job is logged when it starts and ends,
with its wall time (and optionally its CPU time) recorded for the job's report.

    >>> timings: dict[str, float] = {}
    >>> with stage("load", timings):
    ...     pass
    >>> sorted(timings)
    ['load']
    >>> with stage("embed", timings, "embed_seconds", cpu=True, ndigits=3):
    ...     pass
    >>> sorted(timings)
    ['embed_cpu_seconds', 'embed_seconds', 'load']
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["stage"]

logger = logging.getLogger(__name__)


@contextmanager
def stage(
    name: str,
    timings: dict[str, float] | None = None,
    key: str | None = None,
    *,
    cpu: bool = False,
    ndigits: int | None = None,
) -> Iterator[None]:
    """Log a stage's start and end and time it.

    Args:
        name: what the log lines call the stage.
        timings: where the times go (None: logged only).
        key: the wall-time key in `timings` (default: `name`).
        cpu: also record this process's CPU seconds, under `key` with "_seconds" replaced by
            "_cpu_seconds" (CPU / wall far below the core count means a busy machine).
        ndigits: round the recorded seconds to this many digits (None: unrounded).
    """
    logger.info("stage %s ...", name)
    started, cpu_started = time.perf_counter(), time.process_time()
    yield
    wall = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    if ndigits is not None:
        wall, cpu_seconds = round(wall, ndigits), round(cpu_seconds, ndigits)
    if timings is not None:
        wall_key = name if key is None else key
        timings[wall_key] = wall
        if cpu:
            timings[wall_key.replace("_seconds", "_cpu_seconds")] = cpu_seconds
    if cpu:
        logger.info("stage %s done in %.1fs (cpu %.1fs)", name, wall, cpu_seconds)
    else:
        logger.info("stage %s done in %.1fs", name, wall)
