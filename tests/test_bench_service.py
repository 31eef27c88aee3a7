"""The pure helpers of bench/bench_service.py: capacity, the rate sweep's plan and the
server's CPU time over its process tree (no load is run and nothing is timed)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH_SERVICE = Path(__file__).resolve().parents[1] / "bench" / "bench_service.py"
TARGET_MS = 25.0


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_service", BENCH_SERVICE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def level(rate: float, p99: float, p50: float = 5.0, **extra: Any) -> dict[str, Any]:
    """An open-loop level's stats as `run_load` reports them (the fields the sweep reads)."""
    stats = {"offered_qps": rate, "requests": 100, "errors": 0, "qps": rate, "mean_ms": p50}
    return {**stats, "p50_ms": p50, "p99_ms": p99, **extra}


def test_capacity_is_the_cores_over_the_batch_1_floor(bench: ModuleType) -> None:
    assert bench.capacity_qps(2, 4.0) == 500.0  # 2 / 0.004 s
    assert bench.capacity_qps(2, 3.0) == 666.7  # 2 / 0.003 s, one decimal


def test_sweep_rates_are_whole_distinct_and_ascending(bench: ModuleType) -> None:
    assert bench.sweep_rates(500.0) == [200.0, 250.0, 300.0, 350.0, 400.0, 450.0, 500.0]
    # 0.4..1.0 x 3 = 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0 -> 1, 2, 2, 2, 2, 3, 3
    assert bench.sweep_rates(3.0) == [1.0, 2.0, 3.0]
    assert bench.sweep_rates(0.5) == [1.0]


def test_a_level_meets_the_target_only_without_errors_or_drops(bench: ModuleType) -> None:
    assert bench.meets_target(level(200, p99=25.0), TARGET_MS)  # at the target: met
    assert not bench.meets_target(level(200, p99=25.1), TARGET_MS)
    assert not bench.meets_target(level(200, p99=10.0, errors=1), TARGET_MS)
    assert not bench.meets_target(level(200, p99=10.0, dropped=3), TARGET_MS)
    assert not bench.meets_target({"offered_qps": 200, "requests": 0, "errors": 50}, TARGET_MS)


def test_far_over_target_stops_the_sweep(bench: ModuleType) -> None:
    assert not bench.far_over_target(level(200, p99=50.0), TARGET_MS)  # exactly 2x: go on
    assert bench.far_over_target(level(200, p99=50.1), TARGET_MS)
    assert bench.far_over_target(level(200, p99=40.0, p50=1001.0), TARGET_MS)
    assert bench.far_over_target({"offered_qps": 200, "requests": 0, "errors": 9}, TARGET_MS)


def test_bisect_between_the_best_passing_and_the_lowest_failing_above(
    bench: ModuleType,
) -> None:
    monotonic = [level(200, 10), level(250, 20), level(300, 30), level(350, 60)]
    assert bench.bisect_rate(monotonic, TARGET_MS) == 275.0  # (250 + 300) / 2
    # a noisy failure below a pass does not bound the search: (300 + 350) / 2
    noisy = [level(200, 10), level(250, 30), level(300, 20), level(350, 60)]
    assert bench.bisect_rate(noisy, TARGET_MS) == 325.0
    # an error fails a level whatever its latency: (200 + 250) / 2
    errored = [level(200, 10), level(250, 10, errors=1)]
    assert bench.bisect_rate(errored, TARGET_MS) == 225.0
    # nothing passed: halfway between 0 and the lowest rate tried
    assert bench.bisect_rate([level(200, 80)], TARGET_MS) == 100.0
    # everything passed, or no whole rate in between: no extra level
    assert bench.bisect_rate([level(200, 10), level(250, 20)], TARGET_MS) is None
    assert bench.bisect_rate([level(4, 10), level(5, 30)], TARGET_MS) is None


def test_best_within_target_is_the_highest_passing_level(bench: ModuleType) -> None:
    levels = [level(200, 10), level(300, 20, qps=299.5), level(350, 10, errors=2)]
    levels.append({"offered_qps": 400.0, "skipped": "saturated below"})
    assert bench.best_within_target(levels, TARGET_MS) == {
        "offered_qps": 300,
        "qps": 299.5,
        "p50_ms": 5.0,
        "p99_ms": 20,
        "mean_ms": 5.0,
    }
    assert bench.best_within_target([level(200, 30)], TARGET_MS) is None


def test_child_pids_and_tree_cpu_count_every_descendant(bench: ModuleType) -> None:
    burn = (
        "import sys, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.2: pass\n"
        "print('burnt', flush=True)\n"
        "time.sleep(60)\n"
    )
    # sh -> (sleep, python): the python grandchild burns 0.2 s of CPU and then idles
    shell = subprocess.Popen(
        ["sh", "-c", f'sleep 60 & "{sys.executable}" -c "$0" & wait', burn],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, stopped as one below
    )
    try:
        assert shell.stdout is not None and shell.stdout.readline() == "burnt\n"
        deadline = time.monotonic() + 10
        while len(bench.child_pids(shell.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        children = bench.child_pids(shell.pid)
        assert len(children) == 2
        assert shell.pid in bench.child_pids(os.getpid())
        own = bench.process_cpu_seconds(shell.pid)
        # /proc counts whole clock ticks: allow a few below the 0.2 s burnt
        assert bench.process_tree_cpu_seconds(shell.pid) - own >= 0.15
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    assert bench.child_pids(shell.pid) == []  # a process that has exited has no children
