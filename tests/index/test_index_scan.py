"""`retrieval.ivf_scan.ListScanner` answers what FAISS answers, for the indexes it takes,
over lists in memory or memory-mapped from the index file."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from retrieval.index_format import read_index_file
from retrieval.ivf_scan import ListScanner
from retrieval.searchers import ListScanSearcher


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres (IVF lists of uneven sizes, like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim)).astype(np.float32)
    x = centres[rng.integers(0, 40, size=n)] + 0.4 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ivf_sq8(vectors: np.ndarray, nlist: int, *, by_residual: bool = True) -> faiss.Index:
    index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).by_residual = by_residual
    index.train(vectors)
    index.add(vectors)
    return index


def assert_same_answers(
    got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]
) -> None:
    """Same scores (float rounding aside) and the same rows, up to the order of ties."""
    (got_scores, got_rows), (want_scores, want_rows) = got, want
    assert got_scores.shape == want_scores.shape and got_rows.dtype == np.int64
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    for g, w, s in zip(got_rows, want_rows, want_scores, strict=True):
        boundary = s[-1]  # a tie at the k-th score may pick a different row
        clear = s > boundary + 1e-5
        assert set(g[clear]) == set(w[clear])
        assert (g == -1).sum() == (w == -1).sum()


@pytest.mark.parametrize("by_residual", [True, False])
def test_scanner_equals_faiss(by_residual: bool) -> None:
    vectors = clustered(6000, 32, seed=0)
    queries = clustered(25, 32, seed=1)
    index = ivf_sq8(vectors, 48, by_residual=by_residual)
    scanner = ListScanner.from_index(index)
    assert scanner is not None and scanner.nbytes >= 6000 * (32 + 8)
    for nprobe, k in [(1, 10), (6, 100), (48, 500)]:
        index.nprobe = nprobe  # read on every search
        assert_same_answers(scanner.search(queries, k), index.search(queries, k))


def test_scanner_pads_like_faiss_when_the_lists_hold_fewer_than_k() -> None:
    vectors = clustered(500, 16, seed=2)
    index = ivf_sq8(vectors, 20)
    index.nprobe = 2
    scanner = ListScanner.from_index(index)
    assert scanner is not None
    scores, rows = scanner.search(clustered(3, 16, seed=3), 400)
    _, want = index.search(clustered(3, 16, seed=3), 400)
    assert ((rows == -1) == (want == -1)).all() and (rows == -1).any()
    assert np.isneginf(scores[rows == -1]).all()
    for row_scores, row in zip(scores, rows, strict=True):
        valid = row_scores[row >= 0]
        assert (np.diff(valid) <= 0).all()


@pytest.mark.parametrize(
    "factory, metric",
    [
        ("Flat", faiss.METRIC_INNER_PRODUCT),
        ("IVF8,Flat", faiss.METRIC_INNER_PRODUCT),
        ("IVF8,SQ4", faiss.METRIC_INNER_PRODUCT),
        ("IVF8,SQfp16", faiss.METRIC_INNER_PRODUCT),
        ("IVF8,SQ8", faiss.METRIC_L2),
        ("PCA16,IVF8,SQ8", faiss.METRIC_INNER_PRODUCT),
        ("IVF8,SQ8,RFlat", faiss.METRIC_INNER_PRODUCT),
    ],
)
def test_scanner_refuses_other_indexes(factory: str, metric: int) -> None:
    vectors = clustered(800, 32, seed=4)
    index = faiss.index_factory(32, factory, metric)
    index.train(vectors)
    index.add(vectors)
    assert ListScanner.from_index(index) is None


def test_index_version_searches_through_the_scanner(tmp_path: object) -> None:
    """`IndexVersion.use_list_scanner`: same answers through `search`, device says so."""
    import pyarrow as pa

    from retrieval.index_store import IndexVersion

    vectors = clustered(3000, 32, seed=5)
    index = ivf_sq8(vectors, 24)
    ids = pa.array([f"item-{i}" for i in range(3000)])
    version = IndexVersion(
        path=tmp_path,  # type: ignore[arg-type]
        version="v1",
        manifest={"index": {"factory": "IVF24,SQ8"}},
        index=index,
        item_ids=ids,
    )
    version.set_search_params(nprobe=4)
    queries = clustered(10, 32, seed=6)
    want = version.search(queries, 50)
    assert version.device == "cpu" and version.use_list_scanner()
    assert version.device == "cpu (list scanner)"
    assert_same_answers(version.search(queries, 50), want)
    version.set_search_params(nprobe=24)  # parameters set later still apply
    index.nprobe = 24
    assert_same_answers(version.search(queries, 50), index.search(queries, 50))


# --------------------------------------------------------------------------- mapped lists


def mapped_copy(index: faiss.Index, path: Path) -> Any:
    """`index` written to `path` and read back with its lists memory-mapped."""
    faiss.write_index(index, str(path))
    return read_index_file(path, int(index.ntotal), int(index.d), mmap=True)


@pytest.mark.parametrize("by_residual", [True, False])
def test_mapped_scanner_equals_faiss_without_copying_the_codes(
    tmp_path: Path, by_residual: bool
) -> None:
    vectors = clustered(6000, 32, seed=0)
    queries = clustered(25, 32, seed=1)
    index = ivf_sq8(vectors, 48, by_residual=by_residual)
    mapped = mapped_copy(index, tmp_path / "index.faiss")
    in_memory = ListScanner.from_index(index)
    scanner = ListScanner.from_index(mapped)
    assert in_memory is not None and scanner is not None
    assert scanner.codes_mapped and not in_memory.codes_mapped
    assert not scanner.codes.flags.writeable  # a view of the read-only mapping
    # private memory: ids, centroids and list starts only (48 x 32 x 4 + 48 x 8 bytes)
    assert scanner.nbytes == 6000 * 8 + 48 * 32 * 4 + 48 * 8
    assert in_memory.nbytes == scanner.nbytes + 6000 * 32
    for nprobe, k in [(1, 10), (6, 100), (48, 500)]:
        index.nprobe = mapped.nprobe = nprobe
        want = index.search(queries, k)
        faiss_mapped = mapped.search(queries, k)  # FAISS's own search over the mapping
        np.testing.assert_array_equal(faiss_mapped[1], want[1])
        np.testing.assert_array_equal(faiss_mapped[0], want[0])
        got = scanner.search(queries, k)
        assert_same_answers(got, want)
        # same codes, same kernel: bit-identical to the scanner over the in-memory copy
        np.testing.assert_array_equal(got[0], in_memory.search(queries, k)[0])
        np.testing.assert_array_equal(got[1], in_memory.search(queries, k)[1])


def test_mapped_scanner_keeps_the_mapping_alive(tmp_path: Path) -> None:
    """The scanner holds the index, so the mapping its codes view outlives every other
    reference to it, and outlives the file's removal (a pruned version)."""
    vectors = clustered(2000, 16, seed=7)
    index = ivf_sq8(vectors, 16)
    index.nprobe = 16
    queries = clustered(5, 16, seed=8)
    want = index.search(queries, 100)
    path = tmp_path / "index.faiss"
    scanner = ListScanner.from_index(mapped_copy(index, path))
    assert scanner is not None and scanner.codes_mapped
    path.unlink()
    gc.collect()
    assert_same_answers(scanner.search(queries, 100), want)


def test_index_manager_serves_a_mapped_version_through_the_scanner(tmp_path: Path) -> None:
    """`IndexManager(mmap=True, list_scanner=True)`: the version's lists are mapped and
    `use_list_scanner` scans them in place, with the answers of the in-memory load."""
    import pyarrow as pa

    from retrieval.index_format import CURRENT_FILE, write_index_version
    from service.index_manager import IndexManager

    vectors = clustered(3000, 32, seed=5)
    index = faiss.index_factory(32, "IVF24,SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    ids = pa.array([f"item-{i}" for i in range(3000)])
    write_index_version(
        tmp_path, "v1", index, vectors, ids, factory="IVF24,SQ8", search_params={"nprobe": 6}
    )
    (tmp_path / CURRENT_FILE).write_text("v1\n")
    served = {}
    for mmap in (False, True):
        manager = IndexManager(
            tmp_path,
            model_dim=32,
            model_checksum="x",
            require_model_match=False,
            list_scanner=True,
            mmap=mmap,
        )
        assert manager.mmap is mmap
        served[mmap] = manager.load()
        assert served[mmap].loaded.device == "cpu (list scanner)"
    searcher = served[True].loaded.searcher
    assert isinstance(searcher, ListScanSearcher) and searcher.scanner.codes_mapped
    assert not served[False].loaded.searcher.scanner.codes_mapped  # type: ignore[attr-defined]
    queries = clustered(10, 32, seed=6)
    got, want = served[True].search(queries, 50), served[False].search(queries, 50)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
