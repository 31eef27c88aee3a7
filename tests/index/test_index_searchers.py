"""`retrieval.searchers`: every CPU backend answers the same top-k through one interface,
and a loaded version switches backends by replacing its one searcher."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from retrieval.index_store import IndexVersion
from retrieval.searchers import (
    FaissCpuSearcher,
    ListScanSearcher,
    Searcher,
    TorchExactSearcher,
)

NUM_ITEMS, DIM, NLIST, K = 600, 16, 8, 20


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def ivf_sq8_probing_every_list() -> faiss.Index:
    """IVF8,SQ8 with nprobe = nlist: every backend then scores every item by the same
    8-bit reconstructions, so their top-k must agree (up to float rounding)."""
    vectors = unit_rows(NUM_ITEMS, seed=0)
    index = faiss.index_factory(DIM, f"IVF{NLIST},SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.extract_index_ivf(index).nprobe = NLIST
    return index


def cpu_searchers(index: faiss.Index) -> list[Searcher]:
    scanner = ListScanSearcher.from_index(index)
    assert scanner is not None, "an IVF-SQ8 inner-product index is what the scanner takes"
    return [FaissCpuSearcher(index), scanner, TorchExactSearcher.from_index(index, "cpu")]


def test_every_cpu_backend_answers_the_same_top_k() -> None:
    index = ivf_sq8_probing_every_list()
    queries = unit_rows(12, seed=1)
    answers = {s.name: s.search(queries, K) for s in cpu_searchers(index)}
    assert sorted(answers) == ["cpu", "cpu (list scanner)", "cuda (torch exact)"]
    want_scores, want_rows = answers["cpu"]
    assert want_rows.shape == (12, K) and (want_rows >= 0).all()
    for name, (scores, rows) in answers.items():
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, err_msg=name)
        # The same rows per query; random unit vectors leave no exact ties at these scores.
        np.testing.assert_array_equal(rows, want_rows, err_msg=name)


def test_flat_index_has_no_list_scanner_and_torch_matches_faiss() -> None:
    index = faiss.IndexFlatIP(DIM)
    index.add(unit_rows(NUM_ITEMS, seed=2))
    queries = unit_rows(5, seed=3)
    assert ListScanSearcher.from_index(index) is None
    faiss_scores, faiss_rows = FaissCpuSearcher(index).search(queries, K)
    torch_scores, torch_rows = TorchExactSearcher.from_index(index, "cpu").search(queries, K)
    np.testing.assert_allclose(torch_scores, faiss_scores, atol=1e-5)
    np.testing.assert_array_equal(torch_rows, faiss_rows)


def test_search_params_reach_the_loaded_index_through_any_searcher() -> None:
    index = ivf_sq8_probing_every_list()
    for searcher in cpu_searchers(index):
        searcher.set_search_params({"nprobe": 3})
        assert faiss.extract_index_ivf(index).nprobe == 3, searcher.name
        faiss.extract_index_ivf(index).nprobe = NLIST
    with pytest.raises(ValueError, match="unknown search params"):
        FaissCpuSearcher(index).set_search_params({"nprobes": 3})


def test_version_holds_one_searcher_and_replaces_it(tmp_path: Path) -> None:
    index = ivf_sq8_probing_every_list()
    version = IndexVersion(
        path=tmp_path,
        version="v1",
        manifest={"index": {"factory": f"IVF{NLIST},SQ8"}},
        index=index,
        item_ids=pa.array([f"item-{i}" for i in range(NUM_ITEMS)]),
    )
    assert isinstance(version.searcher, FaissCpuSearcher) and version.device == "cpu"
    queries = unit_rows(4, seed=4)
    want = version.search(queries, K)
    assert version.use_list_scanner() and version.use_list_scanner()  # idempotent
    assert isinstance(version.searcher, ListScanSearcher)
    assert version.device == "cpu (list scanner)"
    got = version.search(queries, K)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
