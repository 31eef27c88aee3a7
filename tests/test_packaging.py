"""Packaging: the FAISS extras, the licence metadata, the lock files, `--version`, exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import metadata, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from retrieval.cli import DISTRIBUTION, EXIT_FAILURE, EXIT_USAGE, UsageError, main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKS = ROOT / "requirements"
# Installed before the locked requirements (Makefile, Dockerfiles), so never in a lock.
NOT_LOCKED = {"torch"}


def _name(requirement: str | Requirement) -> str:
    name = requirement.name if isinstance(requirement, Requirement) else requirement
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(*extras: str) -> list[Requirement]:
    listed = list(PYPROJECT["dependencies"])
    for extra in extras:
        listed += PYPROJECT["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


def _lock(name: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (LOCKS / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[_name(match.group(1))] = Version(match.group(2))
    return pins


# --------------------------------------------------------------------------- FAISS extras


def test_faiss_comes_from_exactly_one_extra() -> None:
    base = {_name(r) for r in _requirements()}
    assert not {n for n in base if n.startswith("faiss")}, "FAISS must not be a base dependency"
    extras = PYPROJECT["optional-dependencies"]
    assert [_name(Requirement(r)) for r in extras["cpu"]] == ["faiss-cpu"]
    gpu = [_name(Requirement(r)) for r in extras["gpu"]]
    assert gpu and all(n.startswith("faiss-gpu") for n in gpu) and "faiss-cpu" not in gpu
    for extra, listed in extras.items():
        if extra == "cpu":
            continue
        names = {_name(Requirement(r)) for r in listed}
        assert "faiss-cpu" not in names, f"extra {extra!r} would install faiss-cpu"
        assert DISTRIBUTION not in names, f"extra {extra!r} refers to the project itself"


def test_installed_metadata_puts_each_faiss_behind_its_extra() -> None:
    found = {}
    for text in requires(DISTRIBUTION) or []:
        requirement = Requirement(text)
        if _name(requirement).startswith("faiss"):
            assert requirement.marker is not None, f"{text}: installed unconditionally"
            cpu = requirement.marker.evaluate({"extra": "cpu"})
            gpu = requirement.marker.evaluate({"extra": "gpu"})
            found[_name(requirement)] = (cpu, gpu)
    assert found["faiss-cpu"] == (True, False)
    assert [v for k, v in found.items() if k.startswith("faiss-gpu")] == [(False, True)]


def test_licence_metadata() -> None:
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert PYPROJECT["license"] == "Apache-2.0"
    assert metadata(DISTRIBUTION)["License-Expression"] == "Apache-2.0"


# --------------------------------------------------------------------------- lock files


@pytest.mark.parametrize(
    ("lock", "extras", "absent"),
    [
        ("runtime.lock", ("cpu",), ("pytest", "recbole", "faiss-gpu-cu12")),
        ("dev.lock", ("cpu", "dev"), ("recbole", "faiss-gpu-cu12")),
    ],
)
def test_lock_satisfies_pyproject(
    lock: str, extras: tuple[str, ...], absent: tuple[str, ...]
) -> None:
    pins = _lock(lock)
    for requirement in _requirements(*extras):
        name = _name(requirement)
        if name in NOT_LOCKED:
            assert name not in pins
            continue
        assert name in pins, f"{lock}: {requirement} is not pinned (run `make lock`)"
        assert pins[name] in requirement.specifier, f"{lock}: {name}=={pins[name]} vs {requirement}"
    for name in (*absent, *NOT_LOCKED):
        assert name not in pins, f"{lock} must not hold {name}"


def test_floors_lock_pins_every_floor() -> None:
    """floors.lock holds each direct dependency at the lowest version pyproject allows."""
    pins = _lock("floors.lock")
    runtime = {_name(r) for r in _requirements("cpu")}
    for requirement in _requirements("cpu", "dev"):
        name = _name(requirement)
        if name in NOT_LOCKED:
            continue
        floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
        if not floors:
            assert name not in runtime, f"{requirement}: a runtime dependency needs a floor"
            continue  # a test-only tool (type stubs) at any version
        assert pins[name] == max(floors), f"floors.lock: {name}=={pins[name]}, floor {max(floors)}"


# --------------------------------------------------------------------------- the command line


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"retrieval {metadata(DISTRIBUTION)['Version']}"


def test_exit_status_runtime_1_usage_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The command ran and failed: 1.
    assert main(["data", "summary", str(tmp_path / "missing")]) == EXIT_FAILURE == 1
    assert "dataset directory not found" in capsys.readouterr().err
    # A flag value refused after parsing: 2.
    assert main(["serve", "--model", "m", "--index", "i", "--max-batch-size", "0"]) == EXIT_USAGE
    # argparse's own refusal: 2 as well.
    with pytest.raises(SystemExit) as exc:
        main(["data", "summary"])
    assert exc.value.code == EXIT_USAGE == 2
    assert issubclass(UsageError, Exception)


def test_exit_status_of_the_installed_command(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "retrieval"]
    failed = subprocess.run(
        [*command, "data", "summary", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    usage = subprocess.run(
        [*command, "no-such-command"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
