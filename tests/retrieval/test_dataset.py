"""Dataset directory format: split assignment, write/load, validation, atomic writes, CLI."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from retrieval.cli import main
from retrieval.data import dataset as dataset_module
from retrieval.data.dataset import (
    Dataset,
    DatasetError,
    assign_splits,
    format_summary,
    load_dataset,
    summarize,
    validate_dataset,
    write_dataset,
)
from retrieval.features import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    SCHEMA_FILE,
    USERS_FILE,
    DatasetSchema,
    FeatureKind,
    FeatureSpec,
)

# Input rows (user, item, timestamp), deliberately out of order. User 'a' has 10 rows with
# two timestamp ties (100 and 900), 'b' has 1, 'c' has 2, 'd' has 3 with a tie at 7.
RAW_EVENTS = [
    ("a", "i3", 300),
    ("c", "i1", 50),
    ("a", "i1", 100),
    ("b", "i2", 10),
    ("a", "i2", 100),  # ties with a/i1@100, comes later in the input: stays after it
    ("d", "i1", 7),
    ("a", "i4", 400),
    ("c", "i2", 20),
    ("a", "i5", 500),
    ("d", "i3", 5),
    ("a", "i6", 600),
    ("a", "i7", 700),
    ("a", "i8", 800),
    ("a", "i9", 900),
    ("a", "i10", 900),  # ties with a/i9@900 on the valid/test boundary: stays after it
    ("d", "i2", 7),  # ties with d/i1@7: stays after it
]

# Expected after assign_splits: users in string order, then time, ties in input order.
# 'a' (n=10): floor(0.8*10)=8 train, floor(0.9*10)-8=1 valid, 1 test.
# 'b' (n=1), 'c' (n=2): fewer than 3 interactions -> train only.
# 'd' (n=3): floor(0.8*3)=2 train, floor(0.9*3)-2=0 valid, 3-2=1 test.
EXPECTED_SPLIT_ROWS = [
    ("a", "i1", 100, "train"),
    ("a", "i2", 100, "train"),
    ("a", "i3", 300, "train"),
    ("a", "i4", 400, "train"),
    ("a", "i5", 500, "train"),
    ("a", "i6", 600, "train"),
    ("a", "i7", 700, "train"),
    ("a", "i8", 800, "train"),
    ("a", "i9", 900, "valid"),
    ("a", "i10", 900, "test"),
    ("b", "i2", 10, "train"),
    ("c", "i2", 20, "train"),
    ("c", "i1", 50, "train"),
    ("d", "i3", 5, "train"),
    ("d", "i1", 7, "train"),
    ("d", "i2", 7, "test"),
]


def events_table(rows: list[tuple[str, str, int]]) -> pa.Table:
    users, items, times = zip(*rows, strict=True)
    return pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "timestamp": pa.array(times, pa.int64()),
        }
    )


def rows_of(table: pa.Table) -> list[tuple[Any, ...]]:
    columns = ["user_id", "item_id", "timestamp", "split"]
    return list(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


def tiny_schema() -> DatasetSchema:
    return DatasetSchema(
        name="tiny",
        query_features=(
            FeatureSpec("user_id", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec("age_bucket", FeatureKind.CATEGORICAL, embedding_dim=2),
            FeatureSpec(
                "history", FeatureKind.HISTORY, embedding_dim=4, max_length=3, shared_with="item_id"
            ),
        ),
        item_features=(
            FeatureSpec("item_id", FeatureKind.CATEGORICAL, embedding_dim=4),
            FeatureSpec("genres", FeatureKind.BAG, embedding_dim=2, max_length=2),
        ),
    )


Tables = tuple[pa.Table, pa.Table, pa.Table, DatasetSchema]


def tiny_tables() -> Tables:
    users = pa.table(
        {
            "user_id": ["a", "b", "c", "d"],
            "age_bucket": ["18-24", "<18", None, "56+"],
        }
    )
    item_ids = [f"i{n}" for n in range(1, 11)]
    items = pa.table(
        {
            "item_id": item_ids,
            "genres": pa.array([["x"], [], ["x", "y"]] + [["y"]] * 7, pa.list_(pa.string())),
        }
    )
    events = assign_splits(events_table(RAW_EVENTS))
    return users, items, events, tiny_schema()


# --------------------------------------------------------------------------- split protocol


def test_assign_splits_follows_protocol_with_ties() -> None:
    events = assign_splits(events_table(RAW_EVENTS))
    assert rows_of(events) == EXPECTED_SPLIT_ROWS
    assert events.column_names == ["user_id", "item_id", "timestamp", "split"]


def test_assign_splits_user_order_and_replaces_split_column() -> None:
    events = events_table(RAW_EVENTS).append_column("split", pa.array(["test"] * len(RAW_EVENTS)))
    ordered = assign_splits(events, user_order=pa.array(["d", "c", "b", "a"]))
    expected = [r for u in "dcba" for r in EXPECTED_SPLIT_ROWS if r[0] == u]
    assert rows_of(ordered) == expected


def test_assign_splits_swapped_tie_swaps_split() -> None:
    # Same rows with the two 900 ties given in the opposite order: i10 now comes first.
    rows = [r for r in RAW_EVENTS if r[1] not in ("i9", "i10")]
    rows += [("a", "i10", 900), ("a", "i9", 900)]
    events = assign_splits(events_table(rows))
    assert rows_of(events)[8:10] == [("a", "i10", 900, "valid"), ("a", "i9", 900, "test")]


def test_assign_splits_rejects_user_missing_from_order() -> None:
    with pytest.raises(DatasetError, match=r"interactions.parquet: 1 rows have user ids missing"):
        assign_splits(events_table(RAW_EVENTS[:4]), user_order=pa.array(["a", "c"]))


# --------------------------------------------------------------------------- write / load


def test_write_load_round_trip(tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    out = tmp_path / "tiny"
    written = write_dataset(out, users, items, events, schema)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE, SCHEMA_FILE]
    )
    loaded = load_dataset(out)
    assert loaded.users.equals(users)
    assert loaded.items.equals(items)
    assert loaded.interactions.equals(events)
    assert loaded.schema == written.schema
    assert loaded.schema.query_features == schema.query_features
    # 16 rows: 'a' 8/1/1, 'b' 1/0/0, 'c' 2/0/0, 'd' 2/0/1.
    assert loaded.schema.stats == {
        "users": 4,
        "items": 10,
        "interactions": {"total": 16, "train": 13, "valid": 1, "test": 2},
    }
    assert loaded.split_mask("valid").tolist() == [r[3] == "valid" for r in EXPECTED_SPLIT_ROWS]
    assert rows_of(loaded.split("test")) == [("a", "i10", 900, "test"), ("d", "i2", 7, "test")]
    with pytest.raises(ValueError, match="`name` must be one of"):
        loaded.split_mask("training")


def test_load_without_validation_is_lazy(tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    write_dataset(tmp_path / "tiny", users, items, events, schema)
    (tmp_path / "tiny" / INTERACTIONS_FILE).write_bytes(b"not parquet")
    dataset = load_dataset(tmp_path / "tiny", validate=False)
    assert dataset.items.column("item_id").to_pylist()[:2] == ["i1", "i2"]
    with pytest.raises(DatasetError, match=r"interactions.parquet: not a readable parquet file"):
        _ = dataset.interactions


def test_write_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    out = tmp_path / "tiny"
    write_dataset(out, users, items, events, schema)
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(out, users, items, events, schema)
    items_with_extra = items.append_column("extra", pa.array([1] * items.num_rows))
    write_dataset(out, users, items_with_extra, events, schema, overwrite=True)
    assert "extra" in load_dataset(out).items.column_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users, items, events, schema = tiny_tables()
    real_write_table = pq.write_table
    calls = []

    def write_then_crash(table: pa.Table, where: Any, **kwargs: Any) -> None:
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_write_table(table, where, **kwargs)

    monkeypatch.setattr(dataset_module.pq, "write_table", write_then_crash)
    root = tmp_path / "root"
    with pytest.raises(OSError, match="simulated"):
        write_dataset(root / "tiny", users, items, events, schema)
    assert len(calls) == 2  # users.parquet was written, items.parquet crashed
    assert not (root / "tiny").exists()
    assert list(root.iterdir()) == []  # the temporary directory is gone too


def test_odd_character_ids_kept_verbatim(tmp_path: Path) -> None:
    odd_users = ["user 1", " lead", "trail ", "a,b", "x/y\\z", "ünï-cødé ✓", 'q"uote', "tab\there"]
    odd_items = ["item,1", "../etc", "名前", "0001", "1", "€ 5"]
    users = pa.table({"user_id": odd_users, "age_bucket": ["x"] * len(odd_users)})
    items = pa.table(
        {
            "item_id": odd_items,
            "genres": pa.array([["g, h"]] * len(odd_items), pa.list_(pa.string())),
        }
    )
    rows = [(u, odd_items[k % len(odd_items)], k) for k, u in enumerate(odd_users)]
    rows += [(odd_users[0], item, 100 + k) for k, item in enumerate(odd_items)]
    events = assign_splits(events_table(rows), user_order=users.column("user_id"))
    write_dataset(tmp_path / "odd", users, items, events, tiny_schema())
    loaded = load_dataset(tmp_path / "odd")
    assert loaded.users.column("user_id").to_pylist() == odd_users
    assert loaded.items.column("item_id").to_pylist() == odd_items
    assert set(loaded.interactions.column("user_id").to_pylist()) == set(odd_users)
    assert loaded.items.column("genres").to_pylist()[0] == ["g, h"]
    # '0001' and '1' stay two different items
    assert pc.count_distinct(loaded.interactions.column("item_id")).as_py() == len(odd_items)


# --------------------------------------------------------------------------- validation


Mutation = Callable[[pa.Table, pa.Table, pa.Table], tuple[pa.Table, pa.Table, pa.Table]]


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


def set_value(table: pa.Table, name: str, row: int, value: Any) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    return set_column(table, name, pa.array(values, table.schema.field(name).type))


VALIDATION_CASES: list[tuple[str, Mutation, str]] = [
    (
        "empty table",
        lambda u, i, e: (u, i.slice(0, 0), e),
        r"items.parquet: table is empty",
    ),
    (
        "missing required column",
        lambda u, i, e: (u, i, e.drop_columns(["timestamp"])),
        r"interactions.parquet: missing column 'timestamp'",
    ),
    (
        "schema feature column absent",
        lambda u, i, e: (u.drop_columns(["age_bucket"]), i, e),
        r"users.parquet: schema.json names feature column\(s\) \['age_bucket'\]",
    ),
    (
        "wrong id dtype",
        lambda u, i, e: (set_column(u, "user_id", pa.array([1, 2, 3, 4])), i, e),
        r"users.parquet: column 'user_id' must be string; got int64",
    ),
    (
        "wrong timestamp dtype",
        lambda u, i, e: (
            u,
            i,
            set_column(e, "timestamp", pc.cast(e.column("timestamp"), pa.string())),
        ),
        r"interactions.parquet: column 'timestamp' must be int64; got string",
    ),
    (
        "wrong rating dtype",
        lambda u, i, e: (u, i, e.append_column("rating", pa.array(["5"] * e.num_rows))),
        r"interactions.parquet: column 'rating' must be float; got string",
    ),
    (
        "wrong feature dtype",
        lambda u, i, e: (u, set_column(i, "genres", pa.array(["x"] * i.num_rows)), e),
        r"items.parquet: column 'genres' of bag feature 'genres' must be list<string>",
    ),
    (
        "null user id",
        lambda u, i, e: (set_value(u, "user_id", 1, None), i, e),
        r"users.parquet: 1 null values in column 'user_id'",
    ),
    (
        "null item id in interactions",
        lambda u, i, e: (u, i, set_value(e, "item_id", 3, None)),
        r"interactions.parquet: 1 null values in column 'item_id'",
    ),
    (
        "empty item id",
        lambda u, i, e: (u, set_value(i, "item_id", 0, ""), e),
        r"items.parquet: 1 empty strings in id column 'item_id'",
    ),
    (
        "duplicate user ids",
        lambda u, i, e: (set_value(u, "user_id", 3, "a"), i, e),
        r"users.parquet: 1 duplicate values in column 'user_id' \(e.g. 'a'\)",
    ),
    (
        "duplicate item ids",
        lambda u, i, e: (u, set_value(i, "item_id", 9, "i1"), e),
        r"items.parquet: 1 duplicate values in column 'item_id' \(e.g. 'i1'\)",
    ),
    (
        "unknown user",
        lambda u, i, e: (u.slice(0, 3), i, e),
        r"interactions.parquet: 3 rows reference user ids missing from users.parquet \(e.g. 'd'\)",
    ),
    (
        "unknown item",
        lambda u, i, e: (u, i.slice(1), e),
        r"interactions.parquet: 3 rows reference item ids missing from items.parquet \(e.g. 'i1'\)",
    ),
    (
        "bad split value",
        lambda u, i, e: (u, i, set_value(e, "split", 0, "training")),
        r"interactions.parquet: column 'split' holds values other than .* \(e.g. 'training'\)",
    ),
    (
        "empty train split",
        lambda u, i, e: (u, i, set_column(e, "split", pa.array(["test"] * e.num_rows))),
        r"interactions.parquet: the train split is empty",
    ),
    (
        "users not contiguous",
        lambda u, i, e: (u, i, e.take([0, 10, 1])),  # users a, b, a
        r"interactions.parquet: rows of each user must be contiguous",
    ),
    (
        "time goes backwards",
        lambda u, i, e: (u, i, set_value(e, "timestamp", 4, 50)),
        r"interactions.parquet: rows of a user must be in timestamp order; row 4 \(user 'a'\)",
    ),
    (
        "split protocol broken",
        lambda u, i, e: (u, i, set_value(e, "split", 15, "train")),
        r"interactions.parquet: 1 rows break the split protocol.* row 15 \(user 'd'\) is 'train', "
        r"expected 'test'",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [pytest.param(m, msg, id=case_id) for case_id, m, msg in VALIDATION_CASES],
)
def test_validation_names_file_and_problem(mutate: Mutation, message: str, tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    validate_dataset(Dataset(schema, users, items, events))  # the unmutated tables are valid
    bad = mutate(users, items, events)
    with pytest.raises(DatasetError, match=message):
        validate_dataset(Dataset(schema, *bad))
    with pytest.raises(DatasetError, match=message):
        write_dataset(tmp_path / "bad", *bad, schema)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_validation_on_disk_names_full_path(tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    out = tmp_path / "tiny"
    write_dataset(out, users, items, events, schema)
    pq.write_table(users.slice(0, 2), out / USERS_FILE)  # users 'c' and 'd' vanish
    expected = re.escape(f"{out / INTERACTIONS_FILE}: 5 rows reference user ids missing")
    with pytest.raises(DatasetError, match=expected):
        load_dataset(out)
    with pytest.raises(DatasetError, match=expected):
        validate_dataset(out)


def test_missing_file_is_named(tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    write_dataset(tmp_path / "tiny", users, items, events, schema)
    (tmp_path / "tiny" / ITEMS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing dataset file\(s\) items.parquet"):
        load_dataset(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        load_dataset(tmp_path / "nope")


# --------------------------------------------------------------------------- summary and CLI


def test_summarize_and_format(tmp_path: Path) -> None:
    users, items, events, schema = tiny_tables()
    summary = summarize(write_dataset(tmp_path / "tiny", users, items, events, schema))
    assert summary["users"] == 4
    assert summary["items"] == 10
    assert summary["interactions"] == {"total": 16, "train": 13, "valid": 1, "test": 2}
    assert summary["query_features"] == {
        "user_id": "categorical",
        "age_bucket": "categorical",
        "history": "history",
    }
    assert summary["item_features"] == {"item_id": "categorical", "genres": "bag"}
    text = format_summary(summary)
    assert "interactions    16 (train 13, valid 1, test 2)" in text


def test_cli_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users, items, events, schema = tiny_tables()
    write_dataset(tmp_path / "tiny", users, items, events, schema)
    assert main(["data", "summary", str(tmp_path / "tiny")]) == 0
    assert "items           10" in capsys.readouterr().out
    assert main(["data", "summary", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: dataset directory not found" in err


def test_cli_synth_calls_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_generate(out_dir: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append({"out_dir": out_dir, **kwargs})
        return {"items": kwargs["num_items"], "interactions": {"train": 7}}

    fake = types.ModuleType("retrieval.data.synthetic")
    setattr(fake, "generate_synthetic_dataset", fake_generate)  # noqa: B010
    monkeypatch.setitem(sys.modules, "retrieval.data.synthetic", fake)
    argv = ["data", "synth", "--items", "50", "--users", "20", "--interactions", "300"]
    argv += ["--seed", "3", "--out", str(tmp_path / "s"), "--chunk-size", "64", "--overwrite"]
    assert main(argv) == 0
    assert calls == [
        {
            "out_dir": str(tmp_path / "s"),
            "num_items": 50,
            "num_users": 20,
            "num_interactions": 300,
            "seed": 3,
            "chunk_size": 64,
            "overwrite": True,
        }
    ]
    out = capsys.readouterr().out
    assert '"items": 50' in out
    assert "generated" in out


def test_cli_synth_rejects_non_positive_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--items", "0", "--users", "1", "--interactions", "1"])
    assert exc.value.code == 2
    assert "--items: must be >= 1; got 0" in capsys.readouterr().err


def test_written_files_are_readable_by_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import stat

    from retrieval.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "CURRENT", "v1\n")
        with atomic_directory(tmp_path / "artifact") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "CURRENT").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "artifact").stat().st_mode) == 0o755
