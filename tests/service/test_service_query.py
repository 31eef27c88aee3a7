"""Query checks and encoding: the service encodes a user exactly as the offline evaluation;
bad names, types and non-finite dense values are refused naming the field; settings refuse
unsafe values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from pydantic import SecretStr, ValidationError

from retrieval import encoders
from retrieval.bundle import load_bundle
from retrieval.data.dataset import load_dataset
from retrieval.encoders import OOV_INDEX, DenseStats, FeatureEncoder, Vocabulary
from retrieval.evaluation import build_eval_queries
from retrieval.features import DatasetSchema, FeatureKind, FeatureSpec
from service.errors import InvalidRequestError
from service.feature_store import InProcessFeatureStore, iter_user_records
from service.query import (
    QueryBatchEncoder,
    QueryFeatures,
    QuerySchema,
    encode_queries,
    normalize_query,
)
from service.settings import ServiceSettings


def dense_schema() -> DatasetSchema:
    return DatasetSchema(
        name="dense",
        query_features=(
            FeatureSpec("country", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec("tags", FeatureKind.BAG, embedding_dim=4, max_length=3),
            FeatureSpec("age", FeatureKind.DENSE, missing_indicator=True),
            FeatureSpec(
                "history", FeatureKind.HISTORY, embedding_dim=4, max_length=3, shared_with="item_id"
            ),
        ),
        item_features=(FeatureSpec("item_id", FeatureKind.CATEGORICAL, embedding_dim=4),),
    )


def dense_encoder() -> FeatureEncoder:
    schema = dense_schema()
    return FeatureEncoder(
        schema,
        vocabularies={
            "query": {
                "country": Vocabulary(["fr", "de"], [3, 1]),
                "tags": Vocabulary(["a", "b"], [2, 1]),
            },
            "item": {"item_id": Vocabulary(["i1", "i2", "i3"], [5, 4, 3])},
        },
        dense_stats={"query": {"age": DenseStats(mean=30.0, std=10.0)}},
        user_ids=["u1"],
        item_ids=["i1", "i2", "i3", "i4"],
    )


def test_inline_query_is_encoded_like_the_encoder() -> None:
    encoder = dense_encoder()
    schema = QuerySchema.from_schema(encoder.schema)
    queries = [
        normalize_query(
            {"country": "de", "tags": ["b", "zz"], "age": 40, "history": ["i3", "i4", "i1", "i2"]},
            schema,
        ),
        normalize_query({"country": "xx", "age": None}, schema),  # unknown value, missing age
        normalize_query({}, schema),
    ]
    batch = encode_queries(encoder, schema, queries)
    # country: fr -> 2, de -> 3, unknown -> OOV 1, missing -> OOV 1
    assert batch["country"].tolist() == [3, 1, 1]
    # tags: b -> 3, zz -> OOV 1, padded with 0 to max_length 3
    assert batch["tags"].tolist() == [[3, 1, 0], [0, 0, 0], [0, 0, 0]]
    # age: (40 - 30) / 10 = 1.0, indicator 0; missing -> (0, 1)
    assert batch["age"].tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    # history, most recent first, cut to 3: i3 -> 4, i4 (not in the vocabulary) -> OOV 1, i1 -> 2
    assert batch["history"].tolist() == [[4, 1, 2], [0, 0, 0], [0, 0, 0]]
    # the same rows through the encoder's own table path agree
    table = pa.table(
        {
            "country": pa.array(["de", "xx", None]),
            "tags": pa.array([["b", "zz"], None, None], pa.list_(pa.string())),
            "age": pa.array([40.0, None, None]),
        }
    )
    expected = encoder.encode_users(table)
    for name in ("country", "tags", "age"):
        assert torch.equal(batch[name], expected[name])


@pytest.mark.parametrize(
    ("query", "field", "fragment"),
    [
        ({"agee": 3}, "query.agee", "unknown query feature 'agee'"),
        ({"age": "old"}, "query.age", "must be a number"),
        ({"age": math.nan}, "query.age", "finite number"),
        ({"age": math.inf}, "query.age", "finite number"),
        ({"country": 1.5}, "query.country", "string or an integer"),
        ({"country": ["fr"]}, "query.country", "string or an integer"),
        ({"tags": "a"}, "query.tags", "list of strings"),
        ({"tags": ["a", 2.5]}, "query.tags[1]", "string or an integer"),
        ({"history": "i1"}, "query.history", "list of item ids"),
        ({"history": ["i1", None]}, "query.history", "got null"),
    ],
)
def test_bad_values_are_refused_naming_the_field(query: dict, field: str, fragment: str) -> None:
    schema = QuerySchema.from_schema(dense_schema())
    with pytest.raises(InvalidRequestError) as info:
        normalize_query(query, schema)
    assert info.value.field == field
    assert fragment in info.value.message
    assert info.value.status_code == 422


def test_integers_and_bools_become_their_text() -> None:
    schema = QuerySchema.from_schema(dense_schema())
    query = normalize_query({"country": 7, "tags": [1, True], "history": [12]}, schema)
    assert query.values == {"country": "7", "tags": ["1", "true"]}
    assert query.history == ("12",)


def test_history_length_limit() -> None:
    schema = QuerySchema.from_schema(dense_schema())
    with pytest.raises(InvalidRequestError, match="at most 5 item ids"):
        normalize_query({"history": ["i1"] * 6}, schema, max_history=5)


def test_store_records_encode_like_offline_evaluation(
    tiny_bundle: Path, tiny_dataset: Path
) -> None:
    """Every test user: features + history from the store == build_eval_queries' batch."""
    bundle = load_bundle(tiny_bundle)
    encoder = bundle.encoder
    schema = QuerySchema.from_schema(encoder.schema)
    dataset = load_dataset(tiny_dataset)
    offline = build_eval_queries(encoder, dataset, "test")
    store = InProcessFeatureStore.from_dataset(
        tiny_dataset, list(schema.columns), schema.history_length
    )
    user_ids = encoder.user_ids.take(pa.array(offline.user_rows)).to_pylist()
    queries = []
    for user_id in user_ids:
        record = store._records[user_id]
        raw = dict(record.features)
        raw[schema.history_name or ""] = list(record.history)
        queries.append(normalize_query(raw, schema))
    online = encode_queries(encoder, schema, queries)
    assert sorted(online) == sorted(offline.query_batch)
    for name, tensor in offline.query_batch.items():
        assert torch.equal(online[name], tensor), name


def test_store_records_hold_train_and_valid_only(tiny_dataset: Path) -> None:
    dataset = load_dataset(tiny_dataset)
    events = dataset.interactions
    records = dict(iter_user_records(tiny_dataset, ["user_id"], 4))
    user = "u000"
    mine = events.filter(pc.equal(events["user_id"], user))
    context = mine.filter(pc.is_in(mine["split"], value_set=pa.array(["train", "valid"])))
    test = mine.filter(pc.equal(mine["split"], "test"))
    items = context["item_id"].to_pylist()
    assert list(records[user].seen) == items  # distinct already (no repeats in tiny)
    assert list(records[user].history) == items[::-1][:4]  # last 4, most recent first
    assert not set(test["item_id"].to_pylist()) & set(records[user].seen)
    assert records[user].features == {"user_id": user}


def test_settings_refuse_unsafe_values() -> None:
    base: dict[str, Any] = {"model_dir": "m", "index_root": "i"}
    bad: dict[str, Any]
    for bad in (
        {"max_k": 0},
        {"max_k": 4096},
        {"max_batch_size": 0},
        {"request_timeout_s": 0},
        {"max_body_bytes": 10},
        {"redis_url": "http://x"},
        {"redis_prefix": "a b"},
        {"api_key": "short"},
        {"host": "0.0.0.0"},  # public without an API key
        {"default_k": 100, "max_k": 50},
        {"unknown_field": 1},
    ):
        with pytest.raises(ValidationError):
            ServiceSettings(**base, **bad)
    ok = ServiceSettings(**base, host="0.0.0.0", api_key=SecretStr("x" * 16))
    assert ok.api_key is not None and "x" * 16 not in repr(ok)


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVAL_MODEL_DIR", "/models/m")
    monkeypatch.setenv("RETRIEVAL_INDEX_ROOT", "/index")
    monkeypatch.setenv("RETRIEVAL_MAX_BATCH_SIZE", "8")
    given: dict[str, Any] = {"max_wait_ms": 0}  # the rest comes from the environment
    settings = ServiceSettings(**given)
    assert str(settings.model_dir) == "/models/m" and settings.max_batch_size == 8
    assert settings.max_wait_ms == 0


def test_canonical_query_is_order_free() -> None:
    a = QueryFeatures({"b": "1", "a": "2"}, ("x",)).canonical()
    b = QueryFeatures({"a": "2", "b": "1"}, ("x",)).canonical()
    assert a == b and np.array_equal(list(a["values"]), ["a", "b"])


def test_batch_encoder_equals_the_reference_encoding(tiny_bundle: Path, tiny_dataset: Path) -> None:
    """The serving encoder (cached codes) == `encode_queries` (the encoder's table path),
    on a dense/bag/history schema and on every user of the tiny dataset, twice (cold and
    warm caches), with and without prefilled caches."""
    encoder = dense_encoder()
    schema = QuerySchema.from_schema(encoder.schema)
    raw: tuple[dict[str, Any], ...] = (
        {"country": "de", "tags": ["b", "zz", "a", "b"], "age": 40, "history": ["i3", "x"]},
        {"country": None, "tags": [], "age": -2.5},
        {"tags": None, "history": ["i1", "i2", "i3", "i4", "i1"]},
        {},
    )
    queries = [normalize_query(q, schema) for q in raw]
    for prefill in (False, True):
        fast = QueryBatchEncoder(encoder, schema, cache_capacity=3, prefill=prefill)  # the cap
        for _ in range(2):
            got, want = fast.encode(queries), encode_queries(encoder, schema, queries)
            assert sorted(got) == sorted(want)
            for name in want:
                assert got[name].dtype == want[name].dtype, name
                assert torch.equal(got[name], want[name]), name

    bundle = load_bundle(tiny_bundle)
    schema = QuerySchema.from_schema(bundle.encoder.schema)
    fast = QueryBatchEncoder(bundle.encoder, schema)
    store = InProcessFeatureStore.from_dataset(
        tiny_dataset, list(schema.columns), schema.history_length
    )
    users = []
    for record in store._records.values():
        features = dict(record.features)
        features[schema.history_name or ""] = list(record.history)
        users.append(normalize_query(features, schema))
    for _ in range(2):
        got, want = fast.encode(users), encode_queries(bundle.encoder, schema, users)
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_prefilled_encoder_needs_no_lookup_and_equals_the_reference(
    tiny_bundle: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `prefill`, every vocabulary value is cached at construction: known values and
    history ids encode without a single `Vocabulary.lookup` call, to the reference codes;
    an unknown value gets OOV without a lookup (the whole vocabulary is cached, so it is
    not in it), as the encoder gives it; with a capped cache it is looked up."""
    bundle = load_bundle(tiny_bundle)
    schema = QuerySchema.from_schema(bundle.encoder.schema)
    fast = QueryBatchEncoder(bundle.encoder, schema, prefill=True)
    assert schema.history_name is not None
    cached = fast.cached_values()
    assert cached[schema.history_name] == len(bundle.encoder.item_id_vocabulary.values) + 1
    store = InProcessFeatureStore.from_dataset(
        tiny_dataset, list(schema.columns), schema.history_length
    )
    users = []
    for record in store._records.values():
        features = dict(record.features)
        features[schema.history_name] = list(record.history)
        users.append(normalize_query(features, schema))
    want = encode_queries(bundle.encoder, schema, users)

    calls: list[int] = []
    original = encoders._StringIndex.find  # what every `Vocabulary.lookup` runs

    def counted(self: Any, strings: pa.Array) -> Any:
        calls.append(len(strings))
        return original(self, strings)

    monkeypatch.setattr(encoders._StringIndex, "find", counted)
    got = fast.encode(users)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert calls == []
    unknown = [normalize_query({schema.history_name: ["no-such-item"]}, schema)]
    codes = fast.encode(unknown)[schema.history_name]
    assert calls == [] and int(codes[0, 0]) == OOV_INDEX
    assert torch.equal(codes, encode_queries(bundle.encoder, schema, unknown)[schema.history_name])

    capped = QueryBatchEncoder(bundle.encoder, schema, cache_capacity=2, prefill=True)
    assert capped.cached_values()[schema.history_name] == 2  # null and the first value
    calls.clear()
    codes = capped.encode(unknown)[schema.history_name]
    assert len(calls) == 1 and int(codes[0, 0]) == OOV_INDEX


def test_serve_command_refuses_unsafe_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from retrieval.cli import main

    argv = ["serve", "--model", "m", "--index", "i", "--host", "0.0.0.0", "--port", "8080"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "not a loopback address" in err
    assert main(["serve", "--model", "m", "--index", "i", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
