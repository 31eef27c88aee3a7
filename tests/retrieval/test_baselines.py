"""Baselines: EASE against a hand-computed example, ALS (from `implicit`) on a toy matrix
with an obvious co-consumption pattern, the tune-then-refit protocol, random rankings, and
the context data every baseline is fitted on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from retrieval.bundle import load_bundle
from retrieval.data.dataset import load_dataset
from retrieval.evaluation import baselines
from retrieval.evaluation.baselines import (
    ALSGrid,
    ALSParams,
    BaselineUnavailable,
    EASEParams,
    ease_ranking,
    evaluate_baselines,
    factor_ranking,
    fit_als,
    fit_ease,
    random_ranking,
    tune_then_refit,
)
from retrieval.evaluation.protocol import (
    build_eval_queries,
    context_item_counts,
    user_item_matrix,
)
from retrieval.ranking import ItemSets

needs_implicit = pytest.mark.skipif(
    not baselines.implicit_available(),
    reason="the optional `implicit` library (extra `cf`) is not installed",
)
# scipy comes with `implicit` (extra `cf`); the sparse context matrix needs it.
needs_scipy = pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None,
    reason="scipy (installed with the optional extra `cf`) is not installed",
)


@needs_implicit
def test_als_ranks_the_co_consumed_item_first() -> None:
    # 8 items in 4 pairs (0,1), (2,3), (4,5), (6,7); users 0-39 each consumed one whole
    # pair (10 users per pair). The query user 40 consumed item 2 only: the item that
    # always comes with 2 is 3, so ALS must put 3 first (2 itself is excluded).
    users, items = [], []
    for u in range(40):
        pair = u % 4
        users += [u, u]
        items += [2 * pair, 2 * pair + 1]
    users.append(40)
    items.append(2)
    from scipy.sparse import csr_matrix

    matrix = csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(41, 8))
    user_factors, item_factors = fit_als(
        matrix, ALSParams(factors=8, regularization=0.01, alpha=10.0, iterations=15), seed=0
    )
    ranking = factor_ranking(user_factors[[40]], item_factors, ItemSets.from_lists([[2]]), k=3)
    assert int(ranking[0, 0]) == 3
    assert 2 not in ranking[0].tolist()


def test_fit_als_without_implicit_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "implicit_available", lambda: False)
    with pytest.raises(baselines.BaselineUnavailable, match="pip install"):
        fit_als(None, ALSParams())  # refused before the matrix is looked at


@needs_scipy
def test_context_is_train_for_valid_and_train_plus_valid_for_test(
    tiny_bundle: Path, tiny_dataset: Path
) -> None:
    encoder = load_bundle(tiny_bundle).encoder
    dataset = load_dataset(tiny_dataset)
    splits = dataset.interactions["split"].to_pylist()
    train_events = splits.count("train")
    context_events = train_events + splits.count("valid")
    assert int(context_item_counts(encoder, dataset, "valid").sum()) == train_events
    assert int(context_item_counts(encoder, dataset, "test").sum()) == context_events
    matrix = user_item_matrix(encoder, dataset, "test")
    assert matrix.shape == (encoder.num_users, encoder.num_items)
    assert float(matrix.sum()) == context_events
    with pytest.raises(ValueError, match="`split`"):
        context_item_counts(encoder, dataset, "train")


def test_als_grid_and_params_are_checked() -> None:
    assert len(ALSGrid(factors=(8, 16), regularization=(0.1,), alpha=(1.0, 5.0)).points()) == 4
    with pytest.raises(ValueError, match="`alpha`"):
        ALSParams(alpha=0)


def test_ease_matches_the_hand_computed_3x3_example() -> None:
    from scipy.sparse import csr_matrix

    # X = [[1,1,0],[0,1,1],[1,1,1]] (a repeated event counts once), lambda = 1:
    # G = X^T X + I = [[3,2,1],[2,4,2],[1,2,3]], det G = 3*8 - 2*4 + 1*0 = 16,
    # P = adj(G) / 16 = [[8,-4,0],[-4,8,-4],[0,-4,8]] / 16, so diag P = 0.5 everywhere and
    # B_ij = -P_ij / P_jj = [[0, .5, 0], [.5, 0, .5], [0, .5, 0]].
    counts = np.array([[2, 1, 0], [0, 1, 1], [1, 1, 3]], dtype=np.float32)
    weights = fit_ease(csr_matrix(counts), l2=1.0)
    expected = np.array([[0, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0]])
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    # Scores X B: user 0 (items 0, 1) -> [0.5, 0.5, 0.5]; with 0 and 1 excluded, item 2.
    ranking = ease_ranking(
        csr_matrix(counts), weights, np.array([0]), ItemSets.from_lists([[0, 1]]), k=1
    )
    assert ranking.tolist() == [[2]]


def test_ease_refuses_a_catalog_above_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy.sparse import csr_matrix

    monkeypatch.setattr(baselines, "EASE_MAX_ITEMS", 4)
    with pytest.raises(BaselineUnavailable, match=r"5 x 5 inverse.*above 4 items"):
        fit_ease(csr_matrix(np.ones((2, 5), dtype=np.float32)), l2=1.0)
    with pytest.raises(ValueError, match="`l2`"):
        fit_ease(csr_matrix(np.ones((2, 3), dtype=np.float32)), l2=0.0)


@pytest.fixture(scope="module")
def tiny_protocol(tiny_bundle: Path, tiny_dataset: Path):
    """(encoder, dataset, test queries, valid queries) of the tiny bundle."""
    encoder = load_bundle(tiny_bundle).encoder
    dataset = load_dataset(tiny_dataset)
    test = build_eval_queries(encoder, dataset, "test")
    return encoder, dataset, test, build_eval_queries(encoder, dataset, "valid")


@needs_scipy
def test_tune_then_refit_picks_on_valid_then_refits_on_the_test_context(tiny_protocol) -> None:
    encoder, dataset, test, valid = tiny_protocol
    fitted: list[tuple[float, float]] = []  # (events in the matrix, parameter)
    train_events = dataset.interactions["split"].to_pylist().count("train")

    def fit(matrix: object, params: EASEParams):  # a ranker whose quality is set by params
        fitted.append((float(matrix.sum()), params.l2))  # type: ignore[attr-defined]
        weights = fit_ease(matrix, params.l2)

        def rank(queries, k):
            if params.l2 == 2.0:  # the best point on valid: the true EASE ranking
                return ease_ranking(matrix, weights, queries.user_rows, queries.exclude, k)
            return random_ranking(encoder.num_items, queries.exclude, k, seed=0)

        return rank

    points = [EASEParams(1.0), EASEParams(2.0), EASEParams(3.0)]
    result = tune_then_refit("ease", fit, points, encoder, dataset, test, [10], valid_queries=valid)
    assert result.params == {"l2": 2.0} and len(result.tuning) == 3
    # Three fits on train (the valid context), then one refit on train + valid.
    assert [n for n, _ in fitted[:3]] == [train_events] * 3
    assert fitted[3] == (float(user_item_matrix(encoder, dataset, "test").sum()), 2.0)
    assert result.context == "train+valid"


@needs_scipy
def test_baselines_and_model_see_the_same_context_items(
    tiny_bundle: Path, tiny_dataset: Path
) -> None:
    # The queries the model is scored on exclude exactly each user's rows of the context
    # matrix the baselines are fitted on, for every evaluated user.
    encoder = load_bundle(tiny_bundle).encoder
    dataset = load_dataset(tiny_dataset)
    for split in ("valid", "test"):
        queries = build_eval_queries(encoder, dataset, split)
        matrix = user_item_matrix(encoder, dataset, split).tocsr()
        for q, user in enumerate(queries.user_rows):
            context = sorted(matrix.indices[matrix.indptr[user] : matrix.indptr[user + 1]])
            assert queries.exclude.row(q).tolist() == context


def test_random_ranking_is_seeded_and_skips_excluded_items() -> None:
    exclude = ItemSets.from_lists([[0, 1], [], list(range(9))])
    first = random_ranking(10, exclude, 5, seed=3)
    assert first.tolist() == random_ranking(10, exclude, 5, seed=3).tolist()
    assert not set(first[0].tolist()) & {0, 1} and len(set(first[1].tolist())) == 5
    assert first[2].tolist() == [9, -1, -1, -1, -1]  # one item left


def test_evaluate_baselines_reports_ease_and_marks_cold_rows_not_applicable(
    tiny_protocol,
) -> None:
    encoder, dataset, test, valid = tiny_protocol
    results = evaluate_baselines(
        ("popularity", "ease"), encoder, dataset, test, [5, 10], valid_queries=valid
    )
    assert results["ease"]["params"]["l2"] in baselines.BaselineGrids().ease_l2
    assert results["ease"]["context"] == results["popularity"]["context"] == "train+valid"
    assert 0 <= results["ease"]["recall@5"] <= results["ease"]["recall@10"] <= 1
    cold = evaluate_baselines(
        ("random", "ease", "als"), encoder, dataset, test, [5], valid_queries=valid, cold="items"
    )
    assert cold["ease"]["skipped"].startswith("n/a") and cold["als"]["skipped"].startswith("n/a")
    assert "recall@5" in cold["random"]
