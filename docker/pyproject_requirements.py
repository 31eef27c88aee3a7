"""Print the project's runtime requirements from pyproject.toml, one per line, for an image build.

Usage (what the Dockerfiles run, before the source is copied, so that the dependency layer
is rebuilt only when pyproject.toml changes)::

    python docker/pyproject_requirements.py pyproject.toml --exclude torch > requirements.txt
    python docker/pyproject_requirements.py pyproject.toml --extras gpu \\
        --exclude torch,faiss-cpu > requirements.txt

``--exclude`` drops requirements by project name: torch is installed first, pinned, from
the PyTorch wheel index (a looser requirement resolved from PyPI would pull the CUDA build),
and the GPU image drops faiss-cpu because faiss-cpu and faiss-gpu-cu12 both install the
``faiss`` package into the same directory. ``--extras`` adds optional-dependency groups.
The project itself is then installed with ``pip install --no-deps .``.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pyproject.toml"
    >>> _ = path.write_text('''
    ... [project]
    ... dependencies = ["torch>=2.4", "faiss-cpu>=1.8", "Redis[hiredis]>=5 ; python_version>='3'"]
    ... [project.optional-dependencies]
    ... gpu = ["faiss-gpu-cu12>=1.8"]
    ... ''')
    >>> requirements(path, extras=["gpu"], exclude=["torch", "faiss_cpu"])
    ["Redis[hiredis]>=5 ; python_version>='3'", 'faiss-gpu-cu12>=1.8']
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

# PEP 508: the project name is the leading run of letters, digits, '.', '_' and '-'.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize_name(name: str) -> str:
    """PEP 503 normalised project name.

    >>> normalize_name("Faiss_CPU"), normalize_name("pydantic.settings")
    ('faiss-cpu', 'pydantic-settings')
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement string.

    >>> requirement_name("uvicorn[standard]>=0.29")
    'uvicorn'
    """
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"`requirement` is not a PEP 508 requirement: {requirement!r}")
    return normalize_name(match.group(1))


def requirements(
    pyproject: str | Path, *, extras: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[str]:
    """`[project].dependencies` plus the named extras, minus the excluded project names.

    Raises:
        ValueError: an unknown extra, or an excluded name that matches no requirement
            (a typo there would silently install what the image means to keep out).
    """
    with open(pyproject, "rb") as handle:
        project = tomllib.load(handle)["project"]
    selected = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(
                f"`extras`: no extra {extra!r} in {pyproject}; have {sorted(optional)}"
            )
        selected.extend(optional[extra])
    dropped = {normalize_name(name) for name in exclude}
    unmatched = dropped - {requirement_name(r) for r in selected}
    if unmatched:
        raise ValueError(f"`exclude`: {sorted(unmatched)} match no requirement of {pyproject}")
    return [r for r in selected if requirement_name(r) not in dropped]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("pyproject", type=Path, help="path of pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups")
    parser.add_argument("--exclude", default="", help="comma-separated project names to leave out")
    args = parser.parse_args(argv)
    try:
        lines = requirements(
            args.pyproject, extras=_split(args.extras), exclude=_split(args.exclude)
        )
    except (OSError, KeyError, ValueError) as exc:
        print(f"pyproject_requirements: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
