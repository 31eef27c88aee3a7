"""MovieLens conversion: GroupLens ml-100k / ml-1m and RecBole files, errors, the real ml-100k."""

from __future__ import annotations

import importlib.util
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from retrieval.cli import main
from retrieval.data import movielens
from retrieval.data.dataset import load_dataset
from retrieval.data.movielens import (
    ML100K_GENRES,
    MovieLensFormatError,
    find_movielens_source,
    movielens_schema,
    movielens_tables,
    prepare_movielens,
    recbole_example_directory,
)
from retrieval.data.split import split_sizes

# --------------------------------------------------------------------------- fixtures

# Four users; user 4 has no ratings (kept: users.parquet lists every user).
U_USER = """\
1|24|M|technician|85711
2|53|F|other|94043
3|17|M|student|T8H1N
4|60|F|writer|
"""

# Item 3 is the "unknown" item of ml-100k (no title year, no date); item 4 a video release.
U_ITEM_ROWS = [
    ("1", "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"]),
    ("2", "Misérables, Les (1995)", "01-Jan-1995", ["Drama", "Musical"]),
    ("3", "unknown", "", ["unknown"]),
    ("4", "Land Before Time III: The Time (1995) (V)", "", ["Animation"]),
    ("10", "Seven (Se7en) (1995)", "01-Jan-1993", ["Crime", "Thriller"]),
]

# (user, item, rating, timestamp), out of order. User 1: 4 ratings -> floor(0.8*4)=3 train,
# floor(0.9*4)-3=0 valid, 1 test; user 2: 3 ratings -> 2 train, 0 valid, 1 test;
# user 3: 1 rating -> train only (fewer than 3).
U_DATA = [
    ("1", "2", "5", "881250949"),
    ("2", "1", "3", "891717742"),
    ("1", "1", "4", "881250940"),
    ("3", "10", "1", "878887116"),
    ("2", "3", "2", "891717740"),
    ("1", "4", "3", "881250960"),
    ("1", "10", "4", "881250960"),
    ("2", "2", "5", "891717800"),
]

# Rows after sorting by user (numeric order of users.parquet), then time (ties in input order).
EXPECTED_INTERACTIONS = [
    ("1", "1", 881250940, 4.0, "train"),
    ("1", "2", 881250949, 5.0, "train"),
    ("1", "4", 881250960, 3.0, "train"),
    ("1", "10", 881250960, 4.0, "test"),  # ties with item 4, given after it
    ("2", "3", 891717740, 2.0, "train"),
    ("2", "1", 891717742, 3.0, "train"),
    ("2", "2", 891717800, 5.0, "test"),
    ("3", "10", 878887116, 1.0, "train"),
]

EXPECTED_USERS = [
    {
        "user_id": "1",
        "age_bucket": "18-24",
        "gender": "M",
        "occupation": "technician",
        "zip_prefix": "85",
    },
    {
        "user_id": "2",
        "age_bucket": "50-55",
        "gender": "F",
        "occupation": "other",
        "zip_prefix": "94",
    },
    {
        "user_id": "3",
        "age_bucket": "<18",
        "gender": "M",
        "occupation": "student",
        "zip_prefix": "t8",
    },
    {
        "user_id": "4",
        "age_bucket": "56+",
        "gender": "F",
        "occupation": "writer",
        "zip_prefix": "unknown",
    },
]

EXPECTED_ITEMS = [
    {
        "item_id": "1",
        "title": "Toy Story",
        "genres": ["Animation", "Children's", "Comedy"],
        "release_year": 1995,
        "year_bucket": "1995-1999",
        "title_tokens": ["toy", "story"],
    },
    {
        "item_id": "2",
        "title": "Misérables, Les",
        "genres": ["Drama", "Musical"],
        "release_year": 1995,
        "year_bucket": "1995-1999",
        "title_tokens": ["misérables", "les"],
    },
    {
        "item_id": "3",
        "title": "unknown",
        "genres": ["unknown"],
        "release_year": None,
        "year_bucket": "unknown",
        "title_tokens": ["unknown"],
    },
    {
        "item_id": "4",
        "title": "Land Before Time III: The Time",
        "genres": ["Animation"],
        "release_year": 1995,  # no release date: the year in the title
        "year_bucket": "1995-1999",
        "title_tokens": ["land", "before", "time", "iii", "the", "time"],
    },
    {
        "item_id": "10",
        "title": "Seven (Se7en)",
        "genres": ["Crime", "Thriller"],
        "release_year": 1993,  # the release date wins over the title
        "year_bucket": "1990-1994",
        "title_tokens": ["seven", "se7en"],
    },
]


def genre_flags(genres: list[str]) -> str:
    return "|".join("1" if name in genres else "0" for name in ML100K_GENRES)


def write_grouplens_100k(directory: Path, *, with_genre_file: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.user").write_text(U_USER, encoding="latin-1")
    items = "".join(
        f"{item}|{title}|{date}||http://example.org/{item}|{genre_flags(genres)}\n"
        for item, title, date, genres in U_ITEM_ROWS
    )
    (directory / "u.item").write_text(items, encoding="latin-1")
    (directory / "u.data").write_text("".join("\t".join(r) + "\n" for r in U_DATA))
    if with_genre_file:
        genre_lines = "".join(f"{name}|{k}\n" for k, name in enumerate(ML100K_GENRES))
        (directory / "u.genre").write_text(genre_lines + "\n")  # the real file ends blank
    return directory


def write_recbole_100k(directory: Path) -> Path:
    """The fixture above as RecBole atomic files (typed headers, titles without years)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join("\t".join(line.split("|")) + "\n" for line in U_USER.splitlines()),
        encoding="utf-8",
    )
    item_lines = [
        "1\tToy Story\t1995\tAnimation Children's Comedy",
        "2\tMisérables, Les\t1995\tDrama Musical",
        "3\tunkonwn\tunkonwn\tunknown",  # as misspelled in RecBole's copy
        "4\tLand Before Time III: The Time (1995)\tV\tAnimation",  # as RecBole split it
        "10\tSeven (Se7en)\t1993\tCrime Thriller",
    ]
    (directory / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "\n".join(item_lines)
        + "\n",
        encoding="utf-8",
    )
    (directory / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}.0\n" for u, i, r, t in U_DATA)
    )
    return directory


def write_recbole_wheel(path: Path, source: Path, name: str = "ml-100k") -> Path:
    """A zip laid out like the recbole wheel, holding `source`'s atomic files."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
        for file in sorted(source.iterdir()):
            archive.write(file, f"recbole/dataset_example/{name}/{file.name}")
    return path


def interaction_rows(table: pa.Table) -> list[tuple[Any, ...]]:
    columns = ["user_id", "item_id", "timestamp", "rating", "split"]
    return list(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


# --------------------------------------------------------------------------- GroupLens ml-100k


@pytest.mark.parametrize("with_genre_file", [True, False])
def test_grouplens_100k(tmp_path: Path, with_genre_file: bool) -> None:
    source = write_grouplens_100k(tmp_path / "raw", with_genre_file=with_genre_file)
    dataset = prepare_movielens(tmp_path / "out", source=source)
    assert dataset.users.to_pylist() == EXPECTED_USERS
    assert dataset.items.to_pylist() == EXPECTED_ITEMS
    assert interaction_rows(dataset.interactions) == EXPECTED_INTERACTIONS
    assert dataset.interactions.schema.field("timestamp").type == pa.int64()
    assert dataset.interactions.schema.field("rating").type == pa.float32()
    assert dataset.items.schema.field("release_year").type == pa.int32()
    assert dataset.schema.stats["source"]["layout"] == "grouplens-100k"
    assert dataset.schema.stats["interactions"] == {"total": 8, "train": 6, "valid": 0, "test": 2}
    reloaded = load_dataset(tmp_path / "out")
    assert reloaded.items.equals(dataset.items)
    assert reloaded.schema.query_features == movielens_schema("ml-100k").query_features


def test_grouplens_custom_genre_file(tmp_path: Path) -> None:
    source = tmp_path / "raw"
    source.mkdir()
    (source / "u.user").write_text("1|30|F|artist|12345\n")
    (source / "u.genre").write_text("Drama|1\nComedy|0\n")
    (source / "u.item").write_text(
        "7|Some Film (1980)|01-Jan-1980||url|1|1\n8|Other (1981)|||url|0|1\n"
    )
    (source / "u.data").write_text("1\t7\t5\t100\n1\t8\t4\t50\n")
    _, items, _ = movielens_tables(find_movielens_source("ml-100k", source))
    assert items.column("genres").to_pylist() == [["Comedy", "Drama"], ["Drama"]]


def test_source_may_be_parent_or_file(tmp_path: Path) -> None:
    write_grouplens_100k(tmp_path / "data" / "ml-100k")
    by_parent = find_movielens_source("ml-100k", tmp_path / "data")
    by_file = find_movielens_source("ml-100k", tmp_path / "data" / "ml-100k" / "u.data")
    assert by_parent == by_file
    assert by_parent.layout == "grouplens-100k"


# --------------------------------------------------------------------------- RecBole


def test_recbole_wheel_is_read_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_recbole_100k(tmp_path / "rb")
    wheel = write_recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", raw)
    from_files = prepare_movielens(tmp_path / "a", source=raw)
    from_wheel = prepare_movielens(tmp_path / "b", source=wheel)
    assert from_wheel.schema.stats["source"]["layout"] == "recbole"
    assert from_wheel.interactions.equals(from_files.interactions)
    assert from_wheel.items.equals(from_files.items)
    # Without --source, a wheel in WHEEL_DIRECTORY is found when recbole is not installed.
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda *a, **k: None)
    monkeypatch.setattr(movielens, "WHEEL_DIRECTORY", tmp_path)
    found = find_movielens_source("ml-100k")
    assert str(found.directory).startswith(str(wheel))
    assert prepare_movielens(tmp_path / "c").users.equals(from_files.users)


def test_wheel_without_the_dataset_or_not_a_zip(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    wheel = write_recbole_wheel(tmp_path / "recbole-0-py3-none-any.whl", empty)
    with pytest.raises(FileNotFoundError, match=r"holds no recbole/dataset_example/ml-100k"):
        find_movielens_source("ml-100k", wheel)
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(FileNotFoundError, match="no ml-100k files found"):
        find_movielens_source("ml-100k", broken)


def test_recbole_matches_grouplens(tmp_path: Path) -> None:
    recbole = prepare_movielens(tmp_path / "a", source=write_recbole_100k(tmp_path / "rb"))
    grouplens = prepare_movielens(tmp_path / "b", source=write_grouplens_100k(tmp_path / "gl"))
    assert recbole.schema.stats["source"]["layout"] == "recbole"
    assert recbole.users.equals(grouplens.users)
    assert recbole.items.equals(grouplens.items)
    assert recbole.interactions.equals(grouplens.interactions)


# --------------------------------------------------------------------------- GroupLens ml-1m


def test_grouplens_1m(tmp_path: Path) -> None:
    source = tmp_path / "ml-1m"
    source.mkdir()
    (source / "users.dat").write_text(
        "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::0::55117-1234\n", encoding="latin-1"
    )
    (source / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Misérables, Les (1995)::Drama|Musical\n"
        "3::City of Lost Children, The (1995)::Adventure|Sci-Fi\n",
        encoding="latin-1",
    )
    (source / "ratings.dat").write_text(
        "1::1::5::978300760\n1::2::3::978302109\n1::3::4::978301968\n2::3::4::978298413\n"
    )
    dataset = prepare_movielens(tmp_path / "out", name="ml-1m", source=source)
    assert dataset.schema.name == "ml-1m"
    assert dataset.users.to_pylist() == [
        {
            "user_id": "1",
            "age_bucket": "<18",
            "gender": "F",
            "occupation": "K-12 student",
            "zip_prefix": "48",
        },
        {
            "user_id": "2",
            "age_bucket": "56+",
            "gender": "M",
            "occupation": "self-employed",
            "zip_prefix": "70",
        },
        {
            "user_id": "3",
            "age_bucket": "25-34",
            "gender": "M",
            "occupation": "other",
            "zip_prefix": "55",
        },
    ]
    assert dataset.items.column("title").to_pylist()[1] == "Misérables, Les"
    assert dataset.items.column("genres").to_pylist()[2] == ["Adventure", "Sci-Fi"]
    assert dataset.items.column("title_tokens").to_pylist()[2] == [
        "city",
        "of",
        "lost",
        "children",
        "the",
    ]
    # user 1: 3 ratings sorted by time -> items 1, 3, 2; floor(0.8*3)=2 train, 1 test.
    assert interaction_rows(dataset.interactions) == [
        ("1", "1", 978300760, 5.0, "train"),
        ("1", "3", 978301968, 4.0, "train"),
        ("1", "2", 978302109, 3.0, "test"),
        ("2", "3", 978298413, 4.0, "train"),
    ]


def test_layout_of_another_dataset_is_refused(tmp_path: Path) -> None:
    source = write_grouplens_100k(tmp_path / "raw")
    with pytest.raises(
        ValueError, match=r"holds the grouplens-100k layout \(u.data\), which is not ml-1m"
    ):
        prepare_movielens(tmp_path / "out", name="ml-1m", source=source)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        (
            "u.data",
            "1\t1\t5\t100\n1\t2\t5\n",
            r"u.data:2: expected 4 fields separated by '\\t', got 3",
        ),
        (
            "u.data",
            "1\t1\t5\t100\n\n1\t2\t5\tsoon\n",
            r"u.data:3: timestamp must be an integer; got 'soon'",
        ),
        ("u.data", "1\t1\tfive\t100\n", r"u.data:1: rating must be a number; got 'five'"),
        (
            "u.data",
            "1\t99\t5\t100\n",
            r"u.data: ratings reference 1 item ids missing from u.item \(e.g. \['99'\]\)",
        ),
        ("u.data", "77\t1\t5\t100\n", r"u.data: ratings reference 1 user ids missing from u.user"),
        ("u.user", "1|24|M|technician|85711\n1|30|F|other|1\n", r"u.user: duplicate user id '1'"),
        ("u.user", "1|old|M|technician|85711\n", r"u.user:1: age must be an integer; got 'old'"),
        ("u.item", "1|Toy Story (1995)|01-Jan-1995||url|0|1\n", r"u.item:1: expected 24 fields"),
        (
            "u.item",
            "1|T (1995)|01-Jan-1995||url|" + "|".join("2" * 19) + "\n",
            r"u.item:1: genre flags must be 0 or 1",
        ),
    ],
)
def test_malformed_grouplens_file(
    tmp_path: Path, file_name: str, content: str, message: str
) -> None:
    source = write_grouplens_100k(tmp_path / "raw")
    (source / file_name).write_text(content, encoding="latin-1")
    with pytest.raises(MovieLensFormatError, match=message):
        prepare_movielens(tmp_path / "out", source=source)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        (
            "ml-100k.inter",
            "user_id\titem_id\n1\t1\n",
            r"ml-100k.inter:1: expected a RecBole header",
        ),
        (
            "ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\n1\t1\t5\n",
            r"ml-100k.inter: header lacks a column named one of \['timestamp'\]",
        ),
        ("ml-100k.inter", "", r"ml-100k.inter: file is empty"),
        (
            "ml-100k.item",
            "item_id:token\tmovie_title:token_seq\n1\tToy Story\n",
            r"ml-100k.item: header lacks a column named one of \['class', 'genre', 'genres'\]",
        ),
        (
            "ml-100k.user",
            "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t2\n",
            r"ml-100k.user:2: expected 5 tab-separated fields, got 2",
        ),
    ],
)
def test_malformed_recbole_file(tmp_path: Path, file_name: str, content: str, message: str) -> None:
    source = write_recbole_100k(tmp_path / "raw")
    (source / file_name).write_text(content)
    with pytest.raises(MovieLensFormatError, match=message):
        prepare_movielens(tmp_path / "out", source=source)


def test_incomplete_layout(tmp_path: Path) -> None:
    source = write_grouplens_100k(tmp_path / "raw")
    (source / "u.item").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"grouplens-100k layout of ml-100k is incomplete, missing u.item"
    ):
        find_movielens_source("ml-100k", source)


def test_missing_source_says_how_to_get_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec_without_recbole(name: str, package: str | None = None) -> Any:
        return None if name == "recbole" else real_find_spec(name, package)

    monkeypatch.setattr(movielens.importlib.util, "find_spec", find_spec_without_recbole)
    monkeypatch.setattr(movielens, "WHEEL_DIRECTORY", tmp_path / "no-wheels")
    with pytest.raises(FileNotFoundError) as exc:
        prepare_movielens(tmp_path / "out")
    message = str(exc.value)
    assert "no recbole copy is installed or downloaded" in message
    assert "pip download --no-deps --dest" in message
    assert not (tmp_path / "out").exists()
    assert "recbole==1.2.1" in message
    assert "--source" in message
    with pytest.raises(FileNotFoundError, match=r"ml-1m not found: no --source given.*ml-1m.zip"):
        prepare_movielens(tmp_path / "out", name="ml-1m")
    with pytest.raises(FileNotFoundError, match=r"no ml-100k files found \(looked for u.data"):
        prepare_movielens(tmp_path / "out", source=tmp_path)
    with pytest.raises(
        ValueError, match=r"`name` must be one of \['ml-100k', 'ml-1m'\]; got 'ml-20m'"
    ):
        prepare_movielens(tmp_path / "out", name="ml-20m")


def test_existing_output_refused_before_parsing(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_movielens(tmp_path / "out", source=tmp_path / "does-not-matter")


# --------------------------------------------------------------------------- CLI


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_grouplens_100k(tmp_path / "raw")
    out = tmp_path / "out"
    assert main(["data", "prepare", "ml-100k", "--out", str(out), "--source", str(source)]) == 0
    printed = capsys.readouterr().out
    assert "interactions    8 (train 6, valid 0, test 2)" in printed
    assert "prepared ml-100k in" in printed
    assert main(["data", "prepare", "ml-100k", "--out", str(out), "--source", str(source)]) == 1
    assert "already exists" in capsys.readouterr().err
    args = ["data", "prepare", "ml-100k", "--out", str(out), "--source", str(source), "--overwrite"]
    assert main(args) == 0


# --------------------------------------------------------------------------- the real ml-100k


@pytest.mark.skipif(
    recbole_example_directory() is None,
    reason="no recbole copy of ml-100k: neither the package nor its wheel in "
    "<venv>/share/two-tower-retrieval (make venv downloads it)",
)
def test_real_ml_100k_from_recbole(tmp_path: Path) -> None:
    start = time.perf_counter()
    dataset = prepare_movielens(tmp_path / "ml-100k")
    elapsed = time.perf_counter() - start
    print(f"\nprepare_movielens('ml-100k') from the recbole copy: {elapsed:.2f} s")
    assert dataset.num_users == 943
    assert dataset.num_items == 1682
    assert dataset.interactions.num_rows == 100_000
    # Every split count equals the protocol applied to each user's number of ratings.
    per_user = Counter(dataset.interactions.column("user_id").to_pylist())
    expected = [sum(split_sizes(n)[k] for n in per_user.values()) for k in range(3)]
    stats = dataset.schema.stats["interactions"]
    assert [stats["train"], stats["valid"], stats["test"]] == expected
    assert min(per_user.values()) >= 20  # ml-100k keeps users with >= 20 ratings
    item_1 = dataset.items.slice(0, 1).to_pylist()[0]
    assert item_1["title_tokens"] == ["toy", "story"]
    assert item_1["year_bucket"] == "1995-1999"
    assert pc.max(pc.list_value_length(dataset.items.column("genres"))).as_py() <= 6
    assert set(pc.unique(dataset.users.column("age_bucket")).to_pylist()) <= {
        "<18",
        "18-24",
        "25-34",
        "35-44",
        "45-49",
        "50-55",
        "56+",
    }
    load_dataset(tmp_path / "ml-100k")  # validates
