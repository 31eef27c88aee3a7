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
# This module is the command line (its docstring is `retrieval ablate --help`); the job is
# `training.ablation`: plan, runs, report, plots.

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.kinds import ARRANGEMENTS, CROSS_KINDS

if TYPE_CHECKING:
    from retrieval.cli import Subparsers


def run_ablate(args: argparse.Namespace) -> int:
    from training.ablation import format_report_markdown, run_ablation
    from training.config import load_train_config
    from training.evaluate import parse_names

    config = load_train_config(args.config)
    arrangements = parse_names(args.arrangements, ARRANGEMENTS, "--arrangements")
    crosses = parse_names(args.cross, CROSS_KINDS, "--cross")
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


def register_ablate(subparsers: Subparsers) -> None:
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
        default=",".join(ARRANGEMENTS),
        help="comma-separated arrangements (default %(default)s)",
    )
    parser.add_argument(
        "--cross",
        default=",".join(CROSS_KINDS),
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
