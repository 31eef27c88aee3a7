"""Exact chunked top-K against a full sort, and recall / hit rate / NDCG on a toy ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval.evaluation.metrics import (
    ItemSets,
    evaluate_retrieval,
    exact_top_k,
    hit_rate_at_k,
    ndcg_at_k,
    popularity_top_k,
    ranking_metrics,
    recall_at_k,
)


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


def _toy() -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[list[int]]]:
    """3 users, 5 items with 1-d embeddings; scores tie on items 1 and 2 for every user."""
    items = torch.tensor([[1.0], [3.0], [3.0], [2.0], [0.0]])
    users = torch.tensor([[1.0], [1.0], [-1.0]])
    exclude = [[1], [], []]  # user 0 saw item 1 in train
    held_out = [[0, 4], [2], []]  # user 2 has nothing held out
    return users, items, exclude, held_out


def test_toy_ranking_metrics_match_hand_computed_values() -> None:
    users, items, exclude, held_out = _toy()
    _, ranking = exact_top_k(users, items, k=3, exclude=exclude)
    # user 0: scores [1, 3, 3, 2, 0], item 1 excluded       -> [2, 3, 0]
    # user 1: scores [1, 3, 3, 2, 0], tie 1 = 2 -> 1 first  -> [1, 2, 3]
    # user 2: scores [-1, -3, -3, -2, 0]                    -> [4, 0, 3]
    assert ranking.tolist() == [[2, 3, 0], [1, 2, 3], [4, 0, 3]]

    metrics = ranking_metrics(ranking, held_out, ks=[1, 2, 3])
    inv_log2_3 = 1 / math.log2(3)  # discount of rank 2
    # user 0 (H = {0, 4}): item 0 at rank 3 -> DCG@3 = 1/log2(4) = 0.5,
    #   IDCG@3 over min(2, 3) = 2 items = 1 + 1/log2(3); recall@3 = 1/2.
    # user 1 (H = {2}): item 2 at rank 2 (lost the tie for rank 1) -> DCG = 1/log2(3), IDCG = 1.
    # user 2: skipped (no held-out items).
    ndcg_user0_at3 = 0.5 / (1 + inv_log2_3)
    expected = {
        "recall@1": 0.0,
        "hit_rate@1": 0.0,
        "ndcg@1": 0.0,
        "recall@2": (0 + 1) / 2,
        "hit_rate@2": (0 + 1) / 2,
        "ndcg@2": (0 + inv_log2_3) / 2,
        "recall@3": (0.5 + 1) / 2,
        "hit_rate@3": (1 + 1) / 2,
        "ndcg@3": (ndcg_user0_at3 + inv_log2_3) / 2,  # = (0.306574 + 0.630930) / 2
        "num_users": 2,
        "num_users_skipped": 1,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert metrics["ndcg@3"] == pytest.approx(0.468752, abs=1e-6)

    assert recall_at_k(ranking, held_out, 3) == pytest.approx(0.75)
    assert hit_rate_at_k(ranking, held_out, 2) == pytest.approx(0.5)
    assert ndcg_at_k(ranking, held_out, 3) == pytest.approx(expected["ndcg@3"])
    assert evaluate_retrieval(users, items, held_out, [1, 2, 3], exclude=exclude) == metrics


def test_metrics_ignore_padding_and_use_ideal_dcg_over_min_of_sizes() -> None:
    ranking = torch.tensor([[5, -1, -1], [0, 1, 2]])
    held_out = [[5, 6, 7, 8], [2]]
    metrics = ranking_metrics(ranking, held_out, ks=[3])
    # user 0: 1 of 4 found -> recall 1/4; IDCG over min(4, 3) = 3 ranks, DCG = 1.
    # user 1: item 2 at rank 3 -> recall 1, DCG = 1/log2(4) = 0.5, IDCG = 1.
    idcg3 = 1 + 1 / math.log2(3) + 0.5
    assert metrics["recall@3"] == pytest.approx((0.25 + 1) / 2)
    assert metrics["ndcg@3"] == pytest.approx((1 / idcg3 + 0.5) / 2)


def test_ranking_metrics_validate_inputs() -> None:
    ranking = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="`ks`"):
        ranking_metrics(ranking, [[0], [1]], ks=[3])
    with pytest.raises(ValueError, match="`ranking`"):
        ranking_metrics(torch.tensor([[0, 0], [1, 0]]), [[0], [1]], ks=[1])
    with pytest.raises(ValueError, match="`held_out`"):
        ranking_metrics(ranking, [[0]], ks=[1])
    with pytest.raises(ValueError, match="`held_out`"):
        ranking_metrics(ranking, [[], []], ks=[1])


def test_popularity_baseline_uses_the_same_exclusion_and_tie_breaking() -> None:
    counts = torch.tensor([5, 9, 5, 1, 0, 9])
    exclude = [[1], [], [0, 1, 2, 3, 4, 5]]
    scores, ranking = popularity_top_k(counts, num_queries=3, k=4, exclude=exclude)
    # Counts tie 1 = 5 (9) and 0 = 2 (5): lower rows first; user 2 has every item excluded.
    assert ranking.tolist() == [[5, 0, 2, 3], [1, 5, 0, 2], [-1, -1, -1, -1]]
    assert scores[0].tolist() == [9.0, 5.0, 5.0, 1.0]
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
