"""Declarative feature specs for the query and item towers, and the dataset schema.

A dataset directory (the hand-off format every job reads) holds::

    users.parquet         query-side entity features, one row per user
    items.parquet         the catalog, one row per item, its features
    interactions.parquet  user_id, item_id, timestamp, split ('train' | 'valid' | 'test')
    schema.json           a `DatasetSchema`: which columns are features and how to encode them

Ids are strings in every public interface; encoders map them to dense int indices.

Example:
    >>> spec = FeatureSpec(name="genres", kind=FeatureKind.BAG, embedding_dim=8, max_length=6)
    >>> FeatureSpec.from_dict(spec.to_dict()) == spec
    True
    >>> FeatureSpec(name="zip", kind=FeatureKind.HASHED, embedding_dim=8)
    Traceback (most recent call last):
    ...
    ValueError: feature 'zip': `num_buckets` must be >= 1 for kind 'hashed'; got 0
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA_FORMAT_VERSION = 1

USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
SCHEMA_FILE = "schema.json"

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
SPLIT = "split"
SPLITS = ("train", "valid", "test")

# Reserved indices of every vocabulary-backed feature: 0 pads bags, 1 takes unknown values.
PAD_INDEX = 0
OOV_INDEX = 1
NUM_RESERVED = 2


class FeatureKind(StrEnum):
    """How a raw column becomes model input."""

    CATEGORICAL = "categorical"  # one string/int value; vocabulary fitted on train; OOV bucket
    HASHED = "hashed"  # one value hashed into `num_buckets` (stable across processes)
    BAG = "bag"  # list of values, vocabulary fitted on train, mean-pooled embedding
    HASHED_BAG = "hashed_bag"  # list of values hashed into `num_buckets`, mean-pooled
    DENSE = "dense"  # float, standardised with train statistics; missing -> 0 (+ indicator)
    HISTORY = "history"  # the user's last `max_length` items before the event (query side)


VOCAB_KINDS = frozenset({FeatureKind.CATEGORICAL, FeatureKind.BAG})
HASH_KINDS = frozenset({FeatureKind.HASHED, FeatureKind.HASHED_BAG})
SEQUENCE_KINDS = frozenset({FeatureKind.BAG, FeatureKind.HASHED_BAG, FeatureKind.HISTORY})


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of one tower.

    Args:
        name: feature name; also the key of its tensor in an encoded batch.
        kind: how the raw column is encoded (see `FeatureKind`).
        column: source column in the parquet file; defaults to `name`. Unused for history.
        embedding_dim: width of this feature's embedding (ignored for dense features).
        min_count: vocabulary kinds: values seen fewer times in train go to the OOV bucket.
        num_buckets: hashed kinds: number of hash buckets (the OOV/pad rows come on top).
        max_length: bag kinds: tokens kept per row; history: the N most recent items.
        missing_indicator: dense: append a 0/1 "value was missing" column.
        shared_with: history: name of the item-tower feature whose embedding table it
            shares (normally the item id feature).
    """

    name: str
    kind: FeatureKind
    column: str | None = None
    embedding_dim: int = 16
    min_count: int = 1
    num_buckets: int = 0
    max_length: int = 0
    missing_indicator: bool = False
    shared_with: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FeatureKind(self.kind))
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"feature `name` must be non-empty [A-Za-z0-9_]; got {self.name!r}")
        where = f"feature {self.name!r}"
        if self.kind != FeatureKind.DENSE and self.embedding_dim < 1:
            raise ValueError(f"{where}: `embedding_dim` must be >= 1; got {self.embedding_dim}")
        if self.min_count < 1:
            raise ValueError(f"{where}: `min_count` must be >= 1; got {self.min_count}")
        if self.kind in HASH_KINDS and self.num_buckets < 1:
            raise ValueError(
                f"{where}: `num_buckets` must be >= 1 for kind '{self.kind}'; got {self.num_buckets}"
            )
        if self.kind in SEQUENCE_KINDS and self.max_length < 1:
            raise ValueError(
                f"{where}: `max_length` must be >= 1 for kind '{self.kind}'; got {self.max_length}"
            )
        if self.kind == FeatureKind.HISTORY and not self.shared_with:
            raise ValueError(f"{where}: history features need `shared_with` (the item id feature)")
        if self.kind != FeatureKind.HISTORY and self.shared_with:
            raise ValueError(f"{where}: `shared_with` is only for history features")

    @property
    def source_column(self) -> str:
        """Column read from parquet (history features read the interactions instead)."""
        return self.column or self.name

    @property
    def dense_width(self) -> int:
        """Width of a dense feature's tensor: 1, or 2 with the missing indicator."""
        return 2 if self.missing_indicator else 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = str(self.kind)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown feature spec keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class DatasetSchema:
    """What a dataset directory holds and how each tower's features are encoded.

    Args:
        name: dataset name, e.g. 'ml-100k' or 'synth-1000000'.
        query_features: features of the query tower (read from users.parquet, plus history).
        item_features: features of the item tower (read from items.parquet).
        item_id_feature: name of the item feature holding the item id (shared by history).
        stats: free-form counts written by the producer (users, items, interactions...).
    """

    name: str
    query_features: tuple[FeatureSpec, ...]
    item_features: tuple[FeatureSpec, ...]
    item_id_feature: str = ITEM_ID
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = SCHEMA_FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "query_features", tuple(self.query_features))
        object.__setattr__(self, "item_features", tuple(self.item_features))
        for side, specs in (("query", self.query_features), ("item", self.item_features)):
            if not specs:
                raise ValueError(f"schema {self.name!r}: no {side} features")
            names = [s.name for s in specs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"schema {self.name!r}: duplicate {side} features {dupes}")
            if side == "item" and any(s.kind == FeatureKind.HISTORY for s in specs):
                raise ValueError(f"schema {self.name!r}: history features belong to the query side")
        item_names = {s.name for s in self.item_features}
        if self.item_id_feature not in item_names:
            raise ValueError(
                f"schema {self.name!r}: `item_id_feature` {self.item_id_feature!r} "
                f"is not an item feature ({sorted(item_names)})"
            )
        items_by_name = {s.name: s for s in self.item_features}
        for spec in self.query_features:
            if spec.kind != FeatureKind.HISTORY:
                continue
            shared = items_by_name.get(spec.shared_with or "")
            if shared is None:
                raise ValueError(
                    f"schema {self.name!r}: history feature {spec.name!r} shares "
                    f"{spec.shared_with!r}, which is not an item feature"
                )
            if shared.kind != FeatureKind.CATEGORICAL:
                raise ValueError(
                    f"schema {self.name!r}: history feature {spec.name!r} must share a "
                    f"categorical item feature; {shared.name!r} is {shared.kind}"
                )
            if spec.embedding_dim != shared.embedding_dim:
                raise ValueError(
                    f"schema {self.name!r}: history feature {spec.name!r} has embedding_dim "
                    f"{spec.embedding_dim} but shares {shared.name!r} of embedding_dim "
                    f"{shared.embedding_dim}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "item_id_feature": self.item_id_feature,
            "query_features": [s.to_dict() for s in self.query_features],
            "item_features": [s.to_dict() for s in self.item_features],
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSchema:
        version = data.get("format_version")
        if version != SCHEMA_FORMAT_VERSION:
            raise ValueError(
                f"schema `format_version` must be {SCHEMA_FORMAT_VERSION}; got {version!r}"
            )
        return cls(
            name=data["name"],
            item_id_feature=data.get("item_id_feature", ITEM_ID),
            query_features=tuple(FeatureSpec.from_dict(d) for d in data["query_features"]),
            item_features=tuple(FeatureSpec.from_dict(d) for d in data["item_features"]),
            stats=dict(data.get("stats", {})),
            format_version=version,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> DatasetSchema:
        """Read `schema.json` (a file or the dataset directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / SCHEMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"schema file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid schema: {exc}") from exc


@dataclass(frozen=True)
class FeatureInput:
    """What a tower needs to build the embedding of one feature, once encoders are fitted.

    This is the model-side view of a `FeatureSpec`: the same name and kind, plus the
    fitted table size. It is stored in the model config, so the towers can be rebuilt
    from the config alone.

    Args:
        name: feature name; key of its tensor in an encoded batch.
        kind: feature kind (decides the tensor layout, see below).
        cardinality: rows of the embedding table (reserved rows included); 0 for dense.
        embedding_dim: embedding width (for dense: the tensor width).
        shared_with: history: the item-tower feature whose table is shared.

    Tensor layout in an encoded batch, B = batch size:
        categorical, hashed: int64 `[B]` in [0, cardinality)
        bag, hashed_bag, history: int64 `[B, max_length]`, PAD_INDEX (0) pads
        dense: float32 `[B, width]`
    """

    name: str
    kind: FeatureKind
    cardinality: int
    embedding_dim: int
    shared_with: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FeatureKind(self.kind))
        if self.kind != FeatureKind.DENSE and self.cardinality < NUM_RESERVED:
            raise ValueError(
                f"feature {self.name!r}: `cardinality` must be >= {NUM_RESERVED}; "
                f"got {self.cardinality}"
            )
        if self.embedding_dim < 1:
            raise ValueError(
                f"feature {self.name!r}: `embedding_dim` must be >= 1; got {self.embedding_dim}"
            )

    @property
    def output_dim(self) -> int:
        """Width this feature contributes to the tower input x_0."""
        return self.embedding_dim

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = str(self.kind)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureInput:
        return cls(**data)
