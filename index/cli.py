"""`retrieval build-index` and `retrieval index list|rollback|verify` (entry points).

Usage::

    retrieval build-index --model artifacts/model --data data/ml-100k --out artifacts/index
    retrieval build-index --model M --data D --out R --factory "IVF4000,Flat" --keep 5 \\
        --redis-url redis://127.0.0.1:6379/0
    RETRIEVAL_REDIS_URL_FILE=/run/secrets/redis_url retrieval build-index --model M --data D --out R
    retrieval index list --root artifacts/index
    retrieval index rollback --root artifacts/index [--to VERSION]
    retrieval index verify --root artifacts/index [--version VERSION]
    retrieval build-index --model M --data D --out R --shards 4
    torchrun --nproc-per-node 2 -m index --model M --data D --out R [--shards 2]

The new CURRENT is announced on Redis when a URL is given: `--redis-url` or
`--redis-url-file`, else the service's variables `RETRIEVAL_REDIS_URL` or
`RETRIEVAL_REDIS_URL_FILE` (a password in a flag shows in every process listing; the
variable or the file keeps it out of them).

Heavy modules (torch, faiss) are imported inside the handlers, so `retrieval --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.urls import add_redis_url_arguments

if TYPE_CHECKING:
    from retrieval.cli import Subparsers

logger = logging.getLogger(__name__)
# faiss logs which CPU-specific library it loaded at INFO, three lines per process
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model bundle directory")
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset directory (items.parquet)"
    )
    parser.add_argument("--out", required=True, type=Path, help="index root (versions/, CURRENT)")
    parser.add_argument(
        "--factory",
        help="FAISS index_factory string, e.g. Flat, IVF4000,Flat, IVF4000,PQ32, HNSW32,Flat "
        "(default: by catalog size: Flat up to 200k items, IVF{4 sqrt N},SQ8 above)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=8192, help="catalog rows per step")
    parser.add_argument("--keep", type=int, default=3, help="versions kept (CURRENT always)")
    parser.add_argument(
        "--recall-floor", type=float, default=0.95, help="min ANN recall@k vs exact to publish"
    )
    parser.add_argument("--recall-k", type=int, default=1000, help="k of the recall check")
    parser.add_argument(
        "--recall-queries", type=int, default=500, help="real queries: half tune, half gate"
    )
    parser.add_argument("--force", action="store_true", help="publish even below the floor")
    add_redis_url_arguments(parser, "announce the version on this Redis, if any")
    parser.add_argument(
        "--search-params", default="", help="fixed search params, e.g. nprobe=64 (default: tuned)"
    )
    parser.add_argument("--train-size", type=int, default=0, help="training sample (0 = auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="threads per process (0 = auto)")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="index files in the version, searched as one faiss.IndexShards (default 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_build_index(args: argparse.Namespace) -> int:
    from index.build import BuildOptions, build_index
    from retrieval.index_format import parse_search_params
    from retrieval.urls import resolve_redis_url

    options = BuildOptions(
        factory=args.factory,
        device=args.device,
        batch_size=args.batch_size,
        keep=args.keep,
        recall_floor=args.recall_floor,
        recall_k=args.recall_k,
        recall_queries=args.recall_queries,
        force=args.force,
        redis_url=resolve_redis_url(args.redis_url, args.redis_url_file),
        search_params=parse_search_params(args.search_params),
        train_size=args.train_size,
        seed=args.seed,
        threads=args.threads,
        shards=args.shards,
        progress=not args.no_progress,
    )
    result = build_index(args.model, args.data, args.out, options)
    if _rank() == 0:
        manifest = result.manifest
        recall = manifest["recall"]
        timings = manifest.get("timings", {})
        print(f"published {result.version}  (CURRENT was {result.previous})")
        print(f"  path            {result.path}")
        print(
            f"  items           {manifest['catalog']['num_items']:,}  dim {manifest['index']['dim']}"
        )
        print(
            f"  factory         {manifest['index']['factory']}  params {manifest['index']['search_params']}"
        )
        if manifest["index"].get("layout") == "shards":
            print(f"  shards          {len(manifest['index']['shards'])} (faiss.IndexShards)")
        print(
            f"  recall@{recall['k']:<8} {recall['recall']:.4f} on {recall['num_queries']} queries "
            f"(floor {recall['floor']}{', FORCED' if recall['forced'] else ''})"
        )
        print(
            f"  embed           {timings.get('embed_seconds', 0):.1f}s "
            f"({timings.get('items_per_second', 0):,.0f} items/s per rank)"
        )
        print(
            f"  train / add     {timings.get('train_seconds', 0):.1f}s / {timings.get('add_seconds', 0):.1f}s"
        )
        print(f"  total           {result.seconds:.1f}s; pruned {result.pruned or 'none'}")
    return 0


def _rank() -> int:
    from retrieval.process_group import rank

    return rank()


def run_index_list(args: argparse.Namespace) -> int:
    from retrieval.index_format import list_versions

    infos = list_versions(args.root)
    if args.json:
        rows = [
            {
                "version": info.name,
                "current": info.current,
                "created": info.created,
                "num_items": info.num_items,
                "factory": info.factory,
                "recall": info.recall,
                "shards": info.shards,
                "error": info.error,
            }
            for info in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not infos:
        print(f"no index versions under {args.root}")
        return 0
    print(
        f"  {'version':<34} {'created':<28} {'items':>12} {'factory':<18} {'recall':>7} "
        f"{'shards':>6}"
    )
    for info in infos:
        marker = "*" if info.current else " "
        if info.manifest is None:
            print(f"{marker} {info.name:<34} (unreadable: {info.error})")
            continue
        recall = f"{info.recall:.4f}" if info.recall is not None else "-"
        print(
            f"{marker} {info.name:<34} {info.created:<28} {info.num_items or 0:>12,} "
            f"{info.factory or '-':<18} {recall:>7} {info.shards:>6}"
        )
    return 0


def run_index_rollback(args: argparse.Namespace) -> int:
    from index.publish import announce_version, rollback, root_lock
    from retrieval.cli import UsageError
    from retrieval.index_format import IndexStoreError, check_version_name
    from retrieval.urls import resolve_redis_url

    if args.to is not None:
        try:
            check_version_name(args.to)
        except IndexStoreError as exc:
            raise UsageError(f"--to: {exc}") from None
    redis_url = resolve_redis_url(args.redis_url, args.redis_url_file)  # checked before the swap
    with root_lock(args.root):
        previous, current = rollback(args.root, args.to, verify=not args.no_verify)
    print(f"CURRENT: {previous} -> {current}")
    if redis_url:
        announce_version(redis_url, current)
    return 0


def run_index_verify(args: argparse.Namespace) -> int:
    from retrieval.index_format import read_current, verify_index_version, version_path

    name = args.version or read_current(args.root)
    manifest = verify_index_version(version_path(args.root, name))
    print(f"{name}: ok ({len(manifest['files'])} files match their sha256)")
    return 0


def register_build_index(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "build-index",
        help="embed a catalog with a model bundle and publish a FAISS index version",
        description="Build, recall-check and publish an index version (torchrun: -m index).",
    )
    add_build_arguments(parser)
    parser.set_defaults(func=run_build_index)


def register_index_admin(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="list, roll back or verify index versions", description=__doc__
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list versions (* = CURRENT)")
    listing.add_argument("--root", required=True, type=Path, help="index root")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=run_index_list)
    back = actions.add_parser("rollback", help="point CURRENT at an earlier version")
    back.add_argument("--root", required=True, type=Path, help="index root")
    back.add_argument("--to", help="version name (default: the one before CURRENT)")
    back.add_argument("--no-verify", action="store_true", help="skip the target's checksums")
    add_redis_url_arguments(back, "announce the new CURRENT on this Redis")
    back.set_defaults(func=run_index_rollback)
    check = actions.add_parser("verify", help="check a version's files against its manifest")
    check.add_argument("--root", required=True, type=Path, help="index root")
    check.add_argument("--version", help="version name (default: CURRENT)")
    check.set_defaults(func=run_index_verify)


def main(argv: list[str] | None = None) -> int:
    """`python -m index ...` (what torchrun runs): the build-index arguments."""
    from retrieval.cli import EXIT_FAILURE, EXIT_USAGE, CommandError, UsageError

    parser = argparse.ArgumentParser(prog="python -m index", description="Build an index version.")
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    setup = _setup_process_group()
    try:
        return run_build_index(args)
    except UsageError as exc:
        print(f"build-index (rank {_rank()}): error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"build-index (rank {_rank()}): error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if setup:
            from retrieval.process_group import teardown

            teardown()


def _setup_process_group() -> bool:
    """Join torchrun's group (gloo: the collectives carry only small Python objects)."""
    from datetime import timedelta

    from retrieval.process_group import is_distributed, setup_from_env

    if is_distributed():
        return False  # a group this job did not create is not this job's to leave
    # Ranks > 0 wait while rank 0 trains, checks and writes the index: allow hours.
    return setup_from_env(backend="gloo", timeout=timedelta(hours=4))
