"""Rows 9-13 of the reliability suite: what the running service does with bad index versions
and bad model bundles, and hot swaps every few hundred milliseconds under load.

Every bad version is published the way a real one is (a directory under versions/, then
CURRENT replaced) to a live service; the swap must be refused, logged and counted while
the old version keeps serving and readiness stays up.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import pickle
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from reliability_fixtures import run_load
from service_fixtures import (
    LiveServer,
    ids_by_version,
    live_server,
    set_current,
    slow_embed,
    wait_until,
    write_subset_version,
)

from retrieval.atomic import sha256_file
from retrieval.bundle import load_bundle
from retrieval.index_store import (
    IDS_FILE,
    INDEX_FILE,
    load_index_version,
    read_current,
    version_path,
    write_index_version,
)
from service.settings import ServiceSettings


def copy_version(root: Path, source: str, name: str, dest_root: Path | None = None) -> Path:
    """A copy of version `source` named `name` (manifest renamed), under `dest_root`/versions."""
    dst = version_path(root, name) if dest_root is None else dest_root / name
    shutil.copytree(version_path(root, source), dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def resign(path: Path, *files: str) -> None:
    """Record the current sha256 of `files` in the version's manifest (a forger's move)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for rel in files:
        manifest["files"][rel] = sha256_file(path / rel)
    (path / "manifest.json").write_text(json.dumps(manifest))


def assert_refused_and_still_serving(
    server: LiveServer, root: Path, bad: str, old: str, reason: str
) -> None:
    """CURRENT -> `bad`: the swap fails with `reason`, `old` keeps serving, ready, counted."""
    manager = server.services.index_manager
    failed = manager.swaps_failed
    set_current(root, bad)
    assert wait_until(lambda: manager.swaps_failed > failed, 10), f"{bad} was not attempted"
    assert reason in (manager.last_error or ""), manager.last_error
    answer = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5})
    assert answer.status_code == 200 and answer.json()["index_version"] == old
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'retrieval_index_swaps_total{{result="failed"}} {failed + 1}.0' in metrics
    assert f'retrieval_index_version_info{{version="{old}"}} 1.0' in metrics


# --------------------------------------------------------------------------- row 10


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("target", "damage"),
    [(INDEX_FILE, truncate), (IDS_FILE, truncate)],
    ids=["truncated-index", "truncated-ids"],
)
def test_row10_truncated_version_is_refused_and_the_old_one_serves(
    make_settings: Callable[..., ServiceSettings],
    index_copy: Path,
    target: str,
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # (the byte-flipped index is tests/service/test_service_live.py::test_failed_swap_keeps_serving)
    old = read_current(index_copy)
    damage(copy_version(index_copy, old, "v-damaged") / target)
    with live_server(make_settings(index_root=index_copy)) as server:
        assert_refused_and_still_serving(server, index_copy, "v-damaged", old, "checksum mismatch")
    assert any("index swap to v-damaged failed" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- row 11


def test_row11_paths_leaving_the_index_root_are_refused_and_logged(
    make_settings: Callable[..., ServiceSettings],
    index_copy: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = read_current(index_copy)
    # a manifest whose index file is another directory's (checksums right: only the path is bad)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(version_path(index_copy, old) / INDEX_FILE, outside / INDEX_FILE)
    escaping = copy_version(index_copy, old, "v-escape")
    (escaping / INDEX_FILE).unlink()
    manifest = json.loads((escaping / "manifest.json").read_text())
    rel = os.path.relpath(outside / INDEX_FILE, escaping)
    manifest["index"]["index_file"] = rel
    manifest["files"] = {
        rel: sha256_file(outside / INDEX_FILE),
        IDS_FILE: manifest["files"][IDS_FILE],
    }
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    # a version directory that is a symbolic link to a complete version outside the root
    copy_version(index_copy, old, "v-linked", dest_root=tmp_path)
    os.symlink(tmp_path / "v-linked", version_path(index_copy, "v-linked"))
    # a version whose index file is a symbolic link to an identical file outside
    linked_file = copy_version(index_copy, old, "v-linked-file")
    (linked_file / INDEX_FILE).unlink()
    os.symlink(outside / INDEX_FILE, linked_file / INDEX_FILE)

    caplog.set_level(logging.ERROR, logger="service.index_manager")
    with live_server(make_settings(index_root=index_copy)) as server:
        for bad, reason in [
            ("v-escape", "escapes the version"),
            ("v-linked", "must not be a symbolic link"),
            ("v-linked-file", "is a symbolic link"),
        ]:
            assert_refused_and_still_serving(server, index_copy, bad, old, reason)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for bad in ("v-escape", "v-linked", "v-linked-file"):
        assert any(f"index swap to {bad} failed, still serving {old}" in m for m in logged), bad


# --------------------------------------------------------------------------- row 12


def test_row12_wrong_dimension_or_id_count_is_refused(
    make_settings: Callable[..., ServiceSettings], index_copy: Path, tiny_bundle: Path
) -> None:
    old = read_current(index_copy)
    loaded = load_index_version(index_copy, old)
    bundle = load_bundle(tiny_bundle)
    # dim 8 instead of the model's 16, otherwise a perfect version of this model
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((loaded.num_items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_index_version(
        index_copy,
        "v-dim8",
        faiss.IndexFlatIP(8),
        vectors,
        loaded.item_ids,
        manifest_extra={"model": {"checksum": bundle.checksum, "model_version": bundle.version}},
    )
    # one id short, the manifest re-signed so that every checksum holds
    short = copy_version(index_copy, old, "v-short-ids")
    pq.write_table(pa.table({"item_id": loaded.item_ids[:-1]}), short / IDS_FILE)
    resign(short, IDS_FILE)
    with live_server(make_settings(index_root=index_copy)) as server:
        assert_refused_and_still_serving(server, index_copy, "v-dim8", old, "has dim 8")
        expected = f"expected {loaded.num_items} ids; found {loaded.num_items - 1}"
        assert_refused_and_still_serving(server, index_copy, "v-short-ids", old, expected)


# --------------------------------------------------------------------------- row 13


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("resigned", [False, True], ids=["checksum-stale", "re-signed"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_row13_pickled_weights_stop_the_service_without_being_unpickled(
    make_settings: Callable[..., ServiceSettings],
    tiny_bundle: Path,
    tmp_path: Path,
    resigned: bool,
    writer: str,
) -> None:
    # (load_bundle alone: tests/training/test_trainer.py::test_pickle_weights_are_never_unpickled)
    marker = tmp_path / "PWNED"
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    weights = bundle / "weights.safetensors"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    else:
        torch.save({"w": _Payload(marker)}, weights)
    if resigned:
        resign(bundle, "weights.safetensors")
    server = LiveServer(make_settings(model_dir=bundle)).start(wait_ready=False)
    try:
        # the loading fails, /healthz says so, and the server stops by itself
        assert wait_until(lambda: not server.thread.is_alive(), 30)
    finally:
        server.stop()
    error = server.app.state.load_error
    assert error is not None and server.app.state.services is None
    assert ("cannot read weights" if resigned else "checksum mismatch") in error
    assert not marker.exists()  # never unpickled


# --------------------------------------------------------------------------- row 9 (short)

QUERIES: list[dict[str, Any]] = [
    {"gender": "F", "history": ["m 001/x"]},
    {"gender": "M", "occupation": "artist", "history": ["m 004/x", "m 010/x"]},
    {"age_bucket": "35-44", "zip_prefix": "30"},
]


def test_row9_short_swaps_every_300ms_under_load_lose_nothing(
    make_settings: Callable[..., ServiceSettings], index_copy: Path, tiny_bundle: Path
) -> None:
    """Short form (make soak runs minutes): 12 swaps across 3 versions, 4 clients."""
    first = read_current(index_copy)
    versions = [
        first,
        write_subset_version(index_copy, "v-half", tiny_bundle, keep_every=2, source=first),
        write_subset_version(index_copy, "v-third", tiny_bundle, keep_every=3, source=first),
    ]
    expected = ids_by_version(tiny_bundle, index_copy, versions, 10, QUERIES)
    settings = make_settings(index_root=index_copy, index_poll_s=0.05)
    with live_server(settings) as server:
        manager = server.services.index_manager
        undo = slow_embed(server.services, 0.002)  # batches overlap the swaps
        released: list[weakref.ref[Any]] = []

        async def scenario() -> list[Any]:
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(
                    server.url,
                    lambda i: (str(i % 3), {"query": QUERIES[i % 3], "k": 10}),
                    clients=4,
                    stop=stop,
                )
            )
            for swap in range(1, 13):
                target = versions[swap % 3]
                released.append(weakref.ref(manager.current))
                set_current(index_copy, target)
                deadline = asyncio.get_running_loop().time() + 10
                while manager.current.version != target:
                    assert asyncio.get_running_loop().time() < deadline, "swap not picked up"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
            stop.set()
            return await load

        outcomes = asyncio.run(scenario())
        undo()
        assert manager.swaps_ok >= 13 and manager.swaps_failed == 0
    assert len(outcomes) > 100
    assert all(o.status == 200 for o in outcomes), {o.status for o in outcomes}
    seen = set()
    for outcome in outcomes:  # one version per answer, and exactly that version's answer
        version = outcome.body["index_version"]
        seen.add(version)
        assert outcome.body["ids"] == expected[version][int(outcome.kind)]
    assert seen == set(versions)
    gc.collect()
    alive = [ref for ref in released if ref() is not None]
    assert not alive, f"{len(alive)} swapped-out index versions are still referenced"
