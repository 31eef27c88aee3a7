"""Helpers of the index tests: a small catalog with odd string ids and a random model bundle.

The bundle is a `TwoTowerModel` with random weights written by `save_bundle` (no training:
the index job only needs the towers to be deterministic). Each item has a distinct dense
`price`, so no two item embeddings tie and exact rankings are unique.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.bundle import save_bundle
from retrieval.data.dataset import assign_splits, write_dataset
from retrieval.encoders import FeatureEncoder
from retrieval.features import DatasetSchema, FeatureKind, FeatureSpec
from retrieval.towers import ModelConfig, TowerConfig, TwoTowerModel

NUM_ITEMS = 600
NUM_USERS = 40
DIM = 16


def odd_item_id(j: int) -> str:
    """Ids with spaces, quotes, commas, a tab, a newline, a slash, accents and an emoji."""
    return f'it\u00e9m {j}/"q",\t\U0001f600\n#{j % 7}'


def index_schema() -> DatasetSchema:
    cat = FeatureKind.CATEGORICAL
    return DatasetSchema(
        name="index-tiny",
        query_features=(
            FeatureSpec("user_id", cat, embedding_dim=8),
            FeatureSpec(
                "history", FeatureKind.HISTORY, embedding_dim=8, max_length=5, shared_with="item_id"
            ),
        ),
        item_features=(
            FeatureSpec("item_id", cat, embedding_dim=8),
            FeatureSpec("genre", cat, embedding_dim=4),
            FeatureSpec("price", FeatureKind.DENSE),
        ),
    )


def make_index_dataset(out: Path, num_items: int = NUM_ITEMS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    user_ids = [f"u{u}" for u in range(NUM_USERS)]
    item_ids = [odd_item_id(j) for j in range(num_items)]
    users = pa.table({"user_id": user_ids})
    items = pa.table(
        {
            "item_id": item_ids,
            "genre": [f"g{j % 5}" for j in range(num_items)],
            "price": rng.permutation(num_items).astype(np.float64) / num_items + 1.0,
        }
    )
    rows_user, rows_item, rows_time = [], [], []
    for u in range(NUM_USERS):
        chosen = rng.choice(num_items, size=int(rng.integers(6, 12)), replace=False)
        for t, j in enumerate(chosen):
            rows_user.append(user_ids[u])
            rows_item.append(item_ids[int(j)])
            rows_time.append(1_000_000 + 60 * t)
    events = pa.table(
        {"user_id": rows_user, "item_id": rows_item, "timestamp": pa.array(rows_time, pa.int64())}
    )
    write_dataset(
        out, users, items, assign_splits(events, user_order=users["user_id"]), index_schema()
    )
    return out


def make_random_bundle(data_dir: Path, out: Path, *, seed: int = 0, nan: bool = False) -> Path:
    from retrieval.data.dataset import load_dataset

    dataset = load_dataset(data_dir)
    encoder = FeatureEncoder.fit(dataset.schema, dataset.users, dataset.items, dataset.interactions)

    def tower(side: str) -> TowerConfig:
        return TowerConfig(
            features=encoder.feature_inputs(side),  # type: ignore[arg-type]
            arrangement="parallel",
            cross_kind="full",
            cross_layers=1,
            mlp_hidden=(32,),
            head_hidden=(),
            output_dim=DIM,
        )

    model = TwoTowerModel(ModelConfig(query=tower("query"), item=tower("item"), seed=seed))
    if nan:  # a broken bundle: the item tower's output projection holds NaN
        head = [p for n, p in model.item_tower.named_parameters() if n.endswith("weight")][-1]
        head.data.fill_(float("nan"))
    save_bundle(out, model.eval(), encoder, train_config={"random": True}, metrics={})
    return out


def write_catalog_variant(src: Path, dst: Path, items: pa.Table) -> Path:
    """A copy of dataset `src` whose items.parquet is `items` (for bad-input tests)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name != "items.parquet":
            (dst / path.name).write_bytes(path.read_bytes())
    pq.write_table(items, dst / "items.parquet")
    return dst


WORLD_SIZE = 2


def sharded_rank_main(rank: int, port: int, args: list[str], out_dir: str) -> None:
    """One torchrun-like rank (module level so spawned children can import it): the environment torchrun sets, then the module's main."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from index.cli import main

    code = main(args)
    Path(out_dir, f"rank{rank}.rc").write_text(str(code))
