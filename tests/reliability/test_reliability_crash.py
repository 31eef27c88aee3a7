"""Rows 14 and 25 of the reliability suite. Row 14 (short form): the index job and the
training job SIGKILLed at random moments; what is published is always complete and
loadable, and the next run removes the dead run's temporaries (`make soak` kills 50
times). Row 25: a training run started after one that died between the two renames of its
bundle write detects that state at its start, before any training."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from index_fixtures import NUM_ITEMS, make_index_dataset, make_random_bundle
from tiny_data import tiny_train_config

from index.build import BuildOptions, build_index
from retrieval.atomic import atomic_directory, recover_interrupted_replace, remove_stale_temporaries
from retrieval.bundle import load_bundle
from retrieval.index_store import list_versions, load_index_version, read_current
from training import trainer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INDEX_KILLS = 4
TRAIN_KILLS = 2


def run_and_kill(command: list[str], at_s: float | None) -> tuple[int, float]:
    """Run `command`; SIGKILL it `at_s` seconds in (None: let it finish). (status, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=at_s if at_s is not None else 300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode, time.monotonic() - started


def assert_published_state_is_complete(root: Path, before: str, existed: set[str]) -> str:
    """After a run that started with CURRENT = `before` and the versions `existed`:
    CURRENT is still `before`, or it names a new version that run published whole (not one
    that existed before, and whose manifest names `before` as the CURRENT it replaced);
    CURRENT loads with every checksum right, and so does every version directory (no
    partial version visible). Returns CURRENT."""
    current = load_index_version(root)  # verifies every file against the manifest
    assert current.num_items == NUM_ITEMS
    if current.version != before:  # the kill came after the new CURRENT was in place
        assert current.version not in existed, (current.version, before)
        assert current.manifest["build"]["previous_current"] == before, current.manifest["build"]
    for info in list_versions(root):
        assert info.manifest is not None, info.error
        load_index_version(root, info.name)
    return current.version


def version_names(root: Path) -> set[str]:
    return {info.name for info in list_versions(root)}


@pytest.fixture(scope="module")
def index_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = make_index_dataset(tmp_path_factory.mktemp("crash-data") / "data")
    return data, make_random_bundle(data, tmp_path_factory.mktemp("crash-model") / "model")


def test_row14_short_index_build_killed_at_random_moments(
    index_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    data, bundle = index_inputs
    root = tmp_path / "index"
    first = build_index(bundle, data, root, BuildOptions(progress=False)).version
    command = [
        sys.executable, "-m", "index", "--model", str(bundle), "--data", str(data),
        "--out", str(root), "--batch-size", "4", "--no-progress", "--keep", "50",
    ]  # fmt: skip
    status, whole = run_and_kill(command, None)  # one full run: how long a build takes
    assert status == 0
    current = assert_published_state_is_complete(root, first, {first})
    assert current != first  # a finished build replaced CURRENT
    rng = random.Random(14)
    killed = 0
    for _ in range(6 * INDEX_KILLS):  # a kill drawn late may find the build finished
        existed = version_names(root)
        status, seconds = run_and_kill(command, rng.uniform(0.0, whole))
        killed += status == -signal.SIGKILL
        if status == 0:
            whole = min(whole, seconds)  # builds got faster (a less busy machine): aim earlier
        after = assert_published_state_is_complete(root, current, existed)
        assert status != 0 or after != current  # a build that finished published its version
        current = after
        if killed == INDEX_KILLS:
            break
    assert killed == INDEX_KILLS
    # the next build cleans what the dead ones left and publishes normally
    existed = version_names(root)
    again = build_index(bundle, data, root, BuildOptions(progress=False, keep=50))
    assert read_current(root) == again.version
    assert not list(root.glob(".tmp-*")) and not list((root / "versions").glob(".tmp-*"))
    assert assert_published_state_is_complete(root, current, existed) == again.version


def test_row14_short_training_killed_at_random_moments(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(epochs=4).to_dict()))
    out = tmp_path / "model"
    command = [
        sys.executable, "-m", "training", "--data", str(tiny_dataset), "--out", str(out),
        "--config", str(config), "--no-progress", "--overwrite",
    ]  # fmt: skip
    status, whole = run_and_kill(command, None)
    assert status == 0
    good = load_bundle(out).version
    rng = random.Random(15)
    for _ in range(TRAIN_KILLS):
        status, _ = run_and_kill(command, rng.uniform(0.3 * whole, whole))
        # the bundle is the old one or a new complete one, never half of one
        assert out.is_dir() and load_bundle(out).version
    # leftovers of the killed runs (if a kill hit a write) go on the next run
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    (tmp_path / ".tmp-model.zzzz").mkdir()  # and one that surely is there
    status, _ = run_and_kill(command, None)
    assert status == 0 and load_bundle(out).version
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], leftovers
    assert good  # the first bundle loaded too


def test_row14_a_kill_between_the_two_renames_loses_no_bundle(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """`atomic_directory(overwrite=True)` moves the old directory aside, then the new one in:
    a kill between the two leaves no bundle at the final path. The next training run puts
    the old one back before it removes temporaries (which would delete it)."""
    shutil.copytree(tiny_bundle, tmp_path / ".tmp-model.old-4242")  # the old, moved aside
    (tmp_path / ".tmp-model.k3j2").mkdir()  # the new one, half written
    final = tmp_path / "model"
    assert recover_interrupted_replace(final) and load_bundle(final).version
    assert remove_stale_temporaries(tmp_path, "model") == [tmp_path / ".tmp-model.k3j2"]
    assert not recover_interrupted_replace(final)  # nothing to do the second time


# --------------------------------------------------------------------------- row 25


class TrainingStarted(Exception):
    """Raised by the first training stage in these tests: what ran before it is the
    start-of-job check."""


def refuse_to_train(monkeypatch: pytest.MonkeyPatch) -> None:
    def prepare_data(*args: object, **kwargs: object) -> None:
        raise TrainingStarted

    monkeypatch.setattr(trainer, "prepare_data", prepare_data)


def killed_between_the_two_renames(bundle: Path, parent: Path) -> Path:
    """The state `atomic_directory(overwrite=True)` leaves when killed after moving the old
    bundle aside and before moving the new one in: no bundle at `parent/model`."""
    shutil.copytree(bundle, parent / ".tmp-model.old-4242-0a1b2c3d")  # the old, moved aside
    shutil.copytree(bundle, parent / ".tmp-model.k3j2")  # the new one, complete but not in
    return parent / "model"


def test_row25_retraining_without_overwrite_is_refused_at_the_start_not_the_end(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = killed_between_the_two_renames(tiny_bundle, tmp_path)
    refuse_to_train(monkeypatch)
    with pytest.raises(FileExistsError, match="an interrupted run had moved it aside"):
        trainer.train(tiny_dataset, out, tiny_train_config(), progress=False)
    # refused before any training, and the old bundle is back where it was
    assert load_bundle(out).version == load_bundle(tiny_bundle).version


def test_row25_retraining_with_overwrite_restores_bundle_and_checkpoint_first(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = killed_between_the_two_renames(tiny_bundle, tmp_path)
    # a checkpoint that a kill between the same two renames of its own write left aside
    (tmp_path / ".tmp-model.ckpt.old-4343-0a1b2c3d").mkdir()
    (tmp_path / ".tmp-model.ckpt.old-4343-0a1b2c3d" / "state.json").write_text("{}")
    refuse_to_train(monkeypatch)
    with pytest.raises(TrainingStarted):
        trainer.train(tiny_dataset, out, tiny_train_config(), progress=False, overwrite=True)
    assert load_bundle(out).version == load_bundle(tiny_bundle).version
    assert (tmp_path / "model.ckpt" / "state.json").is_file()  # put back for the resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.ckpt"]


def test_row25_a_leftover_with_the_aside_name_of_this_process_is_no_obstacle(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A leftover named as the aside of this very pid does not make the final rename fail."""
    final = tmp_path / "model"
    shutil.copytree(tiny_bundle, final)
    leftover = tmp_path / f".tmp-model.old-{os.getpid()}"
    shutil.copytree(tiny_bundle, leftover)
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (final / "new.txt").read_text() == "new" and leftover.is_dir()
