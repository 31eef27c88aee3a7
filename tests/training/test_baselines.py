"""Baselines: ALS (from `implicit`) on a toy matrix with an obvious co-consumption pattern,
and the context data both baselines are fitted on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.bundle import load_bundle
from retrieval.data.dataset import load_dataset
from retrieval.metrics import ItemSets, popularity_top_k
from training import baselines
from training.baselines import (
    ALSGrid,
    ALSParams,
    context_item_counts,
    factor_ranking,
    fit_als,
    popularity_ranking,
    slice_item_sets,
    user_item_matrix,
)

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


def test_slice_item_sets_rebases_rows() -> None:
    sets = ItemSets.from_lists([[1], [2, 3], [], [4]])
    part = slice_item_sets(sets, 1, 3)
    assert part.num_queries == 2 and part.row(0).tolist() == [2, 3] and part.row(1).tolist() == []


def test_popularity_ranking_equals_popularity_top_k() -> None:
    # Many ties and uneven exclusions: the sort-once ranking must equal the metrics engine's.
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5, (300,), generator=gen)
    exclude = ItemSets.from_lists(
        [torch.randint(0, 300, (int(n),), generator=gen) for n in torch.randint(0, 60, (50,))]
    )
    _, expected = popularity_top_k(counts, 50, 40, exclude)
    assert popularity_ranking(counts, exclude, 40, query_chunk_size=7).tolist() == expected.tolist()
