"""Reliability soak (`make soak`): the long rows of docs/reliability.md against a real server.

Usage::

    python bench/soak.py --workdir /tmp/soak --out soak.json                 # the full run
    python bench/soak.py --minutes 5 --row17-s 30 --kills 10 --out soak.json # a short form

Everything runs on 127.0.0.1: a private redis-server (so it can be killed and stopped),
`retrieval serve` as a child process, and the load generators in this process. Every
request loop is bounded in time and in count. Steps, top to bottom:

1. artifacts (reused from ``--workdir``): a synthetic catalog (``--items``), a model
   trained for one epoch, a Flat index and a second version of half the catalog;
   features pushed to the private Redis;
2. capacity: closed loop, 8 connections, ``--capacity-s``: the saturation rate S; the
   sustainable rate X is 60 % of S (its open-loop p99 is measured as the baseline);
3. row 5: open loop at 3 X against a second instance with ``--overload-in-flight``
   admissions (the main one keeps the default 256): share answered 429/503, their latency, Retry-After on each,
   p99 of the admitted requests against the baseline p99;
4. rows 9 + 17: 8 client threads for ``--row17-s`` while CURRENT flips every 2 s: failed
   requests, answers whose ids are not the ones their named version gives, RSS before/after;
5. row 7: Redis SIGKILLed for 5 s under load, then restarted (from its append-only file);
6. row 8: Redis SIGSTOPped for 5 s, then SIGCONT: the service's threads, open files and
   Redis client connections before, during and after;
7. row 18: ``--minutes`` at X (60 % of S) with a swap every 30 s and a Redis restart half-way:
   RSS and open files sampled every 10 s, error rate;
8. row 14: the index job SIGKILLed ``--kills`` times at random moments, CURRENT checked
   complete and loadable after each, temporaries gone after the next build;
9. row 15: SIGTERM under load: readiness first, admitted requests all answered, exit time.

JSON on stdout (and ``--out``), a table on stderr. Figures measured on a shared machine
are only as good as the machine: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
from common import emit, machine

PY = sys.executable
SUSTAINABLE_SHARE = 0.6  # the sustainable rate: 60 % of the closed-loop saturation rate
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_figures(pid: int) -> dict[str, int]:
    """RSS (bytes), open files and threads of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {
        "rss": rss,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
    }


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None  # ms


# --------------------------------------------------------------------------- processes


class Redis:
    """A private redis-server with an append-only file, as a production one would restart."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=0.2)
        for _ in range(200):
            try:
                client.ping()  # answers LOADING (an error) until the append-only file is read
                break
            except redis.RedisError:
                time.sleep(0.05)
        client.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def clients(self) -> int:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            return int(client.info("clients")["connected_clients"]) - 1  # not this one
        finally:
            client.close()


def push(args: argparse.Namespace, redis_url: str) -> None:
    subprocess.run(
        [PY, "-m", "retrieval", "features", "push", "--data", str(args.data), "--redis-url",
         redis_url, "--model", str(args.model)],
        check=True, stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def start_service(
    args: argparse.Namespace, port: int, redis_url: str, max_in_flight: int
) -> subprocess.Popen[bytes]:
    env = {
        **ENV,
        "RETRIEVAL_INDEX_POLL_S": "0.2",
        "RETRIEVAL_MAX_IN_FLIGHT": str(max_in_flight),
        "RETRIEVAL_CACHE_ENABLED": "false",  # every request runs the tower and the search
        "RETRIEVAL_SHUTDOWN_DRAIN_S": "1",
        "RETRIEVAL_GRACEFUL_TIMEOUT_S": "10",
    }
    log_file = (args.workdir / "serve.log").open("ab")
    proc = subprocess.Popen(
        [PY, "-m", "retrieval", "serve", "--model", str(args.model), "--index", str(args.index),
         "--redis-url", redis_url, "--port", str(port)],
        env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("retrieval serve exited; see serve.log")
        time.sleep(0.1)
    raise RuntimeError("retrieval serve did not become ready")


# --------------------------------------------------------------------------- artifacts


def ensure_artifacts(args: argparse.Namespace) -> None:
    work = args.workdir
    args.data, args.model = work / "data", work / "model"
    args.index = work / "index"
    cli = [PY, "-m", "retrieval"]
    if not (args.data / "schema.json").is_file():
        subprocess.run([*cli, "data", "synth", "--items", str(args.items), "--users", "2000",
                        "--interactions", "40000", "--seed", "0", "--out", str(args.data)],
                       check=True, stdout=subprocess.DEVNULL, env=ENV)  # fmt: skip
    if not (args.model / "manifest.json").is_file():
        subprocess.run([*cli, "train", "--data", str(args.data), "--out", str(args.model),
                        "--config", "configs/synth.yaml", "--epochs", "1", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL, env=ENV)  # fmt: skip
    if not (args.index / "CURRENT").is_file():
        subprocess.run([*cli, "build-index", "--model", str(args.model), "--data", str(args.data),
                        "--out", str(args.index), "--factory", "Flat", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL, env=ENV)  # fmt: skip
    from retrieval.bundle import load_bundle
    from retrieval.index_store import (
        load_index_version,
        read_current,
        reconstruct_all,
        versions_dir,
        write_index_version,
    )

    args.v1 = read_current(args.index)
    args.v2 = "soak-half"
    if not (versions_dir(args.index) / args.v2).is_dir():
        import faiss
        import pyarrow as pa

        loaded = load_index_version(args.index, args.v1)
        rows = np.arange(0, loaded.num_items, 2)
        bundle = load_bundle(args.model)
        write_index_version(
            args.index, args.v2, faiss.IndexFlatIP(loaded.dim), reconstruct_all(loaded.index)[rows],
            loaded.item_ids.take(pa.array(rows)), factory="Flat",
            manifest_extra={"model": {"checksum": bundle.checksum, "model_version": bundle.version}},
        )  # fmt: skip
    users = __import__("pyarrow.parquet", fromlist=["x"]).read_table(args.data / "users.parquet")
    args.user_ids = [str(u) for u in users["user_id"].to_pylist()[:500]]


def set_current(root: Path, name: str) -> None:
    tmp = root / f".tmp-soak-current-{os.getpid()}"
    tmp.write_text(name + "\n")
    tmp.replace(root / "CURRENT")


# --------------------------------------------------------------------------- load


def body(args: argparse.Namespace, i: int) -> tuple[str, dict[str, Any]]:
    if i % 2:
        return "user", {"user_id": args.user_ids[i % len(args.user_ids)], "k": 100}
    return "inline", {"query": {}, "k": 100}


class Connection(loadgen.Connection):
    """A `loadgen.Connection` to 127.0.0.1 whose `answer` gives (status, Retry-After)."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)

    async def answer(self, request: bytes, timeout_s: float) -> tuple[int, str | None]:
        """(status, Retry-After) of the answer; status 0 when the connection failed."""
        try:
            status, _ = await asyncio.wait_for(self.post(request), timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            self.close()
            return 0, None
        return status, self.retry_after


def prepared(args: argparse.Namespace, port: int, i: int) -> tuple[str, bytes]:
    kind, payload = body(args, i)
    data = json.dumps(payload).encode()
    head = (
        f"POST /v1/retrieve HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return kind, head.encode() + data


async def closed_loop(port: int, args: argparse.Namespace, clients: int, seconds: float) -> list:
    """(sent, seconds, status, kind) of every request of `clients` closed-loop connections."""
    out: list[tuple[float, float, int, str]] = []
    end = time.monotonic() + seconds
    requests = [prepared(args, port, i) for i in range(1000)]

    async def one_client(offset: int) -> None:
        conn, i = Connection(port), offset
        while (sent := time.monotonic()) < end and len(out) < 10_000_000:
            kind, request = requests[i % len(requests)]
            status, _ = await conn.answer(request, 10.0)
            out.append((sent, time.monotonic() - sent, status, kind))
            i += clients
            if status == 0:
                await asyncio.sleep(0.01)
        conn.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return out


async def open_loop(
    port: int, args: argparse.Namespace, rate: float, seconds: float, connections: int = 256
) -> list:
    """Requests scheduled at `rate`/s; latency counts from the scheduled time (a wait for a
    free connection included). (scheduled, seconds, status, kind, retry_after) each."""
    out: list[tuple[float, float, int, str, str | None]] = []
    requests = [prepared(args, port, i) for i in range(1000)]
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(port))
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        kind, request = requests[i % len(requests)]
        conn = await idle.get()
        try:
            status, retry = await conn.answer(request, 10.0)
        finally:
            idle.put_nowait(conn)
        out.append((due, time.monotonic() - due, status, kind, retry))

    start = time.monotonic() + 0.05
    for i in range(int(rate * seconds)):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*list(pending))
    while not idle.empty():
        idle.get_nowait().close()
    return out


def summarize(samples: list, since: float = 0.0) -> dict[str, Any]:
    codes: dict[str, int] = {}
    for s in samples:
        codes[str(s[2])] = codes.get(str(s[2]), 0) + 1
    ok = [s[1] for s in samples if s[2] == 200]
    return {"requests": len(samples), "codes": codes, "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99),
            "max_ms": round(max((s[1] for s in samples), default=0) * 1000, 1)}  # fmt: skip


# --------------------------------------------------------------------------- steps


def step_capacity(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Saturation (closed loop, 8 connections), then the sustainable rate: 60 % of it, with
    its open-loop p99 (the baseline of rows 5 and 18)."""
    samples = asyncio.run(closed_loop(args.port, args, 8, args.capacity_s))
    saturation = sum(1 for s in samples if s[2] == 200) / args.capacity_s
    sustainable = SUSTAINABLE_SHARE * saturation
    baseline = asyncio.run(open_loop(args.port, args, sustainable, args.capacity_s))
    return {
        "saturation_qps": round(saturation, 1),
        "saturation": summarize(samples),
        "sustainable_qps": round(sustainable, 1),
        "sustainable": summarize(baseline),
    }


def step_overload(url: str, args: argparse.Namespace, capacity: dict[str, Any]) -> dict[str, Any]:
    rate = 3 * capacity["sustainable_qps"]
    samples = asyncio.run(open_loop(args.port, args, rate, args.overload_s))
    refused = [s for s in samples if s[2] in (429, 503)]
    admitted = [s[1] for s in samples if s[2] == 200]
    return {
        "rate": round(rate, 1),
        **summarize(samples),
        "admitted_qps": round(len(admitted) / args.overload_s, 1),
        "refused_share": round(len(refused) / max(1, len(samples)), 3),
        "refused_p50_ms": pct([s[1] for s in refused], 50),
        "refused_p99_ms": pct([s[1] for s in refused], 99),
        "refused_without_retry_after": sum(1 for s in refused if not s[4]),
        "admitted_p99_ms": pct(admitted, 99),
        "sustainable_p99_ms": capacity["sustainable"]["p99_ms"],
        "other_errors": sum(1 for s in samples if s[2] not in (200, 429, 503)),
    }


def step_swaps_threads(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """Rows 9 + 17: 8 threads, CURRENT flipped every 2 s."""
    stop = threading.Event()
    answers: dict[tuple[int, str], set[tuple[str, ...]]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    count = {"n": 0}
    queries = [{"query": {}, "k": 50}] + [{"user_id": u, "k": 50} for u in args.user_ids[:7]]

    def worker(t: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            i = t
            while not stop.is_set() and count["n"] < 2_000_000:
                q = i % len(queries)
                try:
                    response = client.post("/v1/retrieve", json=queries[q])
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(type(exc).__name__)
                    continue
                with lock:
                    count["n"] += 1
                    if response.status_code != 200:
                        failures.append(str(response.status_code))
                    else:
                        b = response.json()
                        answers.setdefault((q, b["index_version"]), set()).add(tuple(b["ids"]))
                i += 1

    before = proc_figures(pid)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    swaps = 0
    end = time.monotonic() + args.row17_s
    while time.monotonic() < end:
        time.sleep(2.0)
        set_current(args.index, args.v2 if swaps % 2 == 0 else args.v1)
        swaps += 1
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    set_current(args.index, args.v1)
    time.sleep(1.0)
    after = proc_figures(pid)
    mixed = sum(1 for ids in answers.values() if len(ids) > 1)
    return {
        "requests": count["n"], "swaps": swaps, "failed": len(failures),
        "failure_kinds": sorted(set(failures))[:5],
        "versions_seen": sorted({v for _, v in answers}),
        "answers_not_matching_their_version": mixed,
        "rss_mib_before": round(before["rss"] / 2**20, 1),
        "rss_mib_after": round(after["rss"] / 2**20, 1),
    }  # fmt: skip


def step_redis_fault(url: str, args: argparse.Namespace, redis: Redis, pid: int, mode: str) -> dict:
    """Row 7 (kill) or row 8 (stop): 5 s of fault under load, then recovery."""

    async def scenario() -> tuple[list, dict, dict, dict, float]:
        load = asyncio.create_task(closed_loop(args.port, args, 6, 3 + 5 + 10))
        await asyncio.sleep(3)
        before = proc_figures(pid) | {"redis_clients": redis.clients()}
        redis.signal(signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        await asyncio.sleep(4.5)
        during = proc_figures(pid)
        await asyncio.sleep(0.5)
        if mode == "kill":
            await asyncio.to_thread(redis.start)  # its append-only file holds the features
        else:
            redis.signal(signal.SIGCONT)
        back = time.monotonic()
        samples = await load
        after = proc_figures(pid) | {"redis_clients": redis.clients()}
        return samples, before, during, after, back

    samples, before, during, after, back = asyncio.run(scenario())
    users_after = [s for s in samples if s[3] == "user" and s[0] > back and s[2] == 200]
    return {
        **summarize(samples),
        "inline_not_200": sum(1 for s in samples if s[3] == "inline" and s[2] != 200),
        "status_500": sum(1 for s in samples if s[2] == 500),
        "user_id_recovered_after_s": round(min(s[0] + s[1] for s in users_after) - back, 2)
        if users_after else None,
        "threads": [before["threads"], during["threads"], after["threads"]],
        "open_files": [before["fds"], during["fds"], after["fds"]],
        "redis_clients_before_after": [before["redis_clients"], after["redis_clients"]],
    }  # fmt: skip


def server_histogram(url: str) -> dict[float, float]:
    """Cumulative counts per bucket bound of the service's own latency histogram for
    answered (200) POST /v1/retrieve requests, from /metrics."""
    counts: dict[float, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if (
            line.startswith("retrieval_http_request_duration_seconds_bucket{")
            and 'route="/v1/retrieve"' in line
            and 'status="200"' in line
        ):
            bound = line.split('le="')[1].split('"')[0]
            counts[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return counts


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> Any:
    """Upper bucket bound (ms) holding the q-quantile of the requests between two scrapes."""
    delta = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    for bound, count in delta.items():
        if total and count >= q * total:
            return "inf" if bound == float("inf") else round(bound * 1000, 1)
    return None


def step_soak(url: str, args: argparse.Namespace, redis: Redis, pid: int, rate: float) -> dict:
    """Row 18: `--minutes` at 60 % of capacity, swaps every 30 s, a Redis restart half-way."""
    seconds = args.minutes * 60
    samples_fig: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    def background() -> None:
        start = time.monotonic()
        swaps, restarted = 0, False
        while time.monotonic() - start < seconds:
            time.sleep(10)
            samples_fig.append(proc_figures(pid))
            elapsed = time.monotonic() - start
            if elapsed // 30 > swaps:
                swaps += 1
                set_current(args.index, args.v2 if swaps % 2 else args.v1)
            if not restarted and elapsed > seconds / 2:
                restarted = True
                result["redis_killed_at"] = time.monotonic()
                redis.signal(signal.SIGKILL)
                redis.start()
                result["redis_back_at"] = time.monotonic()
        result["swaps"] = swaps

    url = f"http://127.0.0.1:{args.port}"
    histogram_before = server_histogram(url)
    thread = threading.Thread(target=background)
    thread.start()
    samples = asyncio.run(open_loop(args.port, args, rate, seconds))
    thread.join()
    histogram_after = server_histogram(url)
    by_minute: dict[int, list[float]] = {}
    for sample in samples:
        by_minute.setdefault(int((sample[0] - samples[0][0]) // 60), []).append(sample[1])
    set_current(args.index, args.v1)
    errors = [s for s in samples if s[2] != 200 and not (s[2] == 503 and s[3] == "user")]
    start = samples[0][0] if samples else 0.0
    per_minute: dict[int, int] = {}
    for e in errors:
        per_minute[int((e[0] - start) // 60)] = per_minute.get(int((e[0] - start) // 60), 0) + 1
    user_503 = [s[0] + s[1] for s in samples if s[2] == 503 and s[3] == "user"]
    killed_at, back_at = result.get("redis_killed_at"), result.get("redis_back_at")
    rss = [f["rss"] / 2**20 for f in samples_fig]
    fds = [f["fds"] for f in samples_fig]
    warm = max(1, len(rss) // 5)  # after the first fifth: caches and pools are warm
    return {
        "minutes": args.minutes, "rate": round(rate, 1), **summarize(samples),
        "swaps": result.get("swaps"),
        "error_rate": round(len(errors) / max(1, len(samples)), 5),
        "user_503_during_redis_restart": len(user_503),
        "redis_down_s": round(back_at - killed_at, 2) if killed_at and back_at else None,
        "user_503_first_last_s_after_kill": [round(min(user_503) - killed_at, 2),
                                             round(max(user_503) - killed_at, 2)]
        if user_503 and killed_at else None,
        "rss_mib_first_last_max": [round(rss[warm - 1], 1), round(rss[-1], 1), round(max(rss), 1)]
        if rss else None,
        "errors_by_minute": per_minute,
        # client latency counts from each scheduled send (the generator's own lag included);
        # the server's: its histogram for the answered requests (upper bucket bound)
        "client_p99_ms_by_minute": [pct(v, 99) for _, v in sorted(by_minute.items())],
        "server_p50_ms_at_most": histogram_quantile(histogram_before, histogram_after, 0.5),
        "server_p99_ms_at_most": histogram_quantile(histogram_before, histogram_after, 0.99),
        "error_statuses": sorted({str(e[2]) for e in errors}),
        "open_files_first_last_max": [fds[warm - 1], fds[-1], max(fds)] if fds else None,
    }  # fmt: skip


def step_kills(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.index_store import list_versions, load_index_version, read_current

    root = args.workdir / "kill-index"
    shutil.rmtree(root, ignore_errors=True)
    command = [PY, "-m", "index", "--model", str(args.model), "--data", str(args.data), "--out",
               str(root), "--factory", "Flat", "--no-progress", "--keep", "3"]  # fmt: skip
    started = time.monotonic()
    subprocess.run(
        command, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    whole = time.monotonic() - started
    rng = random.Random(14)
    killed = broken = 0
    for _ in range(args.kills):
        proc = subprocess.Popen(
            command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=rng.uniform(0, whole))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
        try:
            load_index_version(root)
            for info in list_versions(root):
                load_index_version(root, info.name)
        except Exception as exc:
            broken += 1
            log(f"broken after a kill: {exc}")
    subprocess.run(
        command, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    leftovers = list(root.glob(".tmp-*")) + list((root / "versions").glob(".tmp-*"))
    return {"runs": args.kills, "killed": killed, "build_seconds": round(whole, 1),
            "current_not_loadable": broken, "temporaries_after_next_run": len(leftovers),
            "current": read_current(root)}  # fmt: skip


def step_sigterm(url: str, args: argparse.Namespace, proc: subprocess.Popen[bytes]) -> dict:
    ready: list[tuple[float, int]] = []

    async def scenario() -> tuple[list, float]:
        stop = asyncio.Event()
        out: list[tuple[float, float, int, str]] = []
        limits = httpx.Limits(max_keepalive_connections=0)

        async def client_loop() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=15, limits=limits) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        status = (
                            await client.post("/v1/retrieve", json={"query": {}, "k": 100})
                        ).status_code
                        error = ""
                    except httpx.HTTPError as exc:
                        status, error = 0, type(exc).__name__
                    out.append((sent, time.monotonic() - sent, status, error))
                    if error == "ConnectError":
                        await asyncio.sleep(0.05)

        async def poll() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=2) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        code = (await client.get("/readyz")).status_code
                    except httpx.HTTPError:
                        code = 0
                    ready.append((sent, code))
                    await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(client_loop()) for _ in range(8)] + [
            asyncio.create_task(poll())
        ]
        await asyncio.sleep(3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() - signalled < 30:
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*tasks)
        return out, signalled

    samples, signalled = asyncio.run(scenario())
    exited = proc.wait(timeout=30)
    after = [c for t, c in ready if t > signalled]
    answered = [s for s in samples if s[2]]
    return {
        "requests": len(samples), "answered": len(answered),
        "answered_not_200": sum(1 for s in answered if s[2] != 200),
        "no_answer_before_drain_end": sum(1 for s in samples if not s[2] and s[0] < signalled + 1.0),
        "no_answer_after_drain_end": sum(1 for s in samples if not s[2] and s[0] >= signalled + 1.0),
        "no_answer_kinds": sorted({s[3] for s in samples if not s[2]}),
        "readyz_first_after_signal": after[0] if after else None,
        "exit_status": exited, "exit_after_s": round(time.monotonic() - signalled, 2),
    }  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/soak"))
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--minutes", type=float, default=30.0, help="row 18 duration")
    parser.add_argument("--row17-s", type=float, default=120.0, help="rows 9 + 17 duration")
    parser.add_argument("--capacity-s", type=float, default=15.0)
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--kills", type=int, default=50, help="row 14: index builds killed")
    parser.add_argument(
        "--max-in-flight", type=int, default=256, help="admission limit (the service's default)"
    )
    parser.add_argument(
        "--overload-in-flight", type=int, default=32, help="admission limit of the row 5 instance"
    )
    parser.add_argument(
        "--steps",
        default="5,9,7,8,18,15,14",
        help="rows to run, in this order (capacity always runs first)",
    )
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'row':<26} figures", "-" * 100]
    for name, figures in report["rows"].items():
        lines.append(f"{name:<26} {json.dumps(figures, default=str)[:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log("artifacts")
    ensure_artifacts(args)
    set_current(args.index, args.v1)
    redis_dir = args.workdir / "redis"
    shutil.rmtree(redis_dir, ignore_errors=True)
    redis_dir.mkdir()
    redis = Redis(free_port(), redis_dir)
    redis.start()
    push(args, redis.url)
    port = args.port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_service(args, port, redis.url, args.max_in_flight)
    rows: dict[str, Any] = {}
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()
                                                             if k not in ("user_ids",)}, "rows": rows}  # fmt: skip
    try:
        log("capacity")
        capacity = step_capacity(url, args)
        rows["capacity"] = capacity
        steps = [step.strip() for step in args.steps.split(",")]
        for step in steps:
            if step == "5":
                log(f"row 5: 3 x {capacity['sustainable_qps']} QPS")
                # on a second instance whose admission limit is sized for its latency target
                main_port, args.port = args.port, free_port()
                gated = start_service(args, args.port, redis.url, args.overload_in_flight)
                try:
                    rows["5 overload 3x"] = step_overload(url, args, capacity)
                    rows["5 overload 3x"]["max_in_flight"] = args.overload_in_flight
                finally:
                    gated.send_signal(signal.SIGTERM)
                    gated.wait(timeout=30)
                    args.port = main_port
            elif step == "9":
                log("rows 9 + 17: threads and swaps")
                rows["9+17 swaps, 8 threads"] = step_swaps_threads(url, args, proc.pid)
            elif step == "7":
                log("row 7: redis SIGKILL")
                rows["7 redis killed"] = step_redis_fault(url, args, redis, proc.pid, "kill")
            elif step == "8":
                log("row 8: redis SIGSTOP/SIGCONT")
                rows["8 redis hung"] = step_redis_fault(url, args, redis, proc.pid, "stop")
            elif step == "18":
                log(f"row 18: {args.minutes} min at 60 %")
                rows["18 soak"] = step_soak(url, args, redis, proc.pid, capacity["sustainable_qps"])
            elif step == "15":
                log("row 15: SIGTERM under load")
                rows["15 sigterm"] = step_sigterm(url, args, proc)
            elif step == "14":
                log(f"row 14: {args.kills} killed index builds")
                rows["14 killed builds"] = step_kills(args)
            else:
                raise SystemExit(f"unknown step {step!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
        if redis.proc is not None:
            redis.proc.kill()
    report["machine"]["load_average_end"] = os.getloadavg()
    emit(report, format_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
