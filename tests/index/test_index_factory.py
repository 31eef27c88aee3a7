"""Index choice, the torch-trained IVF path, exact search and search-param tuning, checked
against plain FAISS and brute force on small seeded data."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest
import torch

from index.factory import (
    GroundTruth,
    choose_factory,
    default_nlist,
    exact_search,
    train_and_fill,
    tune_search_params,
)
from retrieval.ranking import exact_top_k


def clustered(n: int, d: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres (what trained towers look like)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_default_factory_by_catalog_size() -> None:
    assert choose_factory(200_000, 64) == "Flat"
    assert choose_factory(200_001, 64) == f"IVF{default_nlist(200_001)},SQ8"
    assert default_nlist(1_000_000) == 4000  # 4 * sqrt(1e6)
    assert choose_factory(5_000_001, 64).endswith(",SQ8")
    with pytest.raises(ValueError, match="`num_items` and `dim` must be >= 1"):
        choose_factory(0, 64)


def test_exact_search_equals_the_reference() -> None:
    items, queries = clustered(1000), clustered(7, seed=1)
    scores, rows = exact_search(queries, items, 50, block_rows=128)  # 8 blocks merged
    ref_scores, ref_rows = exact_top_k(torch.from_numpy(queries), torch.from_numpy(items), 50)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows, ref_rows.numpy())
    short_scores, short_rows = exact_search(queries, items[:10], 12)  # k > N: padded
    assert (short_rows[:, 10:] == -1).all() and np.isneginf(short_scores[:, 10:]).all()


def test_torch_trained_ivf_flat_is_a_correct_faiss_index() -> None:
    items = clustered(3000)
    index, info = train_and_fill("IVF16,Flat", items, seed=0)
    assert info["engine"].startswith("torch") and info["train_size"] == 3000
    ivf = faiss.extract_index_ivf(index)
    assert index.is_trained and index.ntotal == 3000 and ivf.quantizer.ntotal == 16
    # every vector sits in the list of its max-inner-product centroid
    _, nearest = ivf.quantizer.search(items, 1)
    invlists = ivf.invlists
    assert invlists is not None
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy()
        assert (nearest[ids, 0] == lst).all()
    # scanning every list is exact search
    ivf.nprobe = ivf.nlist
    queries = clustered(5, seed=2)
    _, rows = index.search(queries, 20)
    _, ref_rows = exact_top_k(torch.from_numpy(queries), torch.from_numpy(items), 20)
    np.testing.assert_array_equal(rows, ref_rows.numpy())


@pytest.mark.parametrize("factory", ["IVF8,SQ8", "IVF8,PQ4x4"])
def test_torch_trained_compressed_ivf_equals_faiss_training_on_the_same_centroids(
    factory: str,
) -> None:
    items = clustered(2000)
    index, info = train_and_fill(factory, items, seed=0)
    assert info["engine"].startswith("torch")
    ours: Any = faiss.downcast_index(index)
    # FAISS itself, given the same coarse centroids (it then skips its own k-means)
    built = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    reference: Any = faiss.downcast_index(built)  # a view: `built` must stay alive
    centroids = ours.quantizer.reconstruct_n(0, ours.nlist)
    reference.quantizer.add(centroids)
    reference.train(items)
    reference.add(items)
    codec = "sq.trained" if "SQ" in factory else "pq.centroids"
    part, field = codec.split(".")
    np.testing.assert_allclose(
        faiss.vector_to_array(getattr(getattr(ours, part), field)),
        faiss.vector_to_array(getattr(getattr(reference, part), field)),
        rtol=1e-5,
        atol=1e-6,
    )
    ours.nprobe = reference.nprobe = 8
    queries = clustered(20, seed=3)
    np.testing.assert_array_equal(ours.search(queries, 10)[1], reference.search(queries, 10)[1])


def test_hnsw_and_wrapped_indexes_use_faiss_itself() -> None:
    items = clustered(500)
    index, info = train_and_fill("HNSW8,Flat", items)
    assert info["engine"] == "faiss" and index.ntotal == 500
    index, info = train_and_fill("PCA8,IVF4,Flat", items)
    assert info["engine"] == "faiss" and index.ntotal == 500


def test_tuning_picks_the_cheapest_nprobe_reaching_the_target() -> None:
    items = clustered(3000, clusters=40)
    index, _ = train_and_fill("IVF32,Flat", items, seed=0)
    queries = clustered(40, clusters=40, seed=4)
    truth = GroundTruth(queries, exact_search(queries, items, 100)[0], 100, len(items))
    params, trials = tune_search_params(index, items, truth, target=0.9)
    recall = {t["params"]["nprobe"]: t["recall"] for t in trials}
    assert trials[0]["params"]["nprobe"] == 8
    assert recall[params["nprobe"]] >= 0.9  # the chosen setting reaches the target
    assert all(r < 0.9 for p, r in recall.items() if p < params["nprobe"])  # nothing cheaper did
    assert faiss.extract_index_ivf(index).nprobe == params["nprobe"]


def test_tuning_bisects_between_the_doubling_steps() -> None:
    items = clustered(4000, clusters=4000)  # no real clusters: recall grows slowly with nprobe
    index, _ = train_and_fill("IVF64,Flat", items, seed=0)
    queries = clustered(40, clusters=40, seed=4)
    truth = GroundTruth(queries, exact_search(queries, items, 100)[0], 100, len(items))
    _, sweep = tune_search_params(index, items, truth, target=0.999)  # full doubling sweep
    doubling = {t["params"]["nprobe"]: t["recall"] for t in sweep}
    passing = sorted(p for p, r in doubling.items() if r >= 0.95)
    first = passing[0]
    assert first > 8, "the test needs a target that the first candidate misses"
    params, trials = tune_search_params(index, items, truth, target=0.95)
    tried = [t["params"]["nprobe"] for t in trials]
    between = [p for p in tried if first // 2 < p < first]
    assert between, f"no bisection between {first // 2} and {first}: tried {tried}"
    assert params["nprobe"] <= first
    recall = {t["params"]["nprobe"]: t["recall"] for t in trials}
    assert recall[params["nprobe"]] >= 0.95
    assert all(r < 0.95 for p, r in recall.items() if p < params["nprobe"])
