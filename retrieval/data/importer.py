"""Bring your own data: interaction, item and user files become a dataset directory.

Usage::

    retrieval data import --interactions events.csv --out data/mine
    retrieval data import --interactions events.csv --items movies.csv \\
        --user-col UserIdent --item-col Movie --time-col When --out data/mine
    # edit data/mine/schema.yaml (or data/mine/schema.json), then run again with it:
    retrieval data import --interactions events.csv --items movies.csv \\
        --user-col UserIdent --item-col Movie --time-col When \\
        --schema data/mine/schema.yaml --out data/mine --overwrite

Inputs are CSV, TSV, Parquet or JSON lines, picked by extension (``.csv``, ``.tsv``,
``.parquet``, ``.jsonl``/``.ndjson``; a ``.gz``/``.bz2``/``.zst``/``.lz4`` suffix on a text
file is decompressed) or by `file_format`. The steps, in order:

1. read each file (pyarrow readers); the id and time columns are renamed to ``user_id``,
   ``item_id`` and ``timestamp`` (`retrieval.features`); ids become strings;
2. check: named columns exist, ids are non-empty, item (user) rows are unique, timestamps
   parse (integers or floats are epoch seconds, ISO-8601 strings and Arrow timestamps or
   dates are converted to epoch seconds, naive ones read as UTC); interactions whose item
   (user) is not in the item (user) table follow a policy: ``error``, ``drop`` them, or
   ``add`` the id as a row with null features;
3. the feature schema: the one given (`ImportSchema.load`: YAML, or a ``schema.json`` an
   earlier import wrote) or one inferred from the column types (`infer_schema`, rules in its
   docstring and docs/own-data.md);
4. columns are converted to what each feature kind reads (delimited strings to lists,
   numbers to float64 for dense features...); unused columns are left out;
5. the fixed split protocol (`retrieval.data.dataset.assign_splits`) and an atomic
   `write_dataset`: on any error above nothing is written. ``schema.yaml``, the schema in
   the editable form `--schema` reads, is written with the other files.

Without an item (user) table the table holds the ids the interactions name, and the side
has only its id feature (plus the query history).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from retrieval.data.dataset import (
    RATING,
    Dataset,
    DatasetError,
    assign_splits,
    write_dataset,
)
from retrieval.features import (
    ITEM_ID,
    SPLIT,
    TIMESTAMP,
    USER_ID,
    DatasetSchema,
    FeatureKind,
    FeatureSpec,
)

logger = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "parquet", "jsonl")
_FORMAT_OF_SUFFIX = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
MISSING_POLICIES = ("error", "drop", "add")
MissingPolicy = Literal["error", "drop", "add"]
Side = Literal["users", "items"]

SCHEMA_YAML_FILE = "schema.yaml"  # the editable schema, written beside schema.json
IMPORT_STATS_KEY = "import"  # schema stats: {"delimiters": {side: {column: delimiter}}}

# Inference rules (`infer_schema`).
HASHED_THRESHOLD = 10_000  # a string column (bag vocabulary) with more distinct values is hashed
MAX_HASH_BUCKETS = 1 << 20  # hash buckets: next power of two >= distinct values, at most this
BAG_DELIMITERS = ("|", ";", ",")  # tried in this order (ties in share go to the earlier)
BAG_MIN_SHARE = 0.05  # share of non-null values that must hold the delimiter
BAG_MIN_REPEATED = 0.5  # share of token occurrences that must be tokens seen more than once
BAG_MAX_LENGTH = 32  # bag `max_length`: the most tokens of a row, capped here
ID_EMBEDDING_DIM = 32  # user_id, item_id and the history that shares item_id's table
HISTORY_FEATURE = "history"
HISTORY_LENGTH = 50  # the query history: the user's last 50 items
_EMBEDDING_DIM_STEPS = ((8, 4), (64, 8), (1024, 16))  # (up to N distinct values, width)
_WIDEST_EMBEDDING_DIM = 32
_EXAMPLES = 3  # offending values quoted in an error message

_SCALAR_KINDS = frozenset({FeatureKind.CATEGORICAL, FeatureKind.HASHED})
_LIST_KINDS = frozenset({FeatureKind.BAG, FeatureKind.HASHED_BAG})


class DataImportError(DatasetError):
    """Input files cannot become a dataset; the message names the file, the column and
    examples of the offending values."""


# --------------------------------------------------------------------------- the schema file


@dataclass(frozen=True)
class ImportSchema:
    """A dataset schema plus how delimited strings become bags.

    Feature columns are those of the input files after the id and time columns are renamed
    to ``user_id``, ``item_id`` and ``timestamp``.

    Args:
        schema: the features of each tower (`retrieval.features.DatasetSchema`).
        delimiters: per side (``users`` / ``items``), source column -> the delimiter that
            splits its strings into a bag. A string bag column not listed is split on the
            delimiter `detect_delimiter` finds.
    """

    schema: DatasetSchema
    delimiters: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def delimiter(self, side: Side, column: str) -> str | None:
        return self.delimiters.get(side, {}).get(column)

    def to_yaml(self) -> str:
        """The YAML `load` reads back: ``name``, then ``users:`` and ``items:``, each a list of
        features with their non-default `FeatureSpec` fields (and ``delimiter`` for bags)."""
        data: dict[str, Any] = {"name": self.schema.name}
        if self.schema.item_id_feature != ITEM_ID:
            data["item_id_feature"] = self.schema.item_id_feature
        sides: tuple[tuple[Side, tuple[FeatureSpec, ...]], ...] = (
            ("users", self.schema.query_features),
            ("items", self.schema.item_features),
        )
        for side, specs in sides:
            data[side] = [self._feature_entry(side, spec) for spec in specs]
        header = (
            "# Feature schema of `retrieval data import` (docs/own-data.md). Edit it and pass it\n"
            "# back with --schema. `column` is the input column after the id and time columns\n"
            "# are renamed to user_id, item_id and timestamp; it defaults to `name`.\n"
        )
        return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def _feature_entry(self, side: Side, spec: FeatureSpec) -> dict[str, Any]:
        defaults = {
            name: fld.default
            for name, fld in FeatureSpec.__dataclass_fields__.items()
            if fld.default is not dataclasses.MISSING
        }
        entry: dict[str, Any] = {"name": spec.name, "kind": str(spec.kind)}
        for key, value in spec.to_dict().items():
            if key in entry or value == defaults.get(key):
                continue
            if key == "embedding_dim" and spec.kind == FeatureKind.DENSE:
                continue  # unused by dense features
            entry[key] = value
        delimiter = self.delimiter(side, spec.source_column)
        if spec.kind in _LIST_KINDS and delimiter is not None:
            entry["delimiter"] = delimiter
        return entry

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "schema") -> ImportSchema:
        """Build from parsed YAML (``users``/``items`` lists) or a ``schema.json`` mapping
        (``query_features``/``item_features``; its ``stats.import.delimiters`` are kept).

        Raises:
            DataImportError: unknown keys or invalid features; the message names `where`.
        """
        if not isinstance(data, Mapping):
            raise DataImportError(f"{where}: expected a mapping at the top level")
        if "query_features" in data or "item_features" in data:
            return cls._from_schema_json(data, where)
        known = {"name", "item_id_feature", "users", "items"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataImportError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        delimiters: dict[str, dict[str, str]] = {}
        sides: dict[str, tuple[FeatureSpec, ...]] = {}
        for side in ("users", "items"):
            entries = data.get(side)
            if not isinstance(entries, list) or not entries:
                raise DataImportError(f"{where}: `{side}` must be a non-empty list of features")
            specs = []
            for position, entry in enumerate(entries):
                spec, delimiter = _feature_from_entry(entry, f"{where}: {side}[{position}]")
                specs.append(spec)
                if delimiter is not None:
                    _add_delimiter(delimiters, side, spec, delimiter, where)
            sides[side] = tuple(specs)
        try:
            schema = DatasetSchema(
                name=str(data.get("name") or ""),  # empty: the import names it
                query_features=sides["users"],
                item_features=sides["items"],
                item_id_feature=str(data.get("item_id_feature", ITEM_ID)),
            )
        except ValueError as exc:
            raise DataImportError(f"{where}: {exc}") from None
        return cls(schema, delimiters)

    @classmethod
    def _from_schema_json(cls, data: Mapping[str, Any], where: str) -> ImportSchema:
        try:
            schema = DatasetSchema.from_dict(dict(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataImportError(f"{where}: invalid schema: {exc}") from None
        imported = schema.stats.get(IMPORT_STATS_KEY, {})
        raw = imported.get("delimiters", {}) if isinstance(imported, Mapping) else {}
        delimiters = {
            str(side): {str(column): str(d) for column, d in columns.items()}
            for side, columns in raw.items()
            if side in ("users", "items") and isinstance(columns, Mapping)
        }
        return cls(dataclasses.replace(schema, stats={}), delimiters)

    @classmethod
    def load(cls, path: str | Path) -> ImportSchema:
        """Read a schema file: YAML as `to_yaml` writes it, or a dataset's ``schema.json``
        (JSON is YAML too).

        Raises:
            FileNotFoundError: no such file.
            DataImportError: the file is not valid YAML or not a valid schema.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--schema: file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise DataImportError(f"{path}: not valid YAML or JSON ({exc})") from None
        return cls.from_mapping(data, where=str(path))


def _feature_from_entry(entry: Any, where: str) -> tuple[FeatureSpec, str | None]:
    if not isinstance(entry, Mapping):
        raise DataImportError(f"{where}: a feature must be a mapping; got {entry!r}")
    fields = dict(entry)
    delimiter = fields.pop("delimiter", None)
    try:
        spec = FeatureSpec.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise DataImportError(f"{where}: {exc}") from None
    if delimiter is not None:
        if spec.kind not in _LIST_KINDS:
            raise DataImportError(
                f"{where}: feature {spec.name!r}: `delimiter` is only for bag and hashed_bag "
                f"features; it is {spec.kind}"
            )
        if not isinstance(delimiter, str) or not delimiter:
            raise DataImportError(
                f"{where}: feature {spec.name!r}: `delimiter` must be a non-empty string; "
                f"got {delimiter!r}"
            )
    return spec, delimiter


def _add_delimiter(
    delimiters: dict[str, dict[str, str]], side: str, spec: FeatureSpec, delimiter: str, where: str
) -> None:
    column = spec.source_column
    known = delimiters.setdefault(side, {}).setdefault(column, delimiter)
    if known != delimiter:
        raise DataImportError(
            f"{where}: {side} column {column!r} is given two delimiters, {known!r} and "
            f"{delimiter!r}"
        )


# --------------------------------------------------------------------------- reading


def detect_format(path: str | Path) -> str:
    """The input format of `path` from its extension (a compression suffix is skipped).

    >>> detect_format("events.csv"), detect_format("items.tsv.gz"), detect_format("u.ndjson")
    ('csv', 'tsv', 'jsonl')
    """
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    found = _FORMAT_OF_SUFFIX.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise DataImportError(
            f"{path}: cannot tell the format from the extension; use one of "
            f"{', '.join(sorted(_FORMAT_OF_SUFFIX))} or pass --format ({', '.join(FORMATS)})"
        )
    return found


def read_table(
    path: str | Path, *, file_format: str | None = None, string_columns: Iterable[str] = ()
) -> pa.Table:
    """Read one input file into an Arrow table (dictionary columns decoded).

    Args:
        path: a CSV, TSV, Parquet or JSON-lines file.
        file_format: one of `FORMATS`; default: from the extension (`detect_format`).
        string_columns: CSV/TSV columns read as strings whatever they look like (ids, codes
            with leading zeros); absent ones are ignored. Empty CSV fields are nulls.

    Raises:
        FileNotFoundError: no such file.
        DataImportError: unreadable, or two columns share a name.
    """
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    fmt = file_format or detect_format(path)
    if fmt not in FORMATS:
        raise DataImportError(f"`file_format` must be one of {list(FORMATS)}; got {fmt!r}")
    try:
        if fmt in ("csv", "tsv"):
            table = pa_csv.read_csv(
                path,
                parse_options=pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t"),
                convert_options=pa_csv.ConvertOptions(
                    column_types={name: pa.string() for name in string_columns},
                    strings_can_be_null=True,
                ),
            )
        elif fmt == "parquet":
            table = pq.read_table(path)
        else:
            table = pa_json.read_json(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataImportError(f"{path}: cannot read it as {fmt} ({exc})") from None
    names = table.column_names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataImportError(f"{path}: column names {repeated} appear more than once")
    for index, column in enumerate(table.columns):
        if pa.types.is_dictionary(column.type):
            decoded = pc.cast(column, column.type.value_type)
            table = table.set_column(index, names[index], decoded)
    return table


# --------------------------------------------------------------------------- value checks


def _examples(values: Iterable[Any]) -> str:
    out = []
    for value in values:
        out.append(repr(value))
        if len(out) == _EXAMPLES:
            break
    return ", ".join(out)


def _combined(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _is_string(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_string(data_type) or pa.types.is_large_string(data_type))


def _require_columns(table: pa.Table, where: str, columns: Mapping[str, str]) -> None:
    """`columns`: name -> how the user named it (e.g. '--user-col')."""
    for column, flag in columns.items():
        if column not in table.column_names:
            raise DataImportError(
                f"{where}: missing column {column!r} ({flag}); columns present: "
                f"{', '.join(table.column_names) or '(none)'}"
            )


def normalize_ids(values: pa.Array | pa.ChunkedArray, *, where: str, label: str) -> pa.Array:
    """Ids as non-null, non-empty strings (integers become their decimal text).

    Raises:
        DataImportError: nulls, empty strings, or a type other than string or integer.
    """
    array = _combined(values)
    if pa.types.is_integer(array.type) or pa.types.is_large_string(array.type):
        array = pc.cast(array, pa.string())
    elif not pa.types.is_string(array.type):
        raise DataImportError(
            f"{where}: {label} holds {array.type} values; ids must be strings or integers"
        )
    if array.null_count:
        raise DataImportError(
            f"{where}: {label}: {array.null_count:,} rows have no id (empty or a null marker "
            f"such as NA)"
        )
    empty = pc.sum(pc.equal(pc.utf8_length(array), 0)).as_py() or 0
    if empty:
        raise DataImportError(f"{where}: {label}: {empty:,} rows have an empty id")
    return array


def epoch_seconds(values: pa.Array | pa.ChunkedArray, *, where: str, label: str) -> pa.Array:
    """Timestamps as int64 epoch seconds.

    Integers are epoch seconds already; floats are floored; Arrow timestamps and dates are
    converted (naive ones read as UTC); strings may be integers, floats or ISO-8601
    (``2024-03-01``, ``2024-03-01T12:30:00``, ``...Z``, ``...+02:00``, fractions of a second
    are floored).

    >>> epoch_seconds(pa.array(["1970-01-02", "1970-01-01T00:01:00.9Z", "60"]),
    ...               where="events.csv", label="column 'When'").to_pylist()
    [86400, 60, 60]
    >>> epoch_seconds(pa.array(["1970-01-01", "soon"]), where="events.csv", label="column 'When'")
    Traceback (most recent call last):
    ...
    retrieval.data.importer.DataImportError: events.csv: column 'When': 1 of 2 rows are not timestamps (epoch seconds or ISO-8601), e.g. 'soon'

    Raises:
        DataImportError: null or unparseable values (count and examples), or another type.
    """
    array = _combined(values)
    n = len(array)
    if array.null_count:
        raise DataImportError(
            f"{where}: {label}: {array.null_count:,} of {n:,} rows have no timestamp (empty or "
            f"a null marker such as NA)"
        )
    data_type = array.type
    if pa.types.is_integer(data_type):
        try:
            return pc.cast(array, pa.int64())
        except pa.ArrowInvalid:
            raise DataImportError(f"{where}: {label}: timestamps overflow int64") from None
    if pa.types.is_floating(data_type):
        floats = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = ~np.isfinite(floats)
        if bad.any():
            raise DataImportError(
                f"{where}: {label}: {int(bad.sum()):,} of {n:,} rows are not finite numbers "
                f"(e.g. {_examples(floats[bad].tolist())})"
            )
        return pa.array(np.floor(floats).astype(np.int64), pa.int64())
    if pa.types.is_timestamp(data_type) or pa.types.is_date(data_type):
        return pa.array(_temporal_seconds(array), pa.int64())
    if _is_string(data_type):
        return pa.array(_parse_timestamp_strings(array, where=where, label=label), pa.int64())
    raise DataImportError(
        f"{where}: {label} holds {data_type} values; timestamps must be integers or floats "
        f"(epoch seconds), ISO-8601 strings, or timestamps"
    )


def _temporal_seconds(array: pa.Array) -> npt.NDArray[np.int64]:
    """Epoch seconds of a timestamp or date array without nulls (floored)."""
    data_type = array.type
    if pa.types.is_date32(data_type):
        return pc.cast(array, pa.int32()).to_numpy().astype(np.int64) * 86_400
    if pa.types.is_date64(data_type):
        return np.floor_divide(pc.cast(array, pa.int64()).to_numpy(), 1000)
    per_second = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}[data_type.unit]
    raw = pc.cast(array, pa.int64()).to_numpy()  # UTC units since the epoch
    return np.floor_divide(raw, per_second)


def _parse_timestamp_strings(array: pa.Array, *, where: str, label: str) -> npt.NDArray[np.int64]:
    """Each distinct string parsed once: Arrow casts first (all integers, then ISO-8601 naive
    or with a zone), `datetime.fromisoformat` for what they leave."""
    encoded = pc.dictionary_encode(array)
    uniques = encoded.dictionary
    indices = encoded.indices.to_numpy()
    seconds = _arrow_parse(uniques)
    if seconds is None:
        parsed = [_parse_one_timestamp(text) for text in uniques.to_pylist()]
        failed = np.array([value is None for value in parsed], dtype=bool)
        if failed.any():
            bad_rows = int(failed[indices].sum())
            raise DataImportError(
                f"{where}: {label}: {bad_rows:,} of {len(array):,} rows are not timestamps "
                f"(epoch seconds or ISO-8601), e.g. "
                f"{_examples(uniques.filter(pa.array(failed)).to_pylist())}"
            )
        seconds = np.array(parsed, dtype=np.int64)
    return seconds[indices]


def _arrow_parse(strings: pa.Array) -> npt.NDArray[np.int64] | None:
    try:
        return np.asarray(pc.cast(strings, pa.int64()).to_numpy(), dtype=np.int64)
    except pa.ArrowInvalid:
        pass
    for target in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):
        try:
            return _temporal_seconds(pc.cast(strings, target))
        except pa.ArrowInvalid:
            continue
    return None


def _parse_one_timestamp(text: str) -> int | None:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return math.floor(number) if math.isfinite(number) else None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return math.floor(moment.timestamp())


# --------------------------------------------------------------------------- inference


def split_delimited(values: pa.Array | pa.ChunkedArray, delimiter: str) -> pa.Array:
    """Strings split on `delimiter` into lists of tokens, whitespace trimmed, empty tokens
    dropped; a null stays null.

    >>> split_delimited(pa.array(["Action| Comedy", "Drama", None, "a||b"]), "|").to_pylist()
    [['Action', 'Comedy'], ['Drama'], None, ['a', 'b']]
    """
    strings = pc.cast(_combined(values), pa.string())
    pieces = pc.split_pattern(strings, pattern=delimiter)
    parents = pc.list_parent_indices(pieces).to_numpy()
    tokens = pc.utf8_trim_whitespace(pc.list_flatten(pieces))
    keep = pc.greater(pc.utf8_length(tokens), 0)
    kept_parents = parents[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
    counts = np.bincount(kept_parents, minlength=len(strings))
    offsets = np.zeros(len(strings) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    mask = strings.is_null() if strings.null_count else None
    return pa.ListArray.from_arrays(pa.array(offsets), tokens.filter(keep), mask=mask)


def detect_delimiter(values: pa.Array | pa.ChunkedArray) -> str | None:
    """The delimiter of a column of delimited labels (``Action|Comedy``), or None.

    A candidate of `BAG_DELIMITERS` qualifies when it is in at least `BAG_MIN_SHARE` of the
    non-null values and its tokens are labels, not free text: tokens that occur more than
    once in the column make up at least `BAG_MIN_REPEATED` of all token occurrences (a
    title such as "Usual Suspects, The" has one-off tokens). Of those, the one in the most
    values wins.

    >>> detect_delimiter(pa.array(["Crime|Thriller", "Animation|Comedy", "Crime", "Comedy"]))
    '|'
    >>> detect_delimiter(pa.array(["Usual Suspects, The", "Heat", "Godfather, The", "Up"])) is None
    True
    """
    strings = pc.drop_null(pc.cast(_combined(values), pa.string()))
    if len(strings) == 0:
        return None
    best: tuple[float, str] | None = None
    for delimiter in BAG_DELIMITERS:
        share = pc.mean(pc.match_substring(strings, delimiter)).as_py() or 0.0
        if share < BAG_MIN_SHARE:
            continue
        counts = pc.value_counts(pc.list_flatten(split_delimited(strings, delimiter)))
        occurrences = counts.field("counts").to_numpy()
        total = int(occurrences.sum())
        if total == 0 or occurrences[occurrences > 1].sum() < BAG_MIN_REPEATED * total:
            continue
        if best is None or share > best[0]:
            best = (share, delimiter)
    return best[1] if best is not None else None


def _fallback_delimiter(values: pa.Array) -> str | None:
    """For a column the schema says is a bag: the candidate delimiter found most often."""
    strings = pc.drop_null(pc.cast(values, pa.string()))
    counts = {d: pc.sum(pc.match_substring(strings, d)).as_py() or 0 for d in BAG_DELIMITERS}
    best = max(BAG_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else None


def embedding_dim_for(cardinality: int) -> int:
    """Embedding width of a vocabulary or hash space of `cardinality` values: 4 up to 8
    values, 8 up to 64, 16 up to 1,024, 32 above.

    >>> [embedding_dim_for(n) for n in (2, 8, 9, 64, 1000, 50_000)]
    [4, 4, 8, 8, 16, 32]
    """
    for limit, width in _EMBEDDING_DIM_STEPS:
        if cardinality <= limit:
            return width
    return _WIDEST_EMBEDDING_DIM


def hash_buckets_for(distinct: int) -> int:
    """Hash buckets of `distinct` values: the next power of two, at most `MAX_HASH_BUCKETS`.

    >>> hash_buckets_for(10_001), hash_buckets_for(5_000_000)
    (16384, 1048576)
    """
    return min(MAX_HASH_BUCKETS, 1 << max(0, distinct - 1).bit_length())


def feature_name_for(column: str, taken: set[str]) -> str:
    """A feature name ([a-z0-9_]) for `column`, unlike every name in `taken` (then added).

    >>> taken = {"genres"}
    >>> feature_name_for("Movie Genres", taken), feature_name_for("genres", taken)
    ('movie_genres', 'genres_2')
    """
    base = re.sub(r"[^0-9A-Za-z_]+", "_", column).strip("_").lower() or "feature"
    name, suffix = base, 2
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(name)
    return name


@dataclass(frozen=True)
class _Guess:
    kind: FeatureKind
    embedding_dim: int = 16
    num_buckets: int = 0
    max_length: int = 0
    missing_indicator: bool = False
    delimiter: str | None = None
    why: str = ""


def _guess_feature(values: pa.Array) -> _Guess | str:
    """What an unschema'd column becomes; a string says why it is left out."""
    data_type = values.type
    present = len(values) - values.null_count
    if pa.types.is_null(data_type) or present == 0:
        return "no values"
    if pa.types.is_boolean(data_type):
        return _Guess(FeatureKind.CATEGORICAL, embedding_dim_for(2), why="boolean")
    numeric = pa.types.is_integer(data_type) or pa.types.is_floating(data_type)
    dated = pa.types.is_timestamp(data_type) or pa.types.is_date(data_type)
    if numeric or dated or pa.types.is_decimal(data_type):
        missing = values.null_count > 0
        if pa.types.is_floating(data_type):
            missing = missing or bool(pc.any(pc.is_nan(values)).as_py())
        return _Guess(FeatureKind.DENSE, missing_indicator=missing, why=f"{data_type}")
    if _is_string(data_type):
        delimiter = detect_delimiter(values)
        if delimiter is not None:
            return _guess_bag(split_delimited(values, delimiter), delimiter)
        distinct = pc.count_distinct(values).as_py() or 0
        if distinct > HASHED_THRESHOLD:
            buckets = hash_buckets_for(distinct)
            return _Guess(
                FeatureKind.HASHED,
                embedding_dim_for(buckets),
                num_buckets=buckets,
                why=f"{distinct:,} distinct strings > {HASHED_THRESHOLD:,}",
            )
        return _Guess(
            FeatureKind.CATEGORICAL,
            embedding_dim_for(distinct),
            why=f"{distinct:,} distinct strings",
        )
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        value_type = data_type.value_type
        if _is_string(value_type) or pa.types.is_integer(value_type):
            return _guess_bag(values, None)
    return f"type {data_type} is not supported"


def _guess_bag(lists: pa.Array, delimiter: str | None) -> _Guess:
    tokens = pc.list_flatten(lists)
    distinct = pc.count_distinct(tokens).as_py() or 0
    longest = pc.max(pc.list_value_length(lists)).as_py() or 1
    max_length = max(1, min(BAG_MAX_LENGTH, longest))
    source = f"delimiter {delimiter!r}, " if delimiter is not None else ""
    why = f"{source}{distinct:,} distinct tokens, up to {longest} a row"
    if distinct > HASHED_THRESHOLD:
        buckets = hash_buckets_for(distinct)
        return _Guess(
            FeatureKind.HASHED_BAG,
            embedding_dim_for(buckets),
            num_buckets=buckets,
            max_length=max_length,
            delimiter=delimiter,
            why=why,
        )
    return _Guess(
        FeatureKind.BAG,
        embedding_dim_for(distinct),
        max_length=max_length,
        delimiter=delimiter,
        why=why,
    )


def infer_schema(users: pa.Table, items: pa.Table, *, name: str) -> tuple[ImportSchema, list[str]]:
    """A feature schema from column types (ids already renamed to user_id / item_id).

    Rules, per column other than the id:

    - strings: a bag when `detect_delimiter` finds a delimiter (split into lists);
      else categorical, or hashed when there are more than `HASHED_THRESHOLD` distinct
      values (`hash_buckets_for` buckets);
    - lists of strings or integers: bag (hashed_bag above `HASHED_THRESHOLD` distinct
      tokens); `max_length` is the longest row, at most `BAG_MAX_LENGTH`;
    - integers, floats, decimals, timestamps and dates (as epoch seconds): dense, with a
      missing indicator when some values are null or NaN;
    - booleans: categorical;
    - empty columns and other types (structs, maps, binary) are left out, with a note.

    Embedding widths follow `embedding_dim_for`; the ids get `ID_EMBEDDING_DIM` and the
    query side a `history` feature of the last `HISTORY_LENGTH` items sharing item_id.

    Returns:
        The schema and one note per column saying what it became and why.
    """
    notes: list[str] = []
    delimiters: dict[str, dict[str, str]] = {}
    sides: dict[str, tuple[FeatureSpec, ...]] = {}
    for side, table, id_column in (("users", users, USER_ID), ("items", items, ITEM_ID)):
        taken = {id_column}
        specs = [FeatureSpec(id_column, FeatureKind.CATEGORICAL, embedding_dim=ID_EMBEDDING_DIM)]
        for column in table.column_names:
            if column == id_column:
                continue
            guess = _guess_feature(_combined(table.column(column)))
            if isinstance(guess, str):
                notes.append(f"{side}: column {column!r} left out: {guess}")
                continue
            feature = feature_name_for(column, taken)
            specs.append(
                FeatureSpec(
                    feature,
                    guess.kind,
                    column=None if feature == column else column,
                    embedding_dim=guess.embedding_dim,
                    num_buckets=guess.num_buckets,
                    max_length=guess.max_length,
                    missing_indicator=guess.missing_indicator,
                )
            )
            if guess.delimiter is not None:
                delimiters.setdefault(side, {})[column] = guess.delimiter
            notes.append(f"{side}: column {column!r} -> {guess.kind} {feature!r} ({guess.why})")
        if side == "users":
            specs.append(
                FeatureSpec(
                    feature_name_for(HISTORY_FEATURE, taken),
                    FeatureKind.HISTORY,
                    embedding_dim=ID_EMBEDDING_DIM,
                    max_length=HISTORY_LENGTH,
                    shared_with=ITEM_ID,
                )
            )
        sides[side] = tuple(specs)
    schema = DatasetSchema(
        name=name,
        query_features=sides["users"],
        item_features=sides["items"],
        item_id_feature=ITEM_ID,
    )
    return ImportSchema(schema, delimiters), notes


# --------------------------------------------------------------------------- conversion


def _convert_scalar(values: pa.Array, where: str, label: str) -> pa.Array:
    data_type = values.type
    if pa.types.is_string(data_type) or pa.types.is_int64(data_type):
        return values
    if pa.types.is_integer(data_type):
        return pc.cast(values, pa.int64())
    if _is_string(data_type) or pa.types.is_boolean(data_type):
        return pc.cast(values, pa.string())
    if pa.types.is_floating(data_type):
        present = pc.drop_null(values)
        integral = pc.all(pc.equal(pc.floor(present), present)).as_py()
        if integral is not False:
            return pc.cast(values, pa.int64())
        bad = present.filter(pc.invert(pc.equal(pc.floor(present), present)))
        raise DataImportError(
            f"{where}: {label} holds non-integer numbers (e.g. {_examples(bad.to_pylist())}); "
            f"categorical and hashed features read strings or integers"
        )
    raise DataImportError(
        f"{where}: {label} holds {data_type} values; categorical and hashed features read "
        f"strings or integers"
    )


def _convert_list(
    values: pa.Array, delimiter: str | None, where: str, label: str
) -> tuple[pa.Array, str | None]:
    data_type = values.type
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        value_type = data_type.value_type
        if _is_string(value_type):
            return pc.cast(values, pa.list_(pa.string())), None
        if pa.types.is_integer(value_type):
            return pc.cast(values, pa.list_(pa.int64())), None
    elif _is_string(data_type):
        if delimiter is None:
            delimiter = detect_delimiter(values) or _fallback_delimiter(values)
        if delimiter is None:  # no candidate anywhere: every value is one label
            return split_delimited(values, "\x00"), None
        return split_delimited(values, delimiter), delimiter
    raise DataImportError(
        f"{where}: {label} holds {data_type} values; bag features read lists of strings or "
        f"integers, or delimited strings"
    )


def _convert_dense(values: pa.Array, where: str, label: str) -> pa.Array:
    data_type = values.type
    if pa.types.is_timestamp(data_type) or pa.types.is_date(data_type):
        seconds = np.zeros(len(values), dtype=np.int64)
        present = pc.invert(values.is_null()).to_numpy(zero_copy_only=False)
        seconds[present] = _temporal_seconds(pc.drop_null(values))
        return pa.array(seconds.astype(np.float64), pa.float64(), mask=~present)
    if (
        pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_decimal(data_type)
        or pa.types.is_boolean(data_type)
    ):
        return pc.cast(values, pa.float64())
    if _is_string(data_type):
        try:
            return pc.cast(values, pa.float64())
        except pa.ArrowInvalid:
            bad = [v for v in pc.unique(values).to_pylist() if v is not None and not _is_float(v)]
            raise DataImportError(
                f"{where}: {label} holds strings that are not numbers (e.g. {_examples(bad)}); "
                f"dense features read numbers"
            ) from None
    raise DataImportError(f"{where}: {label} holds {data_type} values; dense features read numbers")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_feature_table(
    table: pa.Table,
    specs: Sequence[FeatureSpec],
    *,
    side: Side,
    id_column: str,
    delimiters: Mapping[str, str],
    where: str,
) -> tuple[pa.Table, dict[str, str]]:
    """The id column plus each feature's source column, converted for its kind.

    Args:
        table: the side table (id already renamed and normalized).
        specs: the side's features (history features read the interactions: skipped).
        side: 'users' or 'items' (for messages).
        id_column: user_id or item_id.
        delimiters: source column -> delimiter, for string bag columns.
        where: names the input in messages.

    Returns:
        The table to write and the delimiters used (source column -> delimiter).

    Raises:
        DataImportError: a column is missing, of a type its kind cannot read, or read by
            kinds that need different types.
    """
    readers: dict[str, list[FeatureSpec]] = {}
    for spec in specs:
        if spec.kind != FeatureKind.HISTORY:
            readers.setdefault(spec.source_column, []).append(spec)
    absent = [column for column in readers if column not in table.column_names]
    if absent:
        raise DataImportError(
            f"{where}: the schema names {side} column(s) {absent} that are not there "
            f"(columns: {', '.join(table.column_names)})"
        )
    columns: dict[str, pa.Array] = {id_column: _combined(table.column(id_column))}
    used: dict[str, str] = {}
    for column, column_specs in readers.items():
        kinds = {spec.kind for spec in column_specs}
        groups = [group for group in (_SCALAR_KINDS, _LIST_KINDS) if kinds & group]
        groups += [frozenset({FeatureKind.DENSE})] if FeatureKind.DENSE in kinds else []
        if len(groups) > 1:
            raise DataImportError(
                f"{where}: {side} column {column!r} is read by features of kinds "
                f"{sorted(str(k) for k in kinds)}, which need different column types"
            )
        names = ", ".join(repr(spec.name) for spec in column_specs)
        label = f"column {column!r} (feature {names})"
        if column == id_column:
            if not kinds <= _SCALAR_KINDS:
                raise DataImportError(
                    f"{where}: the id column {column!r} can only be read by categorical or "
                    f"hashed features; {names} is {sorted(str(k) for k in kinds)}"
                )
            continue
        values = _combined(table.column(column))
        if kinds & _SCALAR_KINDS:
            columns[column] = _convert_scalar(values, where, label)
        elif kinds & _LIST_KINDS:
            columns[column], delimiter = _convert_list(values, delimiters.get(column), where, label)
            if delimiter is not None:
                used[column] = delimiter
        else:
            columns[column] = _convert_dense(values, where, label)
    return pa.table(columns), used


# --------------------------------------------------------------------------- the import


@dataclass
class ImportResult:
    """What `import_dataset` did.

    Args:
        dataset: the written dataset (tables in memory).
        schema: the schema used, with the delimiters applied (what schema.yaml holds).
        inferred: True when the schema was inferred rather than given.
        notes: one line per decision: inferred features, ignored columns, dropped or added
            rows.
        timings: seconds per stage (read, check, schema, convert, split, write).
        elapsed_s: seconds for the whole import.
    """

    dataset: Dataset
    schema: ImportSchema
    inferred: bool
    notes: list[str]
    timings: dict[str, float]
    elapsed_s: float


@dataclass(frozen=True)
class _Side:
    side: Side
    entity: str  # 'user' / 'item'
    id_column: str  # canonical name
    source_column: str  # the user's name for it
    flag: str  # '--user-col'
    policy_flag: str  # '--missing-users'


_USERS = _Side("users", "user", USER_ID, USER_ID, "--user-col", "--missing-users")
_ITEMS = _Side("items", "item", ITEM_ID, ITEM_ID, "--item-col", "--missing-items")


def _check_policy(name: str, value: str) -> None:
    if value not in MISSING_POLICIES:
        raise ValueError(f"`{name}` must be one of {list(MISSING_POLICIES)}; got {value!r}")


def _prepare_interactions(
    table: pa.Table, where: str, user_col: str, item_col: str, time_col: str
) -> tuple[pa.Table, list[str]]:
    _require_columns(
        table, where, {user_col: "--user-col", item_col: "--item-col", time_col: "--time-col"}
    )
    columns: dict[str, pa.Array] = {
        USER_ID: normalize_ids(
            table.column(user_col), where=where, label=_label(user_col, "--user-col")
        ),
        ITEM_ID: normalize_ids(
            table.column(item_col), where=where, label=_label(item_col, "--item-col")
        ),
        TIMESTAMP: epoch_seconds(
            table.column(time_col), where=where, label=_label(time_col, "--time-col")
        ),
    }
    notes = []
    named = {user_col, item_col, time_col}
    if RATING in table.column_names and RATING not in named:
        rating = _combined(table.column(RATING))
        if pa.types.is_integer(rating.type) or pa.types.is_floating(rating.type):
            columns[RATING] = pc.cast(rating, pa.float32())
            named.add(RATING)
        else:
            notes.append(f"interactions: column {RATING!r} left out: {rating.type} is not a number")
    ignored = [name for name in table.column_names if name not in named]
    if SPLIT in ignored:
        notes.append(
            f"interactions: column {SPLIT!r} ignored: splits follow the fixed protocol "
            f"(retrieval.data.split)"
        )
        ignored.remove(SPLIT)
    if ignored:
        notes.append(f"interactions: columns left out: {', '.join(ignored)}")
    return pa.table(columns), notes


def _label(column: str, flag: str) -> str:
    return f"column {column!r} ({flag})"


def _prepare_side(table: pa.Table, where: str, side: _Side) -> pa.Table:
    """Rename the id column to its canonical name, normalize ids, refuse duplicate rows."""
    _require_columns(table, where, {side.source_column: side.flag})
    if side.source_column != side.id_column and side.id_column in table.column_names:
        raise DataImportError(
            f"{where}: has a column {side.id_column!r} besides the id column "
            f"{side.source_column!r} ({side.flag}), which is renamed to {side.id_column!r}; "
            f"rename one of them"
        )
    ids = normalize_ids(
        table.column(side.source_column), where=where, label=_label(side.source_column, side.flag)
    )
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        rows = int(pc.sum(repeated.field("counts")).as_py())
        raise DataImportError(
            f"{where}: {len(repeated):,} {side.entity} ids appear on more than one row "
            f"({rows:,} rows in all; e.g. {_examples(repeated.field('values').to_pylist())}); "
            f"give each {side.entity} one row"
        )
    index = table.column_names.index(side.source_column)
    return table.set_column(index, side.id_column, ids)


def _apply_missing_policy(
    events: pa.Table,
    table: pa.Table,
    side: _Side,
    policy: str,
    events_where: str,
    table_where: str,
) -> tuple[pa.Table, pa.Table, str | None]:
    ids = events.column(side.id_column)
    found = pc.is_in(ids, value_set=_combined(table.column(side.id_column)))
    missing_rows = len(ids) - (pc.sum(found).as_py() or 0)
    if not missing_rows:
        return events, table, None
    missing = pc.unique(ids.filter(pc.invert(found)))
    count = f"{missing_rows:,} interactions name {len(missing):,} {side.entity} ids"
    if policy == "error":
        raise DataImportError(
            f"{events_where}: {count} missing from {table_where} (e.g. "
            f"{_examples(missing.to_pylist())}); pass {side.policy_flag} drop to drop those "
            f"interactions, or {side.policy_flag} add to add them as {side.entity}s with "
            f"empty features"
        )
    if policy == "drop":
        kept = events.filter(found)
        if kept.num_rows == 0:
            raise DataImportError(
                f"{events_where}: no interaction names a {side.entity} of {table_where}; "
                f"{side.policy_flag} drop would leave none"
            )
        return kept, table, f"{count} missing from {table_where}: dropped ({side.policy_flag} drop)"
    extra = pa.table(
        {
            name: _combined(missing) if name == side.id_column else pa.nulls(len(missing), dtype)
            for name, dtype in zip(table.schema.names, table.schema.types, strict=True)
        },
        schema=table.schema,
    )
    note = f"{count} missing from {table_where}: added with null features ({side.policy_flag} add)"
    return events, pa.concat_tables([table, extra]), note


def _ids_table(events: pa.Table, id_column: str) -> pa.Table:
    """One row per id, in order of first appearance."""
    return pa.table({id_column: pc.unique(_combined(events.column(id_column)))})


def _resolve_id_columns(schema: ImportSchema, user_col: str, item_col: str) -> ImportSchema:
    """A schema feature may name an id column by its input name (``column: Movie``)."""

    def fix(specs: tuple[FeatureSpec, ...], source: str, canonical: str) -> tuple[FeatureSpec, ...]:
        return tuple(
            dataclasses.replace(spec, column=canonical)
            if spec.column == source and source != canonical
            else spec
            for spec in specs
        )

    return dataclasses.replace(
        schema,
        schema=dataclasses.replace(
            schema.schema,
            query_features=fix(schema.schema.query_features, user_col, USER_ID),
            item_features=fix(schema.schema.item_features, item_col, ITEM_ID),
        ),
    )


def _string_columns(schema: ImportSchema | None, side: Side, id_source: str) -> list[str]:
    """CSV columns to read as strings: the id, and what categorical/bag features read."""
    columns = [id_source]
    if schema is not None:
        specs = schema.schema.query_features if side == "users" else schema.schema.item_features
        columns += [
            spec.source_column for spec in specs if spec.kind in _SCALAR_KINDS | _LIST_KINDS
        ]
    return columns


def import_dataset(
    out_dir: str | Path,
    interactions: str | Path,
    *,
    items: str | Path | None = None,
    users: str | Path | None = None,
    schema: str | Path | ImportSchema | None = None,
    user_col: str = USER_ID,
    item_col: str = ITEM_ID,
    time_col: str = TIMESTAMP,
    missing_items: str = "error",
    missing_users: str = "error",
    file_format: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import interaction (and optional item and user) files as the dataset `out_dir`.

    Args:
        out_dir: the dataset directory to write (atomically; nothing on error).
        interactions: file with one row per interaction: user, item, time.
        items: file with one row per item and its features; default: the ids the
            interactions name, with no other feature.
        users: file with one row per user and its features; default: as for items.
        schema: a schema file (`ImportSchema.load`) or object; default: `infer_schema`.
        user_col: the user id column (interactions and users file); renamed to user_id.
        item_col: the item id column (interactions and items file); renamed to item_id.
        time_col: the interaction time column; renamed to timestamp (epoch seconds).
        missing_items: interactions naming items missing from `items`: 'error', 'drop'
            them, or 'add' the items with null features.
        missing_users: the same for `users`.
        file_format: one of `FORMATS` for every input; default: from each extension.
        name: dataset name; default: the schema's (when given), else `out_dir`'s name.
        overwrite: replace an existing `out_dir`.

    Returns:
        The written dataset, the schema used, notes and timings.

    Raises:
        FileNotFoundError: an input file is missing.
        FileExistsError: `out_dir` exists and `overwrite` is false.
        DataImportError: the inputs break a rule (the message names file, column, examples).
        ValueError: an invalid argument.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    mark = started

    def stage(stage_name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[stage_name] = now - mark
        logger.info("import: %s done in %.2f s", stage_name, now - mark)
        mark = now

    _check_policy("missing_items", missing_items)
    _check_policy("missing_users", missing_users)
    for flag, value in (("user_col", user_col), ("item_col", item_col), ("time_col", time_col)):
        if not value:
            raise ValueError(f"`{flag}` must be a column name; got {value!r}")
    if len({user_col, item_col, time_col}) < 3:
        raise ValueError(
            f"`user_col`, `item_col` and `time_col` must differ; got {user_col!r}, "
            f"{item_col!r}, {time_col!r}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    given: ImportSchema | None
    if schema is None or isinstance(schema, ImportSchema):
        given = schema
    else:
        given = ImportSchema.load(schema)
    if given is not None:
        given = _resolve_id_columns(given, user_col, item_col)

    users_side = dataclasses.replace(_USERS, source_column=user_col)
    items_side = dataclasses.replace(_ITEMS, source_column=item_col)
    events_where = str(interactions)
    raw_events = read_table(
        interactions, file_format=file_format, string_columns=(user_col, item_col)
    )
    raw_tables: dict[str, pa.Table] = {}
    for side, path in ((users_side, users), (items_side, items)):
        if path is not None:
            raw_tables[side.side] = read_table(
                path,
                file_format=file_format,
                string_columns=_string_columns(given, side.side, side.source_column),
            )
    stage("read")

    events, notes = _prepare_interactions(raw_events, events_where, user_col, item_col, time_col)
    if events.num_rows == 0:
        raise DataImportError(f"{events_where}: no interactions")
    tables: dict[str, pa.Table] = {}
    wheres: dict[str, str] = {}
    for side, path in ((items_side, items), (users_side, users)):
        if path is None:
            continue
        wheres[side.side] = str(path)
        table = _prepare_side(raw_tables[side.side], str(path), side)
        policy = missing_items if side is items_side else missing_users
        events, table, note = _apply_missing_policy(
            events, table, side, policy, events_where, str(path)
        )
        tables[side.side] = table
        if note is not None:
            notes.append(note)
    for side in (users_side, items_side):
        if side.side not in tables:
            tables[side.side] = _ids_table(events, side.id_column)
            wheres[side.side] = (
                f"{side.side} (built from the ids of {events_where}; pass --{side.side} "
                f"for {side.entity} features)"
            )
    stage("check")

    dataset_name = name or (given.schema.name if given is not None else "") or out_dir.name
    if given is None:
        chosen, inference_notes = infer_schema(tables["users"], tables["items"], name=dataset_name)
        notes = inference_notes + notes
    else:
        chosen = dataclasses.replace(
            given, schema=dataclasses.replace(given.schema, name=dataset_name)
        )
    stage("schema")

    written: dict[str, pa.Table] = {}
    used_delimiters: dict[str, dict[str, str]] = {}
    for side in (users_side, items_side):
        specs = (
            chosen.schema.query_features if side.side == "users" else chosen.schema.item_features
        )
        written[side.side], used = build_feature_table(
            tables[side.side],
            specs,
            side=side.side,
            id_column=side.id_column,
            delimiters=chosen.delimiters.get(side.side, {}),
            where=wheres[side.side],
        )
        if used:
            used_delimiters[side.side] = used
        left_out = [
            column
            for column in tables[side.side].column_names
            if column not in written[side.side].column_names
        ]
        if given is not None and left_out:
            notes.append(f"{side.side}: columns not in the schema, left out: {', '.join(left_out)}")
    chosen = ImportSchema(
        dataclasses.replace(
            chosen.schema, stats={IMPORT_STATS_KEY: {"delimiters": used_delimiters}}
        ),
        used_delimiters,
    )
    stage("convert")

    events = assign_splits(events, user_order=written["users"].column(USER_ID))
    stage("split")

    dataset = write_dataset(
        out_dir,
        written["users"],
        written["items"],
        events,
        chosen.schema,
        overwrite=overwrite,
        extra_files={SCHEMA_YAML_FILE: chosen.to_yaml()},
    )
    stage("write")
    elapsed = time.perf_counter() - started
    logger.info(
        "imported %s: %d interactions, %d users, %d items in %.2f s",
        out_dir,
        events.num_rows,
        dataset.num_users,
        dataset.num_items,
        elapsed,
    )
    return ImportResult(
        dataset=dataset,
        schema=ImportSchema(dataset.schema, used_delimiters),
        inferred=given is None,
        notes=notes,
        timings=timings,
        elapsed_s=elapsed,
    )
