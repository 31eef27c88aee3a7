"""`retrieval data`: prepare, import, generate and inspect dataset directories.

Usage::

    retrieval data prepare ml-100k --out data/ml-100k
    retrieval data prepare ml-1m --out data/ml-1m --source ~/Downloads/ml-1m
    retrieval data synth --items 1000000 --users 100000 --interactions 5000000 --seed 0 \\
        --out data/synth-1m
    retrieval data summary data/ml-100k
    retrieval data import --interactions events.csv [--items items.csv] [--users users.csv] \\
        --out data/mine [--schema data/mine/schema.yaml] [--user-col UserIdent] \\
        [--item-col Movie] [--time-col When] [--missing-items error|drop|add] [--overwrite]
    retrieval data cold items --data data/ml-100k --out data/ml-100k-cold-items

Handlers import pyarrow and the dataset modules only when they run, so `retrieval --help`
stays fast.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval.cli import Subparsers

MOVIELENS_CHOICES = ("ml-100k", "ml-1m")
# The same tuples as retrieval.data.importer.FORMATS / MISSING_POLICIES (a test keeps them
# equal); repeated here so that building the parser imports no pyarrow.
IMPORT_FORMATS = ("csv", "tsv", "parquet", "jsonl")
MISSING_POLICIES = ("error", "drop", "add")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def register_data(subparsers: Subparsers) -> None:
    """Add the `data` command and its subcommands (the `retrieval.commands` entry point)."""
    data = subparsers.add_parser(
        "data",
        help="prepare, import, generate and inspect datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prepare = commands.add_parser(
        "prepare",
        help="convert MovieLens into a dataset directory",
        description="Convert MovieLens (GroupLens or RecBole files) into a dataset directory. "
        "Without --source, ml-100k is read from the copy shipped inside the recbole package.",
    )
    prepare.add_argument("name", metavar="NAME", choices=MOVIELENS_CHOICES, help="ml-100k or ml-1m")
    prepare.add_argument("--out", required=True, help="dataset directory to write")
    prepare.add_argument("--source", help="directory with the GroupLens or RecBole files")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prepare.set_defaults(func=run_prepare)

    synth = commands.add_parser(
        "synth", help="generate a synthetic dataset", description="Generate a synthetic dataset."
    )
    synth.add_argument("--items", type=_positive_int, required=True, help="catalog size")
    synth.add_argument("--users", type=_positive_int, required=True, help="number of users")
    synth.add_argument(
        "--interactions", type=_positive_int, required=True, help="number of interactions"
    )
    synth.add_argument("--seed", type=int, required=True, help="random seed")
    synth.add_argument("--out", required=True, help="dataset directory to write")
    synth.add_argument(
        "--chunk-size", type=_positive_int, default=1_000_000, help="rows generated per chunk"
    )
    synth.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    synth.set_defaults(func=run_synth)

    cold = commands.add_parser(
        "cold",
        help="write a cold-start variant of a dataset (cold items or cold users)",
        description="Items (users) first seen after a time cutoff become cold: never in train "
        "or valid. See retrieval.data.cold; evaluate with `retrieval evaluate --cold MODE`.",
    )
    cold.add_argument("mode", metavar="MODE", choices=("items", "users"), help="items or users")
    cold.add_argument("--data", required=True, help="the regular dataset directory")
    cold.add_argument("--out", required=True, help="dataset directory to write")
    cold.add_argument(
        "--quantile",
        type=float,
        help="cutoff as a quantile of interaction timestamps (default 0.5 for items, 0.8 "
        "for users)",
    )
    cold.add_argument("--cutoff", type=int, help="explicit cutoff timestamp (overrides --quantile)")
    cold.add_argument("--min-cold", type=_positive_int, default=10, help="fewest cold ids")
    cold.add_argument(
        "--min-users", type=_positive_int, default=10, help="fewest users scored on cold ids"
    )
    cold.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cold.set_defaults(func=run_cold)

    imp = commands.add_parser(
        "import",
        help="import your own interactions (CSV, TSV, Parquet, JSON lines) as a dataset",
        description="Import interactions, and optionally item and user tables, as a dataset "
        "directory (fixed split protocol, atomic write). The feature schema is --schema or "
        "inferred from the column types; it is printed and written as DIR/schema.json and "
        "DIR/schema.yaml, either of which --schema reads back. See docs/own-data.md.",
    )
    imp.add_argument("--interactions", required=True, metavar="PATH", help="interactions file")
    imp.add_argument("--items", metavar="PATH", help="item table (one row per item)")
    imp.add_argument("--users", metavar="PATH", help="user table (one row per user)")
    imp.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    imp.add_argument(
        "--schema",
        metavar="FILE",
        help="feature schema: YAML, or the schema.json/schema.yaml of an earlier import "
        "(default: inferred)",
    )
    imp.add_argument(
        "--user-col", metavar="C", default="user_id", help="user id column (default user_id)"
    )
    imp.add_argument(
        "--item-col", metavar="C", default="item_id", help="item id column (default item_id)"
    )
    imp.add_argument(
        "--time-col",
        metavar="C",
        default="timestamp",
        help="time column: epoch seconds or ISO-8601 (default timestamp)",
    )
    imp.add_argument(
        "--missing-items",
        choices=MISSING_POLICIES,
        default="error",
        help="interactions whose item is not in --items: error (default), drop them, or add "
        "the items with null features",
    )
    imp.add_argument(
        "--missing-users",
        choices=MISSING_POLICIES,
        default="error",
        help="the same for users missing from --users",
    )
    imp.add_argument(
        "--format",
        choices=IMPORT_FORMATS,
        help="format of every input (default: from each extension)",
    )
    imp.add_argument("--name", help="dataset name (default: the schema's, else DIR's name)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp.set_defaults(func=run_import)

    summary = commands.add_parser(
        "summary", help="print the summary of a dataset", description="Summarize a dataset."
    )
    summary.add_argument("dir", metavar="DIR", help="dataset directory")
    summary.set_defaults(func=run_summary)


def run_prepare(args: argparse.Namespace) -> int:
    """`retrieval data prepare NAME --out DIR [--source PATH] [--overwrite]`."""
    from retrieval.data.dataset import format_summary, summarize
    from retrieval.data.movielens import prepare_movielens

    start = time.perf_counter()
    dataset = prepare_movielens(
        args.out, name=args.name, source=args.source, overwrite=args.overwrite
    )
    elapsed = time.perf_counter() - start
    print(format_summary(summarize(dataset)))
    print(f"prepared {args.name} in {elapsed:.2f} s")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    """`retrieval data synth --items N --users M --interactions K --seed S --out DIR`."""
    from retrieval.data.synthetic import generate_synthetic_dataset

    start = time.perf_counter()
    stats: dict[str, Any] = generate_synthetic_dataset(
        args.out,
        num_items=args.items,
        num_users=args.users,
        num_interactions=args.interactions,
        seed=args.seed,
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    print(f"generated {args.out} in {elapsed:.2f} s")
    return 0


def run_summary(args: argparse.Namespace) -> int:
    """`retrieval data summary DIR`."""
    from retrieval.data.dataset import format_summary, load_dataset, summarize

    print(format_summary(summarize(load_dataset(args.dir))))
    return 0


def run_cold(args: argparse.Namespace) -> int:
    """`retrieval data cold MODE --data DIR --out DIR [--quantile Q | --cutoff T]`."""
    from retrieval.data.cold import cold_spec, make_cold_dataset
    from retrieval.data.dataset import format_summary, summarize

    dataset = make_cold_dataset(
        args.data,
        args.out,
        args.mode,
        quantile=args.quantile,
        cutoff=args.cutoff,
        min_cold=args.min_cold,
        min_users=args.min_users,
        overwrite=args.overwrite,
    )
    spec = cold_spec(dataset) or {}
    print(format_summary(summarize(dataset)))
    print(
        f"cold {args.mode}: {len(spec['ids'])} first seen after {spec['cutoff_timestamp']}; "
        f"{spec['scored_interactions']} test interactions of {spec['scored_users']} users "
        f"scored; {spec['dropped_interactions']} train/valid interactions dropped"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    """`retrieval data import --interactions PATH [--items PATH] [--users PATH] --out DIR
    [--schema FILE] [--user-col C] [--item-col C] [--time-col C] [--missing-items POLICY]`."""
    from retrieval.data.dataset import format_summary, summarize
    from retrieval.data.importer import SCHEMA_YAML_FILE, import_dataset
    from retrieval.features import SCHEMA_FILE

    start = time.perf_counter()
    result = import_dataset(
        args.out,
        args.interactions,
        items=args.items,
        users=args.users,
        schema=args.schema,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        missing_items=args.missing_items,
        missing_users=args.missing_users,
        file_format=args.format,
        name=args.name,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    for note in result.notes:
        print(f"note: {note}")
    print(f"# schema ({'inferred' if result.inferred else 'from ' + args.schema})")
    print(result.schema.to_yaml(), end="")
    print(format_summary(summarize(result.dataset)))
    stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result.timings.items())
    print(
        f"schema written to {args.out}/{SCHEMA_FILE} and {args.out}/{SCHEMA_YAML_FILE}; "
        f"edit either and pass it back with --schema"
    )
    print(f"imported {args.interactions} in {elapsed:.2f} s ({stages})")
    return 0
