"""Synthetic datasets: determinism, layout, atomic writes, sampler fidelity, crossed signal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from retrieval.data import synthetic
from retrieval.data.dataset import validate_dataset
from retrieval.data.split import SPLIT_NAMES, split_codes_for_sorted
from retrieval.data.synthetic import generate_synthetic_dataset
from retrieval.features import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    SCHEMA_FILE,
    USERS_FILE,
    DatasetSchema,
    FeatureKind,
)

FILES = (USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE, SCHEMA_FILE)


class Sizes(TypedDict):
    num_items: int
    num_users: int
    num_interactions: int


# 2,500 users span three 1,024-user blocks; 5,000 items fill the 250 cells (~20 items each).
SIZES: Sizes = {"num_items": 5000, "num_users": 2500, "num_interactions": 40_000}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "synth"
    generate_synthetic_dataset(out, **SIZES, seed=7, chunk_size=10_000)
    return out


def _read(directory: Path, name: str) -> pa.Table:
    return pq.read_table(directory / name)


def _codes(column: pa.ChunkedArray, prefix: str) -> npt.NDArray[np.int64]:
    """'seg3' -> 3, 'cat07' -> 7, 'band4' -> 4."""
    return np.array([int(v[len(prefix) :]) for v in column.to_pylist()], dtype=np.int64)


def _ids(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """'u0000042' / 'i00000042' -> 42."""
    return np.array([int(v[1:]) for v in column.to_pylist()], dtype=np.int64)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(dataset_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_synthetic_dataset(again, **SIZES, seed=7, chunk_size=10_000)
    for name in FILES:
        assert (again / name).read_bytes() == (dataset_dir / name).read_bytes(), name


def test_rows_do_not_depend_on_chunk_size(dataset_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small-chunks"
    generate_synthetic_dataset(small, **SIZES, seed=7, chunk_size=777)
    for name in (USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE):
        assert _read(small, name).equals(_read(dataset_dir, name)), name
    assert (small / SCHEMA_FILE).read_bytes() == (dataset_dir / SCHEMA_FILE).read_bytes()
    # The chunks are real: 5,000 items / 777 rows -> 7 row groups; interactions: 3 blocks.
    assert pq.ParquetFile(small / ITEMS_FILE).metadata.num_row_groups == 7
    assert pq.ParquetFile(small / INTERACTIONS_FILE).metadata.num_row_groups == 3
    assert pq.ParquetFile(dataset_dir / ITEMS_FILE).metadata.num_row_groups == 1


def test_another_seed_gives_other_data(dataset_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_synthetic_dataset(other, **SIZES, seed=8, chunk_size=10_000)
    for name in (USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE):
        assert not _read(other, name).equals(_read(dataset_dir, name)), name
    mine = _read(dataset_dir, INTERACTIONS_FILE).column("item_id").to_pylist()
    theirs = _read(other, INTERACTIONS_FILE).column("item_id").to_pylist()
    same = sum(a == b for a, b in zip(mine, theirs, strict=False))
    assert same < 0.05 * len(mine)


# --------------------------------------------------------------------------- layout


def test_layout_schema_and_split_protocol(dataset_dir: Path) -> None:
    validate_dataset(dataset_dir)  # the project's own format check
    users = _read(dataset_dir, USERS_FILE)
    items = _read(dataset_dir, ITEMS_FILE)
    events = _read(dataset_dir, INTERACTIONS_FILE)
    assert users.column_names == ["user_id", "segment", "country", "device", "age"]
    assert items.column_names == [
        *("item_id", "category", "price_band", "brand", "tags", "price", "quality")
    ]
    assert events.column_names == ["user_id", "item_id", "timestamp", "split"]
    assert events.schema.field("timestamp").type == pa.int64()
    assert items.schema.field("tags").type == pa.list_(pa.string())

    # Ids: fixed width, unique, row order = index.
    assert users.column("user_id")[42].as_py() == "u0000042"
    assert items.column("item_id")[42].as_py() == "i00000042"
    assert np.array_equal(_ids(users.column("user_id")), np.arange(SIZES["num_users"]))
    assert np.array_equal(_ids(items.column("item_id")), np.arange(SIZES["num_items"]))

    # Interactions: known ids, sorted by (user, strictly increasing timestamp), split protocol.
    user = _ids(events.column("user_id"))
    item = _ids(events.column("item_id"))
    assert user.min() >= 0 and user.max() < SIZES["num_users"]
    assert item.min() >= 0 and item.max() < SIZES["num_items"]
    timestamp = events.column("timestamp").to_numpy()
    same_user = user[1:] == user[:-1]
    assert np.all(user[1:] >= user[:-1])
    assert np.all(timestamp[1:][same_user] > timestamp[:-1][same_user])
    codes = np.array([SPLIT_NAMES.index(s) for s in events.column("split").to_pylist()])
    assert np.array_equal(codes, split_codes_for_sorted(user))
    counts = np.bincount(user, minlength=SIZES["num_users"])
    assert counts.min() >= synthetic.MIN_INTERACTIONS_PER_USER
    assert counts.sum() == SIZES["num_interactions"]  # exact when no user runs short
    assert counts.max() > 5 * counts.mean()  # skewed activity
    pairs = user * SIZES["num_items"] + item
    assert len(np.unique(pairs)) == len(pairs)  # a user meets an item once
    per_user_test = np.bincount(user[codes == 2], minlength=SIZES["num_users"])
    assert per_user_test.min() >= 1  # every user (>= 5 events) has a test item

    # Feature values.
    assert set(users.column("segment").to_pylist()) == {f"seg{s}" for s in range(8)}
    assert len(set(users.column("country").to_pylist())) == 20
    assert 0 < users.column("age").null_count < 0.1 * users.num_rows
    assert len(set(items.column("category").to_pylist())) == 50
    assert len(set(items.column("price_band").to_pylist())) == 5
    assert len(set(items.column("brand").to_pylist())) == SIZES["num_items"] // 100
    tag_lists = items.column("tags").to_pylist()
    assert all(1 <= len(t) <= 4 and len(set(t)) == len(t) for t in tag_lists)
    price = items.column("price").to_numpy()
    assert price.min() > 0
    band = _codes(items.column("price_band"), "band")
    medians = [np.median(price[band == b]) for b in range(5)]
    assert medians == sorted(medians)  # price bands are ordered by price

    # Schema.
    schema = DatasetSchema.load(dataset_dir)
    assert schema.name == "synth-5000"
    specs = {s.name: s for s in (*schema.query_features, *schema.item_features)}
    assert specs["history"].kind == FeatureKind.HISTORY
    assert specs["history"].embedding_dim == specs["item_id"].embedding_dim
    assert specs["age"].missing_indicator
    assert specs["user_id"].min_count > 1
    assert specs["brand"].kind == FeatureKind.HASHED and specs["brand"].num_buckets >= 64
    assert specs["tags"].kind == FeatureKind.BAG
    assert schema.stats["users"] == SIZES["num_users"]
    assert schema.stats["interactions"]["total"] == events.num_rows
    assert schema.stats["interactions"]["test"] == int(np.sum(codes == 2))
    assert schema.stats["generator"]["seed"] == 7


def test_returned_stats(tmp_path: Path) -> None:
    stats = generate_synthetic_dataset(
        tmp_path / "d", num_items=2000, num_users=100, num_interactions=1000, seed=1
    )
    assert stats["interactions"]["total"] == 1000
    assert sum(stats["interactions"][name] for name in SPLIT_NAMES) == 1000
    assert stats["elapsed_s"]["total"] > 0
    assert set(stats["files"]) == set(FILES)
    json.dumps(stats)  # JSON-friendly


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_interactions": 499}, "`num_interactions` must be >= 5 * num_users = 500; got 499"),
        ({"num_items": 999}, "`num_items` must be >= 1000; got 999"),
        ({"num_users": 0}, "`num_users` must be >= 1; got 0"),
        ({"seed": -1}, "`seed` must be >= 0; got -1"),
        ({"chunk_size": 0}, "`chunk_size` must be >= 1; got 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, change: dict[str, int], message: str) -> None:
    args: dict[str, Any] = {"num_items": 1000, "num_users": 100, "num_interactions": 500, "seed": 0}
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        generate_synthetic_dataset(tmp_path / "d", **{**args, **change})
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- atomic writes


def test_failure_mid_generation_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_block = synthetic._interaction_block
    calls = []

    def failing_block(block: int, *args: Any) -> Any:
        calls.append(block)
        if block == 1:
            raise RuntimeError("disk on fire")
        return real_block(block, *args)

    monkeypatch.setattr(synthetic, "_interaction_block", failing_block)
    out = tmp_path / "synth"
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_synthetic_dataset(out, **SIZES, seed=0, chunk_size=100)
    assert calls == [0, 1]  # block 0 was generated and written before the failure
    assert list(tmp_path.iterdir()) == []  # neither `out` nor a temporary sibling


def test_existing_directory_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    small: Sizes = {"num_items": 1000, "num_users": 20, "num_interactions": 200}
    generate_synthetic_dataset(out, **small, seed=0)
    before = (out / INTERACTIONS_FILE).read_bytes()
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(out, **small, seed=1)
    assert (out / INTERACTIONS_FILE).read_bytes() == before
    generate_synthetic_dataset(out, **small, seed=1, overwrite=True)
    assert (out / INTERACTIONS_FILE).read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


# --------------------------------------------------------------------------- the generative model


def _log_softmax(score: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    score = score - score.max()
    return score - np.log(np.exp(score).sum())


def _exact_log_probs(
    catalog: Any, tables: Any, users: Any, user: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(log p(i | u), log p0(i | u)) for every item, by brute force over the catalog.

    p is the softmax of the module docstring's score s(u, i); p0 drops the latent term
    <p_u, q_i> (the sampler's proposal).
    """
    item_latent = np.empty_like(catalog.latent)
    item_latent[catalog.item_of_position] = catalog.latent  # back to item order
    weight = np.empty(len(catalog.item_of_position))
    weight[catalog.item_of_position] = np.diff(np.r_[0.0, catalog.cumulative_weight])
    category = catalog.category.astype(np.int64)
    band = catalog.price_band.astype(np.int64)
    age_z = (float(users.age[user]) - 38.0) / 12.0
    without_latent = (
        tables.cross[users.segment[user], category * 5 + band]
        + tables.country_cross[users.country[user], category]
        + 0.75 * age_z * (band - 2) / 2
        + np.log(weight)
    )
    latent = item_latent.astype(np.float64) @ users.latent[user].astype(np.float64)
    return _log_softmax(without_latent + latent), _log_softmax(without_latent)


def test_sampler_matches_the_exact_distribution() -> None:
    """The hierarchical sampler against brute-force p(i|u) over a 40,000-item catalog."""
    num_items, seed, num_users, draws = 40_000, 3, 8, 40_000
    tables = synthetic._make_tables(num_items, seed)
    catalog = synthetic._make_catalog(num_items, tables, seed)
    users = synthetic._make_users(num_users, num_users * 20, num_items, tables, seed)
    cell_probs = synthetic._cell_probabilities(users, catalog, tables, 0, num_users)
    cell = catalog.category.astype(np.int64) * 5 + catalog.price_band
    rng = np.random.default_rng(0)
    recovered, distance, proposal_distance = [], [], []
    for user in range(num_users):
        log_p, log_p0 = _exact_log_probs(catalog, tables, users, user)
        sampled = synthetic._draw_items(
            rng, catalog, cell_probs, users.latent, np.full(draws, user)
        )
        # Cells: total variation to the exact cell marginals. Sampling noise alone is
        # ~0.02; observed 0.02-0.06, while the proposal p0 (no latent term) is 0.06-0.22 away.
        exact_cells = np.bincount(cell, weights=np.exp(log_p), minlength=250)
        seen_cells = np.bincount(cell[sampled], minlength=250) / draws
        proposal_cells = np.bincount(cell, weights=np.exp(log_p0), minlength=250)
        distance.append(0.5 * np.abs(exact_cells - seen_cells).sum())
        proposal_distance.append(0.5 * np.abs(exact_cells - proposal_cells).sum())
        # Items: E[log p(i)] over sampled items, between E_p0[log p] (proposal only, 0) and
        # E_p[log p] = -entropy (exact sampling, 1). Sampling-importance-resampling with 16
        # candidates recovers most of the gap (0.74-1.0, median 0.90; 1 candidate: ~0).
        proposal = float(np.sum(np.exp(log_p0) * log_p))
        exact = float(np.sum(np.exp(log_p) * log_p))
        recovered.append((float(log_p[sampled].mean()) - proposal) / (exact - proposal))
    assert max(distance) < 0.07, distance
    assert np.mean(distance) < 0.5 * np.mean(proposal_distance), (distance, proposal_distance)
    assert min(recovered) > 0.7, recovered
    assert float(np.median(recovered)) > 0.85, recovered


def _fit_one_hot_logistic(
    features: list[npt.NDArray[np.int64]],
    sizes: list[int],
    train: npt.NDArray[np.float64],
    test: npt.NDArray[np.float64],
) -> tuple[float, float]:
    """Logistic regression logit = b + sum_f w_f[x_f] on one-hot features; held-out (loglik, AUC).

    Every feature is a function of the (segment, category, band) group, so examples are
    aggregated per group: `train` and `test` are [groups, 2] counts of (negatives,
    positives), and the binomial log-likelihood of a group equals the sum over its rows.

    Args:
        features: per feature, [groups] value of the feature in each group.
        sizes: per feature, its number of values.
        train: [groups, 2] counts the model is fitted on (L-BFGS, small L2).
        test: [groups, 2] held-out counts.

    Returns:
        Held-out mean log-likelihood per example and AUC (ties count one half).
    """
    weights = [torch.zeros(size, dtype=torch.float64, requires_grad=True) for size in sizes]
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    index = [torch.from_numpy(f) for f in features]
    negatives, positives = torch.from_numpy(train[:, 0]), torch.from_numpy(train[:, 1])
    optimizer = torch.optim.LBFGS(
        [*weights, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def logits() -> torch.Tensor:
        return bias + torch.stack([w[x] for w, x in zip(weights, index, strict=True)]).sum(0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        z = logits()
        nll = (positives * F.softplus(-z) + negatives * F.softplus(z)).sum() / train.sum()
        loss = nll + 1e-5 * torch.stack([(w**2).sum() for w in weights]).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    z = logits().detach().numpy()  # (groups,)
    log_sigmoid = -np.logaddexp(0.0, -z)
    log_one_minus = -np.logaddexp(0.0, z)
    loglik = float((test[:, 1] @ log_sigmoid + test[:, 0] @ log_one_minus) / test.sum())
    # AUC: P(score of a positive > score of a negative), groups sorted by score.
    order = np.argsort(z, kind="stable")
    neg, pos = test[order, 0], test[order, 1]
    _, first = np.unique(z[order], return_index=True)  # tie blocks of equal scores
    tie_id = np.cumsum(np.isin(np.arange(len(z)), first)) - 1
    neg_tied = np.bincount(tie_id, weights=neg)
    pos_tied = np.bincount(tie_id, weights=pos)
    neg_below = np.cumsum(neg_tied) - neg_tied
    auc = float((pos_tied @ (neg_below + 0.5 * neg_tied)) / (pos.sum() * neg.sum()))
    return loglik, auc


def test_crossed_signal_is_detectable(dataset_dir: Path) -> None:
    """Observed pairs vs uniform random items: the segment x category x band cross wins.

    Positives are the observed (user, item) pairs, negatives one uniformly random item per
    positive for the same user. Three logistic regressions on one-hot features, fitted on
    80 % of the users and scored on the other 20 %: marginals (segment, category, band),
    the item cell (category x band) plus segment, and the full cross (segment x category x
    band). Only the last can express the user x item interaction T of the model.
    """
    users = _read(dataset_dir, USERS_FILE)
    items = _read(dataset_dir, ITEMS_FILE)
    events = _read(dataset_dir, INTERACTIONS_FILE)
    segment_of_user = _codes(users.column("segment"), "seg")
    cell_of_item = _codes(items.column("category"), "cat") * 5 + _codes(
        items.column("price_band"), "band"
    )
    user = _ids(events.column("user_id"))
    positive_item = _ids(events.column("item_id"))
    negative_item = np.random.default_rng(0).integers(0, SIZES["num_items"], len(user))

    def group_counts(rows: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        """[2000, 2] (negatives, positives) per group = segment * 250 + cell."""
        seg = segment_of_user[user[rows]] * 250
        return np.stack(
            [
                np.bincount(seg + cell_of_item[negative_item[rows]], minlength=2000),
                np.bincount(seg + cell_of_item[positive_item[rows]], minlength=2000),
            ],
            axis=1,
        ).astype(np.float64)

    held_out = user % 5 == 0
    train, test = group_counts(~held_out), group_counts(held_out)
    group = np.arange(2000)
    segment, cell = group // 250, group % 250
    category, band = cell // 5, cell % 5

    marginal = _fit_one_hot_logistic([segment, category, band], [8, 50, 5], train, test)
    item_cell = _fit_one_hot_logistic([segment, cell], [8, 250], train, test)
    crossed = _fit_one_hot_logistic([segment, category, band, group], [8, 50, 5, 2000], train, test)
    # Observed (seed 7), (loglik, AUC): marginal (-0.675, 0.612), item cell (-0.652, 0.660),
    # cross (-0.520, 0.821); a constant model scores (-0.693, 0.5).
    assert crossed[0] > marginal[0] + 0.08, (crossed, marginal)
    assert crossed[0] > item_cell[0] + 0.06, (crossed, item_cell)
    assert crossed[1] > marginal[1] + 0.1, (crossed, marginal)
    assert crossed[1] > item_cell[1] + 0.08, (crossed, item_cell)
