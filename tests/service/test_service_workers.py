"""`retrieval serve --workers N` (service/workers.py): real processes on a real port.

Each test starts the real command; the workers are found as the supervisor's spawned
children in /proc (tests/service/workers_fixtures.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_fixtures import wait_until
from workers_fixtures import ENV, Supervised, metric, worker_batch_sum

from service.settings import ServiceSettings
from service.workers import port_lock_path

GOOD = {"query": {"gender": "F", "history": ["i3"]}, "k": 5}


@pytest.fixture
def serve_args(tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path) -> list[str]:
    return ["--model", str(tiny_bundle), "--index", str(tiny_index), "--data", str(tiny_dataset)]


def test_workers_share_the_port_and_the_metrics_then_stop_on_sigterm(
    serve_args: list[str], tmp_path: Path
) -> None:
    server = Supervised([*serve_args, "--workers", "2"], tmp_path / "serve.log")
    try:
        workers = server.wait_ready(2)
        assert len(workers) == 2 and server.process.pid not in workers
        for _ in range(40):  # a new connection each: the kernel hands them to either worker
            response = httpx.post(f"{server.url}/v1/retrieve", json=GOOD, timeout=10)
            assert response.status_code == 200 and len(response.json()["ids"]) == 5
        # every /metrics answer (from either worker) counts the requests of both
        seen = set()
        for _ in range(10):
            text = httpx.get(f"{server.url}/metrics", timeout=5).text
            seen.add(metric(text, "retrieval_batch_size_sum"))
            assert metric(text, "retrieval_index_items") > 0
            assert metric(text, "retrieval_in_flight_requests") == 0
        assert seen == {40.0}
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        mine = [p for p in tmp.glob("retrieval-metrics-*") if any(p.glob(f"*_{workers[0]}.db"))]
        assert len(mine) == 1
        # both workers took connections: each one's own files hold some of the queries
        per_worker = [worker_batch_sum(mine[0], pid, tmp_path) for pid in workers]
        assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker
    finally:
        status = server.stop()
    assert status == 0, server.log.read_text()[-3000:]
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    assert not mine[0].exists()  # the metrics directory is removed at exit
    assert not port_lock_path(server.port).exists()  # and the port's lock file
    log = server.log.read_text()
    assert log.count("service stopped") == 2
    assert "leaked" not in log and "Traceback" not in log  # workers exit through their handlers


def test_a_killed_worker_is_replaced_while_the_other_serves(
    serve_args: list[str], tmp_path: Path
) -> None:
    server = Supervised([*serve_args, "--workers", "2"], tmp_path / "serve.log")
    try:
        victim, survivor = server.wait_ready(2)
        os.kill(victim, signal.SIGKILL)
        # connections the kernel had queued for the victim die with it (reset); once it is
        # reaped, its socket has left the group and every connection reaches the survivor.
        # (Not "gone from children()": its cmdline empties as its main thread exits, while
        # its other threads may still hold the listening socket open for a moment.)
        assert wait_until(lambda: "exited with status -9" in server.log.read_text(), 10)
        assert not Path(f"/proc/{victim}").exists()
        gone = time.monotonic()
        statuses = []
        while time.monotonic() - gone < 3.0:  # the replacement loads meanwhile
            statuses.append(httpx.post(f"{server.url}/v1/retrieve", json=GOOD).status_code)
        assert statuses and set(statuses) == {200}  # never a 503 from a loading worker
        workers = server.wait_ready(2)
        assert survivor in workers and victim not in workers
        for _ in range(20):
            assert httpx.post(f"{server.url}/v1/retrieve", json=GOOD).status_code == 200
    finally:
        assert server.stop() == 0


def test_a_model_that_cannot_load_stops_every_worker_with_status_1(
    tiny_bundle: Path, tiny_index: Path, tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_bundle, broken)
    weights = next(p for p in broken.iterdir() if p.suffix in (".safetensors", ".pt"))
    weights.write_bytes(weights.read_bytes()[:-16])  # checksum no longer matches
    server = Supervised(
        ["--model", str(broken), "--index", str(tiny_index), "--workers", "2"],
        tmp_path / "serve.log",
    )
    try:
        status = server.process.wait(timeout=120)
    finally:
        server.kill()
    log = server.log.read_text()
    assert status == 1, log[-3000:]
    assert "could not load the model and index" in log
    assert "Traceback" not in log.split("could not load the model and index")[-1]


def test_the_port_in_use_is_a_one_line_error(serve_args: list[str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "retrieval", "serve", *serve_args, "--workers", "2"]
        done = subprocess.run(
            [*command, "--port", str(port)], env=ENV, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not port_lock_path(port).exists()


def test_a_second_supervisor_on_the_same_port_is_refused(
    serve_args: list[str], tmp_path: Path
) -> None:
    # SO_REUSEPORT would let it join the first one's workers and take half the connections
    first = Supervised([*serve_args, "--workers", "2"], tmp_path / "first.log")
    try:
        first.wait_ready(2)
        command = [sys.executable, "-m", "retrieval", "serve", *serve_args, "--workers", "2"]
        done = subprocess.run(
            [*command, "--port", str(first.port)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (
            done.returncode == 1 and "another `retrieval serve --workers` holds it" in done.stderr
        )
        # nor can a plain server take the port the supervisor holds
        single = subprocess.run(
            [sys.executable, "-m", "retrieval", "serve", *serve_args, "--port", str(first.port)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert single.returncode != 0 and "address already in use" in single.stderr.lower()
        assert httpx.post(f"{first.url}/v1/retrieve", json=GOOD).status_code == 200
    finally:
        assert first.stop() == 0


def test_several_workers_default_to_one_batch_thread_each() -> None:
    assert ServiceSettings(model_dir="m", index_root="i").batch_workers == 2
    assert ServiceSettings(model_dir="m", index_root="i", workers=2).batch_workers == 1
    given = ServiceSettings(model_dir="m", index_root="i", workers=2, batch_workers=3)
    assert given.batch_workers == 3
    with pytest.raises(ValueError, match="workers"):
        ServiceSettings(model_dir="m", index_root="i", workers="many")


def test_index_mmap_defaults_on_with_several_workers() -> None:
    one = ServiceSettings(model_dir="m", index_root="i")
    two = ServiceSettings(model_dir="m", index_root="i", workers=2)
    off = ServiceSettings(model_dir="m", index_root="i", workers=2, index_mmap=False)
    assert (one.index_mmap_enabled, two.index_mmap_enabled, off.index_mmap_enabled) == (
        False,
        True,
        False,
    )
