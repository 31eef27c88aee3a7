"""Synthetic datasets: determinism, layout, atomic writes, sampler fidelity, crossed signal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

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
# 2,500 users span three 1,024-user blocks; 5,000 items fill the 250 cells (~20 items each).
SIZES: dict[str, int] = {"num_items": 5000, "num_users": 2500, "num_interactions": 40_000}


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
    small: dict[str, int] = {"num_items": 1000, "num_users": 20, "num_interactions": 200}
    generate_synthetic_dataset(out, **small, seed=0)
    before = (out / INTERACTIONS_FILE).read_bytes()
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(out, **small, seed=1)
    assert (out / INTERACTIONS_FILE).read_bytes() == before
    generate_synthetic_dataset(out, **small, seed=1, overwrite=True)
    assert (out / INTERACTIONS_FILE).read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


# --------------------------------------------------------------------------- the generative model


def _exact_log_probs(
    catalog: Any, tables: Any, users: Any, user: int
) -> npt.NDArray[np.float64]:
    """log p(i | u) for every item: log softmax of the module docstring's score, by brute force."""
    item_latent = np.empty_like(catalog.latent)
    item_latent[catalog.item_of_position] = catalog.latent  # back to item order
    weight = np.empty(len(catalog.item_of_position))
    weight[catalog.item_of_position] = np.diff(np.r_[0.0, catalog.cumulative_weight])
    category = catalog.category.astype(np.int64)
    band = catalog.price_band.astype(np.int64)
    age_z = (float(users.age[user]) - 38.0) / 12.0
    score = (
        tables.cross[users.segment[user], category * 5 + band]
        + tables.country_cross[users.country[user], category]
        + 0.75 * age_z * (band - 2) / 2
        + item_latent.astype(np.float64) @ users.latent[user].astype(np.float64)
        + np.log(weight)
    )
    score -= score.max()
    return score - np.log(np.exp(score).sum())


def test_sampler_matches_the_exact_distribution() -> None:
    """The hierarchical sampler against brute-force p(i|u) over a 40,000-item catalog."""
    num_items, seed = 40_000, 3
    tables = synthetic._make_tables(num_items, seed)
    catalog = synthetic._make_catalog(num_items, tables, seed)
    users = synthetic._make_users(8, 8 * 20, num_items, tables, seed)
    rng = np.random.default_rng(0)
    cell_probs = synthetic._cell_probabilities(users, catalog, tables, 0, 8)
    draws = 40_000
    for user in range(4):
        exact = _exact_log_probs(catalog, tables, users, user)
        local = np.full(draws, user)
        sampled = synthetic._draw_items(rng, catalog, cell_probs, users.latent, local)
        # Cell marginals: total variation against the exact cell probabilities. Sampling
        # noise alone is ~0.02 here; sampling cells by popularity only gives ~0.5.
        cell = catalog.category.astype(np.int64) * 5 + catalog.price_band
        exact_cells = np.bincount(cell, weights=np.exp(exact), minlength=250)
        seen_cells = np.bincount(cell[sampled], minlength=250) / draws
        assert 0.5 * np.abs(exact_cells - seen_cells).sum() < 0.05
        # Items: the average exact log-probability of sampled items matches its expectation
        # under p (= -entropy), within 0.1 nats; dropping the latent term costs ~0.5 nats.
        expected = float(np.sum(np.exp(exact) * exact))
        assert abs(float(exact[sampled].mean()) - expected) < 0.1, (user, expected)


def _one_hot_logistic_loglik(
    train: list[npt.NDArray[np.int64]],
    train_label: npt.NDArray[np.float32],
    test: list[npt.NDArray[np.int64]],
    test_label: npt.NDArray[np.float32],
    sizes: list[int],
) -> tuple[float, float]:
    """Fit logit = b + sum_f w_f[x_f] (one-hot features, L2) by L-BFGS; held-out (loglik, AUC)."""
    torch.manual_seed(0)
    weights = [torch.zeros(size, requires_grad=True) for size in sizes]
    bias = torch.zeros(1, requires_grad=True)
    x_train = [torch.from_numpy(x) for x in train]
    y_train = torch.from_numpy(train_label)
    optimizer = torch.optim.LBFGS([*weights, bias], max_iter=200, line_search_fn="strong_wolfe")

    def logits(xs: list[torch.Tensor]) -> torch.Tensor:
        return bias + sum((w[x] for w, x in zip(weights, xs, strict=True)), torch.zeros(1))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(x_train), y_train)
        loss = loss + 1e-4 * sum(((w**2).sum() for w in weights), torch.zeros(()))
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        z = logits([torch.from_numpy(x) for x in test])
        y = torch.from_numpy(test_label)
        loglik = -torch.nn.functional.binary_cross_entropy_with_logits(z, y).item()
    score = z.numpy()
    ranks = np.argsort(np.argsort(score)) + 1.0  # AUC by the rank-sum formula
    positives = test_label == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    auc = (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return loglik, float(auc)


def test_crossed_signal_is_detectable(dataset_dir: Path) -> None:
    """Observed pairs vs uniform random items: the segment x category x band cross wins.

    Three logistic regressions on one-hot features, trained on 80 % of users and scored
    on the other 20 %: marginals (segment, category, band), the item cell
    (category x band) plus segment, and the full cross (segment x category x band).
    Only the last can express the user x item interaction T of the generative model.
    """
    users = _read(dataset_dir, USERS_FILE)
    items = _read(dataset_dir, ITEMS_FILE)
    events = _read(dataset_dir, INTERACTIONS_FILE)
    segment_of_user = _codes(users.column("segment"), "seg")
    category_of_item = _codes(items.column("category"), "cat")
    band_of_item = _codes(items.column("price_band"), "band")

    user = _ids(events.column("user_id"))
    positive_item = _ids(events.column("item_id"))
    rng = np.random.default_rng(0)
    negative_item = rng.integers(0, SIZES["num_items"], len(user))
    user = np.r_[user, user]
    item = np.r_[positive_item, negative_item]
    label = np.r_[np.ones(len(positive_item)), np.zeros(len(negative_item))].astype(np.float32)
    segment = segment_of_user[user]
    category = category_of_item[item]
    band = band_of_item[item]
    cell = category * 5 + band
    cross = segment * 250 + cell
    held_out = (user % 5) == 0

    def fit(features: list[npt.NDArray[np.int64]], sizes: list[int]) -> tuple[float, float]:
        return _one_hot_logistic_loglik(
            [f[~held_out] for f in features],
            label[~held_out],
            [f[held_out] for f in features],
            label[held_out],
            sizes,
        )

    marginal = fit([segment, category, band], [8, 50, 5])
    item_cell = fit([segment, cell], [8, 250])
    crossed = fit([segment, category, band, cross], [8, 50, 5, 2000])
    # Observed (seed 7): marginal -0.59 / AUC 0.74, item cell -0.56 / 0.77, cross -0.44 / 0.87.
    assert crossed[0] > marginal[0] + 0.08, (crossed, marginal)
    assert crossed[0] > item_cell[0] + 0.06, (crossed, item_cell)
    assert crossed[1] > marginal[1] + 0.06, (crossed, marginal)
    assert crossed[1] > item_cell[1] + 0.04, (crossed, item_cell)
