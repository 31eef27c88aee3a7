"""`retrieval train` and `retrieval demo` subcommands (registered through entry points)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from training.config import (
    ARRANGEMENTS,
    CROSS_KINDS,
    TrainConfig,
    load_train_config,
    packaged_config_names,
)

if TYPE_CHECKING:
    from retrieval.cli import Subparsers

logger = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument("--out", required=True, type=Path, help="model bundle directory to create")
    parser.add_argument(
        "--config",
        help=f"training config: a packaged name ({', '.join(packaged_config_names())}) or the "
        "path of a YAML file; default: the default model (the packaged default.yaml)",
    )
    parser.add_argument("--epochs", type=int, help="override `epochs`")
    parser.add_argument("--batch-size", type=int, help="override `batch_size`")
    parser.add_argument("--lr", type=float, help="override `lr`")
    parser.add_argument("--arch", choices=ARRANGEMENTS, help="override `model.arrangement`")
    parser.add_argument("--cross", choices=CROSS_KINDS, help="override `model.cross`")
    parser.add_argument("--seed", type=int, help="override `seed`")
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoints (default OUT.ckpt)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N steps (smoke runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="also write per-epoch loss, learning rate and valid recall as TensorBoard events "
        "to DIR (needs the `tensorboard` extra; default: none). The bundle holds them either "
        "way: training_curves.csv, and training_curves.png when matplotlib is installed",
    )


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The `--config` file (or the default model) with the command-line overrides applied."""
    config = load_train_config(args.config)
    return config.with_overrides(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        **{"model.arrangement": args.arch, "model.cross": args.cross},
    )


def run_train(args: argparse.Namespace) -> int:
    from training import distributed
    from training.trainer import format_recall_table, train

    config = resolve_config(args)
    distributed.setup_from_env()
    is_rank_zero = distributed.rank() == 0
    try:
        result = train(
            args.data,
            args.out,
            config,
            checkpoint_dir=args.checkpoint_dir,
            resume=not args.no_resume,
            overwrite=args.overwrite,
            max_steps=args.max_steps,
            progress=not args.no_progress,
            tensorboard_dir=args.tensorboard,
        )
    finally:
        distributed.teardown()
    if is_rank_zero:
        metrics = result.metrics
        print(f"bundle: {result.bundle_dir}  ({result.seconds:.1f}s)")
        print(f"best epoch {metrics['best_epoch']}; test recall (exact, full catalog):")
        print(format_recall_table(metrics))
    return 0


def register_train(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a two-tower model and write a model bundle",
        description="Train on a dataset directory; torchrun runs it on several processes.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)


def main(argv: list[str] | None = None) -> int:
    """`python -m training ...` (what torchrun runs): the train subcommand's arguments."""
    parser = argparse.ArgumentParser(prog="python -m training")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_train(args)


__all__ = ["json", "main", "register_train"]
