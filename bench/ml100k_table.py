"""The ml-100k test table: the default model next to popularity, EASE and ALS, mean ± std over
seeds, from `retrieval evaluate --json` reports (one per seed's model bundle).

Usage::

    for s in 0 1 2; do
        retrieval train --data D --out M$s --seed $s
        retrieval evaluate --model M$s --data D --k 10,20,50,100 --seed $s --json E$s.json
    done
    python bench/ml100k_table.py E0.json E1.json E2.json --out bench/results/ml100k_table
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="retrieval evaluate --json files")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    ks = reports[0]["ks"]
    names = [n for n in reports[0]["results"] if "skipped" not in reports[0]["results"][n]]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        table[name] = {}
        for k in ks:
            values = [r["results"][name][f"recall@{k}"] for r in reports]
            table[name][f"recall@{k}"] = {
                "mean": statistics.fmean(values),
                "std": statistics.pstdev(values),
            }
    chosen = {
        name: [r["results"][name].get("params") for r in reports]
        for name in names
        if "params" in reports[0]["results"][name]
    }
    payload = {
        "benchmark": "ml100k_table",
        "protocol": "test split, full catalog, context items excluded; every ranker tuned on "
        "valid and refitted on train + valid; mean ± population std over the reports",
        "reports": [str(p) for p in args.reports],
        "models": [r["model"]["version"] for r in reports],
        "table": table,
        "chosen_params": chosen,
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"| ranker ({len(reports)} seeds) | " + " | ".join(f"recall@{k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for name, row in table.items():
        cells = " | ".join(
            f"{row[f'recall@{k}']['mean']:.4f} ± {row[f'recall@{k}']['std']:.4f}" for k in ks
        )
        lines.append(f"| {name} | {cells} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
