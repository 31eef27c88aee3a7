"""`retrieval demo`: the main job end to end on real data (MovieLens-100K).

Usage::

    retrieval demo --out artifacts/demo          # what `make demo` runs
    retrieval demo --out artifacts/demo --fresh  # redo every stage
    retrieval demo --out artifacts/demo --serve  # leave the service running afterwards

Stages, each through the same CLI a user would type, so the demo exercises exactly the
public commands: prepare the data -> train the default parallel model (epochs picked on
valid, refitted on train + valid; test recall next to popularity, EASE and ALS) -> build and
publish the FAISS index -> offline evaluation with the baselines, exact and through the
index -> cold start: a dataset whose newest items never reach training, a model trained on
it, and recall on those cold items next to popularity and random (EASE and ALS cannot score
them) -> start the HTTP service on loopback and ask it for one user's top-1000. Artifacts
that already exist are reused unless `--fresh`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.cli import Subparsers


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
    data, model, index = out / "data", out / "model", out / "index"
    cold_data, cold_model = out / "data-cold-items", out / "model-cold-items"
    config = ["--config", args.config] if args.config else []
    start = time.perf_counter()
    if not (data / "schema.json").exists():
        _run(["data", "prepare", "ml-100k", "--out", str(data)])
    else:
        _run(["data", "summary", str(data)])
    if not (model / "manifest.json").exists():
        _run(["train", "--data", str(data), "--out", str(model), *config,
              "--overwrite", "--no-progress"])  # fmt: skip
    if not (index / "CURRENT").exists():
        _run(["build-index", "--model", str(model), "--data", str(data), "--out", str(index),
              "--no-progress"])  # fmt: skip
    _run(["evaluate", "--model", str(model), "--data", str(data), "--index", str(index),
          "--k", "10,20,50,100,1000", "--json", str(out / "evaluation.json"),
          "--no-progress"])  # fmt: skip
    if not args.no_cold:
        if not (cold_data / "schema.json").exists():
            _run(["data", "cold", "items", "--data", str(data), "--out", str(cold_data)])
        if not (cold_model / "manifest.json").exists():
            _run(["train", "--data", str(cold_data), "--out", str(cold_model), *config,
                  "--overwrite", "--no-progress"])  # fmt: skip
        _run(["evaluate", "--model", str(cold_model), "--data", str(cold_data), "--cold", "items",
              "--k", "10,20,50,100", "--json", str(out / "evaluation-cold-items.json"),
              "--no-progress"])  # fmt: skip
    if not args.no_serve:
        serve_and_query(model, index, data, user_id=args.user, port=args.port, keep=args.serve)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s; artifacts in {out}")
    return 0


def serve_and_query(
    model: Path, index: Path, data: Path, *, user_id: str, port: int, keep: bool
) -> None:
    """Start the real service on loopback, ask it for one user's candidates, print them."""
    import httpx
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "retrieval", "serve", "--model", str(model), "--index",
           str(index), "--data", str(data), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    print(f"\n$ retrieval {' '.join(cmd[3:])}", flush=True)
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"demo: the service exited with status {server.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("demo: the service did not become ready within 120 s")
            time.sleep(0.5)
        body = {"user_id": user_id, "k": 1000, "exclude_seen": True}
        print(f"\n$ curl -s -X POST {base}/v1/retrieve -d '{json.dumps(body)}'", flush=True)
        reply = httpx.post(f"{base}/v1/retrieve", json=body, timeout=30).raise_for_status().json()
        table = pq.read_table(data / "items.parquet", columns=["item_id", "title"]).to_pydict()
        titles = dict(zip(table["item_id"], table["title"], strict=True))
        print(
            f"user {user_id}: {len(reply['ids'])} candidates in {reply['took_ms']:.1f} ms "
            f"(model {reply['model_version']}, index {reply['index_version']}); top 10:"
        )
        top = zip(reply["ids"][:10], reply["scores"][:10], strict=True)
        for rank, (item, score) in enumerate(top, 1):
            print(f"  {rank:>2}. {score:+.3f}  {item:>5}  {titles.get(item, '')}")
        if keep:
            print(f"\nserving on {base} (docs at {base}/docs); Ctrl-C to stop", flush=True)
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def register_demo(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on MovieLens-100K (what `make demo` runs)",
        description="Prepare ml-100k, train, build the index, evaluate, serve one query.",
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="artifacts")
    parser.add_argument(
        "--config",
        help="training config: a packaged name or a YAML path, as `retrieval train --config` "
        "(default: the default model)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete artifacts, redo every stage")
    parser.add_argument("--user", default="196", help="user the demo asks the service about")
    parser.add_argument("--port", type=int, default=8765, help="loopback port of the service")
    parser.add_argument("--serve", action="store_true", help="keep serving after the query")
    parser.add_argument("--no-serve", action="store_true", help="skip the service stage")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start stage")
    parser.set_defaults(func=run_demo)
