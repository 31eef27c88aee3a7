"""Recall / hit rate / NDCG on a toy ranking, against hand-computed values (the exact top-K
itself is tested in test_ranking.py)."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.evaluation.metrics import (
    evaluate_retrieval,
    hit_rate_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
)
from retrieval.ranking import exact_top_k


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
