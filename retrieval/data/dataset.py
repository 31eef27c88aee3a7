"""The dataset directory: the hand-off format every job reads.

Layout (file names are the constants in `retrieval.features`)::

    users.parquet         user_id (string) + user feature columns, one row per user
    items.parquet         item_id (string) + item feature columns; row order = dense item index
    interactions.parquet  user_id, item_id (string), timestamp (int64), split (string),
                          optionally rating (float32); rows sorted by user, then timestamp
    schema.json           a `DatasetSchema`, with counts in `stats`

Splits follow the fixed protocol of `retrieval.data.split`: per user, the first 80 % of
interactions (by time, ties in input order) are train, the next 10 % valid, the rest test;
users with fewer than 3 interactions are train only. `assign_splits` applies it,
`validate_dataset` checks it.

Example:
    >>> import tempfile, pathlib
    >>> import pyarrow as pa
    >>> from retrieval.features import DatasetSchema, FeatureKind, FeatureSpec
    >>> schema = DatasetSchema(
    ...     name="tiny",
    ...     query_features=(FeatureSpec("user_id", FeatureKind.CATEGORICAL),),
    ...     item_features=(FeatureSpec("item_id", FeatureKind.CATEGORICAL),),
    ... )
    >>> users = pa.table({"user_id": ["u1", "u2"]})
    >>> items = pa.table({"item_id": ["a", "b", "c"]})
    >>> events = pa.table({
    ...     "user_id": ["u1", "u2", "u1", "u1"],
    ...     "item_id": ["c", "a", "a", "b"],
    ...     "timestamp": pa.array([30, 5, 10, 20], pa.int64()),
    ... })
    >>> events = assign_splits(events, user_order=users["user_id"])
    >>> events.column("split").to_pylist()
    ['train', 'train', 'test', 'train']
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny"
    >>> dataset = write_dataset(out, users, items, events, schema)
    >>> load_dataset(out).schema.stats["interactions"]
    {'total': 4, 'train': 3, 'valid': 0, 'test': 1}
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrieval.atomic import atomic_directory
from retrieval.data.split import (
    order_by_user_then_time,
    split_codes_for_sorted,
)
from retrieval.features import (
    INTERACTIONS_FILE,
    ITEM_ID,
    ITEMS_FILE,
    SCHEMA_FILE,
    SPLIT,
    SPLITS,
    TIMESTAMP,
    USER_ID,
    USERS_FILE,
    DatasetSchema,
    FeatureKind,
    FeatureSpec,
)

logger = logging.getLogger(__name__)

RATING = "rating"
COLD_STATS_KEY = "cold"  # schema stats of a cold-start dataset (`retrieval.data.cold`)
DATASET_FILES = (USERS_FILE, ITEMS_FILE, INTERACTIONS_FILE, SCHEMA_FILE)
_EXAMPLES = 3  # offending values quoted in an error message


class DatasetError(ValueError):
    """A dataset directory or table breaks the format; the message names the file."""


class Dataset:
    """A dataset: its schema and three pyarrow tables.

    Tables given to the constructor are used as they are; tables left out are read from
    `path` on first access (so a job that needs only the catalog never reads the
    interactions).

    Args:
        schema: the dataset schema (features per tower, stats).
        users: users table, or None to read `path / users.parquet` lazily.
        items: items table (row order = dense item index), or None to read lazily.
        interactions: interactions table, or None to read lazily.
        path: the dataset directory; required when a table is left out.
    """

    def __init__(
        self,
        schema: DatasetSchema,
        users: pa.Table | None = None,
        items: pa.Table | None = None,
        interactions: pa.Table | None = None,
        *,
        path: str | Path | None = None,
    ) -> None:
        self.schema = schema
        self.path = Path(path) if path is not None else None
        if self.path is None and (users is None or items is None or interactions is None):
            raise ValueError("`path` is required when a table is not given")
        self._tables: dict[str, pa.Table | None] = {
            USERS_FILE: users,
            ITEMS_FILE: items,
            INTERACTIONS_FILE: interactions,
        }

    def _table(self, file_name: str) -> pa.Table:
        table = self._tables[file_name]
        if table is None:
            assert self.path is not None
            table = read_parquet(self.path / file_name)
            self._tables[file_name] = table
        return table

    @property
    def users(self) -> pa.Table:
        """users.parquet: `user_id` + user feature columns."""
        return self._table(USERS_FILE)

    @property
    def items(self) -> pa.Table:
        """items.parquet: `item_id` + item feature columns; row i is dense item index i."""
        return self._table(ITEMS_FILE)

    @property
    def interactions(self) -> pa.Table:
        """interactions.parquet: user_id, item_id, timestamp, split[, rating]."""
        return self._table(INTERACTIONS_FILE)

    @property
    def num_users(self) -> int:
        return int(self.users.num_rows)

    @property
    def num_items(self) -> int:
        return int(self.items.num_rows)

    def split_mask(self, name: str) -> npt.NDArray[np.bool_]:
        """Boolean mask over interaction rows that belong to split `name`.

        Raises:
            ValueError: `name` is not one of 'train', 'valid', 'test'.
        """
        if name not in SPLITS:
            raise ValueError(f"`name` must be one of {list(SPLITS)}; got {name!r}")
        mask = pc.equal(self.interactions.column(SPLIT), name)
        return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)

    def split(self, name: str) -> pa.Table:
        """The interactions of split `name` (rows keep their order)."""
        return self.interactions.filter(pa.array(self.split_mask(name)))

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return f"Dataset(name={self.schema.name!r}{where})"


def read_parquet(path: Path) -> pa.Table:
    """Read one parquet file of a dataset, naming the file in any error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing dataset file")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable parquet file ({exc})") from exc


def load_dataset(path: str | Path, *, validate: bool = True) -> Dataset:
    """Open the dataset directory `path`.

    Args:
        path: a directory written by `write_dataset` (or any producer of the format).
        validate: read every table now and check the format (`validate_dataset`);
            with False only the schema is read and tables load on first access.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        DatasetError: a file breaks the format (the message names the file).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path}")
    missing = [name for name in DATASET_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: missing dataset file(s) {', '.join(missing)}")
    dataset = Dataset(DatasetSchema.load(path / SCHEMA_FILE), path=path)
    if validate:
        validate_dataset(dataset)
    return dataset


def assign_splits(
    interactions: pa.Table, user_order: pa.Array | pa.ChunkedArray | None = None
) -> pa.Table:
    """Sort interactions by user, then timestamp (stable), and set the `split` column.

    Args:
        interactions: a table with at least `user_id` and `timestamp`; an existing `split`
            column is replaced.
        user_order: the order users appear in (normally `users["user_id"]`, so that rows
            follow the users table); default: user ids sorted as strings.

    Returns:
        The sorted table with `split` (string: train/valid/test) as its last column.

    Raises:
        DatasetError: a column is missing, or a user is not in `user_order`.
    """
    for column in (USER_ID, TIMESTAMP):
        if column not in interactions.column_names:
            raise DatasetError(f"{INTERACTIONS_FILE}: missing column {column!r}")
    user_ids = interactions.column(USER_ID)
    if user_order is None:
        unique = pc.unique(user_ids)
        user_order = unique.take(pc.sort_indices(unique))
    codes = pc.index_in(user_ids, value_set=_as_array(user_order))
    if codes.null_count:
        unknown = user_ids.filter(pc.is_null(codes))
        raise DatasetError(
            f"{INTERACTIONS_FILE}: {len(unknown)} rows have user ids missing from `user_order` "
            f"(e.g. {_quote(unknown)})"
        )
    user_index = codes.to_numpy(zero_copy_only=False)
    timestamps = interactions.column(TIMESTAMP).to_numpy(zero_copy_only=False)
    order = order_by_user_then_time(user_index, timestamps)
    sorted_table = interactions.take(pa.array(order))
    split_codes = split_codes_for_sorted(user_index[order])
    split_names = pa.array(np.asarray(SPLITS, dtype=object)[split_codes], pa.string())
    if SPLIT in sorted_table.column_names:
        sorted_table = sorted_table.drop_columns([SPLIT])
    return sorted_table.append_column(SPLIT, split_names)


def split_counts(interactions: pa.Table) -> dict[str, int]:
    """Interactions per split, plus 'total'."""
    counts = {name: 0 for name in SPLITS}
    for row in pc.value_counts(interactions.column(SPLIT)).to_pylist():
        counts[row["values"]] = int(row["counts"])
    return {"total": int(interactions.num_rows), **counts}


def dataset_stats(users: pa.Table, items: pa.Table, interactions: pa.Table) -> dict[str, Any]:
    """The counts `write_dataset` records in `schema.stats`."""
    return {
        "users": int(users.num_rows),
        "items": int(items.num_rows),
        "interactions": split_counts(interactions),
    }


def write_dataset(
    out_dir: str | Path,
    users: pa.Table,
    items: pa.Table,
    interactions: pa.Table,
    schema: DatasetSchema,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Dataset:
    """Validate the tables, then write the dataset directory `out_dir` atomically.

    The files go to a temporary sibling directory that is renamed to `out_dir` only once
    every file is written and fsynced: an interrupted write leaves no `out_dir`.

    Args:
        out_dir: the directory to create.
        users: users table (`user_id` + user features).
        items: items table (`item_id` + item features), in dense item index order.
        interactions: interactions with splits assigned (see `assign_splits`).
        schema: the dataset schema; its `stats` gain the counts of users, items and
            interactions per split.
        overwrite: replace an existing `out_dir`.
        extra_files: more text files written with the others (name -> content), e.g. the
            editable schema of an import; plain names, none of the dataset's own files.

    Returns:
        The written dataset (tables in memory, `path` set).

    Raises:
        DatasetError: the tables break the format (nothing is written).
        FileExistsError: `out_dir` exists and `overwrite` is false.
    """
    out_dir = Path(out_dir)
    extra = dict(extra_files or {})
    for name in extra:
        if name in DATASET_FILES or Path(name).name != name or name.startswith("."):
            raise ValueError(f"`extra_files`: {name!r} is not a plain name of a file of its own")
    validate_dataset(Dataset(schema, users, items, interactions))
    schema = dataclasses.replace(
        schema, stats={**schema.stats, **dataset_stats(users, items, interactions)}
    )
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        pq.write_table(users, tmp / USERS_FILE)
        pq.write_table(items, tmp / ITEMS_FILE)
        pq.write_table(interactions, tmp / INTERACTIONS_FILE)
        (tmp / SCHEMA_FILE).write_text(schema.to_json(), encoding="utf-8")
        for name, text in extra.items():
            (tmp / name).write_text(text, encoding="utf-8")
    logger.info("wrote dataset %r to %s", schema.name, out_dir)
    return Dataset(schema, users, items, interactions, path=out_dir)


# --------------------------------------------------------------------------- validation


def validate_dataset(dataset: Dataset | str | Path) -> None:
    """Check a dataset against the format; raise on the first problem found.

    Checked: every table non-empty; required columns and their types; every feature
    column the schema names exists with a type its kind can encode; ids are non-null,
    non-empty strings; user and item ids unique; interactions reference known users and
    items; split values valid and the train split non-empty; each user's rows contiguous,
    in time order, and split by the protocol of `retrieval.data.split`. A cold-start
    dataset (schema stats ``cold``, see `retrieval.data.cold`) is checked for cold ids in
    train or valid instead of the per-user 80/10/10 protocol.

    Args:
        dataset: a `Dataset`, or the path of a dataset directory.

    Raises:
        FileNotFoundError: a dataset file is missing.
        DatasetError: a table breaks the format; the message names the file.
    """
    if not isinstance(dataset, Dataset):
        dataset = load_dataset(dataset, validate=False)
    where = _Where(dataset.path)
    users, items, events = dataset.users, dataset.items, dataset.interactions
    for file_name, table in ((USERS_FILE, users), (ITEMS_FILE, items), (INTERACTIONS_FILE, events)):
        if table.num_rows == 0:
            raise DatasetError(f"{where(file_name)}: table is empty")

    _check_column(where(USERS_FILE), users, USER_ID, _is_string, "string")
    _check_column(where(ITEMS_FILE), items, ITEM_ID, _is_string, "string")
    interactions_file = where(INTERACTIONS_FILE)
    _check_column(interactions_file, events, USER_ID, _is_string, "string")
    _check_column(interactions_file, events, ITEM_ID, _is_string, "string")
    _check_column(interactions_file, events, TIMESTAMP, pa.types.is_int64, "int64")
    _check_column(interactions_file, events, SPLIT, _is_string, "string")
    if RATING in events.column_names:
        _check_column(interactions_file, events, RATING, pa.types.is_floating, "float")

    for file_name, table, specs in (
        (USERS_FILE, users, dataset.schema.query_features),
        (ITEMS_FILE, items, dataset.schema.item_features),
    ):
        _check_features(where(file_name), table, specs)

    _check_ids(where(USERS_FILE), users.column(USER_ID), USER_ID, unique=True)
    _check_ids(where(ITEMS_FILE), items.column(ITEM_ID), ITEM_ID, unique=True)
    _check_ids(interactions_file, events.column(USER_ID), USER_ID, unique=False)
    _check_ids(interactions_file, events.column(ITEM_ID), ITEM_ID, unique=False)
    for column in (TIMESTAMP, SPLIT):
        nulls = events.column(column).null_count
        if nulls:
            raise DatasetError(f"{interactions_file}: {nulls} null values in column {column!r}")
    _check_references(interactions_file, events.column(USER_ID), users.column(USER_ID), "user")
    _check_references(interactions_file, events.column(ITEM_ID), items.column(ITEM_ID), "item")
    cold = dataset.schema.stats.get(COLD_STATS_KEY)
    _check_splits(interactions_file, events, protocol_rows=cold is None)
    if cold is not None:
        _check_cold(interactions_file, events, cold)


class _Where:
    """Names a dataset file: its full path when the dataset is on disk."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def __call__(self, file_name: str) -> str:
        return str(self.directory / file_name) if self.directory is not None else file_name


def _as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _quote(values: pa.Array | pa.ChunkedArray) -> str:
    return ", ".join(repr(v) for v in values[:_EXAMPLES].to_pylist())


def _is_string(data_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(data_type):
        return _is_string(data_type.value_type)
    return bool(pa.types.is_string(data_type) or pa.types.is_large_string(data_type))


def _is_scalar_value(data_type: pa.DataType) -> bool:
    return _is_string(data_type) or bool(pa.types.is_integer(data_type))


def _is_value_list(data_type: pa.DataType) -> bool:
    is_list = pa.types.is_list(data_type) or pa.types.is_large_list(data_type)
    return bool(is_list) and _is_scalar_value(data_type.value_type)


def _is_number(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_integer(data_type) or pa.types.is_floating(data_type))


TypeCheck = Callable[[pa.DataType], bool]

_KIND_TYPES: dict[FeatureKind, tuple[TypeCheck, str]] = {
    FeatureKind.CATEGORICAL: (_is_scalar_value, "string or integer"),
    FeatureKind.HASHED: (_is_scalar_value, "string or integer"),
    FeatureKind.BAG: (_is_value_list, "list<string> or list<integer>"),
    FeatureKind.HASHED_BAG: (_is_value_list, "list<string> or list<integer>"),
    FeatureKind.DENSE: (_is_number, "integer or float"),
}


def _check_column(
    file: str, table: pa.Table, column: str, accepts: TypeCheck, expected: str
) -> None:
    if column not in table.column_names:
        raise DatasetError(
            f"{file}: missing column {column!r} (columns: {', '.join(table.column_names)})"
        )
    data_type = table.schema.field(column).type
    if not accepts(data_type):
        raise DatasetError(f"{file}: column {column!r} must be {expected}; got {data_type}")


def _check_features(file: str, table: pa.Table, specs: tuple[FeatureSpec, ...]) -> None:
    absent = [
        spec.source_column
        for spec in specs
        if spec.kind != FeatureKind.HISTORY and spec.source_column not in table.column_names
    ]
    if absent:
        raise DatasetError(
            f"{file}: schema.json names feature column(s) {absent} that the file does not "
            f"have (columns: {', '.join(table.column_names)})"
        )
    for spec in specs:
        if spec.kind == FeatureKind.HISTORY:
            continue  # read from the interactions
        accepts, expected = _KIND_TYPES[spec.kind]
        data_type = table.schema.field(spec.source_column).type
        if not accepts(data_type):
            raise DatasetError(
                f"{file}: column {spec.source_column!r} of {spec.kind} feature {spec.name!r} "
                f"must be {expected}; got {data_type}"
            )


def _check_ids(file: str, ids: pa.ChunkedArray, column: str, *, unique: bool) -> None:
    if ids.null_count:
        raise DatasetError(f"{file}: {ids.null_count} null values in column {column!r}")
    empty = pc.sum(pc.equal(pc.utf8_length(ids), 0)).as_py() or 0
    if empty:
        raise DatasetError(f"{file}: {empty} empty strings in id column {column!r}")
    if unique:
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        if len(repeated):
            raise DatasetError(
                f"{file}: {len(repeated)} duplicate values in column {column!r} "
                f"(e.g. {_quote(repeated)})"
            )


def _check_references(file: str, ids: pa.ChunkedArray, known: pa.ChunkedArray, entity: str) -> None:
    found = pc.is_in(ids, value_set=_as_array(known))
    unknown = ids.filter(pc.invert(found))
    if len(unknown):
        source = USERS_FILE if entity == "user" else ITEMS_FILE
        raise DatasetError(
            f"{file}: {len(unknown)} rows reference {entity} ids missing from {source} "
            f"(e.g. {_quote(pc.unique(unknown))})"
        )


def _check_cold(file: str, events: pa.Table, cold: Any) -> None:
    """A cold-start dataset (`retrieval.data.cold`): no cold id in the train or valid split."""
    if not isinstance(cold, dict) or cold.get("mode") not in ("items", "users"):
        raise DatasetError(
            f"{file}: schema stats `{COLD_STATS_KEY}` must be a mapping with mode 'items' or "
            f"'users'; got {cold!r}"
        )
    column = ITEM_ID if cold["mode"] == "items" else USER_ID
    ids = pa.array([str(v) for v in cold.get("ids", [])], pa.string())
    context = events.filter(pc.is_in(events.column(SPLIT), value_set=pa.array(SPLITS[:2])))
    leaked = context.filter(pc.is_in(context.column(column), value_set=ids))
    if leaked.num_rows:
        raise DatasetError(
            f"{file}: {leaked.num_rows} train/valid rows hold cold {cold['mode']} "
            f"(e.g. {_quote(leaked.column(column))}); a cold id may only appear in test"
        )


def _check_splits(file: str, events: pa.Table, *, protocol_rows: bool = True) -> None:
    split_codes = pc.index_in(events.column(SPLIT), value_set=pa.array(SPLITS))
    if split_codes.null_count:
        bad = pc.unique(events.column(SPLIT).filter(pc.is_null(split_codes)))
        raise DatasetError(
            f"{file}: column {SPLIT!r} holds values other than {list(SPLITS)} (e.g. {_quote(bad)})"
        )
    codes = np.asarray(split_codes.to_numpy(zero_copy_only=False), dtype=np.int8)
    if not np.any(codes == 0):
        raise DatasetError(f"{file}: the train split is empty")

    user_index = np.asarray(
        pc.dictionary_encode(_as_array(events.column(USER_ID))).indices.to_numpy()
    )
    timestamps = events.column(TIMESTAMP).to_numpy()
    same_user = user_index[1:] == user_index[:-1]
    starts = np.flatnonzero(np.r_[True, ~same_user])
    if len(np.unique(user_index[starts])) != len(starts):
        raise DatasetError(
            f"{file}: rows of each user must be contiguous (sorted by user, then timestamp)"
        )
    backwards = np.flatnonzero(same_user & (timestamps[1:] < timestamps[:-1]))
    if len(backwards):
        row = int(backwards[0]) + 1
        raise DatasetError(
            f"{file}: rows of a user must be in timestamp order; row {row} "
            f"(user {events.column(USER_ID)[row].as_py()!r}) goes back in time"
        )
    if not protocol_rows:  # a cold-start dataset moved rows out of the 80/10/10 protocol
        return
    expected = split_codes_for_sorted(user_index)
    wrong = np.flatnonzero(expected != codes)
    if len(wrong):
        row = int(wrong[0])
        raise DatasetError(
            f"{file}: {len(wrong)} rows break the split protocol (retrieval.data.split); "
            f"row {row} (user {events.column(USER_ID)[row].as_py()!r}) is "
            f"{SPLITS[codes[row]]!r}, expected {SPLITS[expected[row]]!r}"
        )


# --------------------------------------------------------------------------- summary


def summarize(dataset: Dataset) -> dict[str, Any]:
    """Counts and features of a dataset, as a JSON-friendly dict.

    Returns:
        ``{"name", "path", "users", "items", "interactions": {"total", "train", "valid",
        "test"}, "query_features": {name: kind}, "item_features": {name: kind}}``
    """
    schema = dataset.schema
    return {
        "name": schema.name,
        "path": str(dataset.path) if dataset.path is not None else None,
        **dataset_stats(dataset.users, dataset.items, dataset.interactions),
        "query_features": {spec.name: str(spec.kind) for spec in schema.query_features},
        "item_features": {spec.name: str(spec.kind) for spec in schema.item_features},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A `summarize` dict as aligned text for the CLI.

    >>> print(format_summary({
    ...     "name": "tiny", "path": None, "users": 2, "items": 1500,
    ...     "interactions": {"total": 4, "train": 3, "valid": 0, "test": 1},
    ...     "query_features": {"user_id": "categorical"},
    ...     "item_features": {"item_id": "categorical", "genres": "bag"},
    ... }))
    dataset         tiny
    users           2
    items           1,500
    interactions    4 (train 3, valid 0, test 1)
    query features  user_id (categorical)
    item features   item_id (categorical), genres (bag)
    """
    counts = summary["interactions"]
    per_split = ", ".join(f"{name} {counts[name]:,}" for name in SPLITS)
    rows = [("dataset", summary["name"])]
    if summary.get("path"):
        rows.append(("path", summary["path"]))
    rows += [
        ("users", f"{summary['users']:,}"),
        ("items", f"{summary['items']:,}"),
        ("interactions", f"{counts['total']:,} ({per_split})"),
        ("query features", _features_line(summary["query_features"])),
        ("item features", _features_line(summary["item_features"])),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def _features_line(features: dict[str, str]) -> str:
    return ", ".join(f"{name} ({kind})" for name, kind in features.items())
