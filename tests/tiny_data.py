"""Tiny test data shared by the suites: import as `from tiny_data import ...`
(a unique module name, unlike `conftest`, which several test folders have)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa

from retrieval.data.dataset import assign_splits, write_dataset
from retrieval.data.movielens import movielens_schema

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def make_tiny_dataset(
    out: Path, *, num_users: int = 48, num_items: int = 120, seed: int = 0
) -> Path:
    """A small dataset in the project layout whose users prefer one genre each.

    Item j belongs to genre j % 6; user u likes genre u % 6 and draws ~80 % of their
    10-16 interactions from it, the rest uniformly: enough signal to learn in a few steps.
    """
    rng = np.random.default_rng(seed)
    user_ids = [f"u{u:03d}" for u in range(num_users)]
    item_ids = [f"m {j:03d}/x" for j in range(num_items)]  # odd characters on purpose
    users = pa.table(
        {
            "user_id": user_ids,
            "age_bucket": [["18-24", "25-34", "35-44"][u % 3] for u in range(num_users)],
            "gender": [["F", "M"][u % 2] for u in range(num_users)],
            "occupation": [
                ["student", "engineer", "artist", "other"][u % 4] for u in range(num_users)
            ],
            "zip_prefix": [f"{u % 7}0" for u in range(num_users)],
        }
    )
    items = pa.table(
        {
            "item_id": item_ids,
            "genres": [
                [GENRES[j % 6]] + ([GENRES[(j + 1) % 6]] if j % 5 == 0 else [])
                for j in range(num_items)
            ],
            "year_bucket": [f"{1980 + 5 * (j % 4)}-{1984 + 5 * (j % 4)}" for j in range(num_items)],
            "title_tokens": [
                ["movie", f"t{j % 9}", GENRES[j % 6].lower()] for j in range(num_items)
            ],
        }
    )
    rows_user, rows_item, rows_time = [], [], []
    for u in range(num_users):
        liked = [j for j in range(num_items) if j % 6 == u % 6]
        n = int(rng.integers(10, 17))
        chosen: list[int] = []
        while len(chosen) < n:
            j = int(rng.choice(liked)) if rng.random() < 0.8 else int(rng.integers(num_items))
            if j not in chosen:
                chosen.append(j)
        start = int(rng.integers(1_000_000, 2_000_000))
        for t, j in enumerate(chosen):
            rows_user.append(user_ids[u])
            rows_item.append(item_ids[j])
            rows_time.append(start + 60 * t)
    interactions = assign_splits(
        pa.table(
            {
                "user_id": rows_user,
                "item_id": rows_item,
                "timestamp": pa.array(rows_time, pa.int64()),
            }
        ),
        user_order=users["user_id"],
    )
    schema = dataclasses.replace(movielens_schema("ml-100k"), name="tiny")
    write_dataset(out, users, items, interactions, schema)
    return out


def tiny_train_config(**overrides: object):  # -> TrainConfig (import kept local for speed)
    from training.config import TrainConfig

    base = {
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.01,
        "warmup_steps": 2,
        "embedding_dims": {"title_tokens": 8},
        "history_length": 8,
        "model": {
            "cross_layers": 1,
            "rank": 8,
            "mlp_hidden": [32, 16],
            "head_hidden": [16],
            "output_dim": 16,
        },
        "loss": {"temperature": 0.1},
        "eval": {"ks": [5, 10, 20], "metric": "recall@10", "patience": 5},
    }
    base.update(overrides)
    return TrainConfig.from_dict(base)


INTERESTS = ["music", "sport", "travel", "cooking", "films", "books"]


def make_rich_query_dataset(out: Path, *, seed: int = 0) -> Path:
    """`make_tiny_dataset`'s users, items and interactions with a query tower that reads every
    kind of value a request can send: categorical (the MovieLens columns), dense (`age`,
    missing for every 5th user), bag (`interests`, a list per user, empty for some),
    hashed (`city`) and history.
    """
    from retrieval.data.dataset import load_dataset
    from retrieval.features import FeatureKind, FeatureSpec

    base = load_dataset(make_tiny_dataset(out.parent / f"{out.name}-base", seed=seed))
    num_users = base.users.num_rows
    users = (
        base.users.append_column(
            "age", pa.array([None if u % 5 == 0 else 18.0 + (u * 7) % 50 for u in range(num_users)])
        )
        .append_column(
            "interests",
            pa.array([[INTERESTS[(u + j) % 6] for j in range(u % 3)] for u in range(num_users)]),
        )
        .append_column("city", pa.array([f"city-{u % 11}" for u in range(num_users)]))
    )
    schema = dataclasses.replace(
        base.schema,
        name="tiny-rich-query",
        query_features=(
            *base.schema.query_features,
            FeatureSpec("age", FeatureKind.DENSE, missing_indicator=True),
            FeatureSpec("interests", FeatureKind.BAG, embedding_dim=4, max_length=4),
            FeatureSpec("city", FeatureKind.HASHED, embedding_dim=4, num_buckets=16),
        ),
        stats={},
    )
    write_dataset(out, users, base.items, base.interactions, schema)
    return out
