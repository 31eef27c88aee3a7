"""Training throughput on CPU for the ml-100k config (examples/s at batch 1024).

Usage::

    python bench/bench_train.py [--data DIR] [--config configs/default.yaml] [--steps 30]

Prepares ml-100k into a temporary directory when `--data` is not given, then times
optimizer steps of the real training step (gather, both towers, loss, backward, AdamW)
after a warmup. The loss must fall over the timed steps (correctness beside the speed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, machine, peak_rss_mib

from retrieval.loss import RetrievalTask
from retrieval.towers import TwoTowerModel
from training.config import TrainConfig
from training.trainer import build_model_config, build_optimizers, gather_batch, prepare_data

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    data_dir = args.data
    if data_dir is None:
        from retrieval.data.movielens import prepare_movielens

        data_dir = Path(tempfile.mkdtemp()) / "ml-100k"
        prepare_movielens(data_dir, "ml-100k")
    config = TrainConfig.load(args.config).with_overrides(batch_size=args.batch_size)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(0)
    data = prepare_data(data_dir, config)
    model = TwoTowerModel(build_model_config(data.encoder, config))
    task = RetrievalTask(
        temperature=config.loss.temperature,
        item_frequencies=data.item_counts.double(),
        mask_accidental_hits=config.loss.mask_accidental_hits,
    )
    (optimizer,) = build_optimizers(model, task, config)
    order = np.random.default_rng(0).permutation(data.train_rows)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        rows = order[(step * args.batch_size) % (len(order) - args.batch_size) :][: args.batch_size]
        start = time.perf_counter()
        query, item, ids = gather_batch(data, rows)
        q, i = model(query, item)
        loss = task.loss(q, i, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            losses.append(float(loss.detach()))
    step_s = float(np.median(times))
    result = {
        "benchmark": "train_throughput",
        "config": str(args.config),
        "batch_size": args.batch_size,
        "steps_timed": args.steps,
        "median_step_ms": round(step_s * 1000, 2),
        "examples_per_second": round(args.batch_size / step_s, 1),
        "mean_examples_per_second": round(args.batch_size * len(times) / sum(times), 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_fell": losses[-1] < losses[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": machine(),
    }
    table = (
        f"train step @ batch {args.batch_size}: median {result['median_step_ms']} ms -> "
        f"{result['examples_per_second']:,} examples/s (loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    )
    emit(result, table)


if __name__ == "__main__":
    main()
