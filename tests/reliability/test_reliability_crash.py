"""Row 14 of the reliability suite (short form): the index job and the training job SIGKILLed
at random moments; what is published is always complete and loadable, and the next run
removes the dead run's temporaries. `make soak` kills 50 times."""

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
from retrieval.atomic import recover_interrupted_replace, remove_stale_temporaries
from retrieval.bundle import load_bundle
from retrieval.index_store import list_versions, load_index_version, read_current

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


def assert_published_state_is_complete(root: Path, published: set[str]) -> None:
    """CURRENT names a version that loads with every checksum right, and every version
    directory that exists is one that was published whole (no partial version visible)."""
    current = load_index_version(root)  # verifies every file against the manifest
    assert current.num_items == NUM_ITEMS and current.version in published | {current.version}
    for info in list_versions(root):
        assert info.manifest is not None, info.error
        load_index_version(root, info.name)


@pytest.fixture(scope="module")
def index_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = make_index_dataset(tmp_path_factory.mktemp("crash-data") / "data")
    return data, make_random_bundle(data, tmp_path_factory.mktemp("crash-model") / "model")


def test_row14_short_index_build_killed_at_random_moments(
    index_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    data, bundle = index_inputs
    root = tmp_path / "index"
    published = {build_index(bundle, data, root, BuildOptions(progress=False)).version}
    command = [
        sys.executable, "-m", "index", "--model", str(bundle), "--data", str(data),
        "--out", str(root), "--batch-size", "4", "--no-progress", "--keep", "50",
    ]  # fmt: skip
    status, whole = run_and_kill(command, None)  # one full run: how long a build takes
    assert status == 0
    published.add(read_current(root))
    rng = random.Random(14)
    killed = 0
    for _ in range(6 * INDEX_KILLS):  # a kill drawn late may find the build finished
        status, seconds = run_and_kill(command, rng.uniform(0.0, whole))
        killed += status == -signal.SIGKILL
        if status == 0:
            published.add(read_current(root))
            whole = min(whole, seconds)  # builds got faster (a less busy machine): aim earlier
        assert_published_state_is_complete(root, published)
        if killed == INDEX_KILLS:
            break
    assert killed == INDEX_KILLS
    # the next build cleans what the dead ones left and publishes normally
    again = build_index(bundle, data, root, BuildOptions(progress=False, keep=50))
    assert read_current(root) == again.version
    assert not list(root.glob(".tmp-*")) and not list((root / "versions").glob(".tmp-*"))
    assert_published_state_is_complete(root, published | {again.version})


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
