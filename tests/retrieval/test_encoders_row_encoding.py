"""Tests of the two encoding paths of `retrieval.encoders`: the padding step, the code spaces,
`FeatureEncoder.encode_queries` (the table path with history) and the row encoder of
`retrieval.row_encoding`, which must give the table path's tensors row for row."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from retrieval.encoders import (
    DenseStats,
    FeatureEncoder,
    Vocabulary,
    encode_bag,
    pad_codes,
    stable_hash_bucket,
)
from retrieval.features import OOV_INDEX, DatasetSchema, FeatureKind, FeatureSpec
from retrieval.row_encoding import QueryRow, QueryRowEncoder, encode_query_rows, query_rows_table


def every_kind_schema() -> DatasetSchema:
    """One query feature of every kind; `region` reads the column `zip`."""
    return DatasetSchema(
        name="kinds",
        query_features=(
            FeatureSpec("country", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec("tags", FeatureKind.BAG, embedding_dim=4, max_length=3),
            FeatureSpec("region", FeatureKind.HASHED, column="zip", num_buckets=97),
            FeatureSpec("terms", FeatureKind.HASHED_BAG, max_length=2, num_buckets=31),
            FeatureSpec("age", FeatureKind.DENSE, missing_indicator=True),
            FeatureSpec("history", FeatureKind.HISTORY, max_length=3, shared_with="item_id"),
        ),
        item_features=(FeatureSpec("item_id", FeatureKind.CATEGORICAL),),
    )


def every_kind_encoder() -> FeatureEncoder:
    items = [f"i{j}" for j in range(6)]
    return FeatureEncoder(
        every_kind_schema(),
        vocabularies={
            "query": {
                "country": Vocabulary(["fr", "de"], [3, 1]),
                "tags": Vocabulary(["a", "b"], [2, 1]),
            },
            "item": {"item_id": Vocabulary(items[:4], [4, 3, 2, 1])},
        },
        dense_stats={"query": {"age": DenseStats(mean=30.0, std=10.0)}},
        user_ids=["u1"],
        item_ids=items,
    )


def test_pad_codes_places_each_rows_codes_first_and_pads() -> None:
    codes = np.array([5, 6, 7, 8], dtype=np.int64)
    lengths = np.array([0, 3, 1, 0], dtype=np.int64)
    assert pad_codes(codes, lengths, 3).tolist() == [[0, 0, 0], [5, 6, 7], [8, 0, 0], [0, 0, 0]]
    empty = pad_codes(np.zeros(0, dtype=np.int64), np.zeros(2, dtype=np.int64), 2)
    assert empty.tolist() == [[0, 0], [0, 0]] and empty.dtype == np.int64


def test_encode_bag_equals_a_plain_python_padding_on_random_lists() -> None:
    rng = random.Random(0)
    vocab = Vocabulary(["a", "b", "c"], [3, 2, 1])
    rows: list[list[str] | None] = [
        None if rng.random() < 0.1 else [rng.choice("abcdx") for _ in range(rng.randrange(6))]
        for _ in range(200)
    ]
    codes = {"a": 2, "b": 3, "c": 4}  # values from index NUM_RESERVED = 2; others OOV
    expected = [
        [codes.get(t, OOV_INDEX) for t in (row or [])[:4]] + [0] * (4 - len((row or [])[:4]))
        for row in rows
    ]
    assert encode_bag(rows, 4, vocab.lookup).tolist() == expected


def test_code_spaces_by_kind() -> None:
    encoder = every_kind_encoder()
    specs = {s.name: s for s in encoder.schema.query_features}
    country = encoder.code_space("query", specs["country"])
    assert country is not None and country.vocabulary is encoder.vocabulary("query", "country")
    assert country.unknown_code == OOV_INDEX
    assert country.codes(["de", "zz", None]).tolist() == [3, OOV_INDEX, OOV_INDEX]
    history = encoder.code_space("query", specs["history"])
    assert history is not None and history.vocabulary is encoder.item_id_vocabulary
    region = encoder.code_space("query", specs["region"])
    assert region is not None and region.vocabulary is None and region.unknown_code is None
    assert region.codes(["75", None]).tolist() == stable_hash_bucket(["75", None], 97).tolist()
    assert encoder.code_space("query", specs["age"]) is None
    assert encoder.feature_stats("query", specs["age"]) == DenseStats(mean=30.0, std=10.0)
    assert encoder.feature_stats("query", specs["country"]) is None


def test_encode_queries_reads_the_history_column() -> None:
    """The table path with history: ids most recent first, cut to 3, unknown -> OOV, PAD after."""
    encoder = every_kind_encoder()
    table = pa.table(
        {
            "country": ["de", None],
            "tags": pa.array([["b", "zz"], None], pa.list_(pa.string())),
            "zip": ["75", None],
            "terms": pa.array([["w"], []], pa.list_(pa.string())),
            "age": [40.0, None],
            "history": pa.array([["i2", "i9", "i0", "i1"], []], pa.list_(pa.string())),
        }
    )
    batch = encoder.encode_queries(table)
    # item_id codes: i0 -> 2, i1 -> 3, i2 -> 4, i3 -> 5; i9 unknown -> OOV 1
    assert batch["history"].tolist() == [[4, 1, 2], [0, 0, 0]]
    assert batch["age"].tolist() == [[1.0, 0.0], [0.0, 1.0]]  # (40 - 30) / 10; missing
    users = encoder.encode_users(table.drop_columns(["history"]))
    assert sorted(batch) == sorted([*users, "history"])
    for name, tensor in users.items():
        assert torch.equal(batch[name], tensor), name
    with pytest.raises(ValueError, match=r"queries table lacks columns \['history'\]"):
        encoder.encode_queries(table.drop_columns(["history"]))


def random_rows(rng: random.Random, count: int) -> list[QueryRow]:
    """Checked-looking rows over known, unknown and missing values of every kind."""

    def token(pool: str) -> str | None:
        return None if rng.random() < 0.1 else rng.choice(pool.split())

    rows = []
    for _ in range(count):
        values: dict[str, Any] = {
            "country": token("fr de xx yy"),
            "tags": None
            if rng.random() < 0.2
            else [token("a b c") for _ in range(rng.randrange(5))],
            "zip": token("75 13 69 33 06"),
            "terms": [token("w v u t") or "w" for _ in range(rng.randrange(4))],
            "age": None if rng.random() < 0.2 else rng.uniform(-50.0, 120.0),
        }
        values = {k: v for k, v in values.items() if rng.random() < 0.9}  # some left out
        history = tuple(
            rng.choice(["i0", "i1", "i3", "i5", "new"]) for _ in range(rng.randrange(5))
        )
        rows.append(QueryRow(values, history))
    return rows


@pytest.mark.parametrize("prefill", [False, True])
def test_row_encoder_equals_the_table_path_on_random_rows(prefill: bool) -> None:
    """30 batches of random rows, tight caches (capacity 3, 4 recent values): every tensor
    equals `encode_query_rows` (the table path), dtype included."""
    encoder = every_kind_encoder()
    fast = QueryRowEncoder(encoder, cache_capacity=3, prefill=prefill, code_cache_size=4)
    rng = random.Random(1)
    for step in range(30):
        rows = random_rows(rng, rng.randrange(1, 9))
        got, want = fast.encode(rows), encode_query_rows(encoder, rows)
        assert list(got) == [s.name for s in encoder.schema.query_features]
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == want[name].dtype, (step, name)
            assert torch.equal(got[name], want[name]), (step, name)
    sizes = fast.cached_values()
    # keyed like a row: by source column (`region` reads `zip`), the history by its name
    assert set(sizes) == {"country", "tags", "zip", "terms", "history"}
    assert all(size <= 3 + 4 for size in sizes.values()), sizes


def test_query_rows_table_and_empty_batches() -> None:
    encoder = every_kind_encoder()
    table = query_rows_table(encoder, [QueryRow({"zip": "75", "tags": ["a"]}, ("i1",))])
    assert table.column_names == ["country", "tags", "zip", "terms", "age", "history"]
    assert table.to_pylist() == [
        {
            "country": None,
            "tags": ["a"],
            "zip": "75",
            "terms": None,
            "age": None,
            "history": ["i1"],
        }
    ]
    with pytest.raises(ValueError, match="at least one query row"):
        QueryRowEncoder(encoder).encode([])
    with pytest.raises(ValueError, match="at least one query row"):
        encode_query_rows(encoder, [])
