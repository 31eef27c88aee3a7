"""`retrieval.ivf_scan.ListScanner` answers what FAISS answers, for the indexes it takes."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.ivf_scan import ListScanner


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
