"""The ablation's report: per-variant mean ± std over seeds (report.json) and report.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.ablation.plan import Variant


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def build_report(
    records: list[dict[str, Any]], variants: Sequence[Variant], setup: dict[str, Any]
) -> dict[str, Any]:
    """Per-variant aggregates (mean ± std over seeds) plus every run's record."""
    ks = setup["ks"]
    summary = []
    for variant in variants:
        runs = [r for r in records if r["variant"] == variant.name]
        entry: dict[str, Any] = {
            "variant": variant.name,
            "arrangement": variant.arrangement,
            "cross": variant.cross,
            "num_runs": len(runs),
            "costs": runs[0]["costs"],
            "match": runs[0].get("match"),
            "mlp_hidden": runs[0].get("mlp_hidden"),
            "rank": runs[0].get("rank"),
        }
        for metric in ("recall", "ndcg", "hit_rate"):
            for k in ks:
                values = [float(r["test"][f"{metric}@{k}"]) for r in runs]
                mean, std = mean_std(values)
                entry[f"{metric}@{k}"] = {"mean": mean, "std": std, "values": values}
        for key in ("train_seconds", "wall_seconds"):
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            mean, std = mean_std(values)
            entry[key] = {"mean": mean, "std": std, "values": values}
        summary.append(entry)
    popularity = records[0].get("test_popularity", {}) if records else {}
    return {
        "setup": setup,
        "variants": summary,
        "popularity": {f"recall@{k}": popularity.get(f"recall@{k}") for k in ks},
        "runs": [
            {
                "test_eval_seconds": r.get("test", {}).get("eval_seconds"),
            }
            | {
                k: r.get(k)
                for k in (
                    "variant",
                    "steps",
                    "seed",
                    "epochs_run",
                    "best_epoch",
                    "train_seconds",
                    "wall_seconds",
                    "examples_per_second",
                    "load_average",
                    "resumed_from_checkpoint",
                )
            }
            for r in records
        ],
    }


def _pm(stat: dict[str, Any], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _load(values: Sequence[float] | None) -> str:
    return "-" if not values else ", ".join(f"{v:.1f}" for v in values)


def format_count(value: int) -> str:
    """1234567 -> "1.23M", 12345 -> "12.3k" (tables and plot axes)."""
    if value >= 1_000_000:
        return f"{value / 1e6:.2f}M"
    if value >= 1_000:
        return f"{value / 1e3:.1f}k"
    return str(value)


def format_report_markdown(report: dict[str, Any]) -> str:
    """report.md: setup, the mean ± std table, costs, match details and per-run times."""
    setup = report["setup"]
    ks = setup["ks"]
    machine = setup["machine"]
    budget = f"{setup['epochs']} epochs" + (
        f", capped at {setup['max_steps']} steps" if setup["max_steps"] else ""
    )
    lines = [
        "# Tower ablation: arrangement x cross layer",
        "",
        f"- Data: `{setup['data']}` ({setup['num_users']} users, {setup['num_items']} items)",
        f"- Seeds: {setup['seeds']}; budget per run: {budget} (early stopping off; "
        "best-valid-epoch weights tested)",
        "- Metric: exact full-catalog test recall@K (context items excluded), mean ± sample "
        f"std over {len(setup['seeds'])} seed(s); headline {setup['headline']}",
        "- Config: every run is `setup.base_config` of report.json with the variant's "
        "`model.arrangement`/`model.cross`, the seed and the budget applied (its own full "
        "config is in `runs/<variant>/seed<S>/result.json`)",
        f"- Parameter matching (`--match-params`): {'on' if setup['match_params'] else 'off'}",
        *(
            [f"- **Warning**: runs made with another config were kept: {stale}"]
            if (stale := setup.get("runs_with_another_config"))
            else []
        ),
        f"- Machine: {machine['summary']}; torch {machine['torch']}, "
        f"{setup['base_config'].get('num_threads') or 'all'} torch thread(s) per run; the machine "
        "was shared with other jobs, so times vary with the 1-min load average listed per run "
        "(2 = both cores busy)",
        "- Params: all weights, shared id table counted once; dense = all but embedding "
        "tables. FLOPs: forward, per example, query + item tower (`retrieval.cost`).",
        "",
        "| variant | params | dense params | FLOPs/ex (query + item) | "
        + " | ".join(f"recall@{k}" for k in ks)
        + " | train s |",
        "|---|---:|---:|---:|" + "---:|" * len(ks) + "---:|",
    ]
    for entry in report["variants"]:
        costs = entry["costs"]
        lines.append(
            f"| {entry['variant']} | {format_count(costs['params'])} | {format_count(costs['params_dense'])} "
            f"| {format_count(costs['flops'])} ({format_count(costs['flops_query'])} + "
            f"{format_count(costs['flops_item'])}) | "
            + " | ".join(_pm(entry[f"recall@{k}"]) for k in ks)
            + f" | {_pm(entry['train_seconds'], 1)} |"
        )
    popularity = report.get("popularity") or {}
    if any(v is not None for v in popularity.values()):
        lines.append(
            "| popularity (context counts) | 0 | 0 | 0 | "
            + " | ".join(
                f"{popularity[f'recall@{k}']:.4f}"
                if popularity.get(f"recall@{k}") is not None
                else "-"
                for k in ks
            )
            + " | - |"
        )
    if setup["match_params"]:
        lines += [
            "",
            "## Parameter matching",
            "",
            "| variant | knob | value | dense params | target | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for entry in report["variants"]:
            match = entry.get("match") or {}
            lines.append(
                f"| {entry['variant']} | {match.get('knob') or '-'} | {match.get('value') or '-'} "
                f"| {match.get('params_dense', '-')} | {match.get('target_params_dense', '-')} "
                f"| {match.get('note', '')} |"
            )
    lines += [
        "",
        "## Runs",
        "",
        "| variant | seed | steps | epochs run | best epoch | train s | wall s | load (start, end) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['variant']} | {run['seed']} | {run.get('steps')} | {run['epochs_run']} "
            f"| {run['best_epoch']} "
            f"| {float(run['train_seconds'] or float('nan')):.1f} "
            f"| {float(run['wall_seconds'] or float('nan')):.1f}"
            + (" (resumed: rest of the run only)" if run.get("resumed_from_checkpoint") else "")
            + f" | {_load(run.get('load_average'))} |"
        )
    plots = report.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    lines.append("")
    return "\n".join(lines)
