"""Service benchmark: the real HTTP service under load, against its in-process floor.

Usage::

    python bench/bench_service.py --items 1000000 --workdir /tmp/bench-service --out service.json
    python bench/bench_service.py --items 100000 --duration 5           # a smaller catalog
    python bench/bench_service.py --model M --index R --data D          # existing artifacts
    python bench/bench_service.py --workers 2 --no-sweep --rate 300,400 # fixed rates, 2 processes

What it does, top to bottom:

1. artifacts (kept in ``--workdir`` and reused when present): a synthetic catalog
   (``retrieval data synth --items N --users 20000 --interactions 400000 --seed 0``), a
   model trained for one epoch with ``configs/synth.yaml`` (its own validation and test
   evaluation on 1000 sampled users; a trained model's embeddings cluster like a
   production model's, which is what the IVF index's cost depends on) and its index
   (``retrieval build-index``, default factory for the size, recall gate included);
2. queries: inline query bodies (each user's stored features and last-N history, exactly
   what the feature store holds) for a fixed sample of users, ``k = --k`` (1000);
3. with ``--sweep`` (the default), a first estimate of capacity before the server starts:
   the batch-1 in-process floor over 100 queries (step 6's code path; the retriever is
   freed before the server loads its own);
4. the service (``retrieval serve``, a uvicorn subprocess on 127.0.0.1, ``--workers``
   processes) and the lean asyncio load generator of ``bench/loadgen.py`` in this process,
   on the same machine: closed loop at each ``--concurrency`` level, open loop at each
   ``--rate``, then the sweep: open loop at 0.4, 0.5, ... 1.0 of the estimated capacity
   (going no higher after a level whose p99 is over twice ``--target-p99-ms`` or whose
   p50 is over 1 s) and once more halfway between the highest rate that met the target
   and the lowest one above it that did not. Open-loop requests are timed from their
   scheduled send time, so queueing counts; a level meets the target when its p99 is
   within it and no request failed. Each level reports p50/p95/p99/mean latency, QPS,
   errors, the mean micro-batch size the server saw (from /metrics, all workers) and the
   server's CPU time per request (from /proc: the ``retrieval serve`` process and all its
   descendants);
5. correctness beside the speed: the service's ids for a sample of queries compared with
   the same queries run in process (identical lists expected), and the index's recall@k
   against exact search recorded by the build;
6. the in-process floor, server stopped: the same queries through the same code path
   without HTTP (`Retriever.run_batch`: encode, query tower, one FAISS search, ids; the
   index memory-mapped when the server ran several workers, as they read it) at
   batch size 1 and at the batch sizes the server formed; the ratio of the HTTP mean
   latency at concurrency 1 to the batch-1 floor, and capacity: ``os.cpu_count()``
   divided by the batch-1 floor's mean seconds per query (the rate the machine's cores
   could answer with no HTTP, batching or load generator). Both use the faster of the two
   batch-1 floors (before the server started and after it stopped): on VMs whose memory
   bandwidth drifts (the floor is mostly a scan of ~20 MB of codes), the slower one would
   flatter both ratios.

Targets (2 cores, server and load generator on the same box): k=1000 over 1M items,
p99 <= 25 ms at an offered load >= 60 % of capacity_qps; mean latency at concurrency 1
<= 1.3x the batch-1 in-process floor.
Prints a table (stderr) and JSON (stdout, and ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
from common import emit, machine

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600.0
SWEEP_FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # of the estimated capacity
PRE_ESTIMATE_QUERIES = 100  # batch-1 queries of the capacity estimate before the server starts
TARGET_RATE_OVER_CAPACITY = 0.6  # p99 within --target-p99-ms at >= this share of capacity
TARGET_C1_OVER_FLOOR = 1.3  # mean latency at concurrency 1 / batch-1 in-process floor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic catalog size")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--interactions", type=int, default=400_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-service"))
    parser.add_argument("--model", type=Path, help="existing model bundle (skips synth/train)")
    parser.add_argument("--index", type=Path, help="existing index root")
    parser.add_argument("--data", type=Path, help="existing dataset (for query sampling)")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000, help="distinct query bodies")
    parser.add_argument("--concurrency", default="1,4,8,16", help="closed-loop levels")
    parser.add_argument(
        "--rate", default="", help="open-loop request rates (req/s) besides the sweep; '' = none"
    )
    parser.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find the highest open-loop rate whose p99 meets --target-p99-ms",
    )
    parser.add_argument("--target-p99-ms", type=float, default=25.0, help="the sweep's target")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each level")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="server torch and FAISS threads")
    parser.add_argument("--batch-workers", type=int, default=2, help="server batch workers")
    parser.add_argument("--workers", type=int, default=1, help="server processes (uvicorn workers)")
    parser.add_argument(
        "--list-scanner",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="search IVF-SQ8 with retrieval.ivf_scan (the service default) or with FAISS",
    )
    parser.add_argument(
        "--fast-path",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer POST /v1/retrieve through the plain Starlette route (the service default) "
        "or through the FastAPI route (RETRIEVAL_FAST_PATH)",
    )
    parser.add_argument("--floor-repeats", type=int, default=200, help="batches per floor size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench_service {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- artifacts


def run_stage(name: str, command: list[str], timings: dict[str, float]) -> None:
    log(f"{name}: {' '.join(command)}")
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    timings[name] = round(time.perf_counter() - started, 1)


def ensure_artifacts(args: argparse.Namespace) -> tuple[Path, Path, Path, dict[str, float]]:
    timings: dict[str, float] = {}
    if args.model and args.index and args.data:
        return args.data, args.model, args.index, timings
    cli = [sys.executable, "-m", "retrieval"]
    work = args.workdir / f"synth-{args.items}"
    data, model, index = work / "data", work / "model", work / "index"
    work.mkdir(parents=True, exist_ok=True)
    if not (data / "schema.json").is_file():
        run_stage(
            "synth",
            [*cli, "data", "synth", "--items", str(args.items), "--users", str(args.users),
             "--interactions", str(args.interactions), "--seed", str(args.seed), "--out", str(data)],
            timings,
        )  # fmt: skip
    if not (model / "manifest.json").is_file():
        # One epoch of configs/synth.yaml, evaluated on a 1000-user sample (all 20k users
        # against 1M items would take longer than the whole benchmark).
        config = work / "bench-train.yaml"
        synth = (REPO / "configs" / "synth.yaml").read_text()
        config.write_text(re.sub(r"max_users: \d+", "max_users: 1000", synth))
        run_stage(
            "train",
            [*cli, "train", "--data", str(data), "--out", str(model), "--config", str(config),
             "--no-progress"],
            timings,
        )  # fmt: skip
    if not (index / "CURRENT").is_file():
        run_stage(
            "build_index",
            [*cli, "build-index", "--model", str(model), "--data", str(data), "--out", str(index),
             "--no-progress"],
            timings,
        )  # fmt: skip
    return data, model, index, timings


def sample_queries(data: Path, model: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """Inline query features of `count` users with history (what the feature store holds)."""
    from retrieval.bundle import load_bundle
    from service.feature_store import iter_user_records
    from service.query import QuerySchema

    schema = QuerySchema.from_schema(load_bundle(model).encoder.schema)
    records = [r for _, r in iter_user_records(data, list(schema.columns), schema.history_length)]
    with_history = [r for r in records if r.history] or records
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(with_history), size=min(count, len(with_history)), replace=False)
    queries = []
    for i in chosen:
        record = with_history[int(i)]
        query = dict(record.features)
        if schema.history_name is not None:
            query[schema.history_name] = list(record.history)
        queries.append(query)
    return queries


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    args: argparse.Namespace, model: Path, index: Path, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "retrieval", "serve", "--model", str(model), "--index", str(index),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--torch-threads", str(args.threads), "--faiss-threads", str(args.threads),
        "--batch-workers", str(args.batch_workers),
    ]  # fmt: skip
    if args.workers != 1:  # one process needs no flag (and `serve` without it starts one)
        command += ["--workers", str(args.workers)]
    env = {
        **os.environ,
        "RETRIEVAL_MAX_IN_FLIGHT": "4096",
        "RETRIEVAL_REQUEST_TIMEOUT_S": "10",
        "RETRIEVAL_LIST_SCANNER": str(args.list_scanner).lower(),
        "RETRIEVAL_FAST_PATH": str(args.fast_path).lower(),
    }
    log(f"server: {' '.join(command)} (log {log_path})")
    handle = log_path.open("wb")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> float:
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S}s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def server_info(url: str) -> dict[str, Any]:
    import httpx

    info: dict[str, Any] = httpx.get(f"{url}/v1/info", timeout=10).json()
    return info


def batch_counters(url: str) -> tuple[float, float]:
    """(sum, count) of the server's retrieval_batch_size histogram."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = re.search(r"^retrieval_batch_size_sum ([0-9.e+]+)$", text, re.M)
    count = re.search(r"^retrieval_batch_size_count ([0-9.e+]+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


# --------------------------------------------------------------------------- load


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The children of process `pid`, from each of its threads' /proc children list
    (empty when `pid` has exited)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return children
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # the thread has exited
            continue
    return children


def process_tree(pid: int) -> list[int]:
    """Process `pid` and all its descendants now (a server's supervisor and its workers)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += child_pids(current)
    return tree


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and all its descendants so far. A descendant that exits
    between the reads is skipped, so the CPU of one that exits during a measurement is
    missing from the difference."""
    total = process_cpu_seconds(pid)
    for child in process_tree(pid)[1:]:
        try:
            total += process_cpu_seconds(child)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def process_tree_memory_mb(pid: int) -> dict[str, Any]:
    """Memory of process `pid` and its descendants: RSS summed (shared pages counted in
    every process that maps them) and PSS summed (each shared page split between its
    processes: what the tree costs the machine), in MB, and the process count."""
    rss = pss = 0
    count = 0
    for current in process_tree(pid):
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(":", 1) for line in rollup.splitlines()[1:] if ":" in line)
        rss += int(fields["Rss"].split()[0])
        pss += int(fields["Pss"].split()[0])
        count += 1
    return {"rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1), "processes": count}


def run_load(
    url: str, bodies: list[bytes], server_pid: int, run: Any, **kwargs: Any
) -> dict[str, Any]:
    """One load level through `loadgen` (`run` is its closed_loop or open_loop), with the
    server's mean batch size and CPU time (all its processes) per answered request over the
    whole level."""
    host, port = url.removeprefix("http://").split(":")
    before, cpu_before = batch_counters(url), process_tree_cpu_seconds(server_pid)
    outcome = asyncio.run(run(host, int(port), "/v1/retrieve", bodies, **kwargs))
    cpu = process_tree_cpu_seconds(server_pid) - cpu_before
    after = batch_counters(url)
    stats = outcome.summary()
    batches = after[1] - before[1]
    stats["mean_batch_size"] = round((after[0] - before[0]) / batches, 2) if batches else None
    answered = after[0] - before[0]  # queries the batcher ran (warm-up included, like the CPU)
    stats["server_cpu_ms_per_request"] = round(cpu / answered * 1000, 3) if answered else None
    return stats


def service_answers(url: str, queries: list[dict[str, Any]], k: int) -> list[list[str]]:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        return [
            client.post("/v1/retrieve", json={"query": q, "k": k}).json()["ids"] for q in queries
        ]


# --------------------------------------------------------------------------- in-process floor


def in_process(
    model: Path,
    index: Path,
    queries: list[dict[str, Any]],
    k: int,
    threads: int,
    list_scanner: bool,
    mmap: bool = False,
) -> tuple[Any, list[Any]]:
    """A `Retriever` built exactly as the service builds it, and the checked queries
    (`mmap`: the index read memory-mapped, as a server with several workers reads it)."""
    import faiss
    import torch

    from retrieval.bundle import load_bundle
    from service.app import export_checked_query_tower
    from service.index_manager import IndexManager
    from service.query import QuerySchema, normalize_query
    from service.retriever import RetrievalJob, Retriever

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    bundle = load_bundle(model)
    schema = QuerySchema.from_schema(bundle.encoder.schema)
    embed, _ = export_checked_query_tower(bundle, schema, "auto")
    manager = IndexManager(
        index,
        model_dim=bundle.model.output_dim,
        model_checksum=bundle.checksum,
        list_scanner=list_scanner,  # as the server was started
        mmap=mmap,
    )
    manager.load_initial()
    retriever = Retriever(
        bundle.encoder,
        schema,
        embed,
        lambda: manager.current,
        faiss_threads=threads,
        prefill_codes=True,  # as the service's default
    )
    jobs = [RetrievalJob(features=normalize_query(q, schema), k=k) for q in queries]
    retriever.run_batch(jobs[:1])  # warm-up
    return retriever, jobs


def floor_at(retriever: Any, jobs: list[Any], batch_size: int, repeats: int) -> dict[str, Any]:
    from service.retriever import BatchTimings

    retriever.timings = BatchTimings()
    times = []
    for r in range(repeats):
        start = (r * batch_size) % len(jobs)
        batch = [jobs[(start + j) % len(jobs)] for j in range(batch_size)]
        began = time.perf_counter()
        retriever.run_batch(batch)
        times.append(time.perf_counter() - began)
    ms = np.asarray(times) * 1000
    t = retriever.timings
    per_batch = {
        stage: round(getattr(t, stage) / max(t.batches, 1) * 1000, 3)
        for stage in ("encode", "embed", "search", "ids")
    }
    return {
        "batch_size": batch_size,
        "mean_ms": round(float(ms.mean()), 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "queries_per_s": round(batch_size / float(ms.mean()) * 1000, 1),
        "stage_ms": per_batch,
    }


def warm_code_caches(retriever: Any, jobs: list[Any]) -> None:
    """Every query once, in batches of 64, so the row encoder's code caches hold what a
    serving process's hold once it has answered them."""
    for start in range(0, len(jobs), 64):
        retriever.run_batch(jobs[start : start + 64])


def pre_estimate_floor(
    args: argparse.Namespace, model: Path, index: Path, queries: list[dict[str, Any]]
) -> dict[str, Any]:
    """The batch-1 floor over `PRE_ESTIMATE_QUERIES` queries, measured before the server
    starts to place the sweep; the retriever (model and index) is freed before returning."""
    retriever, jobs = in_process(
        model, index, queries, args.k, args.threads, args.list_scanner, args.workers > 1
    )
    warm_code_caches(retriever, jobs)
    floor = floor_at(retriever, jobs, 1, PRE_ESTIMATE_QUERIES)
    del retriever, jobs
    gc.collect()
    return floor


# --------------------------------------------------------------------------- capacity and target


def capacity_qps(cpu_count: int, floor_mean_ms: float) -> float:
    """Queries per second `cpu_count` cores answer when each query costs the batch-1
    in-process floor's mean time (no HTTP, no batching, no load generator)."""
    return round(cpu_count / (floor_mean_ms / 1000), 1)


def sweep_rates(capacity: float) -> list[float]:
    """The sweep's offered rates: `SWEEP_FRACTIONS` of `capacity`, whole req/s, ascending."""
    return sorted({float(max(1, round(f * capacity))) for f in SWEEP_FRACTIONS})


def meets_target(stats: dict[str, Any], target_p99_ms: float) -> bool:
    """Whether a load level met the latency target: answers, none failed or dropped, and
    p99 within `target_p99_ms`."""
    return (
        bool(stats.get("requests"))
        and not stats.get("errors")
        and not stats.get("dropped")
        and stats["p99_ms"] <= target_p99_ms
    )


def far_over_target(stats: dict[str, Any], target_p99_ms: float) -> bool:
    """Whether a level is so far from the target that higher rates are not worth trying:
    no answers, p99 over twice the target, or p50 over a second."""
    return (
        not stats.get("requests") or stats["p99_ms"] > 2 * target_p99_ms or stats["p50_ms"] > 1000
    )


def bisect_rate(levels: list[dict[str, Any]], target_p99_ms: float) -> float | None:
    """The whole rate halfway between the highest level that met the target (0 when none
    did) and the lowest one above it that did not; None when no level above it failed or
    no whole rate lies strictly between the two."""
    best = max((s["offered_qps"] for s in levels if meets_target(s, target_p99_ms)), default=0.0)
    failing = [
        s["offered_qps"]
        for s in levels
        if s["offered_qps"] > best and not meets_target(s, target_p99_ms)
    ]
    if not failing:
        return None
    rate = float(round((best + min(failing)) / 2))
    return rate if best < rate < min(failing) else None


def best_within_target(levels: list[dict[str, Any]], target_p99_ms: float) -> dict[str, Any] | None:
    """The highest offered open-loop level that met the target, or None."""
    passing = [s for s in levels if meets_target(s, target_p99_ms)]
    if not passing:
        return None
    best = max(passing, key=lambda s: s["offered_qps"])
    return {key: best[key] for key in ("offered_qps", "qps", "p50_ms", "p99_ms", "mean_ms")}


def run_sweep(
    url: str, bodies: list[bytes], server_pid: int, args: argparse.Namespace, capacity: float
) -> list[dict[str, Any]]:
    """Open-loop levels at `sweep_rates(capacity)`, going no higher after one far over the
    target, then one level at `bisect_rate` of those."""
    levels: list[dict[str, Any]] = []

    def measure(rate: float) -> dict[str, Any]:
        stats = run_load(
            url, bodies, server_pid, loadgen.open_loop,
            rate=rate, duration_s=args.duration, warmup_s=args.warmup,
        )  # fmt: skip
        stats.update(offered_qps=rate, sweep=True)
        levels.append(stats)
        log(f"sweep {rate:.0f}/s: {stats}")
        return stats

    for rate in sweep_rates(capacity):
        if far_over_target(measure(rate), args.target_p99_ms):
            break
    middle = bisect_rate(levels, args.target_p99_ms)
    if middle is not None:
        measure(middle)
    return levels


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rate.split(",") if r]
    data, model, index, build_timings = ensure_artifacts(args)
    manifest_path = index / "versions" / (index / "CURRENT").read_text().strip() / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    log(f"artifacts: data {data}, model {model}, index {index} ({manifest['index']['factory']})")
    queries = sample_queries(data, model, args.queries, args.seed)
    bodies = [json.dumps({"query": q, "k": args.k}).encode() for q in queries]
    cpu_count = os.cpu_count() or 1
    pre_floor, pre_capacity = None, None
    if args.sweep:
        log("in-process floor estimate (before the server starts)")
        pre_floor = pre_estimate_floor(args, model, index, queries)
        pre_capacity = capacity_qps(cpu_count, pre_floor["mean_ms"])
        log(f"batch-1 floor {pre_floor['mean_ms']} ms: capacity estimate {pre_capacity} q/s")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    server = start_server(args, model, index, port, args.workdir / "server.log")
    results: dict[str, Any] = {"closed_loop": [], "open_loop": []}
    try:
        results["server_start_s"] = round(wait_ready(url, server), 1)
        log(f"server ready in {results['server_start_s']}s")
        results["search_path"] = server_info(url)["index"]["search_path"]
        check_queries = queries[:50]
        served = service_answers(url, check_queries, args.k)
        for level in levels:
            stats = run_load(
                url, bodies, server.pid, loadgen.closed_loop,
                concurrency=level, duration_s=args.duration, warmup_s=args.warmup,
            )  # fmt: skip
            stats["concurrency"] = level
            results["closed_loop"].append(stats)
            log(f"closed loop c={level}: {stats}")
        for rate in rates:
            saturated = [s for s in results["open_loop"] if s.get("p50_ms", 0) > 1000]
            if saturated:
                log(f"open loop {rate}/s skipped: saturated at {saturated[0]['offered_qps']}/s")
                results["open_loop"].append({"offered_qps": rate, "skipped": "saturated below"})
                continue
            stats = run_load(
                url, bodies, server.pid, loadgen.open_loop,
                rate=rate, duration_s=args.duration, warmup_s=args.warmup,
            )  # fmt: skip
            stats.update(offered_qps=rate, sweep=False)
            results["open_loop"].append(stats)
            log(f"open loop {rate}/s: {stats}")
        if pre_capacity is not None:
            results["open_loop"] += run_sweep(url, bodies, server.pid, args, pre_capacity)
        results["server_memory"] = process_tree_memory_mb(server.pid)  # after every level
    finally:
        stop_server(server)

    log("in-process floor (server stopped)")
    retriever, jobs = in_process(
        model, index, queries, args.k, args.threads, args.list_scanner, args.workers > 1
    )
    # one query per batch, as the server ran them at concurrency 1 (FAISS sums in a different
    # order for larger batches, which may swap near-ties)
    local = [retriever.run_batch([job])[0].ids for job in jobs[: len(check_queries)]]
    warm_code_caches(retriever, jobs)
    identical = sum(a == b for a, b in zip(served, local, strict=True)) / len(local)
    overlap = float(
        np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(served, local, strict=True)])
    )
    sizes = sorted(
        {1}
        | {
            max(1, round(s["mean_batch_size"]))
            for s in results["closed_loop"] + results["open_loop"]
            if s.get("mean_batch_size") and s.get("p50_ms", 0) < 1000  # sizes of healthy loads
        }
    )
    floors = [floor_at(retriever, jobs, size, args.floor_repeats) for size in sizes]
    floor_1 = min(floors[0]["mean_ms"], pre_floor["mean_ms"] if pre_floor else float("inf"))
    c1 = next((s for s in results["closed_loop"] if s["concurrency"] == 1), None)
    c1_exact = c1["mean_ms"] / floor_1 if c1 and "mean_ms" in c1 else None
    ratio = round(c1_exact, 2) if c1_exact is not None else None
    capacity = capacity_qps(cpu_count, floor_1)
    best = best_within_target(results["open_loop"], args.target_p99_ms)
    exact_over_capacity = best["offered_qps"] / capacity if best else None
    best_over_capacity = round(exact_over_capacity, 4) if exact_over_capacity else None
    # a target is None when it was not measured (no open-loop level, no concurrency-1 level);
    # both are judged on the unrounded ratios
    rate_target_met = None
    if any(not s.get("skipped") for s in results["open_loop"]):
        rate_target_met = bool(
            exact_over_capacity and exact_over_capacity >= TARGET_RATE_OVER_CAPACITY
        )
    c1_target_met = c1_exact <= TARGET_C1_OVER_FLOOR if c1_exact is not None else None

    report = {
        "machine": machine(),
        "catalog": {
            "items": manifest["catalog"]["num_items"],
            "dim": manifest["index"]["dim"],
            "factory": manifest["index"]["factory"],
            "search_params": manifest["index"].get("search_params"),
            "index_recall_at_k": manifest.get("recall", {}).get("recall"),
            "recall_k": manifest.get("recall", {}).get("k"),
        },
        "k": args.k,
        "server": {
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "threads": args.threads,
            "batch_workers": args.batch_workers,
            "workers": args.workers,
            "fast_path": args.fast_path,
            "search_path": results.get("search_path"),
            "start_s": results.get("server_start_s"),
            "memory": results.get("server_memory"),
        },
        "build_seconds": build_timings,
        "correctness": {
            "queries": len(local),
            "identical_to_in_process": identical,
            "mean_overlap": round(overlap, 4),
        },
        "closed_loop": results["closed_loop"],
        "open_loop": results["open_loop"],
        "in_process_floor": floors,
        "in_process_floor_pre_estimate": pre_floor,
        "cpu_count": cpu_count,
        "floor_for_targets_ms": floor_1,  # the faster batch-1 floor, before or after
        "capacity_qps": capacity,
        "capacity_qps_pre_estimate": pre_capacity,
        "target_p99_ms": args.target_p99_ms,
        "best_rate_within_target": best,
        "best_rate_over_capacity": best_over_capacity,
        "c1_mean_over_floor": ratio,
        "targets": {
            "p99_at_60pct_capacity": rate_target_met,
            "c1_mean_within_1.3x_floor": c1_target_met,
        },
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    emit(report, format_table(report))
    return 0


def format_table(report: dict[str, Any]) -> str:
    catalog = report["catalog"]
    lines = [
        f"service benchmark: k={report['k']} over {catalog['items']:,} items ({catalog['factory']} "
        f"{catalog['search_params']}, index recall@{catalog['recall_k']} {catalog['index_recall_at_k']})",
        f"machine: {report['machine']['cpu_count']} cpus, load {report['machine']['load_average']}",
        f"correctness: {report['correctness']['identical_to_in_process']:.2f} of "
        f"{report['correctness']['queries']} answers identical to in-process "
        f"(mean overlap {report['correctness']['mean_overlap']})",
        f"server: {report['server'].get('workers', 1)} process(es), "
        f"{report['server']['batch_workers']} batch worker(s), "
        f"{report['server']['threads']} torch/FAISS thread(s) each, search path "
        f"{report['server']['search_path']}, fast path "
        f"{'on' if report['server'].get('fast_path', True) else 'off'}",
        "server memory after the load: "
        + (
            f"RSS {memory['rss_mb']} MB, PSS {memory['pss_mb']} MB over {memory['processes']} "
            "process(es)"
            if (memory := report["server"].get("memory"))
            else "not measured"
        ),
        "",
        f"{'load':<14} {'QPS':>8} {'mean':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'batch':>6} "
        f"{'err':>5} {'cpu ms/req':>10}",
    ]
    rows = [(f"c={s['concurrency']}", s) for s in report["closed_loop"]] + [
        (f"{s['offered_qps']:.0f}/s {'sweep' if s.get('sweep') else 'open'}", s)
        for s in report["open_loop"]
    ]
    for name, s in rows:
        if s.get("skipped"):
            lines.append(f"{name:<14} (skipped: {s['skipped']})")
            continue
        if not s.get("requests"):
            lines.append(f"{name:<14} (no answers; errors {s.get('errors')})")
            continue
        lines.append(
            f"{name:<14} {s['qps']:>8.1f} {s['mean_ms']:>8.2f} {s['p50_ms']:>8.2f} "
            f"{s['p95_ms']:>8.2f} {s['p99_ms']:>8.2f} {s.get('mean_batch_size') or 0:>6.1f} "
            f"{s['errors']:>5} {s.get('server_cpu_ms_per_request') or 0:>10.3f}"
        )
    lines += ["", f"{'in-process floor':<18} {'mean ms':>8} {'p99 ms':>8} {'q/s':>9}  stages (ms)"]
    for f in report["in_process_floor"]:
        stages = ", ".join(f"{k} {v}" for k, v in f["stage_ms"].items())
        lines.append(
            f"batch {f['batch_size']:<12} {f['mean_ms']:>8.3f} {f['p99_ms']:>8.3f} "
            f"{f['queries_per_s']:>9.1f}  {stages}"
        )
    lines += ["", *capacity_lines(report)]
    return "\n".join(lines)


def capacity_lines(report: dict[str, Any]) -> list[str]:
    """Capacity, the highest rate within the latency target and the targets, for the table."""
    target = report["target_p99_ms"]
    floor_1 = report["floor_for_targets_ms"]
    pre = report["capacity_qps_pre_estimate"]
    lines = [
        f"capacity: {report['cpu_count']} cpus / faster batch-1 floor {floor_1:.3f} ms = "
        f"{report['capacity_qps']:.1f} q/s"
        + (f" (estimate before the server started: {pre:.1f} q/s)" if pre is not None else "")
    ]
    best = report["best_rate_within_target"]
    if best:
        lines.append(
            f"highest open-loop rate with p99 <= {target:g} ms: {best['offered_qps']:.0f}/s = "
            f"{report['best_rate_over_capacity']:.3f}x capacity (p99 {best['p99_ms']}, "
            f"p50 {best['p50_ms']}, mean {best['mean_ms']} ms; {best['qps']} q/s answered)"
        )
    else:
        lines.append(f"highest open-loop rate with p99 <= {target:g} ms: none")
    lines.append(f"mean latency at c=1 / batch-1 floor: {report['c1_mean_over_floor']}")
    verdict = {True: "met", False: "missed", None: "not measured"}
    targets = report["targets"]
    lines.append(
        f"targets: p99 <= {target:g} ms at >= {TARGET_RATE_OVER_CAPACITY:.0%} of capacity "
        f"{verdict[targets['p99_at_60pct_capacity']]}; mean at c=1 <= "
        f"{TARGET_C1_OVER_FLOOR}x floor {verdict[targets['c1_mean_within_1.3x_floor']]}"
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
