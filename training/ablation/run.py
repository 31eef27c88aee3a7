"""The ablation's runs: train every (variant, seed) once, resumably, then rebuild the report.

Each run writes ``runs/<variant>/seed<S>/result.json`` when it is done and is skipped when
that file exists; an interrupted run resumes from its training checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.ablation.plan import (
    DEFAULT_ARRANGEMENTS,
    DEFAULT_CROSS,
    CostModel,
    Variant,
    headline_k,
    match_variant_params,
    model_costs,
    plan_variants,
    report_ks,
    variant_config,
)
from training.ablation.plots import write_plots
from training.ablation.report import build_report, format_report_markdown

if TYPE_CHECKING:
    from training.config import TrainConfig

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def run_dir_of(out_dir: Path, variant: Variant, seed: int) -> Path:
    return out_dir / "runs" / variant.name / f"seed{seed}"


def run_one(
    data_dir: Path,
    run_dir: Path,
    variant: Variant,
    config: TrainConfig,
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
    base_config: TrainConfig,
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


def _same_budget(run_dir: Path, config: TrainConfig, max_steps: int) -> bool:
    """Whether a finished run used `config` and `max_steps` (what resuming assumes)."""
    record = json.loads((run_dir / RESULT_FILE).read_text())
    planned = json.loads(json.dumps(config.to_dict(), default=str))  # tuples -> lists
    return bool(record.get("config") == planned and record.get("max_steps") == max_steps)
