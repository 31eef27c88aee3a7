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
from retrieval.row_encoding import QueryRowEncoder, encode_query_rows
from service.errors import InvalidRequestError
from service.feature_store import InProcessFeatureStore, iter_user_records
from service.openapi import query_object_schema
from service.query import (
    MAX_STANDARDISED,
    QueryFeatures,
    QuerySchema,
    dense_bounds,
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
    batch = encode_query_rows(encoder, queries)
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
    online = encode_query_rows(encoder, queries)
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
    """The row encoder (cached codes) == `encode_query_rows` (the encoder's table path),
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
        fast = QueryRowEncoder(encoder, cache_capacity=3, prefill=prefill)  # the cap
        for _ in range(2):
            got, want = fast.encode(queries), encode_query_rows(encoder, queries)
            assert sorted(got) == sorted(want)
            for name in want:
                assert got[name].dtype == want[name].dtype, name
                assert torch.equal(got[name], want[name]), name

    bundle = load_bundle(tiny_bundle)
    schema = QuerySchema.from_schema(bundle.encoder.schema)
    fast = QueryRowEncoder(bundle.encoder)
    store = InProcessFeatureStore.from_dataset(
        tiny_dataset, list(schema.columns), schema.history_length
    )
    users = []
    for record in store._records.values():
        features = dict(record.features)
        features[schema.history_name or ""] = list(record.history)
        users.append(normalize_query(features, schema))
    for _ in range(2):
        got, want = fast.encode(users), encode_query_rows(bundle.encoder, users)
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
    fast = QueryRowEncoder(bundle.encoder, prefill=True)
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
    want = encode_query_rows(bundle.encoder, users)

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
    assert torch.equal(codes, encode_query_rows(bundle.encoder, unknown)[schema.history_name])

    capped = QueryRowEncoder(bundle.encoder, cache_capacity=2, prefill=True)
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


@pytest.mark.parametrize(
    "value",
    [1e39, -1e39, 3.5e38, 2**128, -(2**128), 10**400],
    ids=["1e39", "-1e39", "3.5e38", "2**128", "-2**128", "10**400"],
)
def test_dense_values_beyond_float32_are_refused_naming_the_field(value: float) -> None:
    """Finite as float64 but not as float32 (max 3.4028235e38): the tower would see inf,
    then NaN, so the value is refused before it reaches a batch."""
    schema = QuerySchema.from_schema(dense_schema())
    with pytest.raises(InvalidRequestError) as info:
        normalize_query({"age": value}, schema)
    assert info.value.field == "query.age" and info.value.status_code == 422
    assert "float32" in info.value.message or "finite number" in info.value.message


def test_dense_values_within_float32_are_accepted() -> None:
    schema = QuerySchema.from_schema(dense_schema())
    top = float(np.finfo(np.float32).max)
    for value in (top, -top, 3.4e38, 2**127, 0, -1.5):
        assert normalize_query({"age": value}, schema).values == {"age": float(value)}


def test_dense_values_far_from_the_train_data_are_refused() -> None:
    """With the train statistics (`from_encoder`), a value more than `MAX_STANDARDISED`
    standard deviations from the train mean is refused (std 1e-3: the interval is
    [-1000, 1000]); both ends are accepted and encode to finite float32 values, and the
    OpenAPI document publishes the same interval."""
    encoder = FeatureEncoder(
        dense_schema(),
        vocabularies={
            "query": {"country": Vocabulary(["fr"], [1]), "tags": Vocabulary(["a"], [1])},
            "item": {"item_id": Vocabulary(["i1"], [1])},
        },
        dense_stats={"query": {"age": DenseStats(mean=0.0, std=1e-3)}},
        user_ids=["u1"],
        item_ids=["i1"],
    )
    schema = QuerySchema.from_encoder(encoder)
    assert set(schema.dense_stats) == {"age"}
    low, high = dense_bounds(schema.dense_stats["age"])
    assert (low, high) == (-MAX_STANDARDISED * 1e-3, MAX_STANDARDISED * 1e-3)
    for value in (1e36, 1000.5, -1000.5, 2**70):
        with pytest.raises(InvalidRequestError) as info:
            normalize_query({"age": value}, schema)
        assert info.value.field == "query.age" and "must be in [-1000, 1000]" in info.value.message
    for value in (low, high, 0.0):
        query = normalize_query({"age": value}, schema)
        encoded = encode_query_rows(encoder, [query])["age"]
        assert torch.isfinite(encoded).all()
    published = query_object_schema(schema, 10)["properties"]["age"]["anyOf"][0]
    assert (published["minimum"], published["maximum"]) == (low, high)


def hashed_schema() -> DatasetSchema:
    """Every kind the code caches serve: categorical, bag, hashed, hashed bag, history."""
    return DatasetSchema(
        name="hashed",
        query_features=(
            FeatureSpec("country", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec("tags", FeatureKind.BAG, embedding_dim=4, max_length=3),
            FeatureSpec("zip", FeatureKind.HASHED, embedding_dim=4, num_buckets=97),
            FeatureSpec(
                "terms", FeatureKind.HASHED_BAG, embedding_dim=4, max_length=3, num_buckets=31
            ),
            FeatureSpec(
                "history", FeatureKind.HISTORY, embedding_dim=4, max_length=3, shared_with="item_id"
            ),
        ),
        item_features=(FeatureSpec("item_id", FeatureKind.CATEGORICAL, embedding_dim=4),),
    )


def hashed_encoder() -> FeatureEncoder:
    items = [f"i{j}" for j in range(40)]
    return FeatureEncoder(
        hashed_schema(),
        vocabularies={
            "query": {
                "country": Vocabulary(["fr", "de"], [3, 1]),
                "tags": Vocabulary(["a", "b"], [2, 1]),
            },
            "item": {"item_id": Vocabulary(items, list(range(40, 0, -1)))},
        },
        dense_stats={},
        user_ids=["u1"],
        item_ids=items,
    )


def test_code_caches_stay_within_their_bound_and_give_the_reference_codes() -> None:
    """60 batches of never-seen hashed values, unknown and known vocabulary values: no
    cache ever holds more than the prefilled values + `code_cache_size`, and every batch
    encodes exactly as `encode_query_rows` (evicted values are looked up again)."""
    encoder = hashed_encoder()
    schema = QuerySchema.from_schema(encoder.schema)
    bound = 8
    for prefill in (False, True):
        fast = QueryRowEncoder(encoder, prefill=prefill, code_cache_size=bound)
        prefilled = fast.cached_values()  # null + the vocabulary with prefill, else empty
        for step in range(60):
            raw = [
                {
                    "country": ["fr", "de", f"xx{step}-{row}", None][row % 4],
                    "tags": ["a", f"t{step}-{row}", "b"],
                    "zip": f"z{step}-{row}",
                    "terms": [f"w{step}", f"w{step}-{row}", "w"],
                    # known ids cycling through the catalog (more than `bound` of them)
                    # and an unknown one
                    "history": [f"i{(step * 3 + row) % 40}", f"new{step}-{row}", "i0"],
                }
                for row in range(4)
            ]
            queries = [normalize_query(q, schema) for q in raw]
            got, want = fast.encode(queries), encode_query_rows(encoder, queries)
            for name in want:
                assert torch.equal(got[name], want[name]), (prefill, step, name)
            for name, size in fast.cached_values().items():
                assert size <= prefilled.get(name, 0) + bound + 1, (prefill, step, name, size)
        sizes = fast.cached_values()
        assert sizes["zip"] == bound and sizes["terms"] == bound  # full (no null was sent)
        if prefill:  # the whole vocabularies are prefilled: nothing is added to them
            for name in ("country", "tags", "history"):
                assert sizes[name] == prefilled[name], name


def test_unknown_vocabulary_values_are_never_cached() -> None:
    """Without prefill, 500 distinct unknown values (and unknown history ids) leave no
    entry: they map to OOV, and each would otherwise hold memory for good."""
    encoder = hashed_encoder()
    schema = QuerySchema.from_schema(encoder.schema)
    fast = QueryRowEncoder(encoder)  # no prefill, the default sizes
    for start in range(0, 500, 50):
        queries = [
            normalize_query({"country": f"c{i}", "tags": [f"t{i}"], "history": [f"h{i}"]}, schema)
            for i in range(start, start + 50)
        ]
        codes = fast.encode(queries)
        assert set(codes["country"].tolist()) == {OOV_INDEX}
    sizes = fast.cached_values()
    # at most null stays (missing values are in every batch)
    assert sizes["country"] <= 1 and sizes["tags"] <= 1 and sizes["history"] <= 1, sizes


def test_code_cache_drops_the_least_recently_used_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound 2: after a, b, then a again, c evicts b (not a): a needs no lookup, b does."""
    looked_up: list[list[str | None]] = []
    original = encoders.stable_hash_bucket

    def counted(values: Any, num_buckets: int) -> Any:
        looked_up.append(pa.array(values).to_pylist())
        return original(values, num_buckets)

    monkeypatch.setattr(encoders, "stable_hash_bucket", counted)
    encoder = hashed_encoder()
    schema = QuerySchema.from_schema(encoder.schema)
    fast = QueryRowEncoder(encoder, code_cache_size=2)

    def encode_zip(value: str) -> None:
        fast.encode([normalize_query({"zip": value, "terms": ["w"]}, schema)])

    for value in ("a", "b", "a", "c"):
        encode_zip(value)
    looked_up.clear()
    encode_zip("a")
    assert looked_up == []  # recently used: kept
    encode_zip("b")
    assert looked_up == [["b"]]  # least recently used: dropped, looked up again


def test_code_cache_size_must_not_be_negative() -> None:
    encoder = hashed_encoder()
    with pytest.raises(ValueError, match="code_cache_size"):
        QueryRowEncoder(encoder, code_cache_size=-1)
