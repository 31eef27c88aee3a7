"""Exact ranking kernels (`retrieval.ranking`): chunked top-K against a full sort, item sets,
popularity with exclusions, dropping excluded candidates, and the three places that rank
exactly (evaluator, index job ground truth, index-store torch backend) agreeing row for row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from index.factory import exact_search
from retrieval.index_store import torch_exact_search
from retrieval.ranking import (
    ItemSets,
    drop_excluded,
    exact_top_k,
    exact_top_k_arrays,
    popularity_top_k,
    slice_item_sets,
)
from training.evaluate import exact_ranking


def _reference_top_k(
    scores: np.ndarray, k: int, exclude: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Full sort per row by (score desc, item row asc); excluded items dropped; -1/-inf pads."""
    out_scores = np.full((scores.shape[0], k), -np.inf)
    out_indices = np.full((scores.shape[0], k), -1, dtype=np.int64)
    for q, row in enumerate(scores):
        keep = np.setdiff1d(np.arange(len(row)), exclude[q])
        order = keep[np.lexsort((keep, -row[keep]))][:k]
        out_scores[q, : len(order)] = row[order]
        out_indices[q, : len(order)] = order
    return out_scores, out_indices


def _random_exclusions(rng: np.random.Generator, num_queries: int, num_items: int) -> list:
    return [
        rng.choice(num_items, size=rng.integers(0, num_items // 3), replace=False)
        for _ in range(num_queries)
    ]


# --------------------------------------------------------------------------- exact top-k


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "many-ties"])
@pytest.mark.parametrize(("query_chunk", "item_chunk"), [(3, 2), (1, 7), (16, 64), (100, 1000)])
@pytest.mark.parametrize("k", [1, 10, 37])
def test_exact_top_k_by_chunks_equals_full_sort(
    ties: bool, query_chunk: int, item_chunk: int, k: int
) -> None:
    rng = np.random.default_rng(k * 1000 + query_chunk)
    num_queries, num_items, dim = 23, 53, 6
    if ties:  # small integers: exact float products and many equal scores
        query = rng.integers(-1, 2, size=(num_queries, dim)).astype(np.float64)
        items = rng.integers(-1, 2, size=(num_items, dim)).astype(np.float64)
    else:
        query = rng.standard_normal((num_queries, dim))
        items = rng.standard_normal((num_items, dim))
    exclude = _random_exclusions(rng, num_queries, num_items)
    scores, indices = exact_top_k(
        torch.from_numpy(query),
        torch.from_numpy(items),
        k,
        exclude=exclude,
        query_chunk_size=query_chunk,
        item_chunk_size=item_chunk,
    )
    ref_scores, ref_indices = _reference_top_k(query @ items.T, k, exclude)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-12, atol=1e-12)
    for q in range(num_queries):
        assert not np.isin(indices[q].numpy(), exclude[q]).any()


def test_exact_top_k_narrows_many_small_chunks_exactly() -> None:
    # k = 3 from 2-item chunks: the candidate list passes 8k = 24 and is narrowed 7 times.
    rng = np.random.default_rng(2)
    query = rng.integers(-1, 2, size=(9, 3)).astype(np.float64)
    items = rng.integers(-1, 2, size=(100, 3)).astype(np.float64)
    exclude = _random_exclusions(rng, 9, 100)
    _, indices = exact_top_k(
        torch.from_numpy(query), torch.from_numpy(items), 3, exclude, item_chunk_size=2
    )
    _, ref_indices = _reference_top_k(query @ items.T, 3, exclude)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)


def test_exact_top_k_pads_when_k_exceeds_available_items() -> None:
    items = torch.tensor([[1.0], [3.0], [2.0]])
    query = torch.tensor([[1.0], [-1.0]])
    scores, indices = exact_top_k(query, items, k=5, exclude=[[1], []], item_chunk_size=2)
    assert indices.tolist() == [[2, 0, -1, -1, -1], [0, 2, 1, -1, -1]]
    assert scores[0, :2].tolist() == [2.0, 1.0] and torch.isneginf(scores[0, 2:]).all()
    assert scores[1, :3].tolist() == [-1.0, -2.0, -3.0] and torch.isneginf(scores[1, 3:]).all()


def test_exact_top_k_accepts_item_sets_and_validates() -> None:
    query, items = torch.ones(2, 1), torch.arange(4.0)[:, None]
    by_lists = exact_top_k(query, items, 2, exclude=[[3], [2, 3]])
    by_sets = exact_top_k(query, items, 2, exclude=ItemSets([0, 1, 3], [3, 2, 3]))
    assert torch.equal(by_lists[1], by_sets[1])
    assert by_lists[1].tolist() == [[2, 1], [1, 0]]
    with pytest.raises(ValueError, match="`k`"):
        exact_top_k(query, items, 0)
    with pytest.raises(ValueError, match="`exclude`"):
        exact_top_k(query, items, 2, exclude=[[4], []])  # row 4 outside the 4-item catalog
    with pytest.raises(ValueError, match="`exclude`"):
        exact_top_k(query, items, 2, exclude=[[1]])  # one row for two queries
    with pytest.raises(ValueError, match="`item_chunk_size`"):
        exact_top_k(query, items, 2, item_chunk_size=0)
    with pytest.raises(ValueError, match="`query_emb`"):
        exact_top_k(torch.full((2, 1), float("nan")), items, 2)
    with pytest.raises(ValueError, match="`item_emb`"):
        exact_top_k(query, torch.full((4, 1), float("inf")), 2)
    with pytest.raises(ValueError, match=r"`item_emb`.*rows 2:4"):
        exact_top_k(query, np.array([[0.0], [1.0], [np.nan], [2.0]]), 2, item_chunk_size=2)


def test_exact_top_k_reads_a_memmap_once_per_item_chunk_like_a_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    items = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)  # ties
    path = tmp_path / "items.f32"
    items.tofile(path)
    memmap = np.memmap(path, dtype=np.float32, mode="r", shape=items.shape)
    queries = torch.from_numpy(rng.integers(-2, 3, size=(17, 8)).astype(np.float32))
    exclude = _random_exclusions(rng, 17, 300)
    from_tensor = exact_top_k(queries, torch.from_numpy(items), 40, exclude, item_chunk_size=64)
    from_memmap = exact_top_k(queries, memmap, 40, exclude, item_chunk_size=64, query_chunk_size=5)
    assert torch.equal(from_tensor[0], from_memmap[0])
    assert torch.equal(from_tensor[1], from_memmap[1])


def test_exact_top_k_arrays_returns_numpy_float32_and_pads() -> None:
    scores, rows = exact_top_k_arrays(np.array([[1.0], [-1.0]]), np.arange(3.0)[:, None], 4)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert rows.tolist() == [[2, 1, 0, -1], [0, 1, 2, -1]]
    assert scores[:, :3].tolist() == [[2.0, 1.0, 0.0], [-0.0, -1.0, -2.0]]
    assert np.isneginf(scores[:, 3]).all()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none on this machine"
)
def test_exact_top_k_on_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(11)
    query = torch.from_numpy(rng.integers(-1, 2, size=(40, 6)).astype(np.float32))
    items = torch.from_numpy(rng.integers(-1, 2, size=(500, 6)).astype(np.float32))
    exclude = _random_exclusions(rng, 40, 500)
    cpu = exact_top_k(query, items, 30, exclude, query_chunk_size=16, item_chunk_size=128)
    gpu = exact_top_k(query.cuda(), items, 30, exclude, query_chunk_size=16, item_chunk_size=128)
    assert gpu[1].device.type == "cuda"
    assert torch.equal(cpu[1], gpu[1].cpu()) and torch.equal(cpu[0], gpu[0].cpu())


# --------------------------------------------------------------------------- item sets


def test_item_sets_normalise_and_validate() -> None:
    sets = ItemSets.from_pairs([1, 0, 1, 1], [9, 4, 2, 9], num_queries=3)
    assert sets.indptr.tolist() == [0, 1, 3, 3]
    assert sets.indices.tolist() == [4, 2, 9]
    assert sets.sizes().tolist() == [1, 2, 0]
    from_tensors = ItemSets.from_lists(
        [torch.tensor([4]), torch.tensor([9, 2, 9]), torch.tensor([])]
    )
    assert torch.equal(from_tensors.indptr, sets.indptr)
    assert torch.equal(from_tensors.indices, sets.indices)
    with pytest.raises(ValueError, match="`indptr`"):
        ItemSets([0, 2, 1], [1, 2])
    with pytest.raises(ValueError, match="`indices`"):
        ItemSets([0, 1], [-3])
    with pytest.raises(ValueError, match="`query_rows`"):
        ItemSets.from_pairs([3], [1], num_queries=3)


def test_slice_item_sets_rebases_rows() -> None:
    sets = ItemSets.from_lists([[1], [2, 3], [], [4]])
    part = slice_item_sets(sets, 1, 3)
    assert part.num_queries == 2 and part.row(0).tolist() == [2, 3] and part.row(1).tolist() == []


# --------------------------------------------------------------------------- popularity


def test_popularity_uses_the_same_exclusion_and_tie_breaking() -> None:
    counts = torch.tensor([5, 9, 5, 1, 0, 9])
    exclude = [[1], [], [0, 1, 2, 3, 4, 5]]
    scores, ranking = popularity_top_k(counts, num_queries=3, k=4, exclude=exclude)
    # Counts tie 1 = 5 (9) and 0 = 2 (5): lower rows first; user 2 has every item excluded.
    assert ranking.tolist() == [[5, 0, 2, 3], [1, 5, 0, 2], [-1, -1, -1, -1]]
    assert scores[0].tolist() == [9.0, 5.0, 5.0, 1.0]
    assert torch.isneginf(scores[2]).all()
    # Same as exact search with a constant query against the counts as 1-d embeddings.
    _, exact = exact_top_k(
        torch.ones(3, 1, dtype=torch.float64), counts[:, None].double(), 4, exclude
    )
    assert torch.equal(ranking, exact)


def test_popularity_top_k_equals_a_stable_sort_with_exclusions() -> None:
    generator = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 6, (200,), generator=generator)  # many ties
    exclude = [
        torch.randperm(200, generator=generator)[: int(n)]
        for n in torch.randint(0, 60, (37,), generator=generator)
    ]
    for k in (1, 7, 150, 250):
        scores, ranking = popularity_top_k(
            counts, num_queries=37, k=k, exclude=exclude, query_chunk_size=5
        )
        for q in range(37):
            allowed = torch.ones(200, dtype=torch.bool)
            allowed[exclude[q]] = False
            rows = torch.arange(200)[allowed]
            expected = rows[
                torch.sort(counts[allowed].double(), descending=True, stable=True).indices
            ][:k]
            got = ranking[q][ranking[q] >= 0]
            assert got.tolist() == expected.tolist()
            assert (ranking[q][len(expected) :] == -1).all()
            assert torch.isneginf(scores[q][len(expected) :]).all()
            assert scores[q][: len(expected)].tolist() == counts[expected].double().tolist()


def test_popularity_is_independent_of_the_query_chunking() -> None:
    # Many ties and uneven (repeated) exclusions: every chunking gives the one ranking.
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5, (300,), generator=gen)
    exclude = ItemSets.from_lists(
        [torch.randint(0, 300, (int(n),), generator=gen) for n in torch.randint(0, 60, (50,))]
    )
    whole = popularity_top_k(counts, 50, 40, exclude, query_chunk_size=50)
    chunked = popularity_top_k(counts, 50, 40, exclude, query_chunk_size=7)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    scores, ranking = popularity_top_k(counts, 2, 400)  # no exclusions, k > N: padded
    assert (ranking[:, 300:] == -1).all() and torch.isneginf(scores[:, 300:]).all()
    assert sorted(ranking[0, :300].tolist()) == list(range(300))


def test_popularity_validates() -> None:
    with pytest.raises(ValueError, match="`item_counts`"):
        popularity_top_k(torch.tensor([1, -2]), 1, 1)
    with pytest.raises(ValueError, match="`k`"):
        popularity_top_k(torch.tensor([1, 2]), 1, 0)
    with pytest.raises(ValueError, match="`exclude`"):
        popularity_top_k(torch.tensor([1, 2]), 1, 1, exclude=[[2]])  # row 2 outside 2 items


# --------------------------------------------------------------------------- candidate lists


def test_drop_excluded_keeps_order_and_pads() -> None:
    candidates = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, -1, -1]])
    exclude = ItemSets.from_lists([[1, 5], [2, 6]])
    assert drop_excluded(candidates, exclude, 3).tolist() == [[3, 4, -1], [9, -1, -1]]
    assert drop_excluded(candidates, [[], [9]], 2).tolist() == [[3, 1], [2, 6]]
    with pytest.raises(ValueError, match="`exclude`"):
        drop_excluded(candidates, [[1]], 3)  # one row for two candidate rows


# --------------------------------------------------------------------------- the call sites


def test_evaluator_index_job_and_index_store_rank_identically() -> None:
    """The evaluator's exact ranking (with exclusions), the index job's ground truth and the
    index store's torch backend (over-fetched by the most excluded items, then the excluded
    ones dropped) give one top-k, ties included."""
    rng = np.random.default_rng(7)
    num_queries, num_items, dim, k = 29, 400, 5, 25
    # Small integers: exact float32 products and many equal scores.
    queries = rng.integers(-1, 2, size=(num_queries, dim)).astype(np.float32)
    items = rng.integers(-1, 2, size=(num_items, dim)).astype(np.float32)
    exclude = ItemSets.from_lists(_random_exclusions(rng, num_queries, num_items))
    fetch = k + int(exclude.sizes().max())

    evaluator = exact_ranking(
        torch.from_numpy(queries),
        torch.from_numpy(items),
        exclude,
        k,
        query_chunk_size=8,
        item_chunk_size=64,
        progress=False,
    )
    _, index_job = exact_search(queries, items, fetch, block_rows=96)
    _, index_store = torch_exact_search(torch.from_numpy(items), queries, fetch, query_chunk_size=8)
    np.testing.assert_array_equal(index_job, index_store)
    from_index_job = drop_excluded(torch.from_numpy(index_job), exclude, k)
    assert torch.equal(evaluator, from_index_job)
    _, reference = _reference_top_k(
        queries.astype(np.float64) @ items.T.astype(np.float64),
        k,
        [exclude.row(q).numpy() for q in range(num_queries)],
    )
    np.testing.assert_array_equal(evaluator.numpy(), reference)
