"""Query features as the service takes them: checked per request, encoded per batch.

An inline query is a JSON object of raw values, keyed like the columns of
`users.parquet` (the query tower's non-history features), plus the history feature
(``"history"`` in the shipped schemas) as a list of catalog item ids, **most recent
first** (the order `retrieval.encoders` uses). Per feature kind:

=================  ==========================================  ==========================
kind               accepted JSON                               becomes
=================  ==========================================  ==========================
categorical        string, integer (decimal text), bool, null  vocabulary code; unknown
hashed             string, integer, bool, null                 -> OOV (as the encoder)
bag, hashed_bag    list of strings/integers, or null           codes of the first tokens
dense              number within `dense_bounds`, or null       standardised (train stats)
history            list of item ids (strings/integers)         first N ids, unknown -> OOV
=================  ==========================================  ==========================

A feature left out counts as null (categorical -> OOV, bag -> empty, dense -> missing).
An unknown feature *name*, a value of the wrong type, NaN or infinity is refused with
`InvalidRequestError` naming the field, and so is a dense value outside `dense_bounds`:
beyond float32's range (|x| > 3.4028235e38), or, with the train statistics known
(`QuerySchema.from_encoder`), more than `MAX_STANDARDISED` standard deviations from the
train mean (the OpenAPI document publishes the same interval per feature). The
feature store's records go through the same checks. Encoding is the library's: a checked
query is a `retrieval.row_encoding.QueryRow`, and the model bundle's own `FeatureEncoder`
encodes batches of them (`retrieval.row_encoding.QueryRowEncoder`), so a query built from a `user_id`
is encoded exactly as `retrieval.evaluation` encodes it offline.

Example:
    >>> from retrieval.features import DatasetSchema, FeatureKind, FeatureSpec
    >>> schema = DatasetSchema(
    ...     name="s",
    ...     query_features=(
    ...         FeatureSpec("age", FeatureKind.DENSE),
    ...         FeatureSpec("history", FeatureKind.HISTORY, embedding_dim=16, max_length=2,
    ...                     shared_with="item_id"),
    ...     ),
    ...     item_features=(FeatureSpec("item_id", FeatureKind.CATEGORICAL),),
    ... )
    >>> spec = QuerySchema.from_schema(schema)
    >>> q = normalize_query({"age": 31, "history": ["a", 7, "c"]}, spec)
    >>> q.values, q.history
    ({'age': 31.0}, ('a', '7'))
    >>> normalize_query({"agee": 3}, spec)
    Traceback (most recent call last):
    ...
    service.errors.InvalidRequestError: unknown query feature 'agee'; known features: ['age', 'history']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.encoders import DenseStats, FeatureEncoder
from retrieval.features import FeatureKind, FeatureSpec
from retrieval.row_encoding import QueryRow
from service.errors import InvalidRequestError

SCALAR_KINDS = frozenset({FeatureKind.CATEGORICAL, FeatureKind.HASHED})
LIST_KINDS = frozenset({FeatureKind.BAG, FeatureKind.HASHED_BAG})
MAX_TOKEN_CHARS = 1024  # longest string value accepted in a feature
MAX_BAG_TOKENS = 1024  # longest list accepted in a bag feature
FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38: the tower computes in float32
# Most train standard deviations a dense value may lie from the train mean. Farther is no
# measurement but garbage, and the tower's cross layers multiply the input by itself
# (x0 * (W x + b)): a value near float32's limit overflows them, one that passes this
# bound does not (1e6 cubed through three cross layers is 1e18).
MAX_STANDARDISED = 1e6


def dense_bounds(stats: DenseStats | None) -> tuple[float, float]:
    """The closed interval a dense query value must lie in (the OpenAPI document says so
    too): within float32, and at most `MAX_STANDARDISED` train standard deviations from
    the train mean when the statistics are known.

    >>> dense_bounds(DenseStats(mean=30.0, std=10.0))
    (-9999970.0, 10000030.0)
    >>> dense_bounds(None) == (-FLOAT32_MAX, FLOAT32_MAX)
    True
    """
    if stats is None:
        return -FLOAT32_MAX, FLOAT32_MAX
    spread = MAX_STANDARDISED * stats.std
    return max(-FLOAT32_MAX, stats.mean - spread), min(FLOAT32_MAX, stats.mean + spread)


@dataclass(frozen=True)
class QuerySchema:
    """What a query may hold, derived from the bundle's dataset schema.

    Args:
        columns: users.parquet column -> the (non-history) feature reading it.
        history_name: name of the history feature (the JSON key), or None.
        history_length: N, items of history the tower reads (0 without history).
        dense_stats: column -> train statistics of a dense feature; they bound what the
            feature accepts (`dense_bounds`; empty: only float32's range is checked).
    """

    columns: Mapping[str, FeatureSpec]
    history_name: str | None
    history_length: int
    dense_stats: Mapping[str, DenseStats] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_schema(
        cls, schema: Any, dense_stats: Mapping[str, DenseStats] | None = None
    ) -> QuerySchema:
        """The query schema of a `DatasetSchema`; `dense_stats` is keyed by feature name."""
        columns: dict[str, FeatureSpec] = {}
        history_name, history_length = None, 0
        for spec in schema.query_features:
            if spec.kind == FeatureKind.HISTORY:
                history_name, history_length = spec.name, spec.max_length
            else:
                columns[spec.source_column] = spec
        stats = {
            column: dense_stats[spec.name]
            for column, spec in columns.items()
            if dense_stats is not None and spec.name in dense_stats
        }
        return cls(
            columns=columns,
            history_name=history_name,
            history_length=history_length,
            dense_stats=stats,
        )

    @classmethod
    def from_encoder(cls, encoder: FeatureEncoder) -> QuerySchema:
        """The query schema of a fitted encoder, with its dense features' train statistics
        (so a value too far from the train data is refused up front: `dense_bounds`)."""
        dense = {
            spec.name: encoder.dense_stats("query", spec.name)
            for spec in encoder.schema.query_features
            if spec.kind == FeatureKind.DENSE
        }
        return cls.from_schema(encoder.schema, dense)

    @property
    def known(self) -> list[str]:
        names = list(self.columns)
        if self.history_name is not None:
            names.append(self.history_name)
        return sorted(names)

    def describe(self) -> dict[str, Any]:
        """The query schema as JSON (for /v1/info)."""
        features: dict[str, Any] = {
            column: {"kind": str(spec.kind), "feature": spec.name}
            for column, spec in self.columns.items()
        }
        if self.history_name is not None:
            features[self.history_name] = {
                "kind": str(FeatureKind.HISTORY),
                "max_length": self.history_length,
                "order": "most recent first",
            }
        return features


class QueryFeatures(QueryRow):
    """One query's checked raw values: column -> value, and history ids (most recent first).

    A `QueryRow`, so the encoder's row encoder (`retrieval.row_encoding.QueryRowEncoder`) encodes it.
    """

    def canonical(self) -> dict[str, Any]:
        """A JSON-ready form with a fixed key order (cache keys)."""
        return {"values": dict(sorted(self.values.items())), "history": list(self.history)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integral_float_to_int(value: Any) -> Any:
    """JSON has one number type: ``7.0`` is the integer 7 (JSON Schema says so too).

    >>> integral_float_to_int(7.0), integral_float_to_int(7.5), integral_float_to_int("7")
    (7, 7.5, '7')
    """
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _scalar_text(value: Any, field: str) -> str | None:
    """A categorical/hashed value as the encoder reads it (ints as decimal text)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"  # what Arrow's bool -> string cast gives
    value = integral_float_to_int(value)
    if _is_int(value):
        return str(value)
    if isinstance(value, str):
        if len(value) > MAX_TOKEN_CHARS:
            raise InvalidRequestError(
                f"`{field}` must be at most {MAX_TOKEN_CHARS} characters; got {len(value)}",
                field=field,
            )
        return value
    raise InvalidRequestError(
        f"`{field}` must be a string or an integer; got {type(value).__name__} {_short(value)}",
        field=field,
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_dense(value: Any, field: str, stats: DenseStats | None) -> float | None:
    """A dense value as a float the float32 tower can hold, or None (missing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        raise InvalidRequestError(
            f"`{field}` (dense) must be a number or null; got {type(value).__name__} "
            f"{_short(value)}",
            field=field,
        )
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float64 range
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRequestError(
            f"`{field}` (dense) must be a finite number (send null for a missing value); "
            f"got {_short(value)}",
            field=field,
        )
    low, high = dense_bounds(stats)
    if not low <= number <= high:
        where = (
            f"{MAX_STANDARDISED:.0e} train standard deviations of the train mean (mean "
            f"{stats.mean:.6g}, std {stats.std:.6g})"
            if stats is not None
            else "float32 range"
        )
        raise InvalidRequestError(
            f"`{field}` (dense) must be in [{low:.8g}, {high:.8g}] (within {where}); "
            f"got {_short(value)}",
            field=field,
        )
    return number


def _check_value(spec: FeatureSpec, value: Any, field: str, stats: DenseStats | None = None) -> Any:
    kind = spec.kind
    if kind in SCALAR_KINDS:
        return _scalar_text(value, field)
    if kind in LIST_KINDS:
        if value is None:
            return None
        if not isinstance(value, list):
            raise InvalidRequestError(
                f"`{field}` ({kind}) must be a list of strings; got {type(value).__name__} "
                f"{_short(value)}",
                field=field,
            )
        if len(value) > MAX_BAG_TOKENS:
            raise InvalidRequestError(
                f"`{field}` must hold at most {MAX_BAG_TOKENS} tokens; got {len(value)}",
                field=field,
            )
        return [
            token
            if type(token) is str and len(token) <= MAX_TOKEN_CHARS
            else _scalar_text(token, f"{field}[{i}]")
            for i, token in enumerate(value)
        ]
    if kind == FeatureKind.DENSE:
        return _check_dense(value, field, stats)
    raise InvalidRequestError(f"`{field}`: feature kind {kind} cannot be sent", field=field)


def normalize_history(
    history: Any, schema: QuerySchema, field: str, max_items: int | None = None
) -> tuple[str, ...]:
    """Checked history ids, most recent first, cut to the tower's N."""
    if history is None:
        return ()
    if not isinstance(history, list | tuple):
        raise InvalidRequestError(
            f"`{field}` must be a list of item ids (most recent first); got "
            f"{type(history).__name__} {_short(history)}",
            field=field,
        )
    if max_items is not None and len(history) > max_items:
        raise InvalidRequestError(
            f"`{field}` must hold at most {max_items} item ids; got {len(history)}", field=field
        )
    ids = []
    for i, item in enumerate(history):  # every id is checked; the tower reads the first N
        if type(item) is str and len(item) <= MAX_TOKEN_CHARS:  # the common case, fast
            ids.append(item)
            continue
        text = _scalar_text(item, f"{field}[{i}]")
        if text is None:
            raise InvalidRequestError(f"`{field}[{i}]` must be an item id; got null", field=field)
        ids.append(text)
    return tuple(ids[: schema.history_length])


def normalize_query(
    raw: Mapping[str, Any],
    schema: QuerySchema,
    *,
    field: str = "query",
    max_history: int | None = None,
) -> QueryFeatures:
    """Check an inline query (or a feature store record) against the query schema.

    Raises:
        InvalidRequestError: unknown feature name, wrong type, non-finite dense value or
            one outside `dense_bounds`, over-long value; the message
            names the field (``query.<name>``).
    """
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(
            f"`{field}` must be an object of feature values; got {type(raw).__name__}", field=field
        )
    values: dict[str, Any] = {}
    history: tuple[str, ...] = ()
    for name, value in raw.items():
        if name == schema.history_name:
            history = normalize_history(value, schema, f"{field}.{name}", max_history)
            continue
        spec = schema.columns.get(name)
        if spec is None:
            raise InvalidRequestError(
                f"unknown query feature {name!r}; known features: {schema.known}",
                field=f"{field}.{name}",
            )
        checked = _check_value(spec, value, f"{field}.{name}", schema.dense_stats.get(name))
        if checked is not None:
            values[name] = checked
    return QueryFeatures(values=values, history=history)
