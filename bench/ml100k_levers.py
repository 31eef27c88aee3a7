"""Model-quality levers on ml-100k: each lever is a set of config overrides on top of a base
config, trained through the real job (`training.trainer.train`) for several seeds; the test
recall@K of each (lever, seed) is recorded next to the baselines of the same data.

Usage::

    python bench/ml100k_levers.py --seeds 0 1 2 --workers 2
    python bench/ml100k_levers.py --levers default position_pooling --seeds 0

Every finished (lever, seed) is written to the JSON at once, so a rerun skips it (`--redo`
retrains). Baselines (popularity, EASE, ALS; each tuned on valid and refitted on train +
valid) are computed once per seed. Training runs on one torch thread per worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from common import machine

REPO = Path(__file__).resolve().parents[1]
KS = (10, 20, 50, 100)

# name -> (what it changes, overrides as `section.field` keys on top of the base config)
LEVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("the default model (configs/default.yaml)", {}),
    "base": ("the default without id dropout", {"id_dropout": 0.0}),
    # Each lever of the base taken away:
    "no_refit": (
        "without the refit: test the weights selected on valid",
        {"id_dropout": 0.0, "refit": False},
    ),
    "mean_pooling": (
        "history mean-pooled instead of position-weighted",
        {"id_dropout": 0.0, "model.history_pooling": "mean"},
    ),
    "id_dim_32": (
        "id embeddings of the schema's 32 instead of 64",
        {"id_dropout": 0.0, "id_embedding_dim": 0},
    ),
    "epochs_5": ("at most 5 epochs instead of 10", {"id_dropout": 0.0, "epochs": 5}),
    # Levers tried on top of the default:
    "id_dropout_0.3": (
        "user / item ids replaced by OOV in 30 % of training rows",
        {"id_dropout": 0.3},
    ),
    "id_dim_128": ("id embeddings of 128", {"id_embedding_dim": 128}),
    "full_catalog": (
        "exact softmax over all 1682 items, no logQ",
        {"loss.full_catalog": True, "loss.logq_correction": False},
    ),
    "in_batch_no_logq": ("in-batch softmax without logQ", {"loss.logq_correction": False}),
    "mixed_2048": ("in-batch + 2048 uniform negatives, logQ", {"loss.num_extra_negatives": 2048}),
    "output_dim_128": ("output dimension 128", {"model.output_dim": 128}),
    "temperature_0.1": ("temperature 0.1", {"loss.temperature": 0.1}),
    "weight_decay_1e-3": ("AdamW weight decay 1e-3", {"weight_decay": 1e-3}),
    "dropout_0.2": ("dropout 0.2 in the MLPs", {"model.dropout": 0.2}),
    "history_100": ("a history of 100 items instead of 50", {"history_length": 100}),
}


def _apply(base: Any, overrides: dict[str, Any]) -> Any:
    data = base.to_dict()
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".", 1)
            data[section][name] = value
        else:
            data[key] = value
    return type(base).from_dict(data)


def run_one(data_dir: str, config_path: str, lever: str, seed: int, work: str) -> dict[str, Any]:
    """Train one (lever, seed); the baselines too when the lever is `default`."""
    import torch

    from training.config import TrainConfig
    from training.trainer import train

    torch.set_num_threads(1)
    base = TrainConfig.load(config_path)
    config = _apply(base, {**LEVERS[lever][1], "seed": seed, "num_threads": 1})
    if lever != "default":
        config = _apply(config, {"eval.baselines": []})
    result = train(data_dir, Path(work) / f"{lever}-{seed}", config, progress=False)
    metrics = result.metrics
    run: dict[str, Any] = {
        "lever": lever,
        "seed": seed,
        "train_seconds": round(metrics["train_seconds"], 1),
        "best_epoch": metrics["best_epoch"],
        "best_valid": metrics[f"best_valid_{config.eval.metric}"],
        "test": {f"recall@{k}": metrics["test"][f"recall@{k}"] for k in KS},
    }
    for name, row in metrics.get("test_baselines", {}).items():
        if "skipped" not in row:
            run[name] = {f"recall@{k}": row[f"recall@{k}"] for k in KS}
            if "params" in row:
                run[name]["params"] = row["params"]
    return run


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread per lever (and per baseline), over its seeds."""
    out: dict[str, Any] = {}
    for lever in dict.fromkeys(r["lever"] for r in runs):
        mine = [r for r in runs if r["lever"] == lever]
        out[lever] = {
            "seeds": sorted(r["seed"] for r in mine),
            "mean_train_seconds": statistics.fmean(r["train_seconds"] for r in mine),
            **{
                f"recall@{k}": {
                    "mean": statistics.fmean(r["test"][f"recall@{k}"] for r in mine),
                    "std": statistics.pstdev(r["test"][f"recall@{k}"] for r in mine),
                }
                for k in KS
            },
        }
    baselines = [r for r in runs if "ease" in r or "als" in r or "popularity" in r]
    for name in ("popularity", "ease", "als"):
        rows = [r[name] for r in baselines if name in r]
        if rows:
            out[f"baseline:{name}"] = {
                f"recall@{k}": {
                    "mean": statistics.fmean(r[f"recall@{k}"] for r in rows),
                    "std": statistics.pstdev(r[f"recall@{k}"] for r in rows),
                }
                for k in KS
            }
    return out


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| lever | what | " + " | ".join(f"recall@{k}" for k in KS) + " | train s |",
        "|---|---|" + "---|" * len(KS) + "---|",
    ]
    for name, row in summary.items():
        what = LEVERS[name][0] if name in LEVERS else "(baseline)"
        cells = " | ".join(
            f"{row[f'recall@{k}']['mean']:.4f} ± {row[f'recall@{k}']['std']:.4f}" for k in KS
        )
        seconds = f"{row['mean_train_seconds']:.0f}" if "mean_train_seconds" in row else "-"
        lines.append(f"| {name} | {what} | {cells} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prepared ml-100k (default: prepare one)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redo", action="store_true", help="retrain finished (lever, seed)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "ml100k_levers.json"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ml100k-levers-"))
    data_dir = args.data
    if data_dir is None:
        from retrieval.data.movielens import prepare_movielens

        data_dir = work / "data"
        prepare_movielens(data_dir, "ml-100k")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs: list[dict[str, Any]] = [
        r
        for r in previous.get("runs", [])
        if args.redo is False
        or (r["lever"], r["seed"]) not in {(lv, s) for lv in args.levers for s in args.seeds}
    ]
    done = {(r["lever"], r["seed"]) for r in runs}
    todo = [(lv, s) for s in args.seeds for lv in args.levers if (lv, s) not in done]
    started = time.perf_counter()

    def save() -> None:
        runs.sort(key=lambda r: (list(LEVERS).index(r["lever"]), r["seed"]))
        summary = summarise(runs)
        payload = {
            "benchmark": "ml100k_levers",
            "config": str(
                args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
            ),
            "protocol": "test recall, full catalog, context items excluded; mean ± std over seeds",
            "levers": {name: {"what": what, "overrides": o} for name, (what, o) in LEVERS.items()},
            "runs": runs,
            "summary": summary,
            "machine": machine(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table(summary) + "\n")

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            pool.submit(run_one, str(data_dir), str(args.config), lv, s, str(work)): (lv, s)
            for lv, s in todo
        }
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            save()
            print(
                f"{run['lever']:>20} seed {run['seed']}: "
                + ", ".join(f"@{k} {run['test'][f'recall@{k}']:.4f}" for k in KS)
                + f"  ({run['train_seconds']:.0f}s, {time.perf_counter() - started:.0f}s total)",
                flush=True,
            )
    save()
    print(table(summarise(runs)))


if __name__ == "__main__":
    main()
