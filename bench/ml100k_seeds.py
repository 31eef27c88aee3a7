"""The ml-100k quality check: train the default parallel model for several seeds and
report test recall@K (exact, full catalog, fixed split protocol) next to popularity.

Usage::

    python bench/ml100k_seeds.py --seeds 0 1 2 [--config configs/ml100k.yaml] [--out bench/results/ml100k_seeds.json]

Each seed trains from scratch through the real job (`training.trainer.train`); the JSON
records per-seed metrics, the mean and std, training seconds and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import emit, machine

from training.config import TrainConfig
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
KS = (10, 20, 50, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "ml100k.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "ml100k_seeds.json"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ml100k-seeds-"))
    data_dir = args.data
    if data_dir is None:
        from retrieval.data.movielens import prepare_movielens

        data_dir = work / "data"
        prepare_movielens(data_dir, "ml-100k")
    base = TrainConfig.load(args.config)
    runs = []
    for seed in args.seeds:
        result = train(
            data_dir, work / f"model-{seed}", base.with_overrides(seed=seed), progress=False
        )
        metrics = result.metrics
        runs.append(
            {
                "seed": seed,
                "train_seconds": round(metrics["train_seconds"], 1),
                "best_epoch": metrics["best_epoch"],
                "model": {f"recall@{k}": metrics["test"][f"recall@{k}"] for k in KS},
                "popularity": {
                    f"recall@{k}": metrics["test_baselines"]["popularity"][f"recall@{k}"]
                    for k in KS
                },
            }
        )
    summary = {}
    for who in ("model", "popularity"):
        summary[who] = {
            f"recall@{k}": {
                "mean": statistics.fmean(r[who][f"recall@{k}"] for r in runs),
                "std": statistics.pstdev(r[who][f"recall@{k}"] for r in runs),
            }
            for k in KS
        }
    result = {
        "benchmark": "ml100k_quality",
        "config": str(
            args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
        ),
        "seeds": args.seeds,
        "runs": runs,
        "mean": summary,
        "mean_train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
        "machine": machine(),
    }
    lines = [f"{'':<12}" + "".join(f"{'recall@' + str(k):>16}" for k in KS)]
    for who in ("model", "popularity"):
        cells = "".join(
            f"{summary[who][f'recall@{k}']['mean']:>9.4f} ± {summary[who][f'recall@{k}']['std']:.3f}"
            for k in KS
        )
        lines.append(f"{who:<12}{cells}")
    lines.append(f"mean training time {result['mean_train_seconds']:.0f}s per seed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from training.trainer import write_json

    write_json(args.out, result)
    emit(result, "\n".join(lines))


if __name__ == "__main__":
    main()
