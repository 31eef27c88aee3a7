"""The index version format (retrieval/index_store.py): round trip against a plain exact
search, id mapping, checksums, unsafe paths, listing and the recall formula."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch

from retrieval.index_store import (
    CURRENT_FILE,
    ChecksumMismatchError,
    IndexStoreError,
    list_versions,
    load_index_version,
    parse_search_params,
    read_current,
    recall_against_exact,
    verify_index_version,
    write_index_version,
)
from retrieval.metrics import exact_top_k

IDS = pa.array(["a,b", 'q"uote', "tab\tnew\nline", "\u00e9\U0001f600", "", "../x", "7"])


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_flat(root: Path, name: str, vectors: np.ndarray, ids: pa.Array) -> Path:
    return write_index_version(root, name, faiss.IndexFlatIP(vectors.shape[1]), vectors, ids)


def test_flat_round_trip_equals_exact_search(tmp_path: Path) -> None:
    vectors = unit_vectors(300, 8)
    ids = pa.array([f"id-{i}" for i in range(300)])
    write_flat(tmp_path, "v1", vectors, ids)
    (tmp_path / CURRENT_FILE).write_text("v1\n")
    version = load_index_version(tmp_path)
    queries = unit_vectors(5, 8, seed=1)
    scores, rows = version.search(queries, k=20)
    ref_scores, ref_rows = exact_top_k(torch.from_numpy(queries), torch.from_numpy(vectors), 20)
    np.testing.assert_array_equal(rows, ref_rows.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-6)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert version.ids_of(rows[:1, :3]) == [[f"id-{r}" for r in ref_rows[0, :3].tolist()]]
    # a torch query tensor works the same
    _, rows_t = version.search(torch.from_numpy(queries), k=20)
    np.testing.assert_array_equal(rows_t, rows)


def test_odd_string_ids_map_back_and_short_results_are_padded(tmp_path: Path) -> None:
    vectors = np.eye(len(IDS), 8, dtype=np.float32)
    write_flat(tmp_path, "v1", vectors, IDS)
    version = load_index_version(tmp_path, "v1")
    assert version.item_ids.to_pylist() == IDS.to_pylist()
    for row, item_id in enumerate(IDS.to_pylist()):
        query = np.zeros((1, 8), dtype=np.float32)
        query[0, row] = 1.0
        ids, id_scores = version.search_ids(query, k=1)
        assert ids == [[item_id]] and id_scores == [[pytest.approx(1.0)]]
    scores, rows = version.search(vectors[:1], k=10)  # k > N = 7: -1 / -inf past the catalog
    assert rows[0, 7:].tolist() == [-1, -1, -1] and np.isneginf(scores[0, 7:]).all()
    assert version.row_of(["tab\tnew\nline", "missing"]).tolist() == [2, -1]


def test_bad_queries_and_k_are_refused(tmp_path: Path) -> None:
    write_flat(tmp_path, "v1", unit_vectors(10, 4), pa.array([str(i) for i in range(10)]))
    version = load_index_version(tmp_path, "v1")
    with pytest.raises(ValueError, match=r"`query_emb` must be \[Q, 4\]"):
        version.search(np.zeros((2, 3), np.float32), k=1)
    with pytest.raises(ValueError, match="finite"):
        version.search(np.full((1, 4), np.nan, np.float32), k=1)
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        version.search(np.zeros((1, 4), np.float32), k=0)


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    path = write_flat(tmp_path, "v1", unit_vectors(10, 4), pa.array([str(i) for i in range(10)]))
    verify_index_version(path)
    index_file = path / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[-1] ^= 0xFF  # flip the bits of one stored float
    index_file.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch") as info:
        load_index_version(tmp_path, "v1")
    assert isinstance(info.value, ValueError)


def test_missing_and_unlisted_files_are_refused(tmp_path: Path) -> None:
    path = write_flat(tmp_path, "v1", unit_vectors(4, 4), pa.array(list("abcd")))
    (path / "extra.bin").write_bytes(b"x")
    with pytest.raises(IndexStoreError, match="not listed"):
        verify_index_version(path)
    (path / "extra.bin").unlink()
    (path / "ids.parquet").unlink()
    with pytest.raises(IndexStoreError, match="missing"):
        verify_index_version(path)


def _rewrite_manifest(path: Path, **files: str) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"].update(files)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/passwd", "sub/../../x"])
def test_manifest_paths_escaping_the_version_are_refused(tmp_path: Path, entry: str) -> None:
    path = write_flat(tmp_path, "v1", unit_vectors(4, 4), pa.array(list("abcd")))
    (tmp_path / "versions" / "outside.bin").write_bytes(b"x")
    _rewrite_manifest(path, **{entry: "0" * 64})
    with pytest.raises(IndexStoreError, match=r"escapes|relative path|outside"):
        verify_index_version(path)


def test_symlink_escapes_are_refused(tmp_path: Path) -> None:
    path = write_flat(tmp_path, "v1", unit_vectors(4, 4), pa.array(list("abcd")))
    # a listed file replaced by a link to an identical copy outside the version
    outside = tmp_path / "ids-copy.parquet"
    outside.write_bytes((path / "ids.parquet").read_bytes())
    (path / "ids.parquet").unlink()
    os.symlink(outside, path / "ids.parquet")
    with pytest.raises(IndexStoreError, match="symbolic link"):
        verify_index_version(path)
    # a version directory that is itself a link
    os.symlink(path, tmp_path / "versions" / "v2")
    with pytest.raises(IndexStoreError, match="symbolic link"):
        load_index_version(tmp_path, "v2")
    # CURRENT naming a path instead of a version
    (tmp_path / CURRENT_FILE).write_text("../../etc\n")
    with pytest.raises(IndexStoreError, match="version name"):
        read_current(tmp_path)


def test_list_versions_orders_by_build_time_and_marks_current(tmp_path: Path) -> None:
    for name in ("b-first", "a-second"):
        write_flat(tmp_path, name, unit_vectors(3, 4), pa.array(list("xyz")))
    (tmp_path / "versions" / "broken").mkdir()
    (tmp_path / "versions" / ".tmp-half-written").mkdir()
    (tmp_path / CURRENT_FILE).write_text("a-second\n")
    infos = list_versions(tmp_path)
    assert [i.name for i in infos] == ["broken", "b-first", "a-second"]
    assert [i.current for i in infos] == [False, False, True]
    assert infos[0].manifest is None and "manifest.json missing" in str(infos[0].error)
    assert infos[2].num_items == 3 and infos[2].factory == "Flat"
    assert list_versions(tmp_path / "nothing-here") == []
    with pytest.raises(FileNotFoundError, match="no CURRENT"):
        read_current(tmp_path / "nothing-here")


def test_recall_against_exact_by_hand() -> None:
    # k = 3; query 0 finds 2 of the exact top-3 (0.9, 0.8) plus 0.1 < kth 0.7: 2/3.
    # query 1 finds a tie at the k-th score (0.5 == 0.5): counted, 3/3. Mean 5/6.
    recall = recall_against_exact(
        [[0, 1, 9], [4, 5, 6]],
        [[0.9, 0.8, 0.1], [0.9, 0.6, 0.5]],
        [[0.9, 0.8, 0.7], [0.9, 0.6, 0.5]],
        num_items=10,
    )
    assert recall == pytest.approx(5 / 6)
    # N = 2 < k = 3: the denominator is 2
    assert recall_against_exact([[0, 1, -1]], [[0.5, 0.4, 0.0]], [[0.5, 0.4, -np.inf]], 2) == 1.0


def test_search_params_are_applied_and_recorded(tmp_path: Path) -> None:
    vectors = unit_vectors(400, 8)
    index = faiss.index_factory(8, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    write_index_version(
        tmp_path,
        "v1",
        index,
        vectors,
        pa.array([str(i) for i in range(400)]),
        factory="IVF8,Flat",
        search_params={"nprobe": 8},
    )
    version = load_index_version(tmp_path, "v1")
    assert faiss.extract_index_ivf(version.index).nprobe == 8
    version.set_search_params(nprobe=2)
    assert faiss.extract_index_ivf(version.index).nprobe == 2
    assert version.search_params == {"nprobe": 2}
    assert parse_search_params("nprobe=3,efSearch=40") == {"nprobe": 3, "efSearch": 40}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_search_params("nprobes=3")
