"""The index build job end to end on a 600-item catalog with a random model bundle: round
trip against the towers' own exact ranking, recall gate, bad input, crash safety."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from index_fixtures import NUM_ITEMS, make_random_bundle, odd_item_id, write_catalog_variant

from index.build import BuildOptions, RecallGateError, build_index
from index.publish import IndexBuildError, root_lock
from retrieval import index_format
from retrieval.bundle import load_bundle
from retrieval.index_store import list_versions, load_index_version, read_current
from retrieval.ranking import exact_top_k

QUIET = {"progress": False, "recall_queries": 40}


def build(bundle: Path, data: Path, root: Path, **options: object):
    return build_index(bundle, data, root, BuildOptions(**{**QUIET, **options}))  # type: ignore[arg-type]


def reference_embeddings(bundle_dir: Path, data_dir: Path) -> np.ndarray:
    """Item embeddings computed directly by the towers over the whole catalog at once."""
    bundle = load_bundle(bundle_dir)
    items = pq.read_table(data_dir / "items.parquet")
    with torch.inference_mode():
        return bundle.model.embed_items(bundle.encoder.encode_items(items)).numpy()


def test_flat_build_round_trip_equals_exact(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    result = build(index_bundle, index_data, tmp_path, batch_size=128)  # 5 batches
    assert read_current(tmp_path) == result.version
    version = load_index_version(tmp_path)
    manifest = version.manifest
    bundle = load_bundle(index_bundle)
    assert manifest["index"]["factory"] == "Flat" and manifest["index"]["metric"] == "inner_product"
    assert manifest["model"]["checksum"] == bundle.checksum
    assert manifest["model"]["model_version"] == bundle.version
    assert manifest["model"]["output_dim"] == version.dim == 16
    assert manifest["catalog"]["num_items"] == version.num_items == NUM_ITEMS
    assert manifest["recall"]["k"] == NUM_ITEMS and manifest["recall"]["recall"] == 1.0
    assert manifest["recall"]["passed"] and not manifest["recall"]["forced"]
    assert set(manifest["files"]) == {"index.faiss", "ids.parquet"}

    items = reference_embeddings(index_bundle, index_data)
    queries = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    scores, rows = version.search(queries, k=50)
    ref_scores, ref_rows = exact_top_k(torch.from_numpy(queries), torch.from_numpy(items), 50)
    np.testing.assert_array_equal(rows, ref_rows.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-5)
    # string ids with odd characters come back as the catalog wrote them
    ids, _ = version.search_ids(queries[:1], k=3)
    assert ids == [[odd_item_id(r) for r in ref_rows[0, :3].tolist()]]


def test_ivf_tuned_search_params_are_stored(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    result = build(index_bundle, index_data, tmp_path, factory="IVF16,Flat", recall_floor=0.9)
    manifest = result.manifest
    params = manifest["index"]["search_params"]
    assert set(params) == {"nprobe"} and 8 <= params["nprobe"] <= 16
    assert manifest["recall"]["recall"] >= 0.9 and manifest["recall"]["tuning"]
    assert manifest["recall"]["tune_queries"] + manifest["recall"]["num_queries"] == 40
    assert faiss.extract_index_ivf(load_index_version(tmp_path).index).nprobe == params["nprobe"]


@pytest.mark.parametrize(
    ("factory", "params"),
    [("Flat", {}), ("IVF16,Flat", {"search_params": {"nprobe": 4}, "recall_floor": 0.0})],
)
def test_sharded_build_equals_single_index_build(
    index_bundle: Path, index_data: Path, tmp_path: Path, factory: str, params: dict
) -> None:
    build(index_bundle, index_data, tmp_path / "one", factory=factory, **params)
    sharded = build(
        index_bundle, index_data, tmp_path / "three", factory=factory, shards=3, **params
    )
    index = sharded.manifest["index"]
    assert index["layout"] == "shards" and index["num_shards"] == 3
    # 600 rows in contiguous thirds (shard_bounds), one sha256 per shard file
    assert [(s["first_row"], s["num_items"]) for s in index["shards"]] == [
        (0, 200),
        (200, 200),
        (400, 200),
    ]
    assert {s["file"] for s in index["shards"]} < set(sharded.manifest["files"])
    assert sharded.manifest["build"]["options"]["shards"] == 3
    a, b = load_index_version(tmp_path / "one"), load_index_version(tmp_path / "three")
    assert (a.num_shards, b.num_shards) == (1, 3)
    assert b.item_ids.equals(a.item_ids) and b.search_params == a.search_params
    # IVF parts share the trained quantizer, so the same lists are probed in each
    queries = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    scores_a, rows_a = a.search(queries, k=120)
    scores_b, rows_b = b.search(queries, k=120)
    np.testing.assert_array_equal(rows_b, rows_a)
    np.testing.assert_allclose(scores_b, scores_a, rtol=1e-5, atol=1e-6)
    assert b.manifest["recall"]["recall"] == pytest.approx(a.manifest["recall"]["recall"])


def test_more_shards_than_items_is_refused_before_embedding(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(IndexBuildError, match=r"`shards` \(601\) exceeds the catalog's 600"):
        build(index_bundle, index_data, tmp_path, shards=NUM_ITEMS + 1)
    with pytest.raises(ValueError, match="`shards` must be >= 1; got 0"):
        BuildOptions(shards=0)
    assert not (tmp_path / "CURRENT").exists()


def test_recall_gate_refuses_a_bad_index_and_force_overrides(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    good = build(index_bundle, index_data, tmp_path)
    bad = {"factory": "IVF32,Flat", "search_params": {"nprobe": 1}}  # ~1/32 of the catalog
    with pytest.raises(RecallGateError, match=r"below the floor 0.95.*--force"):
        build(index_bundle, index_data, tmp_path, **bad)
    assert read_current(tmp_path) == good.version
    assert [v.name for v in list_versions(tmp_path)] == [good.version]

    forced = build(index_bundle, index_data, tmp_path, force=True, **bad)
    recall = forced.manifest["recall"]
    assert recall["forced"] is True and recall["passed"] is False and recall["recall"] < 0.5
    assert read_current(tmp_path) == forced.version


def test_keep_n_prunes_old_versions_but_never_current(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    names = [build(index_bundle, index_data, tmp_path, keep=2).version for _ in range(3)]
    assert [v.name for v in list_versions(tmp_path)] == names[1:]
    assert read_current(tmp_path) == names[2]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["price"]), r"lacks columns \['price'\]"),
        (lambda t: t.slice(0, 0), "catalog is empty"),
        (
            lambda t: t.set_column(
                0, "item_id", pa.array(["dup"] * 2 + t["item_id"].to_pylist()[2:])
            ),
            r"occur more than once, e.g. \['dup'\]",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("price"), "price", pa.array(["x"] * t.num_rows)
            ),
            "do not fit the model bundle's item features",
        ),
    ],
    ids=["schema-mismatch", "empty", "duplicate-ids", "bad-type"],
)
def test_bad_catalogs_are_refused_and_current_is_untouched(
    index_bundle: Path, index_data: Path, tmp_path: Path, mutate, message: str
) -> None:
    root = tmp_path / "root"
    good = build(index_bundle, index_data, root)
    items = mutate(pq.read_table(index_data / "items.parquet"))
    bad_data = write_catalog_variant(index_data, tmp_path / "bad", items)
    with pytest.raises(IndexBuildError, match=message):
        build(index_bundle, bad_data, root)
    assert read_current(root) == good.version
    assert [v.name for v in list_versions(root)] == [good.version]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # staging removed


def test_non_finite_embeddings_are_refused(index_data: Path, tmp_path: Path) -> None:
    broken = make_random_bundle(index_data, tmp_path / "nan-model", nan=True)
    with pytest.raises(IndexBuildError, match="non-finite embeddings"):
        build(broken, index_data, tmp_path / "root")
    assert not (tmp_path / "root" / "CURRENT").exists()


def test_bad_factory_fails_before_embedding(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="not a valid FAISS index_factory string"):
        build(index_bundle, index_data, tmp_path, factory="IVF,Nonsense")
    with pytest.raises(ValueError, match="asks for 4096 inverted lists"):
        build(index_bundle, index_data, tmp_path, factory="IVF4096,Flat")


def test_disk_full_while_writing_keeps_current(
    index_bundle: Path, index_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = build(index_bundle, index_data, tmp_path)

    def write_then_fail(index: faiss.Index, path: str) -> None:
        Path(path).write_bytes(b"half an index")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_format.faiss, "write_index", write_then_fail)
    with pytest.raises(IndexBuildError, match=r"No space left on device.*CURRENT is unchanged"):
        build(index_bundle, index_data, tmp_path)
    assert read_current(tmp_path) == good.version
    assert [v.name for v in list_versions(tmp_path)] == [good.version]
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".tmp-")]
    assert load_index_version(tmp_path).version == good.version


def test_a_second_build_on_a_locked_root_is_refused(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    with root_lock(tmp_path), pytest.raises(IndexBuildError, match="another index build"):
        build(index_bundle, index_data, tmp_path)


def test_build_killed_mid_way_leaves_current_on_the_old_version(
    index_bundle: Path, index_data: Path, tmp_path: Path
) -> None:
    good = build(index_bundle, index_data, tmp_path)
    command = [
        sys.executable,
        "-m",
        "index",
        "--model",
        str(index_bundle),
        "--data",
        str(index_data),
        "--out",
        str(tmp_path),
        "--batch-size",
        "1",  # 600 one-row steps: seconds of embedding to be killed in
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tmp-build-*/embeddings.npy")):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never started embedding"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert read_current(tmp_path) == good.version
    assert [v.name for v in list_versions(tmp_path)] == [good.version]
    assert load_index_version(tmp_path).num_items == NUM_ITEMS
    # the next build removes the dead build's staging directory and publishes normally
    again = build(index_bundle, index_data, tmp_path)
    assert read_current(tmp_path) == again.version
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_redis_password_is_in_no_log_line_and_not_in_the_manifest(
    index_bundle: Path, index_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nothing listens on port 1: the announcement fails, and is logged (redacted) too
    url = "redis://:s3cret-pw@127.0.0.1:1/0"
    caplog.set_level(logging.DEBUG)
    result = build(index_bundle, index_data, tmp_path, redis_url=url)
    logged = [record.getMessage() for record in caplog.records]
    assert any("build-index: model=" in line for line in logged)  # the options line
    assert any("could not publish version" in line for line in logged)
    assert not [line for line in logged if "s3cret-pw" in line]
    assert result.manifest["build"]["options"]["redis_url"] is True
    assert "s3cret-pw" not in (result.path / "manifest.json").read_text()
    assert "s3cret-pw" not in repr(BuildOptions(redis_url=url))
