"""Benchmark the synthetic dataset generator: wall time and peak RSS per catalog size.

Usage::

    .venv/bin/python bench/bench_synth.py                                  # 1M items
    .venv/bin/python bench/bench_synth.py --config 1000000,100000,2000000 \\
        --config 10000000,1000000,10000000
    .venv/bin/python bench/bench_synth.py --out-root /data/tmp --keep      # keep the datasets

Each configuration (items, users, interactions) runs `generate_synthetic_dataset` in a fresh
Python process, so its peak resident set size (ru_maxrss from wait4) is the generator's own.
Beside the timing, the written dataset is checked with `retrieval.data.dataset.
validate_dataset` (ids unique and known, rows sorted by user then time, split protocol) and
the row counts are compared with the requested sizes. Prints a table on stderr and the
JSON (machine, load average, one result per configuration) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emit, machine

CHILD = """
import json, logging, sys
from retrieval.data.synthetic import generate_synthetic_dataset
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
args = json.loads(sys.argv[1])
stats = generate_synthetic_dataset(args.pop("out"), **args)
print(json.dumps(stats))
"""

VALIDATE = """
import json, sys, time
import pyarrow.parquet as pq
from retrieval.data.dataset import validate_dataset
start = time.perf_counter()
validate_dataset(sys.argv[1])
rows = {name: pq.ParquetFile(f"{sys.argv[1]}/{name}.parquet").metadata.num_rows
        for name in ("users", "items", "interactions")}
print(json.dumps({"validate_s": time.perf_counter() - start, "rows": rows}))
"""


def run_child(code: str, argument: str) -> tuple[dict[str, Any], float, float]:
    """Run `code` in a fresh interpreter; return (its last stdout line as JSON, wall s, peak MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, argument], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"child failed with status {process.returncode}")
    peak_mib = usage.ru_maxrss / 1024  # Linux reports KiB
    return json.loads(output.strip().splitlines()[-1]), elapsed, peak_mib


def parse_config(text: str) -> tuple[int, int, int]:
    try:
        items, users, interactions = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ITEMS,USERS,INTERACTIONS; got {text!r}"
        ) from None
    return items, users, interactions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=parse_config,
        action="append",
        help="ITEMS,USERS,INTERACTIONS (repeatable; default 1000000,100000,2000000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=1_000_000)
    parser.add_argument("--out-root", default=None, help="where datasets are written (tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated datasets")
    parser.add_argument("--no-validate", action="store_true", help="skip the format check")
    args = parser.parse_args()
    configs = args.config or [(1_000_000, 100_000, 2_000_000)]

    root = Path(args.out_root or tempfile.mkdtemp(prefix="bench-synth-"))
    results = []
    for items, users, interactions in configs:
        out = root / f"synth-{items}-{users}-{interactions}"
        request = {
            "out": str(out),
            "num_items": items,
            "num_users": users,
            "num_interactions": interactions,
            "seed": args.seed,
            "chunk_size": args.chunk_size,
            "overwrite": True,
        }
        stats, wall_s, peak_mib = run_child(CHILD, json.dumps(request))
        result: dict[str, Any] = {
            "items": items,
            "users": users,
            "interactions_requested": interactions,
            "interactions": stats["interactions"]["total"],
            "splits": {k: stats["interactions"][k] for k in ("train", "valid", "test")},
            "shortfall_users": stats["generator"]["shortfall"],
            "seed": args.seed,
            "chunk_size": args.chunk_size,
            "elapsed_s": round(stats["elapsed_s"]["total"], 2),
            "stages_s": {k: round(v, 2) for k, v in stats["elapsed_s"].items() if k != "total"},
            "process_wall_s": round(wall_s, 2),
            "peak_rss_mib": round(peak_mib, 1),
            "files_mib": {k: round(v / 2**20, 1) for k, v in stats["files"].items()},
            "load_average_after": os.getloadavg(),
        }
        if not args.no_validate:
            check, _, check_peak = run_child(VALIDATE, str(out))
            rows = check["rows"]
            result["validated"] = (
                rows["users"] == users
                and rows["items"] == items
                and rows["interactions"] == result["interactions"]
            )
            result["validate_s"] = round(check["validate_s"], 2)
            result["validate_peak_rss_mib"] = round(check_peak, 1)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep and args.out_root is None:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"{'items':>11} {'users':>10} {'interactions':>13} {'elapsed s':>10} "
        f"{'peak RSS MiB':>13} {'valid':>6}"
    ]
    for r in results:
        lines.append(
            f"{r['items']:>11,} {r['users']:>10,} {r['interactions']:>13,} "
            f"{r['elapsed_s']:>10.1f} {r['peak_rss_mib']:>13.0f} {r.get('validated', '-')!s:>6}"
        )
    emit({"machine": machine(), "results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
