"""`retrieval data import`: bring-your-own files become a dataset that validates and trains;
every input problem is refused with a message naming the file, the column and examples, and
nothing is written; the schema it writes can be edited and passed back."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest
import yaml
from tiny_data import tiny_train_config

from retrieval.cli import build_parser, main
from retrieval.data import cli as data_cli
from retrieval.data import importer
from retrieval.data.dataset import DatasetError, load_dataset
from retrieval.data.importer import (
    DataImportError,
    ImportSchema,
    detect_delimiter,
    epoch_seconds,
    import_dataset,
    infer_schema,
    read_table,
)
from retrieval.features import ITEM_ID, SCHEMA_FILE, USER_ID, FeatureKind

# A hand-written export with its own column names: ISO times in three spellings
# (zone 'Z', naive = UTC, an offset) and a date; a rating column that is kept.
EVENTS_CSV = """\
UserIdent,Movie,When,rating
alice,m1,2024-01-01T10:00:00Z,5
alice,m2,2024-01-02T10:00:00,4
alice,m3,2024-01-03,3
alice,m4,2024-01-04T10:00:00+01:00,5
bob,m1,2024-01-01T11:00:00Z,2
bob,m3,2024-01-05T10:00:00Z,2
bob,m5,2024-01-06T10:00:00Z,2
"""
# A title with a comma (free text, not a bag), genres delimited by '|', a year with a gap.
ITEMS_CSV = """\
Movie,Title,Genres,Year
m1,"Usual Suspects, The",Crime|Thriller,1995
m2,Toy Story,Animation|Comedy,1995
m3,Heat,Crime|Action,
m4,Up,Animation,2009
m5,Drive,Crime|Drama,2011
"""
ODD_COLUMNS = {"user_col": "UserIdent", "item_col": "Movie", "time_col": "When"}
ODD_FLAGS = ["--user-col", "UserIdent", "--item-col", "Movie", "--time-col", "When"]


def epoch(text: str) -> int:
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def odd_files(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "events.csv", EVENTS_CSV), write(tmp_path / "movies.csv", ITEMS_CSV)


# --------------------------------------------------------------------------- round trip


def test_odd_column_names_round_trip(odd_files: tuple[Path, Path], tmp_path: Path) -> None:
    events, items = odd_files
    out = tmp_path / "mine"
    result = import_dataset(out, events, items=items, **ODD_COLUMNS)
    dataset = load_dataset(out)  # validates every table and the split protocol

    assert dataset.users[USER_ID].to_pylist() == ["alice", "bob"]
    ids, lists = dataset.items[ITEM_ID].to_pylist(), dataset.items["Genres"].to_pylist()
    genres = dict(zip(ids, lists, strict=True))
    assert genres == {
        "m1": ["Crime", "Thriller"],
        "m2": ["Animation", "Comedy"],
        "m3": ["Crime", "Action"],
        "m4": ["Animation"],
        "m5": ["Crime", "Drama"],
    }
    assert dataset.items["Title"].to_pylist()[0] == "Usual Suspects, The"
    assert dataset.items["Year"].to_pylist() == [1995.0, 1995.0, None, 2009.0, 2011.0]

    inter = dataset.interactions.to_pylist()
    # alice has 4 rows -> split_sizes(4) = (3 train, 0 valid, 1 test); bob 3 -> (2, 0, 1).
    assert [(r["user_id"], r["item_id"], r["split"]) for r in inter] == [
        ("alice", "m1", "train"),
        ("alice", "m2", "train"),
        ("alice", "m3", "train"),
        ("alice", "m4", "test"),
        ("bob", "m1", "train"),
        ("bob", "m3", "train"),
        ("bob", "m5", "test"),
    ]
    assert [r["timestamp"] for r in inter[:4]] == [
        epoch("2024-01-01T10:00:00+00:00"),
        epoch("2024-01-02T10:00:00"),  # naive: read as UTC
        epoch("2024-01-03T00:00:00"),
        epoch("2024-01-04T09:00:00+00:00"),  # 10:00 at +01:00
    ]
    assert [r["rating"] for r in inter] == [5.0, 4.0, 3.0, 5.0, 2.0, 2.0, 2.0]

    kinds = {s.name: (s.kind, s.column) for s in dataset.schema.item_features}
    assert kinds == {
        "item_id": (FeatureKind.CATEGORICAL, None),
        "title": (FeatureKind.CATEGORICAL, "Title"),
        "genres": (FeatureKind.BAG, "Genres"),
        "year": (FeatureKind.DENSE, "Year"),
    }
    genres_spec = next(s for s in dataset.schema.item_features if s.name == "genres")
    assert genres_spec.max_length == 2
    year_spec = next(s for s in dataset.schema.item_features if s.name == "year")
    assert year_spec.missing_indicator  # m3 has no year
    assert [s.kind for s in dataset.schema.query_features] == [
        FeatureKind.CATEGORICAL,
        FeatureKind.HISTORY,
    ]
    assert dataset.schema.stats["import"] == {"delimiters": {"items": {"Genres": "|"}}}
    assert result.inferred
    assert any("'Genres' -> bag 'genres'" in note for note in result.notes)
    assert (out / importer.SCHEMA_YAML_FILE).is_file()


def _training_csvs(tmp_path: Path) -> tuple[Path, Path]:
    """30 users, 24 items of 4 genres; user u draws 12 items, 10 of them from genre u % 4."""
    genres = ["Action", "Comedy", "Drama", "Horror"]
    items = ["Movie,Genres"] + [
        f"film-{j:02d},{genres[j % 4]}" + (f"|{genres[(j + 1) % 4]}" if j % 3 == 0 else "")
        for j in range(24)
    ]
    events = ["UserIdent,Movie,When"]
    start = dt.datetime(2023, 5, 1, tzinfo=dt.UTC)
    for u in range(30):
        liked = [j for j in range(24) if j % 4 == u % 4]
        other = [j for j in range(24) if j % 4 != u % 4]
        chosen = liked + other[u % 7 : u % 7 + 6]
        for t, j in enumerate(chosen[:12]):
            when = (start + dt.timedelta(days=u, hours=t)).isoformat().replace("+00:00", "Z")
            events.append(f"user {u:02d},film-{j:02d},{when}")
    return (
        write(tmp_path / "events.csv", "\n".join(events) + "\n"),
        write(tmp_path / "films.csv", "\n".join(items) + "\n"),
    )


def test_imported_dataset_trains(tmp_path: Path) -> None:
    from retrieval.bundle import load_bundle
    from training.trainer import train

    events, items = _training_csvs(tmp_path)
    data = tmp_path / "data"
    import_dataset(data, events, items=items, **ODD_COLUMNS)
    dataset = load_dataset(data)
    assert dataset.num_users == 30 and dataset.num_items == 24
    assert dataset.schema.stats["interactions"] == {
        "total": 360,
        "train": 30 * 9,  # split_sizes(12) = (9, 1, 2)
        "valid": 30,
        "test": 60,
    }
    config = tiny_train_config(
        epochs=1,
        embedding_dims={},
        refit=False,
        eval={"ks": [5], "metric": "recall@5", "patience": 1, "baselines": ["popularity"]},
    )
    result = train(data, tmp_path / "model", config, progress=False)
    history = result.metrics["history"]
    assert len(history) == 1 and history[0]["train_loss"] > 0
    assert 0.0 <= result.metrics["test"]["recall@5"] <= 1.0
    bundle = load_bundle(tmp_path / "model")
    assert {s.name for s in bundle.encoder.schema.item_features} == {"item_id", "genres"}


# --------------------------------------------------------------------------- readers


def _reference(tmp_path: Path) -> list[dict[str, object]]:
    out = tmp_path / "from-csv"
    import_dataset(out, write(tmp_path / "ref.csv", EVENTS_CSV), **ODD_COLUMNS)
    return load_dataset(out).interactions.to_pylist()


def test_tsv_reader(tmp_path: Path) -> None:
    tsv = write(tmp_path / "events.tsv", EVENTS_CSV.replace(",", "\t"))
    out = tmp_path / "from-tsv"
    import_dataset(out, tsv, **ODD_COLUMNS)
    assert load_dataset(out).interactions.to_pylist() == _reference(tmp_path)


def test_parquet_reader_with_integer_ids_and_timestamp_type(tmp_path: Path) -> None:
    table = pa.table(
        {
            "user_id": pa.array([7, 7, 7, 8], pa.int32()),
            "item_id": pa.array([1, 2, 3, 1], pa.int64()),
            "timestamp": pa.array(
                [dt.datetime(2024, 1, 1, 0, 0, s) for s in (0, 1, 2, 3)], pa.timestamp("ms")
            ),
            "split": ["test", "test", "test", "test"],  # ignored: the protocol decides
        }
    )
    pq.write_table(table, tmp_path / "events.parquet")
    result = import_dataset(tmp_path / "out", tmp_path / "events.parquet")
    inter = load_dataset(tmp_path / "out").interactions.to_pylist()
    base = epoch("2024-01-01T00:00:00")
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["split"]) for r in inter] == [
        ("7", "1", base, "train"),
        ("7", "2", base + 1, "train"),
        ("7", "3", base + 2, "test"),
        ("8", "1", base + 3, "train"),
    ]
    assert any("'split' ignored" in note for note in result.notes)


def test_jsonl_reader_with_list_features(tmp_path: Path) -> None:
    events = [{"u": "a", "i": "x", "t": 100 + k} for k in range(3)] + [
        {"u": "b", "i": "y", "t": 50.9}
    ]
    items = [
        {"i": "x", "tags": ["red", "big"], "price": 1.5, "new": True},
        {"i": "y", "tags": ["red"], "price": None, "new": False},
    ]
    write(tmp_path / "events.ndjson", "\n".join(json.dumps(e) for e in events) + "\n")
    write(tmp_path / "items.jsonl", "\n".join(json.dumps(i) for i in items) + "\n")
    import_dataset(
        tmp_path / "out",
        tmp_path / "events.ndjson",
        items=tmp_path / "items.jsonl",
        user_col="u",
        item_col="i",
        time_col="t",
    )
    dataset = load_dataset(tmp_path / "out")
    kinds = {s.name: s.kind for s in dataset.schema.item_features}
    assert kinds == {
        "item_id": FeatureKind.CATEGORICAL,
        "tags": FeatureKind.BAG,
        "price": FeatureKind.DENSE,
        "new": FeatureKind.CATEGORICAL,  # booleans are categorical
    }
    assert dataset.items["tags"].to_pylist() == [["red", "big"], ["red"]]
    assert dataset.items["new"].to_pylist() == ["true", "false"]
    # float epoch seconds are floored: 50.9 -> 50
    assert dataset.interactions["timestamp"].to_pylist() == [100, 101, 102, 50]


def test_format_override_and_compressed_csv(tmp_path: Path) -> None:
    plain = write(tmp_path / "events.txt", EVENTS_CSV)
    with pytest.raises(DataImportError, match=r"events\.txt: cannot tell the format"):
        import_dataset(tmp_path / "a", plain, **ODD_COLUMNS)
    import_dataset(tmp_path / "a", plain, file_format="csv", **ODD_COLUMNS)
    packed = tmp_path / "events.csv.gz"
    packed.write_bytes(gzip.compress(EVENTS_CSV.encode()))
    import_dataset(tmp_path / "b", packed, **ODD_COLUMNS)
    first = load_dataset(tmp_path / "a").interactions.to_pylist()
    assert first == load_dataset(tmp_path / "b").interactions.to_pylist()
    assert len(first) == 7


def test_csv_ids_keep_leading_zeros(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp\n007,0042,1\n007,42,2\n")
    import_dataset(tmp_path / "out", events)
    dataset = load_dataset(tmp_path / "out")
    assert dataset.items[ITEM_ID].to_pylist() == ["0042", "42"]
    assert dataset.users[USER_ID].to_pylist() == ["007"]


# --------------------------------------------------------------------------- errors


def _fails(tmp_path: Path, match: str, *args: object, **kwargs: object) -> DataImportError:
    out = tmp_path / "never"
    with pytest.raises(DataImportError, match=match) as info:
        import_dataset(out, *args, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    return info.value


def test_missing_column_is_named_with_the_columns_present(
    odd_files: tuple[Path, Path], tmp_path: Path
) -> None:
    events, items = odd_files
    error = _fails(tmp_path, r"missing column 'user_id' \(--user-col\)", events)
    assert "columns present: UserIdent, Movie, When, rating" in str(error)
    error = _fails(
        tmp_path,
        r"movies\.csv: missing column 'Film' \(--item-col\)",
        write(tmp_path / "e.csv", EVENTS_CSV.replace("Movie", "Film")),
        items=items,
        user_col="UserIdent",
        item_col="Film",
        time_col="When",
    )
    assert "Movie, Title, Genres, Year" in str(error)


def test_duplicate_item_rows_are_refused(odd_files: tuple[Path, Path], tmp_path: Path) -> None:
    events, _ = odd_files
    items = write(
        tmp_path / "dup.csv", ITEMS_CSV + "m2,Toy Story 2,Comedy,1999\nm4,Up,Animation,2009\n"
    )
    error = _fails(
        tmp_path, "2 item ids appear on more than one row", events, items=items, **ODD_COLUMNS
    )
    assert "4 rows in all" in str(error) and "'m2'" in str(error) and "'m4'" in str(error)


def test_unparseable_timestamps_name_column_count_and_examples(tmp_path: Path) -> None:
    bad = EVENTS_CSV.replace("2024-01-03", "yesterday").replace("2024-01-05T10:00:00Z", "someday")
    error = _fails(
        tmp_path,
        r"column 'When' \(--time-col\): 2 of 7 rows are not timestamps",
        write(tmp_path / "e.csv", bad),
        **ODD_COLUMNS,
    )
    assert "'yesterday'" in str(error) and "'someday'" in str(error)
    empty = EVENTS_CSV.replace("2024-01-03", "")
    _fails(
        tmp_path, "1 of 7 rows have no timestamp", write(tmp_path / "e2.csv", empty), **ODD_COLUMNS
    )


def test_missing_and_empty_ids_are_refused(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu1,,1\nu1,i2,2\n")
    _fails(tmp_path, r"column 'item_id' \(--item-col\): 1 rows have no id", events)
    floats = tmp_path / "e.parquet"
    pq.write_table(pa.table({"user_id": [1.5], "item_id": ["a"], "timestamp": [1]}), floats)
    _fails(tmp_path, "holds double values; ids must be strings or integers", floats)


def test_missing_items_policy(odd_files: tuple[Path, Path], tmp_path: Path) -> None:
    events, _ = odd_files
    items = write(tmp_path / "few.csv", "\n".join(ITEMS_CSV.splitlines()[:3]) + "\n")  # m1, m2
    error = _fails(
        tmp_path, "4 interactions name 3 item ids missing from", events, items=items, **ODD_COLUMNS
    )
    assert "'m3', 'm4', 'm5'" in str(error) and "--missing-items drop" in str(error)

    dropped = import_dataset(
        tmp_path / "drop", events, items=items, missing_items="drop", **ODD_COLUMNS
    )
    kept = load_dataset(tmp_path / "drop")
    assert kept.interactions["item_id"].to_pylist() == ["m1", "m2", "m1"]
    assert kept.num_items == 2
    assert any("dropped (--missing-items drop)" in note for note in dropped.notes)

    import_dataset(tmp_path / "add", events, items=items, missing_items="add", **ODD_COLUMNS)
    added = load_dataset(tmp_path / "add")
    assert added.interactions.num_rows == 7
    rows = added.items.to_pylist()
    assert [r["item_id"] for r in rows] == ["m1", "m2", "m3", "m4", "m5"]
    assert rows[2]["Genres"] is None and rows[2]["Title"] is None


def test_missing_users_policy(odd_files: tuple[Path, Path], tmp_path: Path) -> None:
    events, _ = odd_files
    users = write(tmp_path / "people.csv", "UserIdent,Country\nalice,FR\ncarol,DE\n")
    error = _fails(
        tmp_path, "3 interactions name 1 user ids missing from", events, users=users, **ODD_COLUMNS
    )
    assert "'bob'" in str(error) and "--missing-users" in str(error)
    import_dataset(tmp_path / "drop", events, users=users, missing_users="drop", **ODD_COLUMNS)
    dropped = load_dataset(tmp_path / "drop")
    assert set(dropped.interactions["user_id"].to_pylist()) == {"alice"}
    assert dropped.users[USER_ID].to_pylist() == ["alice", "carol"]  # carol: no interactions
    import_dataset(tmp_path / "add", events, users=users, missing_users="add", **ODD_COLUMNS)
    added = load_dataset(tmp_path / "add").users.to_pylist()
    assert added[-1] == {"user_id": "bob", "Country": None}


def test_no_half_written_directory_and_old_one_kept(
    odd_files: tuple[Path, Path], tmp_path: Path
) -> None:
    events, items = odd_files
    out = tmp_path / "mine"
    import_dataset(out, events, items=items, **ODD_COLUMNS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        import_dataset(out, events, items=items, **ODD_COLUMNS)
    dup = write(tmp_path / "dup.csv", ITEMS_CSV + "m1,Again,Drama,2000\n")
    with pytest.raises(DataImportError, match="1 item ids appear on more than one row"):
        import_dataset(out, events, items=dup, overwrite=True, **ODD_COLUMNS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dup.csv",
        "events.csv",
        "mine",
        "movies.csv",
    ]


# --------------------------------------------------------------------------- schema round trip


def test_edited_schema_yaml_round_trip(odd_files: tuple[Path, Path], tmp_path: Path) -> None:
    events, items = odd_files
    first = tmp_path / "first"
    import_dataset(first, events, items=items, **ODD_COLUMNS)
    edited = yaml.safe_load((first / importer.SCHEMA_YAML_FILE).read_text())
    assert edited["name"] == "first"
    features = {f["name"]: f for f in edited["items"]}
    features["genres"].update(kind="hashed_bag", num_buckets=64, embedding_dim=8)
    features["title"].update(kind="hashed", num_buckets=32)
    del features["year"]
    features["item_id"]["column"] = "Movie"  # the input name of the id column works too
    edited["items"] = list(features.values())
    edited["name"] = "edited"
    schema_file = write(tmp_path / "edited.yaml", yaml.safe_dump(edited, sort_keys=False))

    second = tmp_path / "second"
    result = import_dataset(second, events, items=items, schema=schema_file, **ODD_COLUMNS)
    dataset = load_dataset(second)
    specs = {s.name: s for s in dataset.schema.item_features}
    assert dataset.schema.name == "edited"
    assert (specs["genres"].kind, specs["genres"].num_buckets) == (FeatureKind.HASHED_BAG, 64)
    assert (specs["title"].kind, specs["title"].num_buckets) == (FeatureKind.HASHED, 32)
    assert specs["item_id"].column == ITEM_ID
    assert "year" not in specs and "Year" not in dataset.items.column_names
    assert dataset.items["Genres"].to_pylist()[0] == ["Crime", "Thriller"]
    assert not result.inferred
    assert any("left out: Year" in note for note in result.notes)
    # and the second run's own files read back to the same schema
    again = ImportSchema.load(second / importer.SCHEMA_YAML_FILE).schema
    assert again.item_features == dataset.schema.item_features


def test_written_schema_json_is_accepted_by_schema(
    odd_files: tuple[Path, Path], tmp_path: Path
) -> None:
    events, items = odd_files
    first = tmp_path / "first"
    import_dataset(first, events, items=items, **ODD_COLUMNS)
    data = json.loads((first / SCHEMA_FILE).read_text())
    data["item_features"] = [f for f in data["item_features"] if f["name"] != "title"]
    edited = write(tmp_path / "edited.json", json.dumps(data))
    import_dataset(tmp_path / "second", events, items=items, schema=edited, **ODD_COLUMNS)
    second = load_dataset(tmp_path / "second")
    assert [s.name for s in second.schema.item_features] == ["item_id", "genres", "year"]
    # the delimiter came back from stats.import, not from a fresh guess
    assert second.schema.stats["import"] == {"delimiters": {"items": {"Genres": "|"}}}
    assert second.items["Genres"].to_pylist() == load_dataset(first).items["Genres"].to_pylist()


def test_schema_delimiter_and_kinds_are_applied(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2\n")
    items = write(tmp_path / "i.csv", "item_id,tags,zip\na,x;y,01234\nb,y,99\n")
    schema = write(
        tmp_path / "s.yaml",
        "users:\n- {name: user_id, kind: categorical}\n"
        "items:\n- {name: item_id, kind: categorical}\n"
        "- {name: tags, kind: bag, max_length: 4, delimiter: ';'}\n"
        "- {name: zip, kind: categorical}\n",
    )
    import_dataset(tmp_path / "out", events, items=items, schema=schema)
    dataset = load_dataset(tmp_path / "out")
    assert dataset.items["tags"].to_pylist() == [["x", "y"], ["y"]]
    assert dataset.items["zip"].to_pylist() == ["01234", "99"]  # read as text: zero kept
    assert [s.name for s in dataset.schema.query_features] == ["user_id"]  # no history asked


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("users: []\nitems: []\n", "`users` must be a non-empty list"),
        ("colour: red\n", r"unknown keys \['colour'\]"),
        (
            "users:\n- {name: user_id, kind: categorical}\n"
            "items:\n- {name: item_id, kind: categorical, delimiter: '|'}\n",
            "`delimiter` is only for bag and hashed_bag",
        ),
        (
            "users:\n- {name: user_id, kind: categorical, buckets: 3}\n"
            "items:\n- {name: item_id, kind: categorical}\n",
            r"users\[0\]: unknown feature spec keys \['buckets'\]",
        ),
        ("users: [\n", "not valid YAML"),
    ],
)
def test_invalid_schema_files_are_refused(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path / "schema.yaml", text)
    with pytest.raises(DataImportError, match=match):
        ImportSchema.load(path)


def test_schema_naming_an_absent_column_or_wrong_type(tmp_path: Path) -> None:
    events = write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,a,1\nu,b,2\n")
    items = write(tmp_path / "i.csv", "item_id,price\na,cheap\nb,1.5\n")
    absent = write(
        tmp_path / "absent.yaml",
        "users:\n- {name: user_id, kind: categorical}\n- {name: age, kind: dense}\n"
        "items:\n- {name: item_id, kind: categorical}\n",
    )
    _fails(
        tmp_path,
        r"pass --users for user features\): the schema names users column\(s\) \['age'\]",
        events,
        items=items,
        schema=absent,
    )
    dense = write(
        tmp_path / "dense.yaml",
        "users:\n- {name: user_id, kind: categorical}\n"
        "items:\n- {name: item_id, kind: categorical}\n- {name: price, kind: dense}\n",
    )
    _fails(
        tmp_path,
        r"column 'price' \(feature 'price'\) holds strings that are not numbers "
        r"\(e.g. 'cheap'\)",
        events,
        items=items,
        schema=dense,
    )


# --------------------------------------------------------------------------- inference rules


def test_inference_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "HASHED_THRESHOLD", 3)
    items = pa.table(
        {
            "item_id": ["a", "b", "c", "d", "e"],
            "brand": ["p", "q", "r", "s", "t"],  # 5 distinct > 3: hashed
            "colour": ["red", "red", "blue", None, "red"],  # categorical
            "weight": [1.0, 2.0, float("nan"), 3.0, 4.0],  # dense; NaN -> missing indicator
            "stock": [1, 2, 3, 4, 5],  # dense without indicator
            "empty": pa.nulls(5),  # left out
            "tags": [["x"], ["x", "y"], [], None, ["y", "z", "x"]],  # bag, longest row 3
        }
    )
    users = pa.table({"user_id": ["u"], "history": ["h"]})  # a column named like the feature
    schema, notes = infer_schema(users, items, name="t")
    specs = {s.name: s for s in schema.schema.item_features}
    assert specs["brand"].kind == FeatureKind.HASHED
    assert specs["brand"].num_buckets == 8  # next power of two >= 5
    assert specs["colour"].kind == FeatureKind.CATEGORICAL
    assert specs["weight"].missing_indicator and not specs["stock"].missing_indicator
    assert (specs["tags"].kind, specs["tags"].max_length) == (FeatureKind.BAG, 3)
    assert "empty" not in specs
    assert any("'empty' left out: no values" in note for note in notes)
    assert [s.name for s in schema.schema.query_features] == ["user_id", "history", "history_2"]
    assert schema.schema.query_features[2].kind == FeatureKind.HISTORY


def test_detect_delimiter_prefers_labels_over_free_text() -> None:
    assert detect_delimiter(pa.array(["a;b", "b", "a;c", "c;b"])) == ";"
    assert detect_delimiter(pa.array(["a,b|c", "b|a", "c|a", "a"])) == "|"  # most values
    titles = ["Usual Suspects, The", "Godfather, The", "Heat", "Up", "Misérables, Les"]
    assert detect_delimiter(pa.array(titles)) is None
    assert detect_delimiter(pa.array(["Drama", "Comedy", None])) is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (pa.array([0, 86_400], pa.int32()), [0, 86_400]),
        (pa.array([1.9, -0.5]), [1, -1]),  # floored
        (pa.array([dt.date(1970, 1, 2)], pa.date32()), [86_400]),
        (
            pa.array([dt.datetime(1970, 1, 1, 0, 0, 2, 500_000)], pa.timestamp("us", tz="UTC")),
            [2],
        ),
        (pa.array(["1970-01-01T01:00:00+01:00", "1970-01-01T00:00:07"]), [0, 7]),
        (pa.array(["12", "13"]), [12, 13]),
    ],
)
def test_epoch_seconds(values: pa.Array, expected: list[int]) -> None:
    assert epoch_seconds(values, where="f", label="c").to_pylist() == expected


def test_epoch_seconds_refuses_other_types() -> None:
    with pytest.raises(DataImportError, match="holds bool values"):
        epoch_seconds(pa.array([True]), where="f", label="column 't'")
    with pytest.raises(DataImportError, match="1 of 2 rows are not finite"):
        epoch_seconds(pa.array([1.0, float("inf")]), where="f", label="column 't'")


def test_read_table_refuses_repeated_column_names(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "a,b,a\n1,2,3\n")
    with pytest.raises(DataImportError, match=r"column names \['a'\] appear more than once"):
        read_table(path)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        read_table(tmp_path / "nope.csv")


def test_jsonl_reader_reads_what_pyarrow_reads(tmp_path: Path) -> None:
    path = write(tmp_path / "x.jsonl", '{"a": 1, "b": ["x"]}\n{"a": 2, "b": []}\n')
    assert read_table(path).equals(pa_json.read_json(path))


# --------------------------------------------------------------------------- command line


def test_cli_import_prints_schema_and_elapsed(
    odd_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events, items = odd_files
    out = tmp_path / "cli"
    argv = ["data", "import", "--interactions", str(events), "--items", str(items)]
    assert main([*argv, "--out", str(out), *ODD_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "# schema (inferred)" in printed and "delimiter: '|'" in printed
    assert "imported" in printed and " s (read " in printed
    assert load_dataset(out).num_items == 5

    # rerun with the written schema.json, items missing one row: the policy flag applies
    few = write(tmp_path / "few.csv", ITEMS_CSV.rsplit("m5", 1)[0])
    base = [*argv[:4], "--items", str(few), "--out", str(out), *ODD_FLAGS]
    assert main([*base, "--schema", str(out / SCHEMA_FILE), "--overwrite"]) != 0
    stderr = capsys.readouterr().err
    error = [line for line in stderr.splitlines() if line.startswith("retrieval data: error:")]
    assert len(error) == 1 and "--missing-items drop" in error[0]
    assert "Traceback" not in stderr
    code = main(
        [*base, "--schema", str(out / SCHEMA_FILE), "--overwrite", "--missing-items", "drop"]
    )
    assert code == 0
    assert load_dataset(out).num_items == 4


def test_cli_choices_match_the_library() -> None:
    assert data_cli.IMPORT_FORMATS == importer.FORMATS
    assert data_cli.MISSING_POLICIES == importer.MISSING_POLICIES


def test_data_import_error_is_a_dataset_error() -> None:
    assert issubclass(DataImportError, DatasetError) and issubclass(DataImportError, ValueError)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "own-data.md"


def test_documented_commands_parse_and_example_schema_loads(tmp_path: Path) -> None:
    text = DOCS.read_text(encoding="utf-8")
    commands = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for line in block.splitlines()
        if line.startswith("retrieval ")
    ]
    assert len(commands) == 4
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.func is not None
    (example,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    schema = ImportSchema.load(write(tmp_path / "example.yaml", example))
    assert schema.delimiter("items", "Genres") == "|"
    assert [s.name for s in schema.schema.item_features] == ["item_id", "genres", "title", "year"]
