"""`retrieval demo`: the main job end to end on real data (MovieLens-100K).

Usage::

    retrieval demo --out artifacts/demo          # what `make demo` runs
    retrieval demo --out artifacts/demo --fresh  # redo every stage

Stages, each through the same CLI a user would type, so the demo exercises exactly the
public commands: prepare the data -> train the default parallel model (test recall next
to popularity) -> build and publish the FAISS index -> offline evaluation with baselines
through the index -> start the HTTP service on loopback and ask it for one user's top-k.
Artifacts that already exist are reused unless `--fresh`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from training.cli import DEFAULT_CONFIG


def _run(argv: list[str]) -> None:
    from retrieval.cli import main

    print(f"\n$ retrieval {' '.join(argv)}", flush=True)
    status = main(argv)
    if status != 0:
        raise SystemExit(f"demo: `retrieval {' '.join(argv)}` failed with status {status}")


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data, model = out / "data", out / "model"
    start = time.perf_counter()
    if not (data / "schema.json").exists():
        _run(["data", "prepare", "ml-100k", "--out", str(data)])
    else:
        _run(["data", "summary", str(data)])
    if not (model / "manifest.json").exists():
        _run(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(model),
                "--config",
                str(args.config),
                "--overwrite",
            ]
        )
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s; artifacts in {out}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on MovieLens-100K (what `make demo` runs)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/demo"), help="artifact directory"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config")
    parser.add_argument(
        "--fresh", action="store_true", help="delete the artifacts and redo every stage"
    )
    parser.set_defaults(func=run_demo)
