"""Rows 9-13 and 22-24 of the reliability suite: what the running service does with bad
index versions and bad model bundles, and hot swaps every few hundred milliseconds under load.

Every bad version is published the way a real one is (a directory under versions/, then
CURRENT replaced) to a live service; the swap must be refused, logged and counted while
the old version keeps serving and readiness stays up. Bad versions are re-signed (every
sha256 of the manifest right) wherever a checksum would otherwise refuse them, so that
only the check under test can.
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
    build_flat_index,
    ids_by_version,
    live_server,
    set_current,
    slow_embed,
    wait_until,
    write_subset_version,
)

from index import build as index_build
from retrieval.atomic import sha256_file
from retrieval.bundle import load_bundle, save_bundle
from retrieval.index_store import (
    CURRENT_FILE,
    IDS_FILE,
    INDEX_FILE,
    load_index_version,
    read_current,
    reconstruct_all,
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
    # id tables of the right length that the serving path cannot use, each re-signed
    ids = loaded.item_ids.to_pylist()
    bad_ids = {
        "v-duplicate-id": (pa.array([*ids[:-1], ids[0]]), "1 item ids occur more than once"),
        "v-null-id": (pa.array([*ids[:3], None, *ids[4:]]), "1 `item_id` values are null"),
        "v-int64-ids": (
            pa.array(np.arange(loaded.num_items, dtype=np.int64)),
            "must be strings (string or large_string); got type int64",
        ),
    }
    for name, (column, _) in bad_ids.items():
        write_ids(copy_version(index_copy, old, name), column)
    # the same ids as large_string: a type the service serves
    write_ids(copy_version(index_copy, old, "v-large-string"), pa.array(ids, pa.large_string()))
    with live_server(make_settings(index_root=index_copy)) as server:
        assert_refused_and_still_serving(server, index_copy, "v-dim8", old, "has dim 8")
        expected = f"expected {loaded.num_items} ids; found {loaded.num_items - 1}"
        assert_refused_and_still_serving(server, index_copy, "v-short-ids", old, expected)
        for name, (_, reason) in bad_ids.items():
            assert_refused_and_still_serving(server, index_copy, name, old, reason)
        manager = server.services.index_manager
        set_current(index_copy, "v-large-string")
        assert wait_until(lambda: manager.current.version == "v-large-string", 10)
        answer = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5}).json()
        assert answer["index_version"] == "v-large-string" and set(answer["ids"]) <= set(ids)


def write_ids(version: Path, column: pa.Array) -> None:
    """Replace the version's id table by `column` and re-sign it."""
    pq.write_table(pa.table({"item_id": column}), version / IDS_FILE)
    resign(version, IDS_FILE)


# --------------------------------------------------------------------------- row 13


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def record_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of a pickle loader (`pickle.load`/`loads`, `torch.load`) is recorded, then
    passed through: a loader that called one would run the payload and leave its marker."""
    calls: list[str] = []

    def recording(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(pickle, "load", recording("pickle.load", pickle.load))
    monkeypatch.setattr(pickle, "loads", recording("pickle.loads", pickle.loads))
    torch_load = recording("torch.load", torch.load)
    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(torch.serialization, "load", torch_load)
    return calls


@pytest.mark.parametrize("resigned", [False, True], ids=["checksum-stale", "re-signed"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_row13_pickled_weights_stop_the_service_without_being_unpickled(
    make_settings: Callable[..., ServiceSettings],
    tiny_bundle: Path,
    tmp_path: Path,
    resigned: bool,
    writer: str,
    monkeypatch: pytest.MonkeyPatch,
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
    # the payload is live: the pickle loaders would run it (checked on a copy)
    live = tmp_path / "live-copy"
    shutil.copy(weights, live)
    (
        pickle.loads(live.read_bytes())
        if writer == "pickle"
        else torch.load(live, weights_only=False)
    )
    assert marker.exists()
    marker.unlink()

    calls = record_unpickling(monkeypatch)
    with pytest.raises(ValueError, match="cannot read weights" if resigned else "checksum"):
        load_bundle(bundle)
    assert calls == [] and not marker.exists()  # the loader never reaches a pickle loader
    server = LiveServer(make_settings(model_dir=bundle)).start(wait_ready=False)
    try:
        # the loading fails, /healthz says so, and the server stops by itself
        assert wait_until(lambda: not server.thread.is_alive(), 30)
    finally:
        server.stop()
    error = server.app.state.load_error
    assert error is not None and server.app.state.services is None
    assert ("cannot read weights" if resigned else "checksum mismatch") in error
    assert calls == [] and not marker.exists()  # never unpickled


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


# --------------------------------------------------------------------------- row 22


def write_faiss(version: Path, index: faiss.Index) -> None:
    """Replace the version's index file by `index` and re-sign it."""
    faiss.write_index(index, str(version / INDEX_FILE))
    resign(version, INDEX_FILE)


def labelled_versions(root: Path, old: str) -> dict[str, str]:
    """Versions whose files, counts, dims and metric are all right (re-signed), but whose
    search labels are not rows of the id table, or whose vectors are not finite; name ->
    the reason the load must give."""
    loaded = load_index_version(root, old)
    vectors = reconstruct_all(loaded.index)  # (N, D)
    n, dim = vectors.shape
    # an id map whose ids ARE the row positions: only the index type can refuse it
    idmap = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    idmap.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    write_faiss(copy_version(root, old, "v-idmap"), idmap)
    idmap2 = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    idmap2.add_with_ids(vectors, np.arange(n, dtype=np.int64) + 1000)
    write_faiss(copy_version(root, old, "v-idmap2"), idmap2)
    # no id map, but an IVF given ids of its own (labels 1000..): only the probe sees it
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 2, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add_with_ids(vectors, np.arange(n, dtype=np.int64) + 1000)
    ivf.nprobe = 2
    write_faiss(copy_version(root, old, "v-ivf-foreign-labels"), ivf)
    # NaN vectors: every score NaN (or nothing found)
    nan = faiss.IndexFlatIP(dim)
    nan.add(np.full_like(vectors, np.nan))
    write_faiss(copy_version(root, old, "v-nan-vectors"), nan)
    return {
        "v-idmap": "the index is an id map (IndexIDMap)",
        "v-idmap2": "the index is an id map (IndexIDMap2)",
        "v-ivf-foreign-labels": "outside the id table's rows [0, ",
        "v-nan-vectors": "probe search",
    }


def test_row22_versions_whose_labels_are_not_rows_are_refused_before_the_swap(
    make_settings: Callable[..., ServiceSettings],
    index_copy: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = read_current(index_copy)
    reasons = labelled_versions(index_copy, old)
    caplog.set_level(logging.ERROR, logger="service.index_manager")
    with live_server(make_settings(index_root=index_copy)) as server:
        for bad, reason in reasons.items():
            assert_refused_and_still_serving(server, index_copy, bad, old, reason)
    logged = [r.getMessage() for r in caplog.records if r.name == "service.index_manager"]
    for bad in reasons:
        assert sum(f"index swap to {bad} failed, still serving {old}" in m for m in logged) == 1


def test_row22_the_same_checks_refuse_a_bad_version_at_start_up(
    make_settings: Callable[..., ServiceSettings], index_copy: Path
) -> None:
    labelled_versions(index_copy, read_current(index_copy))
    set_current(index_copy, "v-idmap")
    server = LiveServer(make_settings(index_root=index_copy)).start(wait_ready=False)
    try:  # no version to fall back on: the service does not start
        assert wait_until(lambda: not server.thread.is_alive(), 30)
    finally:
        server.stop()
    assert server.app.state.services is None
    assert "IndexIDMap" in (server.app.state.load_error or "")


# --------------------------------------------------------------------------- row 23


def test_row23_info_shows_the_loaded_checksum_after_the_model_dir_is_removed(
    make_settings: Callable[..., ServiceSettings], tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "model"
    shutil.copytree(tiny_bundle, bundle)
    checksum = sha256_file(bundle / "manifest.json")
    with live_server(make_settings(model_dir=bundle)) as server:
        shutil.rmtree(bundle)  # e.g. a deploy removed it; the service keeps its model
        info = httpx.get(f"{server.url}/v1/info")
        assert info.status_code == 200, info.text
        assert info.json()["model"]["checksum"] == checksum
        answer = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5})
        assert answer.status_code == 200


def overwrite_with_another_bundle(bundle: Path, tmp_path: Path) -> str:
    """Replace the bundle directory by another bundle (same weights, other metrics, so
    another manifest) the way an overwriting training run does; returns the new checksum."""
    loaded = load_bundle(bundle)
    other = save_bundle(
        tmp_path / "other-model", loaded.model, loaded.encoder, train_config={}, metrics={"x": 1}
    )
    shutil.rmtree(bundle)
    shutil.copytree(other, bundle)
    return sha256_file(bundle / "manifest.json")


def test_row23_a_loaded_bundle_keeps_its_checksum_when_its_directory_is_overwritten(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "model"
    shutil.copytree(tiny_bundle, bundle)
    checksum = sha256_file(bundle / "manifest.json")
    loaded = load_bundle(bundle)
    assert loaded.checksum == checksum
    assert overwrite_with_another_bundle(bundle, tmp_path) != checksum
    assert loaded.checksum == checksum and loaded.version == load_bundle(tiny_bundle).version


def test_row23_an_index_names_the_bundle_it_embedded_with_even_if_overwritten_meanwhile(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "model"
    shutil.copytree(tiny_bundle, bundle)
    checksum = sha256_file(bundle / "manifest.json")
    replaced: list[str] = []
    original = index_build.open_catalog

    def open_catalog_then_overwrite(*args: Any, **kwargs: Any) -> Any:
        catalog = original(*args, **kwargs)  # the bundle is loaded by now
        replaced.append(overwrite_with_another_bundle(bundle, tmp_path))
        return catalog

    monkeypatch.setattr(index_build, "open_catalog", open_catalog_then_overwrite)
    root = tmp_path / "index"
    build_flat_index(bundle, tiny_dataset, root)
    manifest = load_index_version(root).manifest
    assert replaced and replaced[0] != checksum
    assert manifest["model"]["checksum"] == checksum  # the bundle that embedded the catalog


# --------------------------------------------------------------------------- row 24


def drop_manifest_key(version: Path) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["index"]["dim"]  # KeyError where the loader reads it
    (version / "manifest.json").write_text(json.dumps(manifest))


def model_section_a_list(version: Path) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["model"] = [manifest["model"]]  # AttributeError: a list has no .get
    (version / "manifest.json").write_text(json.dumps(manifest))


def ids_section_a_list(version: Path) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["ids"] = [manifest["ids"]]  # AttributeError inside the checksum check
    (version / "manifest.json").write_text(json.dumps(manifest))


def assert_counted_and_logged_once(
    server: LiveServer, caplog: pytest.LogCaptureFixture, failed: int, old: str
) -> None:
    """Ten more polls of CURRENT after the failure: still one failure counted, one log line
    (no traceback), the old version serving, ready."""
    manager = server.services.index_manager
    assert wait_until(lambda: manager.swaps_failed > failed, 10), "the failure was not counted"
    checks = manager.checks
    assert wait_until(lambda: manager.checks >= checks + 10, 10)
    assert manager.swaps_failed == failed + 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'retrieval_index_swaps_total{{result="failed"}} {failed + 1}.0' in metrics
    answer = httpx.post(f"{server.url}/v1/retrieve", json={"query": {}, "k": 5})
    assert answer.status_code == 200 and answer.json()["index_version"] == old
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    records = [r for r in caplog.records if r.name == "service.index_manager"]
    errors = [r for r in records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "failed, still serving" in errors[0].getMessage()
    assert not any(r.exc_info for r in records), "a traceback was logged"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (drop_manifest_key, "KeyError: 'dim'"),
        (model_section_a_list, "was built from model bundle None"),
        (ids_section_a_list, "AttributeError"),
    ],
    ids=["manifest-missing-key", "model-section-a-list", "ids-section-a-list"],
)
def test_row24_a_malformed_manifest_is_one_counted_failure(
    make_settings: Callable[..., ServiceSettings],
    index_copy: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    old = read_current(index_copy)
    damage(copy_version(index_copy, old, "v-malformed"))
    caplog.set_level(logging.INFO, logger="service.index_manager")
    with live_server(make_settings(index_root=index_copy)) as server:
        manager = server.services.index_manager
        failed = manager.swaps_failed
        caplog.clear()
        set_current(index_copy, "v-malformed")
        assert_counted_and_logged_once(server, caplog, failed, old)
        assert reason in (manager.last_error or ""), manager.last_error


def test_row24_a_current_file_that_is_not_utf8_is_one_counted_failure(
    make_settings: Callable[..., ServiceSettings],
    index_copy: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = read_current(index_copy)
    caplog.set_level(logging.INFO, logger="service.index_manager")
    with live_server(make_settings(index_root=index_copy)) as server:
        manager = server.services.index_manager
        failed = manager.swaps_failed
        caplog.clear()
        tmp = index_copy / ".tmp-current-bad"
        tmp.write_bytes(b"\xff\xfe" + old.encode() + b"\n")
        tmp.replace(index_copy / CURRENT_FILE)
        assert_counted_and_logged_once(server, caplog, failed, old)
        assert "not UTF-8" in (manager.last_error or ""), manager.last_error
        # CURRENT put right: the next version swaps in as usual
        copy_version(index_copy, old, "v-next")
        set_current(index_copy, "v-next")
        assert wait_until(lambda: manager.current.version == "v-next", 10)
