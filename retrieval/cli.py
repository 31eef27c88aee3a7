"""The `retrieval` command line.

Usage::

    retrieval data prepare ml-100k --out data/ml-100k
    retrieval data synth --items 1000000 --users 100000 --interactions 5000000 --seed 0 --out data/synth-1m
    retrieval --help
    retrieval --version

Exit status: 0 on success, 1 when the command ran and failed (`CommandError`, a missing
file, bad data), 2 when the command line is wrong (argparse, `UsageError`).

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
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TypeAlias

logger = logging.getLogger(__name__)

# The subcommand table a `retrieval.commands` entry point adds its subcommand to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Register: TypeAlias = Callable[[Subparsers], None]


DISTRIBUTION = "two-tower-retrieval"
EXIT_FAILURE = 1  # the command ran and failed: missing file, bad data, unreachable Redis
EXIT_USAGE = 2  # the command line itself is wrong (argparse's status for the same)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CommandError(Exception):
    """A runtime failure: printed as one line, exit status 1 (`EXIT_FAILURE`), no traceback."""


class UsageError(CommandError):
    """A flag value or combination the command refuses (found after parsing): exit status 2."""


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrieval",
        description="Two-tower candidate retrieval: data, training, index, evaluation, service.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group="retrieval.commands"), key=lambda e: e.name):
        try:
            register: Register = entry.load()
        except (ImportError, AttributeError) as exc:
            # A subcommand whose package is missing must not take the others down.
            hint = ""
            if isinstance(exc, ModuleNotFoundError) and exc.name == "faiss":
                hint = f" (install {DISTRIBUTION}[cpu] for faiss-cpu, or [gpu] for faiss-gpu)"
            print(f"retrieval: subcommand {entry.name!r} unavailable: {exc}{hint}", file=sys.stderr)
            continue
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return EXIT_USAGE
    try:
        result = func(args)
    except UsageError as exc:
        print(f"retrieval {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"retrieval {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"retrieval {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
