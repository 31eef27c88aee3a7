"""Cost and CPU latency of the towers at the ml-100k config, and the serving-export choice.

Usage (from the repository root)::

    .venv/bin/python bench/bench_model.py                 # all variants + export comparison
    .venv/bin/python bench/bench_model.py --export-only   # only the serving-export comparison
    .venv/bin/python bench/bench_model.py --no-export     # only the variants
    .venv/bin/python bench/bench_model.py --export-only --modes eager,trace,compile
    .venv/bin/python bench/bench_model.py --export-only --quick   # ~20 s: checks that it runs

For every arrangement (parallel, stacked, deep, cross) x cross kind (full, lowrank, mix,
masked) it prints the parameters (dense and total, shared table once), FLOPs per example
of each tower (`retrieval.cost` conventions) and the latency of one forward pass of the
query tower at batch 1 and 1024 and of the item tower at batch 1024, in eval mode under
``torch.inference_mode``. "deep" has no cross network, so it is run once.

Timing: the CPU is shared, so every case is timed in blocks (30 calls at batch 1, 3 at
batch 1024), interleaved over `--rounds` rounds; the tables show the best block median
(close to the uncontended latency), the JSON also the median over rounds.

The export section times the default query tower (parallel, full) through
`export_query_tower` in each of `--modes` (default: eager, ``torch.jit.trace``,
``torch.export`` and onnxruntime; ``compile`` on request: it takes minutes to warm up) at
batch 1 and 1024, with each of `--threads` torch threads (onnxruntime: as many intra-op
threads, its session rebuilt per count), all modes and batch sizes interleaved in the same
rounds, next to the largest difference from eager outputs: a speed number is only kept
when it is correct (max |diff| <= 1e-5). It then names the candidate for
`retrieval.towers.AUTO_EXPORT_MODE`: the faster of "export" and "onnxruntime" at batch 1
(1 thread, the service's default) if it is at least as fast as "trace" there, else
"trace".

It prints one JSON document (stdout), writes it to ``--json`` (default
``bench/results/bench_model.json``; ``bench_model_export.json`` with ``--export-only``,
``bench_model_quick.json`` with ``--quick``), then prints the tables. ``--quick`` (2 rounds,
5 calls at batch 1 and 1 at batch 1024, 1 thread unless ``--threads``) only checks that
everything runs: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from retrieval.cost import model_cost
from retrieval.features import FeatureInput, FeatureKind
from retrieval.towers import (
    ARRANGEMENTS,
    Batch,
    ModelConfig,
    TowerConfig,
    TwoTowerModel,
    export_query_tower,
    random_batch,
)

CROSS_KINDS = ("full", "lowrank", "mix", "masked")
BATCH_SIZES = (1, 1024)
RUNS = {1: 30, 1024: 3}  # calls per timed block, by batch size
QUICK_RUNS = {1: 5, 1024: 1}
EXACT = 1e-5  # largest |exported - eager| for a mode's timings to count
NEW_MODES = ("export", "onnxruntime")  # the candidates to replace "trace" in "auto"
RESULTS = Path(__file__).resolve().parent / "results"

# ml-100k: 943 users and 1682 items, plus the PAD and OOV rows.
QUERY_FEATURES = (
    FeatureInput("user_id", FeatureKind.CATEGORICAL, 945, 32),
    FeatureInput("age_bucket", FeatureKind.CATEGORICAL, 9, 8),
    FeatureInput("gender", FeatureKind.CATEGORICAL, 4, 4),
    FeatureInput("occupation", FeatureKind.CATEGORICAL, 23, 8),
    FeatureInput("zip_prefix", FeatureKind.CATEGORICAL, 100, 8),
    FeatureInput("history", FeatureKind.HISTORY, 1684, 32, shared_with="item_id"),
)
ITEM_FEATURES = (
    FeatureInput("item_id", FeatureKind.CATEGORICAL, 1684, 32),
    FeatureInput("genres", FeatureKind.BAG, 21, 16),
    FeatureInput("year_bucket", FeatureKind.CATEGORICAL, 20, 8),
    FeatureInput("title_tokens", FeatureKind.HASHED_BAG, 20002, 16),
)
LENGTHS = {"history": 50, "genres": 6, "title_tokens": 12}


def ml100k_config(arrangement: str = "parallel", cross_kind: str = "full") -> ModelConfig:
    """The benchmark model: the library defaults on the ml-100k features."""
    return ModelConfig(
        query=TowerConfig(features=QUERY_FEATURES, arrangement=arrangement, cross_kind=cross_kind),  # type: ignore[arg-type]
        item=TowerConfig(features=ITEM_FEATURES, arrangement=arrangement, cross_kind=cross_kind),  # type: ignore[arg-type]
    )


def block_median_ms(function: Callable[[Batch], torch.Tensor], batch: Batch, runs: int) -> float:
    """Median wall time of `runs` single calls, in milliseconds."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        function(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_timings(
    cases: Mapping[str, tuple[Callable[[Batch], torch.Tensor], Batch, int]], rounds: int
) -> dict[str, dict[str, float]]:
    """Time every case in `rounds` interleaved rounds (one block of runs per case per round).

    The CPU is shared with other jobs, so the load changes while the benchmark runs:
    interleaving spreads it over all cases, and the best block median ("best") estimates
    the uncontended latency while the median over rounds ("median") shows the typical one.
    """
    for function, batch, _ in cases.values():  # warm-up
        for _ in range(2):
            function(batch)
    blocks: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (function, batch, runs) in cases.items():
            blocks[name].append(block_median_ms(function, batch, runs))
    return {
        name: {"best_ms": min(values), "median_ms": statistics.median(values)}
        for name, values in blocks.items()
    }


def bench_variants(rounds: int, runs: Mapping[int, int]) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    query_batches = {
        b: random_batch(QUERY_FEATURES, b, LENGTHS, generator=generator) for b in BATCH_SIZES
    }
    item_batch = random_batch(ITEM_FEATURES, 1024, LENGTHS, generator=generator)
    rows: dict[str, dict[str, Any]] = {}
    cases: dict[str, tuple[Callable[[Batch], torch.Tensor], Batch, int]] = {}
    for arrangement in ARRANGEMENTS:
        for kind in CROSS_KINDS:
            if arrangement == "deep" and kind != "full":
                continue  # no cross network: the kind changes nothing
            config = ml100k_config(arrangement, kind)
            model = TwoTowerModel(config).eval()
            cost = model_cost(config)
            key = f"{arrangement}/{kind}"
            rows[key] = {
                "arrangement": arrangement,
                "cross_kind": kind if arrangement != "deep" else "-",
                "params_total": cost.params,
                "params_dense_query": cost.query.params_dense,
                "params_dense_item": cost.item.params_dense,
                "flops_query": cost.query.flops,
                "flops_item": cost.item.flops,
            }
            for b, batch in query_batches.items():
                cases[f"{key}/query_b{b}"] = (model.query_tower, batch, runs[b])
            cases[f"{key}/item_b1024"] = (model.item_tower, item_batch, runs[1024])
    with torch.inference_mode():
        timings = interleaved_timings(cases, rounds)
    for name, timing in timings.items():
        arrangement, kind, what = name.split("/")
        rows[f"{arrangement}/{kind}"][f"{what}_ms"] = timing["best_ms"]
        rows[f"{arrangement}/{kind}"][f"{what}_median_ms"] = timing["median_ms"]
    return list(rows.values())


def bench_export(
    rounds: int, modes: tuple[str, ...], threads: tuple[int, ...], runs: Mapping[int, int]
) -> list[dict[str, Any]]:
    """One row per (mode, threads): latency at batch 1 and 1024, max |diff| from eager.

    The torch modes are exported once; onnxruntime once per thread count (its intra-op
    threads are fixed when its session is made). Within one thread count, every mode and
    batch size is timed in the same interleaved rounds.
    """
    model = TwoTowerModel(ml100k_config()).eval()
    generator = torch.Generator().manual_seed(1)
    batches = {
        b: random_batch(QUERY_FEATURES, b, LENGTHS, generator=generator) for b in BATCH_SIZES
    }
    with torch.inference_mode():
        expected = {b: model.query_tower(batch) for b, batch in batches.items()}
    default_threads = torch.get_num_threads()
    exported: dict[tuple[str, int], tuple[Callable[[Batch], torch.Tensor], dict[str, Any]]] = {}
    out = []
    for n in threads:
        torch.set_num_threads(n)
        towers: dict[str, Callable[[Batch], torch.Tensor]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for mode in modes:
            key = (mode, n if mode == "onnxruntime" else 0)
            if key not in exported:
                started = time.perf_counter()
                tower = export_query_tower(
                    model,
                    mode=mode,  # type: ignore[arg-type]
                    example_batch=batches[1024],
                    threads=n,
                )
                first = {b: tower(batch) for b, batch in batches.items()}  # compiles if needed
                row: dict[str, Any] = {"export_and_first_calls_s": time.perf_counter() - started}
                for b in BATCH_SIZES:
                    row[f"b{b}_max_abs_diff"] = float((first[b] - expected[b]).abs().max())
                exported[key] = (tower, row)
                print(f"  export {mode} ({n} threads) ready", file=sys.stderr)
            towers[mode], row = exported[key]
            rows[mode] = {"mode": mode, **row, "threads": n}
        cases = {
            f"{mode}/b{b}": (tower, batch, runs[b])
            for mode, tower in towers.items()
            for b, batch in batches.items()
        }
        timings = interleaved_timings(cases, rounds)
        for mode in modes:
            row = rows[mode]
            for b in BATCH_SIZES:
                row[f"b{b}_ms"] = timings[f"{mode}/b{b}"]["best_ms"]
                row[f"b{b}_median_ms"] = timings[f"{mode}/b{b}"]["median_ms"]
            row["exact"] = all(row[f"b{b}_max_abs_diff"] <= EXACT for b in BATCH_SIZES)
            out.append(row)
    torch.set_num_threads(default_threads)
    return out


def auto_candidate(rows: list[dict[str, Any]], threads: int = 1) -> dict[str, Any]:
    """The mode `AUTO_EXPORT_MODE` should name, by the rows at `threads` threads.

    The faster of "export" and "onnxruntime" at batch 1 (best block median) when it is
    exact and at least as fast as "trace" there; else "trace". Batch 1024 is reported
    beside it (ratio to trace), not used.
    """
    by_mode = {r["mode"]: r for r in rows if r["threads"] == threads}
    trace = by_mode.get("trace")
    if trace is None:
        return {"threads": threads, "mode": None, "reason": "trace was not timed"}
    new = [by_mode[m] for m in NEW_MODES if m in by_mode and by_mode[m]["exact"]]
    best = min(new, key=lambda r: r["b1_ms"], default=None)
    result: dict[str, Any] = {"threads": threads, "trace_b1_ms": trace["b1_ms"]}
    for r in new:
        result[f"{r['mode']}_b1_vs_trace"] = r["b1_ms"] / trace["b1_ms"]
        result[f"{r['mode']}_b1024_vs_trace"] = r["b1024_ms"] / trace["b1024_ms"]
    if best is not None and best["b1_ms"] <= trace["b1_ms"]:
        result.update(mode=best["mode"], reason="at least as fast as trace at batch 1")
    else:
        result.update(mode="trace", reason="no exact new mode as fast as trace at batch 1")
    return result


def print_variants(result: dict[str, Any]) -> None:
    print()
    threads = result["machine"]["torch_threads"]
    print(
        "Variants (ml-100k, query d=92, item d=72; FLOPs per example; latency ms, best of "
        f"interleaved block medians, {threads} threads)"
    )
    header = (
        f"{'arrangement':11s} {'cross':7s} {'params':>9s} {'dense q':>8s} {'dense i':>8s} "
        f"{'FLOPs q':>9s} {'FLOPs i':>9s} {'q b=1':>7s} {'q b=1024':>9s} {'i b=1024':>9s}"
    )
    print(header)
    print("-" * len(header))
    for r in result["variants"]:
        print(
            f"{r['arrangement']:11s} {r['cross_kind']:7s} {r['params_total']:9d} "
            f"{r['params_dense_query']:8d} {r['params_dense_item']:8d} "
            f"{r['flops_query']:9d} {r['flops_item']:9d} {r['query_b1_ms']:7.3f} "
            f"{r['query_b1024_ms']:9.2f} {r['item_b1024_ms']:9.2f}"
        )


def print_tables(result: dict[str, Any]) -> None:
    if result["variants"]:
        print_variants(result)
    if result.get("export"):
        print()
        print(
            "Query tower export (parallel, full): ms (best / median of rounds), max |diff| vs eager"
        )
        header = f"{'mode':11s} {'threads':>7s} {'b=1':>8s} {'b=1 med':>8s} {'b=1024':>8s} {'b=1024 med':>10s} {'diff b=1':>10s} {'diff b=1024':>11s} {'warm-up s':>9s}"
        print(header)
        print("-" * len(header))
        for r in result["export"]:
            print(
                f"{r['mode']:11s} {r['threads']:7d} {r['b1_ms']:8.3f} {r['b1_median_ms']:8.3f} "
                f"{r['b1024_ms']:8.2f} {r['b1024_median_ms']:10.2f} "
                f"{r['b1_max_abs_diff']:10.1e} {r['b1024_max_abs_diff']:11.1e} "
                f"{r['export_and_first_calls_s']:9.1f}"
            )
        candidate = result.get("auto_candidate") or {}
        print(
            f"AUTO_EXPORT_MODE candidate ({candidate.get('threads')} thread): "
            f"{candidate.get('mode')!r} ({candidate.get('reason')})"
        )
        if result.get("quick"):
            print("--quick: a run check only; these timings mean nothing")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-export", action="store_true", help="skip the export comparison")
    parser.add_argument("--export-only", action="store_true", help="only the export comparison")
    parser.add_argument(
        "--modes", default="eager,trace,export,onnxruntime", help="export modes to time"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument(
        "--threads", default=None, help="torch threads for the export timings (default 1,2)"
    )
    parser.add_argument(
        "--variant-threads", type=int, default=0, help="torch threads for the variants (0: default)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds of short blocks, 1 thread: checks that it runs (timings mean nothing)",
    )
    parser.add_argument("--json", type=Path, help="where to write the JSON (see above)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 2
    if args.threads is None:
        args.threads = "1" if args.quick else "1,2"
    runs = QUICK_RUNS if args.quick else RUNS
    if args.json is None:
        name = "bench_model_quick" if args.quick else "bench_model"
        if args.export_only and not args.quick:
            name = "bench_model_export"
        args.json = RESULTS / f"{name}.json"

    if args.variant_threads:
        torch.set_num_threads(args.variant_threads)
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "quick": args.quick,
        "rounds": args.rounds,
        "runs_per_block": {f"b{b}": n for b, n in runs.items()},
        "config": ml100k_config().to_dict(),
        "lengths": LENGTHS,
    }
    if not args.export_only:
        result["variants"] = bench_variants(args.rounds, runs)
    if not args.no_export:
        result["export"] = bench_export(
            args.rounds,
            tuple(args.modes.split(",")),
            tuple(int(n) for n in args.threads.split(",")),
            runs,
        )
        result["auto_candidate"] = auto_candidate(result["export"])
    result["machine"]["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    if "variants" not in result:
        result["variants"] = []
    print_tables(result)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
