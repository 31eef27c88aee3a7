"""The `retrieval` command line.

Usage::

    retrieval data prepare ml-100k --out data/ml-100k
    retrieval data synth --items 1000000 --users 100000 --interactions 5000000 --seed 0 --out data/synth-1m
    retrieval --help

Each package contributes its subcommands through the ``retrieval.commands`` entry-point
group (see pyproject.toml): an entry point is a function ``register_<command>(subparsers:
Subparsers)`` that adds one subcommand and sets ``func`` on it. The library therefore
imports none of the jobs, and a subcommand imports its heavy dependencies only when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TypeAlias

logger = logging.getLogger(__name__)

# The subcommand table a `retrieval.commands` entry point adds its subcommand to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Register: TypeAlias = Callable[[Subparsers], None]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval",
        description="Two-tower candidate retrieval: data, training, index, evaluation, service.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group="retrieval.commands"), key=lambda e: e.name):
        try:
            register: Register = entry.load()
        except (ImportError, AttributeError) as exc:
            # A subcommand whose package is missing must not take the others down.
            print(f"retrieval: subcommand {entry.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    try:
        result = func(args)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"retrieval {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retrieval {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
