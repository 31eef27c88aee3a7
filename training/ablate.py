"""`retrieval ablate`: train every tower arrangement x cross variant under one budget and
report test recall, parameters and FLOPs, mean ± std over seeds.

Usage::

    retrieval ablate --data artifacts/demo/data --config configs/default.yaml --seeds 3 \\
        --out artifacts/ablation
    retrieval ablate --data D --config C --seeds 3 --out R --arrangements parallel,stacked \\
        --cross lowrank,full --epochs 5 --match-params

Variants: every arrangement in ``--arrangements`` crossed with every kind in ``--cross``,
except "deep", which has no cross network and runs once. Every run uses the same config
(``--config`` with ``--epochs`` applied) apart from the variant's `model.arrangement` and
`model.cross` and the seed: equal budgets, so early stopping is switched off (each run
trains exactly `epochs` epochs, or ``--max-steps`` steps; the best-valid-epoch weights are
tested, as in `retrieval train`). ``--match-params`` rescales each variant's block MLP width
(or, for "cross" with a low-rank kind, its rank) so that its dense parameters (both towers,
embedding tables excluded: those are equal in every variant) come closest to those of the
parallel/lowrank variant of the same config; cross/full has no such knob and is reported
unmatched.

Resumable: each run writes ``runs/<variant>/seed<S>/result.json`` when it is done and is
skipped when that file exists (one made with another config or budget is kept, and
listed in the report: delete its result.json to rerun it); an interrupted run resumes
from its training checkpoint.
The report is rebuilt from all result files at the end: ``report.md``, ``report.json``,
``recall_at_k.png`` (mean recall@K per variant) and ``recall_vs_flops.png`` (headline
recall against FLOPs per example). Parameters and FLOPs follow `retrieval.cost`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_ARRANGEMENTS = ("parallel", "stacked", "deep", "cross")
DEFAULT_CROSS = ("full", "lowrank", "mix", "masked")
REFERENCE = ("parallel", "lowrank")  # the default variant whose size --match-params targets
BASE_KS = (10, 20, 50, 100)
BIG_CATALOG = 20_000  # from this many items on, recall@1000 is the headline metric
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Variant:
    """One tower shape: an arrangement and (unless "deep") a cross layer kind."""

    arrangement: str
    cross: str | None

    @property
    def name(self) -> str:
        return self.arrangement if self.cross is None else f"{self.arrangement}-{self.cross}"


def plan_variants(arrangements: Sequence[str], crosses: Sequence[str]) -> list[Variant]:
    """Every arrangement x cross kind; "deep" (no cross network) once.

    >>> [v.name for v in plan_variants(["parallel", "deep"], ["full", "lowrank"])]
    ['parallel-full', 'parallel-lowrank', 'deep']
    """
    from training.config import ARRANGEMENTS, CROSS_KINDS

    for name in arrangements:
        if name not in ARRANGEMENTS:
            raise ValueError(
                f"`--arrangements` entries must be in {list(ARRANGEMENTS)}; got {name!r}"
            )
    for name in crosses:
        if name not in CROSS_KINDS:
            raise ValueError(f"`--cross` entries must be in {list(CROSS_KINDS)}; got {name!r}")
    variants: list[Variant] = []
    for arrangement in dict.fromkeys(arrangements):
        if arrangement == "deep":
            variants.append(Variant("deep", None))
        else:
            if not crosses:
                raise ValueError(f"arrangement {arrangement!r} needs at least one `--cross` kind")
            variants.extend(Variant(arrangement, cross) for cross in dict.fromkeys(crosses))
    if not variants:
        raise ValueError("no variants to run (empty `--arrangements`)")
    return variants


def report_ks(num_items: int) -> tuple[int, ...]:
    """Cut-offs of the report: 10, 20, 50, 100, plus 1000 when the catalog is larger.

    >>> report_ks(1682), report_ks(500)
    ((10, 20, 50, 100, 1000), (10, 20, 50, 100))
    """
    return (*BASE_KS, 1000) if num_items > 1000 else BASE_KS


def headline_k(num_items: int) -> int:
    """recall@50, or recall@1000 for big catalogs (>= `BIG_CATALOG` items)."""
    return 1000 if num_items >= BIG_CATALOG else 50


# --------------------------------------------------------------------------- configs and costs


def variant_config(
    base: Any,
    variant: Variant,
    *,
    seed: int,
    epochs: int | None,
    ks: Sequence[int],
    plateau: bool = False,
) -> Any:
    """The base `TrainConfig` with the variant's shape, the seed, the epoch budget, the
    report's K in `eval.ks`, early stopping off (patience beyond the budget) and popularity
    as the only baseline of each run's test table (EASE and ALS do not depend on the variant).
    With `plateau`, early stopping stays on (the base config's patience): every run trains
    to its validation plateau, at most `epochs` epochs."""
    epochs = epochs or base.epochs
    return base.with_overrides(
        seed=seed,
        epochs=epochs,
        **{
            "model.arrangement": variant.arrangement,
            "model.cross": variant.cross or base.model.cross,
            "eval.ks": sorted({*base.eval.ks, *ks}),
            "eval.patience": base.eval.patience if plateau else epochs + 1,
            "eval.baselines": ["popularity"],
        },
    )


@dataclass
class CostModel:
    """Builds a variant's `ModelConfig` as the trainer would (from the fitted encoder)."""

    encoder: Any

    def model_config(self, config: Any) -> Any:
        from training.trainer import build_model_config

        return build_model_config(self.encoder, config)

    def costs(self, config: Any) -> dict[str, int]:
        return model_costs(self.model_config(config))

    def max_rank(self) -> int:
        """Largest cross rank valid in both towers (the narrower tower's input width d)."""
        return min(
            sum(f.output_dim for f in self.encoder.feature_inputs(side))
            for side in ("query", "item")
        )


def model_costs(model_config: Any) -> dict[str, int]:
    """Parameters and per-example FLOPs of a `ModelConfig` (see `retrieval.cost`)."""
    from retrieval.cost import model_cost

    cost = model_cost(model_config)
    return {
        "params": cost.params,
        "params_dense": cost.query.params_dense + cost.item.params_dense,
        "params_embedding": cost.query.params_embedding + cost.item.params_embedding,
        "flops_query": cost.query.flops,
        "flops_item": cost.item.flops,
        "flops": cost.query.flops + cost.item.flops,
    }


def fit_knob_to_params(
    config: Any,
    target_dense: int,
    knob: str,
    dense_params: Callable[[Any], int],
    *,
    max_value: int = 16384,
) -> tuple[Any, int, int]:
    """Resize `config` with one knob so both towers' dense parameters come closest to
    `target_dense`; returns ``(config, value, dense params)``.

    The trainer builds both towers from one `model` section, so the width (or rank) is
    shared by the two towers; `retrieval.cost.width_for_param_budget` sizes one tower, so
    the same bisection is done here over the sum (monotone in either knob), with the same
    `scale_mlp` rescaling.

    Args:
        config: the variant's `TrainConfig`.
        target_dense: wanted dense parameter count of the two towers.
        knob: "mlp_width" (rescale `model.mlp_hidden`, first layer = width) or "rank".
        dense_params: counts a config's dense parameters (both towers).
        max_value: the largest width or rank tried.
    """
    from retrieval.cost import scale_mlp

    def resized(value: int) -> Any:
        if knob == "mlp_width":
            return config.with_overrides(
                **{"model.mlp_hidden": list(scale_mlp(config.model.mlp_hidden, value))}
            )
        return config.with_overrides(**{"model.rank": value})

    if knob not in ("mlp_width", "rank"):
        raise ValueError(f"`knob` must be 'mlp_width' or 'rank'; got {knob!r}")
    low, high = 1, max_value
    while low < high:  # first value reaching the target
        mid = (low + high) // 2
        if dense_params(resized(mid)) >= target_dense:
            high = mid
        else:
            low = mid + 1
    candidates = [low - 1, low] if low > 1 else [low]
    best = min(candidates, key=lambda v: (abs(dense_params(resized(v)) - target_dense), v))
    best_config = resized(best)
    return best_config, best, dense_params(best_config)


def knob_for(variant: Variant) -> str | None:
    """Which knob `--match-params` turns for a variant (None: none exists)."""
    if variant.arrangement in ("parallel", "stacked", "deep"):
        return "mlp_width"
    if variant.cross in ("lowrank", "mix", "masked"):
        return "rank"
    return None  # cross-only network with full d x d layers: its size is fixed by d


def match_variant_params(
    base: Any, variant: Variant, config: Any, costs: CostModel
) -> tuple[Any, dict[str, Any]]:
    """`config` resized to the reference variant's dense parameter count, plus a record."""
    reference = base.with_overrides(
        **{"model.arrangement": REFERENCE[0], "model.cross": REFERENCE[1]}
    )
    target = costs.costs(reference)["params_dense"]
    before = costs.costs(config)["params_dense"]
    info: dict[str, Any] = {"target_params_dense": target, "params_dense_before": before}
    if (variant.arrangement, variant.cross) == REFERENCE:
        return config, {
            **info,
            "knob": None,
            "value": None,
            "params_dense": before,
            "note": "reference",
        }
    knob = knob_for(variant)
    if knob is None:
        return config, {
            **info,
            "knob": None,
            "value": None,
            "params_dense": before,
            "note": "unmatched: a cross-only network of full layers has no width or rank knob",
        }
    matched, value, params = fit_knob_to_params(
        config,
        target,
        knob,
        lambda c: costs.costs(c)["params_dense"],
        max_value=16384 if knob == "mlp_width" else costs.max_rank(),
    )
    deviation = params / target - 1.0
    note = "matched" if abs(deviation) <= 0.05 else f"closest reachable ({deviation:+.1%})"
    return matched, {**info, "knob": knob, "value": value, "params_dense": params, "note": note}


# --------------------------------------------------------------------------- runs


def run_dir_of(out_dir: Path, variant: Variant, seed: int) -> Path:
    return out_dir / "runs" / variant.name / f"seed{seed}"


def run_one(
    data_dir: Path,
    run_dir: Path,
    variant: Variant,
    config: Any,
    *,
    match_info: dict[str, Any] | None,
    max_steps: int,
    keep_model: bool,
    progress: bool,
) -> dict[str, Any]:
    """Train one (variant, seed) and write its `result.json`; returns the result."""
    from retrieval.atomic import atomic_write_text
    from retrieval.towers import ModelConfig
    from training.trainer import train

    bundle = run_dir / "model"
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # An interrupted run continues from its checkpoint; its times then cover the rest only.
    resumed = (run_dir / "model.ckpt" / "state.json").exists()
    load_start = os.getloadavg()[0]  # other work on the machine slows the run down
    if (bundle / "manifest.json").exists():
        # Trained, but interrupted before its result was written: reuse the bundle.
        metrics = json.loads((bundle / "metrics.json").read_text())
        wall = float(metrics.get("train_seconds", float("nan")))
        logger.info("%s: bundle already trained; reading its metrics", run_dir)
    else:
        result = train(
            data_dir,
            bundle,
            config,
            checkpoint_dir=run_dir / "model.ckpt",
            resume=True,
            max_steps=max_steps,
            progress=progress,
        )
        metrics = result.metrics
        wall = time.perf_counter() - started
    model_config = ModelConfig.from_dict(json.loads((bundle / "model_config.json").read_text()))
    history = metrics.get("history", [])
    record = {
        "variant": variant.name,
        "arrangement": variant.arrangement,
        "cross": variant.cross,
        "seed": config.seed,
        "epochs": config.epochs,
        "max_steps": max_steps,
        "epochs_run": len(history),
        "steps": metrics.get("steps"),
        "best_epoch": metrics.get("best_epoch"),
        "test": metrics.get("test", {}),
        "test_popularity": metrics.get("test_baselines", {}).get("popularity", {}),
        "train_seconds": metrics.get("train_seconds"),
        "examples_per_second": (
            sum(h["examples_per_second"] for h in history) / len(history) if history else None
        ),
        "wall_seconds": wall,
        "resumed_from_checkpoint": resumed,
        "load_average": [load_start, os.getloadavg()[0]],  # 1-min, at start and end
        "costs": model_costs(model_config),
        "mlp_hidden": list(config.model.mlp_hidden),
        "rank": config.model.rank,
        "match": match_info,
        "config": config.to_dict(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=2, default=str) + "\n")
    shutil.rmtree(run_dir / "model.ckpt", ignore_errors=True)  # kept by step-capped runs
    if not keep_model:
        shutil.rmtree(bundle, ignore_errors=True)
    return record


def run_ablation(
    data_dir: str | Path,
    base_config: Any,
    out_dir: str | Path,
    *,
    seeds: int = 3,
    arrangements: Sequence[str] = DEFAULT_ARRANGEMENTS,
    crosses: Sequence[str] = DEFAULT_CROSS,
    epochs: int | None = None,
    max_steps: int = 0,
    match_params: bool = False,
    keep_models: bool = False,
    progress: bool = True,
    plots: bool = True,
    plateau: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every variant x seed, then write the report; returns report.json's dict.

    Args:
        data_dir: dataset directory.
        base_config: the `TrainConfig` every run starts from.
        out_dir: report directory (runs live under ``runs/``).
        seeds: number of seeds; run i uses ``base_config.seed + i``.
        arrangements: arrangements to compare.
        crosses: cross kinds to compare (ignored by "deep").
        epochs: epoch budget of every run (None = the config's).
        max_steps: optimizer step budget of every run (0 = no limit).
        match_params: resize variants to the parallel/lowrank dense parameter count.
        keep_models: keep each run's model bundle (default: deleted once measured).
        progress: training progress bars.
        plots: write the PNG plots.
        plateau: keep early stopping on: each run trains to its validation plateau (at most
            the epoch budget) instead of exactly the budget.
    """
    from retrieval.data.dataset import load_dataset
    from retrieval.encoders import FeatureEncoder
    from training.evaluate import describe_machine
    from training.trainer import apply_feature_overrides

    if seeds < 1:
        raise ValueError(f"`seeds` must be >= 1; got {seeds}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"`epochs` must be >= 1; got {epochs}")
    if max_steps < 0:
        raise ValueError(f"`max_steps` must be >= 0; got {max_steps}")
    variants = plan_variants(arrangements, crosses)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    dataset = load_dataset(data_dir)
    num_items, num_users = dataset.items.num_rows, dataset.users.num_rows
    ks = report_ks(num_items)
    cost_model: CostModel | None = None

    def costs() -> CostModel:  # the encoder is fitted only when a run needs resizing
        nonlocal cost_model
        if cost_model is None:
            schema = apply_feature_overrides(dataset.schema, base_config)
            cost_model = CostModel(
                FeatureEncoder.fit(schema, dataset.users, dataset.items, dataset.interactions)
            )
        return cost_model

    seed_values = [base_config.seed + i for i in range(seeds)]
    stale: list[str] = []  # finished runs made with another config than this invocation's
    total = len(variants) * len(seed_values)
    done = 0
    for variant in variants:
        for seed in seed_values:
            done += 1
            run_dir = run_dir_of(out, variant, seed)
            config = variant_config(
                base_config, variant, seed=seed, epochs=epochs, ks=ks, plateau=plateau
            )
            if (run_dir / RESULT_FILE).exists():
                logger.info(
                    "[%d/%d] %s seed %d: done already, skipped", done, total, variant.name, seed
                )
                if not match_params and not _same_budget(run_dir, config, max_steps):
                    stale.append(f"{variant.name}/seed{seed}")
                continue
            match_info = None
            if match_params:
                config, match_info = match_variant_params(base_config, variant, config, costs())
            logger.info("[%d/%d] %s seed %d: training", done, total, variant.name, seed)
            record = run_one(
                Path(data_dir),
                run_dir,
                variant,
                config,
                match_info=match_info,
                max_steps=max_steps,
                keep_model=keep_models,
                progress=progress,
            )
            logger.info(
                "[%d/%d] %s seed %d: recall@%d %.4f in %.0fs",
                done,
                total,
                variant.name,
                seed,
                headline_k(num_items),
                record["test"].get(f"recall@{headline_k(num_items)}", float("nan")),
                record["wall_seconds"],
            )

    records = [
        json.loads((run_dir_of(out, v, s) / RESULT_FILE).read_text())
        for v in variants
        for s in seed_values
    ]
    setup = {
        "data": str(Path(data_dir).resolve()),
        "num_items": num_items,
        "num_users": num_users,
        "seeds": seed_values,
        "epochs": epochs or base_config.epochs,
        "max_steps": max_steps,
        "match_params": match_params,
        "ks": list(ks),
        "headline": f"recall@{headline_k(num_items)}",
        "base_config": base_config.to_dict(),
        "machine": describe_machine(),
        "wall_seconds_this_invocation": time.perf_counter() - started,
        "runs_with_another_config": stale,
    }
    if stale:
        logger.warning(
            "%d finished run(s) were made with another config than this invocation's and "
            "were kept (delete their result.json to rerun): %s",
            len(stale),
            stale,
        )
    report = build_report(records, variants, setup)
    from retrieval.atomic import atomic_write_text

    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    if plots:
        report["plots"] = write_plots(report, out)
    atomic_write_text(out / "report.md", format_report_markdown(report))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return report


def _same_budget(run_dir: Path, config: Any, max_steps: int) -> bool:
    """Whether a finished run used `config` and `max_steps` (what resuming assumes)."""
    record = json.loads((run_dir / RESULT_FILE).read_text())
    planned = json.loads(json.dumps(config.to_dict(), default=str))  # tuples -> lists
    return bool(record.get("config") == planned and record.get("max_steps") == max_steps)


# --------------------------------------------------------------------------- the report


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


def _color(colormap: Any, index: int) -> Any:
    """tab20: ten distinct dark hues first, then their light partners."""
    return colormap((2 * index) % 20 + (2 * index // 20) % 2)


def _load(values: Any) -> str:
    return "-" if not values else ", ".join(f"{v:.1f}" for v in values)


def _count(value: int) -> str:
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
            f"| {entry['variant']} | {_count(costs['params'])} | {_count(costs['params_dense'])} "
            f"| {_count(costs['flops'])} ({_count(costs['flops_query'])} + "
            f"{_count(costs['flops_item'])}) | "
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


def write_plots(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """recall_at_k.png and recall_vs_flops.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    setup = report["setup"]
    ks = setup["ks"]
    headline = setup["headline"]
    paths: dict[str, str] = {}

    variants = report["variants"]
    reference = next(
        (v for v in variants if (v["arrangement"], v["cross"]) == REFERENCE), variants[0]
    )
    colors = plt.get_cmap("tab20")
    markers = "osD^v<>ph*"
    fig, (absolute, relative) = plt.subplots(1, 2, figsize=(13, 5))
    for index, entry in enumerate(variants):
        style = {
            "marker": markers[index % len(markers)],
            "color": _color(colors, index),
            "capsize": 3,
            "label": entry["variant"],
        }
        means = [entry[f"recall@{k}"]["mean"] for k in ks]
        stds = [entry[f"recall@{k}"]["std"] for k in ks]
        absolute.errorbar(ks, means, yerr=stds, **style)
        base = [reference[f"recall@{k}"]["mean"] for k in ks]
        relative.errorbar(
            ks,
            [100 * (m / b - 1) if b else 0.0 for m, b in zip(means, base, strict=True)],
            yerr=[100 * s / b if b else 0.0 for s, b in zip(stds, base, strict=True)],
            **style,
        )
    for ax in (absolute, relative):
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("K")
        ax.grid(True, alpha=0.3)
    absolute.set_ylabel("test recall@K (mean ± std over seeds)")
    absolute.set_title("Recall@K per variant")
    relative.axhline(0.0, color="black", linewidth=0.8)
    relative.set_ylabel(f"recall@K vs {reference['variant']} (%)")
    relative.set_title(f"Relative to {reference['variant']}")
    relative.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "recall_at_k.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["recall@K per variant"] = str(path)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for index, entry in enumerate(variants):
        stat = entry[headline]
        flops = entry["costs"]["flops"]
        ax.errorbar(
            [flops],
            [stat["mean"]],
            yerr=[stat["std"]],
            marker=markers[index % len(markers)],
            color=_color(colors, index),
            capsize=3,
        )
        ax.annotate(
            entry["variant"],
            (flops, stat["mean"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    flops = [entry["costs"]["flops"] for entry in report["variants"]]
    if max(flops) >= 10 * min(flops):
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _count(int(value))))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("FLOPs per example (query + item tower, forward)")
    ax.set_ylabel(f"test {headline} (mean ± std)")
    ax.set_title(f"{headline} vs FLOPs")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out_dir / "recall_vs_flops.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths[f"{headline} vs FLOPs"] = str(path)
    return paths


# --------------------------------------------------------------------------- CLI


def run_ablate(args: argparse.Namespace) -> int:
    from training.config import load_train_config
    from training.evaluate import parse_names

    config = load_train_config(args.config)
    arrangements = parse_names(args.arrangements, DEFAULT_ARRANGEMENTS, "--arrangements")
    crosses = parse_names(args.cross, DEFAULT_CROSS, "--cross")
    report = run_ablation(
        args.data,
        config,
        args.out,
        seeds=args.seeds,
        arrangements=arrangements,
        crosses=crosses,
        epochs=args.epochs,
        max_steps=args.max_steps,
        match_params=args.match_params,
        plateau=args.plateau,
        keep_models=args.keep_models,
        progress=not args.no_progress,
    )
    print(format_report_markdown(report))
    print(f"wrote {Path(args.out) / 'report.md'} and report.json")
    return 0


def register_ablate(subparsers: Any) -> None:
    """Add `retrieval ablate` (the `retrieval.commands` entry point)."""
    parser = subparsers.add_parser(
        "ablate",
        help="train tower variants under one budget and report recall, params and FLOPs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument(
        "--config",
        help="base training config: a packaged name (default, ablation, ...) or a YAML path; "
        "default: the default model",
    )
    parser.add_argument("--out", required=True, type=Path, help="report directory")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    parser.add_argument(
        "--arrangements",
        default=",".join(DEFAULT_ARRANGEMENTS),
        help="comma-separated arrangements (default %(default)s)",
    )
    parser.add_argument(
        "--cross",
        default=",".join(DEFAULT_CROSS),
        help="comma-separated cross kinds (default %(default)s)",
    )
    parser.add_argument("--epochs", type=int, help="epoch budget of every run (default: config)")
    parser.add_argument(
        "--max-steps", type=int, default=0, help="step budget of every run (0 = none)"
    )
    parser.add_argument(
        "--match-params",
        action="store_true",
        help="resize each variant to the parallel/lowrank dense parameter count",
    )
    parser.add_argument(
        "--plateau",
        action="store_true",
        help="early stopping on: train each run to its validation plateau (at most --epochs)",
    )
    parser.add_argument("--keep-models", action="store_true", help="keep every run's model bundle")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_ablate)
