"""Index benchmark: embedding throughput, FAISS build cost, memory, search latency at k=1000
and ANN recall@1000 against exact search, for several index types on one catalog.

Usage::

    retrieval data synth --items 1000000 --users 20000 --interactions 400000 --seed 0 --out D
    retrieval train --data D --out M --epochs 1 --max-steps 50
    python bench/bench_index.py --model M --data D --out bench-index.json
    python bench/bench_index.py --model M --data D --factory "IVF4000,Flat" --factory "HNSW32,Flat"

    # 10M items, IVF-PQ only, one thread (a shared machine; bench/results/bench_index_10m.txt):
    retrieval data synth --items 10000000 --users 50000 --interactions 1000000 --seed 0 --out D
    python bench/bench_index.py --model M --data D --threads 1 --skip-e2e \
        --factory "IVF4096,PQ32" --factory "IVF4096,PQ16" --out factories.json
    python bench/bench_index.py --model M --data D --threads 1 --factory none \
        --e2e-factory "IVF4096,PQ32" --e2e-arg=--recall-floor=0.75 [--e2e-arg=--shards=4] \
        --note "shared with a training job" --out e2e.json

Two parts:

1. end to end: the real job (`python -m index`, default factory or `--e2e-factory`, recall
   gate included) in a child process; wall time, peak RSS of the whole process (``wait4``
   ru_maxrss) and the manifest's figures; then the published version is loaded as the
   service loads it and searched (batch 1 and 64, k) with the real queries;
2. per factory, in this process: the catalog is embedded once (items/s) into a memmap,
   then each index is trained and filled (seconds), serialised (bytes), its search params
   tuned on half of the real queries (the build's procedure), and measured on the other
   half: ANN recall@k against exact brute force, latency of batch-1 and batch-64 searches.

Every speed number sits beside the recall it was measured at. Prints a table and writes
JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index.build import (
    EMBEDDINGS_FILE,
    create_embedding_file,
    embed_catalog_slice,
    gate_query_embeddings,
    open_catalog,
)
from index.factory import (
    GroundTruth,
    choose_factory,
    default_nlist,
    exact_search,
    measure_recall,
    train_and_fill,
    tune_search_params,
)
from retrieval.bundle import load_bundle
from retrieval.index_store import load_index_version


def embed_catalog_to_file(bundle: Any, catalog: Any, path: Path) -> float:
    """Embed the whole catalog with the bundle's item tower into the .npy memmap `path`
    (as the index job does, CPU, batches of 8192); returns the seconds it took."""
    create_embedding_file(path, catalog.num_items, bundle.model.output_dim)
    out = np.load(path, mmap_mode="r+")
    started = time.perf_counter()
    embed_catalog_slice(
        bundle, catalog, out, 0, catalog.num_items, batch_size=8192, device="cpu", progress=False
    )
    seconds = time.perf_counter() - started
    out.flush()
    del out
    return seconds


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as handle:
        total_kib = int(handle.readline().split()[1])
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(total_kib / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }


def end_to_end(
    model: Path, data: Path, work: Path, extra: list[str], queries: np.ndarray, k: int
) -> dict[str, Any]:
    """The real build job in a child process: wall time, peak RSS, manifest figures, and
    search latency of the published version (loaded like the service loads it).

    A build refused by the recall gate is reported (`published: false`, the job's message),
    not raised: its wall time and peak RSS are still measured.
    """
    root = work / "e2e-root"
    command = [sys.executable, "-m", "index", "--model", str(model), "--data", str(data)]
    command += ["--out", str(root), "--no-progress", *extra]
    print(f"end to end: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""  # drain, or a chatty child blocks
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    (work / "e2e.log").write_text(output)
    base = {"wall_seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if os.waitstatus_to_exitcode(status) != 0:
        if "below the floor" not in output:
            raise RuntimeError(f"build-index failed:\n{output[-4000:]}")
        message = next(line for line in output.splitlines() if "below the floor" in line)
        return {**base, "published": False, "error": message.strip()}
    version = load_index_version(root)
    manifest = version.manifest
    timings = manifest["timings"]
    files = [version.path / name for name in manifest["files"]]
    return {
        **base,
        "published": True,
        "factory": manifest["index"]["factory"],
        "search_params": manifest["index"]["search_params"],
        "items_per_second": timings["items_per_second"],
        "embed_seconds": timings["embed_seconds"],
        "train_seconds": timings["train_seconds"],
        "add_seconds": timings["add_seconds"],
        "exact_seconds": timings["exact_seconds"],
        "gate_seconds": timings["gate_seconds"],
        "index_mib": round(sum(path.stat().st_size for path in files) / 2**20, 1),
        "recall": manifest["recall"]["recall"],
        "recall_k": manifest["recall"]["k"],
        "recall_queries": manifest["recall"]["num_queries"],
        "tuning": manifest["recall"]["tuning"],
        "latency_batch1_ms": latency_ms(version.index, queries, k, 1, 100),
        "latency_batch64_ms": latency_ms(version.index, queries, k, 64, 10),
    }


def latency_ms(
    index: faiss.Index, queries: np.ndarray, k: int, batch: int, repeats: int
) -> dict[str, float]:
    """p50 / p95 wall time of `index.search` on batches of `batch` queries."""
    times = []
    for i in range(repeats):
        start = (i * batch) % max(1, len(queries) - batch + 1)
        block = np.ascontiguousarray(queries[start : start + batch])
        began = time.perf_counter()
        index.search(block, k)
        times.append((time.perf_counter() - began) * 1000)
    return {
        "p50": round(float(np.median(times)), 3),
        "p95": round(float(np.percentile(times, 95)), 3),
    }


def bench_factory(
    factory: str,
    vectors: np.ndarray,
    truth: GroundTruth,
    tune_rows: np.ndarray,
    gate_rows: np.ndarray,
    target: float,
    work: Path,
) -> dict[str, Any]:
    rss_before = rss_mib()
    index, info = train_and_fill(factory, vectors, seed=0)
    path = work / "bench.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    params, trials = tune_search_params(index, vectors, truth.subset(tune_rows), target)
    gate = truth.subset(gate_rows)
    recall, _ = measure_recall(index, vectors, gate, params)
    row = {
        "factory": factory,
        "train_seconds": info["train_seconds"],
        "add_seconds": info["add_seconds"],
        "index_mib": round(size / 2**20, 1),
        "rss_growth_mib": round(rss_mib() - rss_before, 1),
        "search_params": params,
        "recall": round(recall, 4),
        "latency_batch1_ms": latency_ms(index, gate.queries, truth.k, 1, 100),
        "latency_batch64_ms": latency_ms(index, gate.queries, truth.k, 64, 10),
        "tuning": trials,
    }
    del index
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument(
        "--factory",
        action="append",
        help="repeatable; default: Flat, IVF-Flat, IVF-SQ8, IVF-PQ, HNSW; 'none': only the "
        "end-to-end run",
    )
    parser.add_argument(
        "--queries", type=int, default=600, help="real queries (half tune, half measure)"
    )
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument(
        "--floor", type=float, default=0.95, help="recall the tuning aims at (+0.01)"
    )
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end job run")
    parser.add_argument("--e2e-factory", help="--factory of the end-to-end job (default: auto)")
    parser.add_argument(
        "--e2e-arg",
        action="append",
        default=[],
        help="repeatable; passed to the end-to-end job, e.g. --e2e-arg=--recall-floor=0.9",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch / faiss threads here and in the job (0 = all)"
    )
    parser.add_argument("--note", default="", help="recorded in the report (e.g. machine shared)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0; got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "note": args.note,
        "threads": args.threads or os.cpu_count(),
        "model": str(args.model),
        "data": str(args.data),
    }
    print(f"machine: {json.dumps(report['machine'])}", flush=True)

    bundle = load_bundle(args.model)
    catalog = open_catalog(args.data, bundle.encoder)
    dim = bundle.model.output_dim
    n = catalog.num_items
    k = min(args.k, n)
    queries, source = gate_query_embeddings(bundle, args.data, args.queries, 0, "cpu")

    if not args.skip_e2e:
        extra = ["--recall-queries", str(args.queries), "--recall-k", str(k)]
        extra += ["--factory", args.e2e_factory] if args.e2e_factory else []
        extra += ["--threads", str(args.threads)] if args.threads else []
        report["end_to_end"] = end_to_end(
            args.model, args.data, work, [*extra, *args.e2e_arg], queries, k
        )
        print(f"end to end: {json.dumps(report['end_to_end'])}", flush=True)

    factories = args.factory or [
        "Flat",
        f"IVF{default_nlist(n)},Flat",
        f"IVF{default_nlist(n)},SQ8",
        f"IVF{default_nlist(n)},PQ{dim // 2}",
        "HNSW32,Flat",
    ]
    factories = [factory for factory in factories if factory.lower() != "none"]
    report["default_factory"] = choose_factory(n, dim)
    rows = []
    gate_count = 0
    if factories:
        emb_path = work / EMBEDDINGS_FILE
        embed_seconds = embed_catalog_to_file(bundle, catalog, emb_path)
        vectors = np.load(emb_path, mmap_mode="r")
        report["catalog"] = {"items": n, "dim": dim, "embed_seconds": round(embed_seconds, 1),
                             "items_per_second": round(n / embed_seconds)}  # fmt: skip
        print(
            f"embedded {n:,} items in {embed_seconds:.1f}s ({n / embed_seconds:,.0f} items/s)",
            flush=True,
        )

        started = time.perf_counter()
        exact_scores, _ = exact_search(queries, vectors, k)
        exact_seconds = time.perf_counter() - started
        truth = GroundTruth(queries, exact_scores, k, n)
        order = np.random.default_rng(0).permutation(len(queries))
        tune_rows, gate_rows = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
        gate_count = len(gate_rows)
        report["queries"] = {"count": len(queries), "source": source, "k": k,
                             "exact_seconds_all": round(exact_seconds, 2)}  # fmt: skip
        print(
            f"{len(queries)} queries ({source}); exact top-{k} in {exact_seconds:.1f}s", flush=True
        )
        for factory in factories:
            print(f"-- {factory}", flush=True)
            row = bench_factory(
                factory, vectors, truth, tune_rows, gate_rows, args.floor + 0.01, work
            )
            rows.append(row)
            print(
                json.dumps({key: value for key, value in row.items() if key != "tuning"}),
                flush=True,
            )
        del vectors
        emb_path.unlink()
    report["factories"] = rows
    report["peak_rss_mib_bench_process"] = round(peak_rss_mib(), 1)
    report["load_average_at_end"] = os.getloadavg()

    print()
    if args.note:
        print(f"note: {args.note}")
    print(f"{report['machine']['cpus']} CPUs, {report['threads']} thread(s) per process")
    if rows:
        print(f"catalog {n:,} x {dim}; embed {report['catalog']['items_per_second']:,} items/s; "
              f"{gate_count} held-out real queries, k={k}")  # fmt: skip
        header = (
            f"{'factory':<22} {'train s':>8} {'add s':>7} {'MiB':>7} {'params':<16} "
            f"{'recall':>7} {'b1 p50 ms':>10} {'b64 p50 ms':>11}"
        )
        print(header)
        print("-" * len(header))
        for row in rows:
            params = ",".join(f"{a}={b}" for a, b in row["search_params"].items()) or "-"
            print(
                f"{row['factory']:<22} {row['train_seconds']:>8.1f} {row['add_seconds']:>7.1f} "
                f"{row['index_mib']:>7.0f} {params:<16} {row['recall']:>7.4f} "
                f"{row['latency_batch1_ms']['p50']:>10.2f} "
                f"{row['latency_batch64_ms']['p50']:>11.1f}"
            )
    if "end_to_end" in report:
        e2e = report["end_to_end"]
        if not e2e["published"]:
            print(
                f"\nend-to-end build-index: refused by the recall gate after "
                f"{e2e['wall_seconds']:.1f}s, peak RSS {e2e['peak_rss_mib']:.0f} MiB: {e2e['error']}"
            )
        else:
            print(
                f"\nend-to-end build-index ({e2e['factory']}, {e2e['search_params']}): "
                f"{e2e['wall_seconds']:.1f}s wall incl. start-up, "
                f"peak RSS {e2e['peak_rss_mib']:.0f} MiB, "
                f"embed {e2e['items_per_second']:,.0f} items/s, train {e2e['train_seconds']:.1f}s, "
                f"add {e2e['add_seconds']:.1f}s, index {e2e['index_mib']:.0f} MiB, "
                f"recall@{e2e['recall_k']} {e2e['recall']:.4f} on {e2e['recall_queries']} "
                f"held-out queries, search p50 {e2e['latency_batch1_ms']['p50']:.2f} ms (batch 1) "
                f"/ {e2e['latency_batch64_ms']['p50']:.1f} ms (batch 64)"
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
