"""The index version format (retrieval/index_format.py, loaded by retrieval/index_store.py):
round trip against a plain exact search, id mapping, checksums, unsafe paths, listing and
the recall formula (index/recall.py)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch

from index.recall import recall_against_exact
from retrieval.index_format import (
    CURRENT_FILE,
    ChecksumMismatchError,
    IndexStoreError,
    assemble_shards,
    list_versions,
    parse_search_params,
    read_current,
    shard_indexes,
    verify_index_version,
    write_index_version,
)
from retrieval.index_store import load_index_version
from retrieval.ranking import exact_top_k
from retrieval.searchers import reconstruct_all

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


# --------------------------------------------------------------------------- sharded versions


def write_sharded(root: Path, name: str, vectors: np.ndarray, ids: pa.Array, cuts: list[int]):
    """Flat parts over the contiguous rows between `cuts` (e.g. [0, 3, 7, N])."""
    parts = []
    for start, end in itertools.pairwise(cuts):
        part = faiss.IndexFlatIP(vectors.shape[1])
        part.add(vectors[start:end])
        parts.append(part)
    return write_index_version(root, name, assemble_shards(parts), None, ids)


def test_sharded_flat_round_trip_equals_single_index(tmp_path: Path) -> None:
    vectors = unit_vectors(300, 8)
    ids = pa.array([f"id-{i}" for i in range(300)])
    write_flat(tmp_path, "single", vectors, ids)
    path = write_sharded(tmp_path, "sharded", vectors, ids, [0, 97, 98, 300])  # uneven sizes
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["index"]["layout"] == "shards"
    assert manifest["index"]["shards"] == [
        {"file": "shard-000.faiss", "first_row": 0, "num_items": 97},
        {"file": "shard-001.faiss", "first_row": 97, "num_items": 1},
        {"file": "shard-002.faiss", "first_row": 98, "num_items": 202},
    ]
    assert "index_file" not in manifest["index"]
    assert set(manifest["files"]) == {f"shard-00{s}.faiss" for s in range(3)} | {"ids.parquet"}
    assert all(len(digest) == 64 for digest in manifest["files"].values())

    single = load_index_version(tmp_path, "single")
    sharded = load_index_version(tmp_path, "sharded")
    assert (sharded.num_shards, single.num_shards) == (3, 1)
    assert (sharded.num_items, sharded.dim) == (300, 8)
    queries = unit_vectors(7, 8, seed=2)
    scores, rows = sharded.search(queries, k=310)  # k > N: padded like the single index
    ref_scores, ref_rows = single.search(queries, k=310)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert sharded.ids_of(rows[:, :5]) == single.ids_of(ref_rows[:, :5])
    # each item is its own nearest neighbour: row r of every shard comes back as r
    _, own = sharded.search(vectors[[0, 96, 97, 98, 299]], k=1)
    assert own[:, 0].tolist() == [0, 96, 97, 98, 299]
    np.testing.assert_allclose(reconstruct_all(sharded.index), vectors, atol=1e-7)


def trained_shards(
    factory: str, vectors: np.ndarray, split: int
) -> tuple[faiss.Index, list[faiss.Index]]:
    """An inner-product index trained on `vectors`, and two copies of it holding rows
    [0, split) and [split, N): the shards of one IVF."""
    trained = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(vectors)
    parts = []
    for start, end in ((0, split), (split, len(vectors))):
        part = faiss.clone_index(trained)
        part.add(vectors[start:end])
        parts.append(part)
    return trained, parts


def test_sharded_ivf_search_params_reach_every_shard(tmp_path: Path) -> None:
    vectors = unit_vectors(400, 8)
    trained, parts = trained_shards("IVF8,Flat", vectors, 150)
    single = faiss.clone_index(trained)
    single.add(vectors)
    ids = pa.array([str(i) for i in range(400)])
    write_index_version(
        tmp_path, "v1", assemble_shards(parts), None, ids, search_params={"nprobe": 3}
    )
    version = load_index_version(tmp_path, "v1")
    parts_loaded = shard_indexes(version.index)
    assert parts_loaded is not None
    assert [faiss.extract_index_ivf(p).nprobe for p in parts_loaded] == [3, 3]
    faiss.extract_index_ivf(single).nprobe = 3
    queries = unit_vectors(9, 8, seed=3)
    np.testing.assert_array_equal(version.search(queries, 40)[1], single.search(queries, 40)[1])
    version.set_search_params(nprobe=8)
    assert [faiss.extract_index_ivf(p).nprobe for p in parts_loaded] == [8, 8]


def test_corrupt_or_missing_shard_is_refused(tmp_path: Path) -> None:
    vectors = unit_vectors(30, 4)
    ids = pa.array([str(i) for i in range(30)])
    path = write_sharded(tmp_path, "v1", vectors, ids, [0, 10, 20, 30])
    verify_index_version(path)
    shard = path / "shard-002.faiss"  # the last shard: every shard's sha256 is checked
    original = shard.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF  # flip the bits of one stored float
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"shard-002\.faiss: checksum mismatch"):
        load_index_version(tmp_path, "v1")
    shard.unlink()
    with pytest.raises(IndexStoreError, match=r"missing: \['shard-002.faiss'\]"):
        load_index_version(tmp_path, "v1")
    shard.write_bytes(original)
    assert load_index_version(tmp_path, "v1").num_items == 30


@pytest.mark.parametrize(
    ("shard", "change", "message"),
    [
        (1, {"first_row": 11}, "expected rows from 10"),
        (2, {"num_items": 9}, "the shards hold 29 items; the catalog has 30"),
        (1, {"file": "shard-000.faiss"}, "names a file twice"),
        (0, {"first_row": "zero"}, "needs file, first_row, num_items"),
    ],
)
def test_inconsistent_shard_table_is_refused(
    tmp_path: Path, shard: int, change: dict[str, object], message: str
) -> None:
    ids = pa.array([str(i) for i in range(30)])
    path = write_sharded(tmp_path, "v1", unit_vectors(30, 4), ids, [0, 10, 20, 30])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["index"]["shards"][shard].update(change)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStoreError, match=message):
        load_index_version(tmp_path, "v1", verify=False)


def test_sharded_version_needs_format_version_2(tmp_path: Path) -> None:
    path = write_sharded(tmp_path, "v1", unit_vectors(6, 4), pa.array(list("abcdef")), [0, 3, 6])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1  # what a reader that knows only one index file accepts
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStoreError, match="sharded layout needs `format_version` 2"):
        verify_index_version(path)


# --------------------------------------------------------------------------- memory-mapped reads


def mapped_lists(index: faiss.Index) -> list[Any]:
    """The inverted lists of every IVF inside `index` (through shards, pre-transforms and
    refine stages), downcast; [] for an index without IVF."""
    parts = shard_indexes(index) or [index]
    found = []
    for part in parts:
        try:
            ivf: Any = faiss.extract_index_ivf(part)
        except RuntimeError:
            continue
        found.append(faiss.downcast_InvertedLists(ivf.invlists))
    return found


# Every kind the index job builds or is documented to take (`index/factory.py`, the CLI):
# (factory, search params, whether FAISS maps its lists with IO_FLAG_MMAP).
MMAP_KINDS = [
    ("Flat", {}, False),
    ("HNSW16,Flat", {"efSearch": 32}, False),
    ("HNSW16,SQ8", {"efSearch": 32}, False),
    ("IVF8,Flat", {"nprobe": 3}, True),
    ("IVF8,SQ8", {"nprobe": 3}, True),
    ("IVF8,SQ4", {"nprobe": 3}, True),
    ("IVF8,PQ4x4", {"nprobe": 3}, True),
    ("IVF8,PQ4x4fs", {"nprobe": 3}, False),  # fast-scan lists are read, not mapped
    ("IVF8,SQ8,RFlat", {"nprobe": 3, "k_factor_rf": 2}, True),
    ("PCA8,IVF8,SQ8", {"nprobe": 3}, True),
    ("IVF8_HNSW16,SQ8", {"nprobe": 3, "quantizer_efSearch": 16}, True),
]


@pytest.mark.parametrize("factory, params, maps", MMAP_KINDS, ids=[k[0] for k in MMAP_KINDS])
def test_every_index_kind_loads_memory_mapped(
    tmp_path: Path, factory: str, params: dict[str, float], maps: bool
) -> None:
    """`mmap=True` loads every kind and answers exactly as the in-memory load; IVF lists
    are mapped read-only with FAISS's prefetch threads off, other kinds read as usual."""
    vectors = unit_vectors(1200, 16, seed=7)
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    ids = pa.array([f"id-{i}" for i in range(1200)])
    write_index_version(tmp_path, "v1", index, vectors, ids, factory=factory, search_params=params)
    in_memory = load_index_version(tmp_path, "v1")
    mapped = load_index_version(tmp_path, "v1", mmap=True)
    lists = mapped_lists(mapped.index)
    assert (
        bool(lists) and all(isinstance(lst, faiss.OnDiskInvertedLists) for lst in lists)
    ) == maps
    assert not any(
        isinstance(lst, faiss.OnDiskInvertedLists) for lst in mapped_lists(in_memory.index)
    )
    for lst in lists:
        if isinstance(lst, faiss.OnDiskInvertedLists):
            assert lst.read_only and lst.prefetch_nthread == 0
    assert mapped.search_params == in_memory.search_params == params
    queries = unit_vectors(6, 16, seed=8)
    want_scores, want_rows = in_memory.search(queries, 50)
    scores, rows = mapped.search(queries, 50)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


def test_sharded_ivf_loads_memory_mapped(tmp_path: Path) -> None:
    """Each shard file of a sharded IVF version is mapped on its own; answers unchanged."""
    vectors = unit_vectors(600, 8)
    _, parts = trained_shards("IVF8,SQ8", vectors, 250)
    ids = pa.array([str(i) for i in range(600)])
    write_index_version(
        tmp_path, "v1", assemble_shards(parts), None, ids, search_params={"nprobe": 4}
    )
    in_memory = load_index_version(tmp_path, "v1")
    mapped = load_index_version(tmp_path, "v1", mmap=True)
    lists = mapped_lists(mapped.index)
    assert len(lists) == 2 and all(isinstance(lst, faiss.OnDiskInvertedLists) for lst in lists)
    queries = unit_vectors(5, 8, seed=4)
    np.testing.assert_array_equal(mapped.search(queries, 40)[1], in_memory.search(queries, 40)[1])
    np.testing.assert_allclose(reconstruct_all(mapped.index), reconstruct_all(in_memory.index))
