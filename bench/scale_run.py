"""Scale run: parallel vs stacked towers on a synthetic 1M-item catalog, recall@1000 over seeds.

Usage::

    # the full run (hours on a 2-core CPU; resumable: rerun the same command after a stop)
    .venv/bin/python bench/scale_run.py --items 1000000 --users 100000 \\
        --interactions 5000000 --seeds 3 --work /data/scale-1m --name scale_1m
    # the small end-to-end check
    .venv/bin/python bench/scale_run.py --items 50000 --users 10000 --interactions 500000 \\
        --seeds 3 --work /tmp/scale-50k --name scale_50k

Stages (each timed): (1) synthesize the catalog with `retrieval.data.synthetic` into
``WORK/data`` (skipped when it exists); (2) train the parallel/lowrank and stacked/lowrank
towers with `configs/synth.yaml` (same budget: the config's epochs, or ``--max-steps``),
one run per seed, through the ablation runner (`training.ablation.run_ablation`, so finished
runs are skipped on a rerun and an interrupted run resumes from its checkpoint); each run
ends with the trainer's exact full-catalog test evaluation; (3) report test recall@1000 of
each arrangement (mean ± std over seeds) and the relative gain of parallel over stacked,
per seed (paired: same seed, same data order) and of the means.

Correctness beside the numbers: every run also records the popularity baseline on the
same queries, and the report prints it; a tower below popularity is a broken run.

Writes ``bench/results/NAME.md`` and ``bench/results/NAME.json`` (setup, machine, dataset
sizes, per-stage and per-run wall times) and prints the JSON on stdout, the table on stderr.

Cost: the trainer's final test evaluation ranks the whole catalog for every test user
(it does not sample users), so at 1M items it costs users x (tens of ms) per run; size
``--users`` with that in mind (see bench/results/scale_50k.md for measured rates).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import emit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ARRANGEMENTS = ("parallel", "stacked")
METRIC = "recall@1000"


def _display_path(path: Path) -> str:
    """`path` relative to the repository when inside it (reports stay machine-neutral)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(float(value), spec)


def _without_note(argv: list[str]) -> list[str]:
    """The command line without ``--note TEXT`` (the report prints the note apart)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            kept.append(arg)
    return kept


def relative_gain(new: float, old: float) -> float:
    """(new - old) / old; nan when old is 0."""
    return (new - old) / old if old else float("nan")


def paired_gains(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed: recall of each arrangement and the gain of parallel over stacked."""
    per_variant = {v["variant"]: v for v in report["variants"]}
    parallel = per_variant["parallel-lowrank"][METRIC]["values"]
    stacked = per_variant["stacked-lowrank"][METRIC]["values"]
    seeds = report["setup"]["seeds"]
    return [
        {"seed": s, "parallel": p, "stacked": q, "gain": relative_gain(p, q)}
        for s, p, q in zip(seeds, parallel, stacked, strict=True)
    ]


def format_markdown(result: dict[str, Any]) -> str:
    setup, machine = result["setup"], result["machine"]
    lines = [
        f"# Scale run: parallel vs stacked towers, {setup['items']:,} items",
        "",
        f"- Command: `{setup['command']}`",
        f"- Data: synthetic (`retrieval data synth`), {setup['items']:,} items, "
        f"{setup['users']:,} users, {setup['interactions']:,} interactions, seed "
        f"{setup['data_seed']}; test users evaluated: {result['test_users']:,}",
        f"- Config: `{setup['config']}` ({setup['budget']}); seeds {setup['seeds']}",
        f"- Metric: exact full-catalog test {METRIC} (context items excluded)",
        f"- Machine: {machine['summary']}",
        f"- Wall time: data {result['timings']['data']:.0f}s"
        + ("" if setup["data_generated_now"] else " (existed already)")
        + f", runs {result['timings']['runs_wall_sum']:.0f}s (sum of the runs' wall times, "
        f"whenever they ran); this invocation {result['timings']['total']:.0f}s",
    ]
    if result.get("note"):
        lines.append(f"- Note: {result['note']}")
    lines += [
        "",
        f"| arrangement | {METRIC} (mean ± std) | recall@100 | params | FLOPs/ex | train s / run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["arrangements"]:
        lines.append(
            f"| {row['arrangement']} | {row[METRIC]['mean']:.4f} ± {row[METRIC]['std']:.4f} "
            f"| {row['recall@100']['mean']:.4f} | {row['params']:,} | {row['flops']:,} "
            f"| {row['train_seconds']['mean']:.0f} |"
        )
    popularity = result.get("popularity", {}).get(METRIC)
    if popularity is not None:
        lines.append(f"| popularity (context counts) | {popularity:.4f} | | 0 | 0 | |")
    gain = result["gain"]
    lines += [
        "",
        f"Relative gain of parallel over stacked in {METRIC}: "
        f"{gain['of_means']:+.2%} (of the means); per seed "
        + ", ".join(f"seed {g['seed']}: {g['gain']:+.2%}" for g in gain["per_seed"])
        + f"; mean {gain['mean']:+.2%} ± {gain['std']:.2%}.",
        "",
        "## Runs",
        "",
        "| arrangement | seed | epochs run | best epoch | steps | train ex/s | test eval s "
        "| train s (all stages) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['variant']} | {run['seed']} | {run.get('epochs_run')} "
            f"| {run.get('best_epoch')} | {run.get('steps')} "
            f"| {_number(run.get('examples_per_second'), ',.0f')} "
            f"| {_number(run.get('test_eval_seconds'), '.0f')} "
            f"| {float(run['train_seconds'] or math.nan):.0f} "
            f"| {float(run['wall_seconds'] or math.nan):.0f} |"
        )
    plots = result.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in plots.items()]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=5_000_000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "synth.yaml")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--max-steps", type=int, default=0, help="step budget per run (0 = none)")
    parser.add_argument(
        "--plateau", action="store_true", help="train each run to its validation plateau"
    )
    parser.add_argument(
        "--match-params", action="store_true", help="size stacked to parallel's dense params"
    )
    parser.add_argument(
        "--arrangements",
        default=",".join(ARRANGEMENTS),
        help="run only these (e.g. one per process); the report needs both",
    )
    parser.add_argument("--work", type=Path, required=True, help="data and runs go here")
    parser.add_argument("--name", default="scale_1m", help="bench/results/NAME.{md,json}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--note", default="", help="how the runs ran (load beside them...), printed in the report"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    from retrieval.atomic import atomic_write_text
    from retrieval.data.synthetic import generate_synthetic_dataset
    from training.ablation import mean_std, run_ablation
    from training.config import TrainConfig
    from training.evaluate import describe_machine

    started = time.perf_counter()
    config = TrainConfig.load(args.config)
    data_dir = args.work / "data"
    timings: dict[str, float] = {}

    stage = time.perf_counter()
    data_generated = not (data_dir / "schema.json").exists()
    if data_generated:
        generate_synthetic_dataset(
            data_dir,
            num_items=args.items,
            num_users=args.users,
            num_interactions=args.interactions,
            seed=args.data_seed,
        )
    timings["data"] = time.perf_counter() - stage

    stage = time.perf_counter()
    report = run_ablation(
        data_dir,
        config,
        args.work / "runs",
        seeds=args.seeds,
        arrangements=tuple(args.arrangements.split(",")),
        crosses=("lowrank",),
        epochs=args.epochs,
        max_steps=args.max_steps,
        match_params=args.match_params,
        plateau=args.plateau,
        progress=False,
    )
    timings["runs"] = time.perf_counter() - stage
    timings["total"] = time.perf_counter() - started
    if set(args.arrangements.split(",")) != set(ARRANGEMENTS):
        print(f"runs of {args.arrangements} done; rerun with both arrangements for the report")
        return

    records = [
        json.loads(p.read_text())
        for p in sorted((args.work / "runs" / "runs").glob("*/seed*/result.json"))
    ]
    rows = []
    for entry in report["variants"]:
        rows.append(
            {
                "arrangement": entry["arrangement"],
                METRIC: entry[METRIC],
                "recall@100": entry["recall@100"],
                "params": entry["costs"]["params"],
                "flops": entry["costs"]["flops"],
                "train_seconds": entry["train_seconds"],
            }
        )
    timings["runs_wall_sum"] = sum(float(r["wall_seconds"] or 0.0) for r in report["runs"])
    per_seed = paired_gains(report)
    gain_mean, gain_std = mean_std([g["gain"] for g in per_seed])
    means = {row["arrangement"]: row[METRIC]["mean"] for row in rows}
    epochs = args.epochs or config.epochs
    budget = (
        f"up to {epochs} epoch(s), stopped at the validation plateau (patience "
        f"{config.eval.patience}; best-valid-epoch weights tested)"
        if args.plateau
        else f"{epochs} epoch(s)"
    ) + (f", capped at {args.max_steps} steps" if args.max_steps else "")
    if args.match_params:
        budget += "; stacked resized to parallel's dense parameter count (--match-params)"
    result = {
        "setup": {
            "command": " ".join(["python", *_without_note(sys.argv)]),
            "items": args.items,
            "users": args.users,
            "interactions": args.interactions,
            "data_seed": args.data_seed,
            "config": _display_path(args.config),
            "data_generated_now": data_generated,
            "budget": budget,
            "seeds": report["setup"]["seeds"],
            "train_config": config.to_dict(),
        },
        "machine": describe_machine(),
        "test_users": records[0]["test"].get("num_users") if records else None,
        "arrangements": rows,
        "popularity": report["popularity"],
        "gain": {
            "definition": f"(parallel - stacked) / stacked, {METRIC}",
            "of_means": relative_gain(means["parallel"], means["stacked"]),
            "per_seed": per_seed,
            "mean": gain_mean,
            "std": gain_std,
        },
        "runs": report["runs"],
        "timings": timings,
        "ablation_report": str(args.work / "runs" / "report.md"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    result["note"] = args.note
    result["plots"] = {}
    for name, path in (report.get("plots") or {}).items():  # the ablation runner's plots
        copy = args.results / f"{args.name}_{Path(path).name}"
        shutil.copyfile(path, copy)
        result["plots"][name] = copy.name
    atomic_write_text(args.results / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    markdown = format_markdown(result)
    atomic_write_text(args.results / f"{args.name}.md", markdown)
    emit(result, markdown)


if __name__ == "__main__":
    main()
