"""Tests of retrieval.encoders: vocabularies, stable hashing, dense/bag encoding, causal
history, train-only fitting and the save/load round trip of `FeatureEncoder`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from retrieval import encoders
from retrieval.encoders import (
    DenseStats,
    FeatureEncoder,
    Vocabulary,
    build_history,
    encode_bag,
    encode_dense,
    fnv1a_64,
    history_at_end,
    stable_hash_bucket,
)
from retrieval.features import (
    NUM_RESERVED,
    OOV_INDEX,
    DatasetSchema,
    FeatureInput,
    FeatureKind,
    FeatureSpec,
)

MASK64 = (1 << 64) - 1


def reference_fnv1a_64(data: bytes) -> int:
    """Plain FNV-1a 64, byte by byte, as in the FNV reference code."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def reference_bucket(value: str, num_buckets: int) -> int:
    """NUM_RESERVED + fmix64(fnv1a_64(utf8)) % num_buckets, in plain Python integers."""
    k = reference_fnv1a_64(value.encode("utf-8"))
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK64
    k ^= k >> 33
    return NUM_RESERVED + k % num_buckets


# ------------------------------------------------------------------------------ vocabulary


def test_vocabulary_orders_by_count_then_value_and_reserves_pad_oov() -> None:
    vocab = Vocabulary.fit(["b", "c", "a", "c", "b", "c", "d", None, None, None])
    # counts: c 3, b 2, a 1, d 1 (nulls ignored) -> c, b, then a < d
    assert vocab.values == ["c", "b", "a", "d"]
    assert vocab.counts.tolist() == [3, 2, 1, 1]
    assert len(vocab) == 4 + NUM_RESERVED
    assert vocab.lookup(["c", "b", "a", "d"]).tolist() == [2, 3, 4, 5]


def test_vocabulary_order_matches_python_sort_on_random_unicode() -> None:
    rng = np.random.default_rng(0)
    alphabet = ["a", "B", "é", "ß", "中", "😀", "1", " "]
    words = ["".join(rng.choice(alphabet, size=rng.integers(0, 4))) for _ in range(300)]
    vocab = Vocabulary.fit(words)
    counts: dict[str, int] = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    expected = sorted(counts, key=lambda w: (-counts[w], w))  # code point order
    assert vocab.values == expected
    assert Vocabulary.from_counts(counts) == vocab


def test_vocabulary_min_count_sends_rare_values_to_oov() -> None:
    vocab = Vocabulary.fit(["x", "x", "x", "y", "y", "z"], min_count=2)
    assert vocab.values == ["x", "y"]
    assert vocab.lookup(["x", "y", "z"]).tolist() == [2, 3, OOV_INDEX]


def test_vocabulary_unknown_null_and_nan_values_map_to_oov() -> None:
    vocab = Vocabulary.fit(["a", "b"])
    assert vocab.lookup(["b", "never-seen", None, "a"]).tolist() == [3, 1, 1, 2]
    assert vocab.lookup(np.array(["a", np.nan, "q"], dtype=object)).tolist() == [2, 1, 1]
    assert vocab.lookup([]).tolist() == []
    empty = Vocabulary.fit([None, None])
    assert len(empty) == NUM_RESERVED
    assert empty.lookup(["a", None]).tolist() == [1, 1]


def test_vocabulary_of_integers_reads_their_decimal_text() -> None:
    vocab = Vocabulary.fit(pa.array([1990, 1995, 1990, None]))
    assert vocab.values == ["1990", "1995"]
    assert vocab.lookup(pa.array([1995, 1990, 2001])).tolist() == [3, 2, 1]
    assert vocab.lookup(["1995"]).tolist() == [3]


def test_vocabulary_lookup_matches_dict_reference_and_chunked_input() -> None:
    rng = np.random.default_rng(1)
    train = [f"v{i}" for i in rng.zipf(1.5, size=5000) % 700]
    vocab = Vocabulary.fit(train, min_count=3)
    index = {v: i + NUM_RESERVED for i, v in enumerate(vocab.values)}
    queries = [f"v{i}" for i in rng.integers(0, 1000, size=4000)]
    expected = [index.get(q, OOV_INDEX) for q in queries]
    assert vocab.lookup(queries).tolist() == expected
    chunked = pa.chunked_array([pa.array(queries[:1000]), pa.array(queries[1000:])])
    assert vocab.lookup(chunked).tolist() == expected
    dictionary = pa.array(queries).dictionary_encode()
    assert vocab.lookup(dictionary).tolist() == expected


def test_vocabulary_lookup_is_exact_when_hashes_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    def constant_hash(strings: pa.Array) -> np.ndarray:
        return np.zeros(len(strings), dtype=np.uint64)

    monkeypatch.setattr(encoders, "_hash64_unique", constant_hash)
    # one value: no collision inside the vocabulary, but "b" hashes like "a"
    single = Vocabulary.fit(["a"])
    assert single.lookup(["b", "a"]).tolist() == [OOV_INDEX, 2]
    # several values sharing one hash: the index falls back to exact set lookup
    several = Vocabulary.fit(["a", "a", "b", "c"])
    assert several.lookup(["c", "b", "a", "z"]).tolist() == [4, 3, 2, OOV_INDEX]


def test_vocabulary_json_round_trip_is_exact(tmp_path: Path) -> None:
    values = ["", "naïve", "中文", "😀", "1990", "a b", 'quote"', "x" * 200]
    vocab = Vocabulary.fit(values + values[:3], min_count=1)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab.to_dict()))
    loaded = Vocabulary.from_dict(json.loads(path.read_text()))
    assert loaded == vocab
    assert loaded.values == vocab.values
    assert loaded.min_count == vocab.min_count
    queries = [*values, "missing", None]
    np.testing.assert_array_equal(loaded.lookup(queries), vocab.lookup(queries))


def test_vocabulary_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary(["a", "a"], [1, 1])
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.fit(["a"], min_count=0)
    with pytest.raises(ValueError, match="expected string or integer"):
        Vocabulary.fit(pa.array([1.5, 2.5]))
    with pytest.raises(ValueError, match="keys"):
        Vocabulary.from_dict({"values": []})


# ------------------------------------------------------------------------------ hashing


def test_fnv1a_64_matches_published_vectors_and_reference() -> None:
    # Vectors from the FNV reference test suite (fnv1a 64-bit).
    assert fnv1a_64(["", "a", "foobar"]).tolist() == [
        0xCBF29CE484222325,
        0xAF63DC4C8601EC8C,
        0x85944171F73967E8,
    ]
    rng = np.random.default_rng(2)
    alphabet = [*"abcXYZ019 -_", "é", "中", "😀"]
    words = ["".join(rng.choice(alphabet, size=rng.integers(0, 60))) for _ in range(200)]
    expected = [reference_fnv1a_64(w.encode("utf-8")) for w in words]
    assert fnv1a_64(words).tolist() == expected


def test_stable_hash_bucket_golden_values_and_reference_formula() -> None:
    values = ["a", "b", "item_42", "Drama", "中文", ""]
    buckets = stable_hash_bucket(values, num_buckets=1000)
    # Golden: pinned once; a change here re-buckets every hashed feature of every saved model.
    assert buckets.tolist() == [317, 706, 680, 821, 339, 344]
    assert buckets.tolist() == [reference_bucket(v, 1000) for v in values]
    assert buckets.dtype == np.int64


def test_stable_hash_bucket_nulls_integers_and_range() -> None:
    assert stable_hash_bucket([None, "a", None], 10).tolist()[::2] == [OOV_INDEX, OOV_INDEX]
    np.testing.assert_array_equal(
        stable_hash_bucket(pa.array([7, -3, None]), 97), stable_hash_bucket(["7", "-3", None], 97)
    )
    buckets = stable_hash_bucket([f"v{i}" for i in range(5000)], 7)
    assert buckets.min() >= NUM_RESERVED and buckets.max() < NUM_RESERVED + 7
    assert set(np.bincount(buckets - NUM_RESERVED).tolist()) <= set(range(600, 830))  # ~714 each
    with pytest.raises(ValueError, match="num_buckets"):
        stable_hash_bucket(["a"], 0)


def test_stable_hash_bucket_is_the_same_in_another_process() -> None:
    values = ["a", "b", "item_42", "Drama", "中文", "", "x" * 100]
    code = (
        "import json, sys\n"
        "from retrieval.encoders import stable_hash_bucket\n"
        "values = json.loads(sys.argv[1])\n"
        "print(json.dumps(stable_hash_bucket(values, 1000003).tolist()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different salt for Python's hash()
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(values)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert json.loads(result.stdout) == stable_hash_bucket(values, 1000003).tolist()


# ------------------------------------------------------------------------------ dense


def test_dense_standardises_with_train_stats_and_flags_missing() -> None:
    stats = DenseStats.fit(pa.array([1.0, 2.0, None, 3.0, float("nan")]))
    # finite values 1, 2, 3: mean 2, population variance (1 + 0 + 1) / 3 = 2/3
    assert stats.mean == 2.0
    assert stats.std == pytest.approx(np.sqrt(2.0 / 3.0))
    encoded = encode_dense(pa.array([2.0, 4.0, None, float("nan")]), stats, missing_indicator=True)
    s = np.sqrt(2.0 / 3.0)
    expected = [[0.0, 0.0], [2.0 / s, 0.0], [0.0, 1.0], [0.0, 1.0]]  # (4 - 2) / s = 2.449...
    np.testing.assert_allclose(encoded, expected, rtol=1e-6)
    assert encoded.dtype == np.float32
    plain = encode_dense(pa.array([2.0, None]), stats, missing_indicator=False)
    assert plain.shape == (2, 1) and plain.tolist() == [[0.0], [0.0]]


def test_dense_constant_and_all_missing_columns_do_not_divide_by_zero() -> None:
    constant = DenseStats.fit([5, 5, 5])
    assert (constant.mean, constant.std) == (5.0, 1.0)
    assert encode_dense([5, 7], constant, False).tolist() == [[0.0], [2.0]]
    empty = DenseStats.fit(pa.array([None, None], type=pa.float64()))
    assert (empty.mean, empty.std) == (0.0, 1.0)
    with pytest.raises(ValueError, match="numeric"):
        encode_dense(["a"], constant, False)


# ------------------------------------------------------------------------------ bags


def test_bag_truncates_keeps_first_tokens_and_pads() -> None:
    vocab = Vocabulary.fit(["a", "a", "a", "b", "b", "c"])  # a=2, b=3, c=4
    column = pa.array([["a", "b", "c", "a"], ["c"], [], None, ["zzz", None, "b"]])
    encoded = encode_bag(column, 3, vocab.lookup)
    assert encoded.tolist() == [
        [2, 3, 4],  # first 3 of 4 kept
        [4, 0, 0],
        [0, 0, 0],  # empty list
        [0, 0, 0],  # null list
        [1, 1, 3],  # unknown and null tokens -> OOV, position kept
    ]
    assert encoded.dtype == np.int64
    chunked = pa.chunked_array([column[:2], column[2:]])
    np.testing.assert_array_equal(encode_bag(chunked, 3, vocab.lookup), encoded)
    with pytest.raises(ValueError, match="list column"):
        encode_bag(pa.array(["a"]), 3, vocab.lookup)


# ------------------------------------------------------------------------------ history


def test_build_history_on_a_hand_made_sequence() -> None:
    # user 7: items 10, 11, 12, 13 in time order; user 3: 20, 21; user 9: 30
    users = np.array([7, 7, 7, 7, 3, 3, 9])
    codes = np.array([10, 11, 12, 13, 20, 21, 30])
    assert build_history(users, codes, max_length=3).tolist() == [
        [0, 0, 0],
        [10, 0, 0],
        [11, 10, 0],
        [12, 11, 10],
        [0, 0, 0],
        [20, 0, 0],
        [0, 0, 0],
    ]
    assert build_history(users[:1], codes[:1], 2).tolist() == [[0, 0]]
    assert build_history(users[:0], codes[:0], 2).shape == (0, 2)


def test_build_history_is_causal_on_random_sequences() -> None:
    rng = np.random.default_rng(3)
    runs = rng.integers(1, 12, size=60)
    users = np.repeat(rng.permutation(60), runs)  # contiguous runs, users not in order
    n = len(users)
    codes = np.arange(n) + NUM_RESERVED  # each row's code names its position
    first_of_run = np.r_[True, users[1:] != users[:-1]]
    run_start = np.maximum.accumulate(np.where(first_of_run, np.arange(n), 0))
    for max_length in (1, 4, 15):
        history = build_history(users, codes, max_length)
        assert history.shape == (n, max_length)
        for i in range(n):
            start = run_start[i]
            expected = [codes[i - k] if i - k >= start else 0 for k in range(1, max_length + 1)]
            assert history[i].tolist() == expected
            positions = history[i][history[i] > 0] - NUM_RESERVED
            assert (positions < i).all()  # never the event itself nor a later one
            assert (users[positions] == users[i]).all()


def test_build_history_refuses_interleaved_users_and_padding_codes() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        build_history(np.array([0, 1, 0]), np.array([2, 3, 4]), 2)
    with pytest.raises(ValueError, match="padding"):
        build_history(np.array([0, 0]), np.array([2, 0]), 2)
    with pytest.raises(ValueError, match="max_length"):
        build_history(np.array([0]), np.array([2]), 0)


def test_history_at_end_matches_reference() -> None:
    rng = np.random.default_rng(4)
    runs = rng.integers(1, 8, size=20)
    run_users = rng.choice(30, size=20, replace=False)
    users = np.repeat(run_users, runs)
    codes = rng.integers(1, 50, size=len(users))
    result = history_at_end(users, codes, 5, num_users=30)
    for user in range(30):
        mine = codes[users == user][::-1][:5].tolist()
        assert result[user].tolist() == mine + [0] * (5 - len(mine))
    with pytest.raises(ValueError, match="num_users"):
        history_at_end(users, codes, 5, num_users=3)


# ------------------------------------------------------------------------------ encoder


def make_schema() -> DatasetSchema:
    return DatasetSchema(
        name="tiny",
        query_features=(
            FeatureSpec("user_id", FeatureKind.CATEGORICAL, embedding_dim=4, min_count=2),
            FeatureSpec("occupation", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec("zip_prefix", FeatureKind.HASHED, embedding_dim=4, num_buckets=11),
            FeatureSpec("income", FeatureKind.DENSE, missing_indicator=True),
            FeatureSpec(
                "history",
                FeatureKind.HISTORY,
                embedding_dim=8,
                max_length=3,
                shared_with="item_id",
            ),
        ),
        item_features=(
            FeatureSpec("item_id", FeatureKind.CATEGORICAL, embedding_dim=8),
            FeatureSpec("genres", FeatureKind.BAG, embedding_dim=4, max_length=2),
            FeatureSpec("year_bucket", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec(
                "title_tokens",
                FeatureKind.HASHED_BAG,
                embedding_dim=4,
                num_buckets=50,
                max_length=3,
            ),
        ),
    )


def make_users() -> pa.Table:
    return pa.table(
        {
            "user_id": ["u1", "u2", "u3", "u4"],
            "occupation": ["eng", "art", "eng", "chef"],
            "zip_prefix": ["9", "9", "1", None],
            "income": pa.array([10.0, 20.0, None, 1000.0]),
        }
    )


def make_items() -> pa.Table:
    return pa.table(
        {
            "item_id": ["i1", "i2", "i3", "i4", "i5"],
            "genres": pa.array(
                [["Drama", "Comedy", "Drama"], ["Drama"], ["Horror"], [], None],
                type=pa.list_(pa.string()),
            ),
            "year_bucket": pa.array([1990, 1995, 1990, None, 2001]),
            "title_tokens": pa.array(
                [["toy", "story"], ["heat"], ["the", "ring", "two", "x"], [], ["up"]]
            ),
        }
    )


INTERACTION_ROWS = [
    # user, item, timestamp, split
    ("u1", "i1", 10, "train"),
    ("u1", "i2", 20, "train"),
    ("u1", "i1", 30, "train"),
    ("u1", "i4", 40, "valid"),
    ("u1", "i3", 50, "test"),
    ("u2", "i2", 15, "train"),
    ("u2", "i1", 25, "train"),
    ("u2", "i3", 35, "test"),
    ("u3", "i1", 12, "train"),
    ("u4", "i3", 5, "test"),
]


def make_interactions(rows: list[tuple[str, str, int, str]] = INTERACTION_ROWS) -> pa.Table:
    users, items, times, splits = zip(*rows, strict=True)
    return pa.table(
        {
            "user_id": list(users),
            "item_id": list(items),
            "timestamp": pa.array(times, type=pa.int64()),
            "split": list(splits),
        }
    )


@pytest.fixture
def encoder() -> FeatureEncoder:
    return FeatureEncoder.fit(make_schema(), make_users(), make_items(), make_interactions())


def test_fit_uses_train_only(encoder: FeatureEncoder) -> None:
    # item ids count train interactions: i1 4 (rows 0, 2, 6, 8), i2 2; i3/i4 only valid/test
    assert encoder.vocabulary("item", "item_id").values == ["i1", "i2"]
    assert encoder.vocabulary("item", "item_id").counts.tolist() == [4, 2]
    # user ids count train interactions: u1 3, u2 2, u3 1 < min_count 2; u4 has none
    assert encoder.vocabulary("query", "user_id").values == ["u1", "u2"]
    # attributes counted once per user with a train interaction: u4's 'chef' is test-only
    assert encoder.vocabulary("query", "occupation").values == ["eng", "art"]
    # items with a train interaction are i1, i2: 'Horror' (i3) and 2001 (i5) are never seen
    assert encoder.vocabulary("item", "genres").values == ["Drama", "Comedy"]
    assert encoder.vocabulary("item", "genres").counts.tolist() == [3, 1]
    assert encoder.vocabulary("item", "year_bucket").values == ["1990", "1995"]
    # income over u1..u3 (u4's 1000 excluded, u3 missing): mean 15, std 5
    assert encoder.dense_stats("query", "income") == DenseStats(mean=15.0, std=5.0)


def test_feature_inputs_follow_schema_order(encoder: FeatureEncoder) -> None:
    assert encoder.feature_inputs("query") == (
        FeatureInput("user_id", FeatureKind.CATEGORICAL, cardinality=4, embedding_dim=4),
        FeatureInput("occupation", FeatureKind.CATEGORICAL, cardinality=4, embedding_dim=4),
        FeatureInput("zip_prefix", FeatureKind.HASHED, cardinality=13, embedding_dim=4),
        FeatureInput("income", FeatureKind.DENSE, cardinality=0, embedding_dim=2),
        FeatureInput(
            "history", FeatureKind.HISTORY, cardinality=4, embedding_dim=8, shared_with="item_id"
        ),
    )
    assert [f.name for f in encoder.feature_inputs("item")] == [
        "item_id",
        "genres",
        "year_bucket",
        "title_tokens",
    ]
    assert encoder.feature_inputs("item")[1].cardinality == 2 + NUM_RESERVED
    with pytest.raises(ValueError, match="side"):
        encoder.feature_inputs("user")  # type: ignore[arg-type]


def test_encode_users_and_items(encoder: FeatureEncoder) -> None:
    users = encoder.encode_users(make_users())
    assert set(users) == {"user_id", "occupation", "zip_prefix", "income"}
    assert users["user_id"].tolist() == [2, 3, 1, 1]  # u3 below min_count, u4 unseen
    assert users["occupation"].tolist() == [2, 3, 2, 1]  # chef -> OOV
    assert users["zip_prefix"].tolist() == [
        *stable_hash_bucket(["9", "9", "1"], 11).tolist(),
        OOV_INDEX,
    ]
    # income: (10-15)/5 = -1, (20-15)/5 = 1, missing, (1000-15)/5 = 197
    assert users["income"].tolist() == [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [197.0, 0.0]]
    assert users["income"].dtype == torch.float32

    items = encoder.encode_items(make_items())
    assert items["item_id"].tolist() == [2, 3, 1, 1, 1]  # cold items rely on content
    assert items["genres"].tolist() == [[2, 3], [2, 0], [1, 0], [0, 0], [0, 0]]
    assert items["year_bucket"].tolist() == [2, 3, 2, 1, 1]
    titles = items["title_tokens"]
    assert titles.shape == (5, 3) and titles.dtype == torch.int64
    assert titles[2].tolist() == stable_hash_bucket(["the", "ring", "two"], 50).tolist()
    assert titles[3].tolist() == [0, 0, 0]
    for tensor in (*items.values(), users["user_id"]):
        assert tensor.dtype in (torch.int64, torch.float32)


def test_encode_items_in_chunks_equals_whole_table(encoder: FeatureEncoder) -> None:
    table = make_items()
    whole = encoder.encode_items(table)
    parts = [encoder.encode_items(table.slice(start, 2)) for start in range(0, 5, 2)]
    for name, tensor in whole.items():
        assert torch.equal(torch.cat([p[name] for p in parts]), tensor), name
    with pytest.raises(ValueError, match="genres"):
        encoder.encode_items(table.drop_columns(["genres"]))


def test_id_indices_and_unknown_ids(encoder: FeatureEncoder) -> None:
    assert encoder.item_index(["i5", "i1", "i3"]).tolist() == [4, 0, 2]
    assert encoder.user_index(pa.array(["u4", "u1"])).tolist() == [3, 0]
    with pytest.raises(ValueError, match=r"unknown item_ids.*'nope'"):
        encoder.item_index(["i1", "nope"])
    with pytest.raises(ValueError, match="distinct"):
        FeatureEncoder.fit(
            make_schema(), make_users(), pa.concat_tables([make_items()] * 2), make_interactions()
        )


def test_encode_interactions_rows_history_and_split(encoder: FeatureEncoder) -> None:
    encoded = encoder.encode_interactions(make_interactions(), history_max_length=3)
    assert encoded.user_row.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 3]
    assert encoded.item_row.tolist() == [0, 1, 0, 3, 2, 1, 0, 2, 0, 2]
    assert encoded.split.tolist() == [0, 0, 0, 1, 2, 0, 0, 2, 0, 2]
    assert encoded.split.dtype == np.int8
    # item codes: i1 2, i2 3, i3 and i4 OOV 1 (no train interaction)
    assert encoded.history.tolist() == [
        [0, 0, 0],
        [2, 0, 0],
        [3, 2, 0],
        [2, 3, 2],  # the valid event sees the three train events before it
        [1, 2, 3],  # the test event sees the valid event (i4 -> OOV) first
        [0, 0, 0],
        [3, 0, 0],
        [2, 3, 0],
        [0, 0, 0],
        [0, 0, 0],
    ]
    assert len(encoded) == 10
    default = encoder.encode_interactions(make_interactions())  # N from the schema: 3
    np.testing.assert_array_equal(default.history, encoded.history)

    train_valid = make_interactions([r for r in INTERACTION_ROWS if r[3] != "test"])
    assert encoder.histories_at_end(train_valid).tolist() == [
        [1, 2, 3],
        [2, 3, 0],
        [2, 0, 0],
        [0, 0, 0],
    ]


def test_encode_interactions_refuses_unsorted_rows(encoder: FeatureEncoder) -> None:
    swapped = list(INTERACTION_ROWS)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ValueError, match="sorted"):
        encoder.encode_interactions(make_interactions(swapped))
    interleaved = [*INTERACTION_ROWS[5:6], *INTERACTION_ROWS[:5], *INTERACTION_ROWS[6:]]
    with pytest.raises(ValueError, match="contiguous"):
        encoder.encode_interactions(make_interactions(interleaved))
    bad_split = [("u1", "i1", 10, "holdout")]
    with pytest.raises(ValueError, match="holdout"):
        encoder.encode_interactions(make_interactions(bad_split))


def test_save_load_round_trip_gives_identical_tensors(
    encoder: FeatureEncoder, tmp_path: Path
) -> None:
    encoder.save(tmp_path / "encoder")
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == [
        "encoder.json",
        "item_ids.parquet",
        "user_ids.parquet",
    ]
    json.loads((tmp_path / "encoder" / "encoder.json").read_text())  # plain JSON
    loaded = FeatureEncoder.load(tmp_path / "encoder")
    assert loaded.schema == encoder.schema
    for side in ("query", "item"):
        assert loaded.feature_inputs(side) == encoder.feature_inputs(side)
    assert loaded.to_dict() == encoder.to_dict()
    for before, after in (
        (encoder.encode_users(make_users()), loaded.encode_users(make_users())),
        (encoder.encode_items(make_items()), loaded.encode_items(make_items())),
    ):
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name
    np.testing.assert_array_equal(
        loaded.encode_interactions(make_interactions()).history,
        encoder.encode_interactions(make_interactions()).history,
    )
    assert loaded.item_index(["i3"]).tolist() == [2]
    assert loaded.item_ids.to_pylist() == ["i1", "i2", "i3", "i4", "i5"]


def test_load_refuses_missing_or_foreign_files(encoder: FeatureEncoder, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FeatureEncoder.load(tmp_path)
    encoder.save(tmp_path)
    data = json.loads((tmp_path / "encoder.json").read_text())
    data["format_version"] = 99
    (tmp_path / "encoder.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        FeatureEncoder.load(tmp_path)


def test_encode_items_speed_smoke() -> None:
    """Encode 200k items (3 categorical + 1 bag); prints the time, asserts correctness only."""
    n = 200_000
    rng = np.random.default_rng(5)
    item_ids = pa.array([f"item{i}" for i in range(n)])
    genres = [f"g{i}" for i in range(20)]
    items = pa.table(
        {
            "item_id": item_ids,
            "brand": pa.array([f"b{i}" for i in rng.integers(0, 5000, n)]),
            "category": pa.array([f"c{i}" for i in rng.integers(0, 300, n)]),
            "tags": pa.array(
                [list(rng.choice(genres, size=rng.integers(0, 6))) for _ in range(2000)]
                * (n // 2000),
                type=pa.list_(pa.string()),
            ),
        }
    )
    schema = DatasetSchema(
        name="speed",
        query_features=(FeatureSpec("user_id", FeatureKind.CATEGORICAL),),
        item_features=(
            FeatureSpec("item_id", FeatureKind.CATEGORICAL),
            FeatureSpec("brand", FeatureKind.CATEGORICAL),
            FeatureSpec("category", FeatureKind.CATEGORICAL),
            FeatureSpec("tags", FeatureKind.BAG, max_length=4),
        ),
    )
    interactions = pa.table({"user_id": ["u"] * n, "item_id": item_ids, "split": ["train"] * n})
    users = pa.table({"user_id": ["u"]})
    encoder = FeatureEncoder.fit(schema, users, items, interactions)
    start = time.perf_counter()
    encoded = encoder.encode_items(items)
    seconds = time.perf_counter() - start
    print(f"encode_items: {n} items in {seconds:.3f} s ({n / seconds:,.0f} items/s)")
    # every item has one train interaction: ids are all in vocabulary, in count-then-name order
    assert int(encoded["item_id"].min()) >= NUM_RESERVED
    assert len(torch.unique(encoded["item_id"])) == n
    assert encoded["tags"].shape == (n, 4)
