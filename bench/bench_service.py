"""Service benchmark: the real HTTP service under load, against its in-process floor.

Usage::

    python bench/bench_service.py --items 1000000 --workdir /tmp/bench-service --out service.json
    python bench/bench_service.py --items 100000 --duration 5           # a smaller catalog
    python bench/bench_service.py --model M --index R --data D          # existing artifacts

What it does, top to bottom:

1. artifacts (kept in ``--workdir`` and reused when present): a synthetic catalog
   (``retrieval data synth --items N --users 20000 --interactions 400000 --seed 0``), a
   model trained for one epoch with ``configs/synth.yaml`` (its own validation and test
   evaluation on 1000 sampled users; a trained model's embeddings cluster like a
   production model's, which is what the IVF index's cost depends on) and its index
   (``retrieval build-index``, default factory for the size, recall gate included);
2. queries: inline query bodies (each user's stored features and last-N history, exactly
   what the feature store holds) for a fixed sample of users, ``k = --k`` (1000);
3. the service (``retrieval serve``, a uvicorn subprocess on 127.0.0.1) and the lean
   asyncio load generator of ``bench/loadgen.py`` in this process, on the same machine: closed loop at each
   ``--concurrency`` level, then open loop at each ``--rate`` (requests are timed from
   their scheduled send time, so queueing counts); p50/p95/p99/mean latency, QPS, errors,
   the mean micro-batch size the server saw (from /metrics) and the server's CPU time per
   request (from /proc);
4. correctness beside the speed: the service's ids for a sample of queries compared with
   the same queries run in process (identical lists expected), and the index's recall@k
   against exact search recorded by the build;
5. the in-process floor, server stopped: the same queries through the same code path
   without HTTP (`Retriever.run_batch`: encode, query tower, one FAISS search, ids) at
   batch size 1 and at the batch sizes the server formed; the ratio of the HTTP mean
   latency at concurrency 1 to the batch-1 floor.

Targets (2 cores, server and load generator on the same box): k=1000 over 1M items,
p99 <= 25 ms at >= 400 QPS; mean latency at concurrency 1 <= 2x the in-process floor.
Prints a table (stderr) and JSON (stdout, and ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
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
    parser.add_argument("--rate", default="400", help="open-loop request rates (req/s); '' = none")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each level")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="server torch and FAISS threads")
    parser.add_argument("--batch-workers", type=int, default=2, help="server batch workers")
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


def run_load(
    url: str, bodies: list[bytes], server_pid: int, run: Any, **kwargs: Any
) -> dict[str, Any]:
    """One load level through `loadgen` (`run` is its closed_loop or open_loop), with the
    server's mean batch size and CPU time per answered request over the whole level."""
    host, port = url.removeprefix("http://").split(":")
    before, cpu_before = batch_counters(url), process_cpu_seconds(server_pid)
    outcome = asyncio.run(run(host, int(port), "/v1/retrieve", bodies, **kwargs))
    cpu = process_cpu_seconds(server_pid) - cpu_before
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
) -> tuple[Any, list[Any]]:
    """A `Retriever` built exactly as the service builds it, and the checked queries."""
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
            stats["offered_qps"] = rate
            results["open_loop"].append(stats)
            log(f"open loop {rate}/s: {stats}")
    finally:
        stop_server(server)

    log("in-process floor (server stopped)")
    retriever, jobs = in_process(model, index, queries, args.k, args.threads, args.list_scanner)
    # one query per batch, as the server ran them at concurrency 1 (FAISS sums in a different
    # order for larger batches, which may swap near-ties)
    local = [retriever.run_batch([job])[0].ids for job in jobs[: len(check_queries)]]
    for start in range(0, len(jobs), 64):  # warm the code caches, as the server's were
        retriever.run_batch(jobs[start : start + 64])
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
    floor_1 = floors[0]["mean_ms"]
    c1 = next((s for s in results["closed_loop"] if s["concurrency"] == 1), None)
    ratio = round(c1["mean_ms"] / floor_1, 2) if c1 and "mean_ms" in c1 else None

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
            "fast_path": args.fast_path,
            "search_path": results.get("search_path"),
            "start_s": results.get("server_start_s"),
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
        "c1_mean_over_floor": ratio,
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
        f"server: {report['server']['batch_workers']} batch worker(s), "
        f"{report['server']['threads']} torch/FAISS thread(s) each, search path "
        f"{report['server']['search_path']}, fast path "
        f"{'on' if report['server'].get('fast_path', True) else 'off'}",
        "",
        f"{'load':<14} {'QPS':>8} {'mean':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'batch':>6} "
        f"{'err':>5} {'cpu ms/req':>10}",
    ]
    rows = [(f"c={s['concurrency']}", s) for s in report["closed_loop"]] + [
        (f"{s['offered_qps']:.0f}/s open", s) for s in report["open_loop"]
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
    lines.append(f"\nmean latency at c=1 / batch-1 floor: {report['c1_mean_over_floor']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
