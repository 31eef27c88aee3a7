"""Query rows -> query-tower batches: the fast path the service encodes every batch with.

A query row holds checked raw values keyed like the columns of `users.parquet` (the
query tower's non-history features) and the history as item ids, **most recent first**
(`QueryRow`). `QueryRowEncoder` (built on the bundle's `FeatureEncoder`) encodes a batch of
rows to exactly the tensors of the encoder's table path, `FeatureEncoder.encode_queries`
(`encode_query_rows` runs that path on rows; the tests compare the two row for row). Both
go through the same per-kind dispatch (`retrieval.encoders.encode_feature`) and the same
padding step (`retrieval.encoders.pad_codes`); the row path only puts a bounded code
cache (`_CodeCache`) in front of each feature's lookup, which on a serving batch of a few
rows saves the dozen Arrow calls per feature of the table path.

Example:
    >>> from retrieval.encoders import FeatureEncoder, Vocabulary
    >>> from retrieval.features import DatasetSchema, FeatureKind, FeatureSpec
    >>> schema = DatasetSchema(
    ...     name="s",
    ...     query_features=(
    ...         FeatureSpec("country", FeatureKind.CATEGORICAL),
    ...         FeatureSpec("history", FeatureKind.HISTORY, max_length=2, shared_with="item_id"),
    ...     ),
    ...     item_features=(FeatureSpec("item_id", FeatureKind.CATEGORICAL),),
    ... )
    >>> encoder = FeatureEncoder(
    ...     schema,
    ...     vocabularies={
    ...         "query": {"country": Vocabulary(["fr", "de"], [3, 1])},
    ...         "item": {"item_id": Vocabulary(["i1", "i2"], [2, 1])},
    ...     },
    ...     dense_stats={},
    ...     user_ids=["u1"],
    ...     item_ids=["i1", "i2"],
    ... )
    >>> rows = [QueryRow({"country": "de"}, ("i2", "x", "i1")), QueryRow({})]
    >>> batch = QueryRowEncoder(encoder).encode(rows)
    >>> batch["country"].tolist(), batch["history"].tolist()
    ([3, 1], [[3, 1], [0, 0]])
    >>> all(torch.equal(batch[k], v) for k, v in encode_query_rows(encoder, rows).items())
    True
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from retrieval.encoders import (
    CodeSpace,
    DenseStats,
    FeatureEncoder,
    IntArray,
    encode_feature,
    pad_codes,
)
from retrieval.features import SEQUENCE_KINDS, FeatureKind, FeatureSpec


@dataclass(frozen=True)
class QueryRow:
    """One query's checked raw values (the service's `QueryFeatures` is one).

    Args:
        values: users.parquet column -> value: a string (categorical, hashed), a list of
            strings (bag kinds), a float (dense); None, or a column left out, is a missing
            value (OOV, an empty list, a missing dense value).
        history: item ids, most recent first.
    """

    values: Mapping[str, Any]
    history: tuple[str, ...] = ()


def _row_values(spec: FeatureSpec, rows: Sequence[QueryRow]) -> list[Any]:
    """The values of `spec` in each row (the history feature reads `row.history`)."""
    if spec.kind == FeatureKind.HISTORY:
        return [row.history for row in rows]
    column = spec.source_column
    return [row.values.get(column) for row in rows]


def _arrow_type(spec: FeatureSpec) -> pa.DataType:
    """The Arrow type a column of `spec`'s row values is read as."""
    if spec.kind == FeatureKind.DENSE:
        return pa.float64()
    if spec.kind in SEQUENCE_KINDS:
        return pa.list_(pa.large_string())
    return pa.large_string()


def query_rows_table(encoder: FeatureEncoder, rows: Sequence[QueryRow]) -> pa.Table:
    """Query rows as the table `FeatureEncoder.encode_queries` reads: one column per
    non-history query feature (named by its source column) and the history feature's
    list column (named by the feature)."""
    columns: dict[str, pa.Array] = {}
    for spec in encoder.schema.query_features:
        name = spec.name if spec.kind == FeatureKind.HISTORY else spec.source_column
        values = _row_values(spec, rows)
        if spec.kind in SEQUENCE_KINDS:
            values = [None if v is None else list(v) for v in values]
        columns[name] = pa.array(values, type=_arrow_type(spec))
    return pa.table(columns)


def encode_query_rows(encoder: FeatureEncoder, rows: Sequence[QueryRow]) -> dict[str, torch.Tensor]:
    """The reference encoding of query rows: the encoder's table path
    (`FeatureEncoder.encode_queries`, the code the offline evaluation runs on users.parquet).

    `QueryRowEncoder.encode` equals it and is faster on small batches; this one builds
    an Arrow table first, a dozen Arrow calls per feature.
    """
    if not rows:
        raise ValueError("`rows` must hold at least one query row")
    return encoder.encode_queries(query_rows_table(encoder, rows))


class _CodeCache:
    """Value -> code of one vocabulary or hash space, filled from the encoder's own lookups.

    Codes always come from the encoder (`Vocabulary.lookup` or `stable_hash_bucket`, one
    call per batch for the values not cached), so they are exactly the encoder's; the
    cache only saves the per-call overhead of those lookups on small serving batches.
    It has two parts, both bounded:

    * the prefilled vocabulary: `prefill` looks null and the vocabulary's first values (up
      to `capacity` in all) up in one call when the service starts and keeps them, so the
      first query naming a value does not pay for an Arrow lookup (~0.7 ms per batch on
      the 2-core machine, most of a cold batch's encoding). When the whole vocabulary
      fits, a value missing from it is not in the vocabulary: it gets the code the
      encoder gives null, OOV (`Vocabulary.lookup` maps unknown and null values alike),
      without a lookup and without an entry.
    * the values looked up while serving (hash-space values, and vocabulary values
      outside the prefilled part): at most `recent_capacity`, the least recently used
      dropped first. A value the vocabulary does not know (its code is the space's
      `unknown_code`) is never kept: clients may send any number of distinct unknown
      values.

    Batches run on several worker threads at once, so the second part's reads and
    updates hold a lock (the encoder's lookups do not).

    Args:
        space: where the codes come from (`FeatureEncoder.code_space`).
        capacity: most values `prefill` keeps, null included.
        recent_capacity: most values kept from the lookups made while serving (0: none).
    """

    def __init__(self, space: CodeSpace, capacity: int, recent_capacity: int) -> None:
        self._lookup = space.lookup
        self._prefilled: dict[str | None, int] = {}  # kept for good (null among them)
        self._recent: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._unknown: int | None = None  # set when every vocabulary value is prefilled
        self._lock = threading.Lock()
        self.capacity = capacity
        self.recent_capacity = recent_capacity
        self.unknown_code = space.unknown_code

    def __len__(self) -> int:
        return len(self._prefilled) + len(self._recent)

    def prefill(self, values: pa.Array) -> None:
        """Keep the codes of null (a missing value) and of `values` (the first ones, up to
        the room left)."""
        room = self.capacity - len(self._prefilled)
        if room <= 0:
            return
        head = pa.concat_arrays([pa.nulls(1, type=values.type), values.slice(0, room - 1)])
        codes = self._lookup(head)
        with self._lock:
            self._prefilled.update(zip(head.to_pylist(), codes.tolist(), strict=True))
        if len(head) == len(values) + 1:
            self._unknown = int(codes[0])

    def codes(self, values: Sequence[str | None]) -> IntArray:
        """int64 `[n]` code of each value (None: the code of a missing value)."""
        prefilled = self._prefilled
        if self._unknown is not None:
            unknown = self._unknown
            return np.fromiter(
                (prefilled.get(v, unknown) for v in values), dtype=np.int64, count=len(values)
            )
        found: dict[str | None, int] = {}
        missing: list[str | None] = []
        recent = self._recent
        with self._lock:
            for value in dict.fromkeys(values):
                code = prefilled.get(value)
                if code is None and value is not None:
                    code = recent.get(value)
                    if code is not None:
                        recent.move_to_end(value)  # most recently used
                if code is None:
                    missing.append(value)
                else:
                    found[value] = code
        if missing:
            codes = self._lookup(pa.array(missing, type=pa.large_string()))
            fresh = dict(zip(missing, codes.tolist(), strict=True))
            found.update(fresh)
            self._keep(fresh)
        return np.fromiter((found[v] for v in values), dtype=np.int64, count=len(values))

    def padded(self, lists: Sequence[Sequence[str | None] | None], width: int) -> IntArray:
        """int64 `[n, width]`: codes of each list's first `width` values, PAD (0) after;
        a None list is empty (as a null list of the table path)."""
        kept = [row[:width] if row is not None else () for row in lists]
        lengths = np.fromiter((len(r) for r in kept), dtype=np.int64, count=len(kept))  # (n,)
        if lengths.sum():
            codes = self.codes([token for row in kept for token in row])  # (total,)
        else:
            codes = np.zeros(0, dtype=np.int64)
        return pad_codes(codes, lengths, width)

    def _keep(self, fresh: Mapping[str | None, int]) -> None:
        """Remember looked-up codes: null for good, unknown values never, the rest in the
        bounded LRU part."""
        recent = self._recent
        with self._lock:
            for value, code in fresh.items():
                if value is None:
                    self._prefilled[None] = code  # one entry, needed by most batches
                elif code != self.unknown_code and self.recent_capacity > 0:
                    recent[value] = code
                    recent.move_to_end(value)
            while len(recent) > self.recent_capacity:
                recent.popitem(last=False)  # the least recently used


class QueryRowEncoder:
    """Encodes query rows into a query-tower batch, exactly as `FeatureEncoder.encode_queries`.

    Categorical, bag, hashed and history codes go through per-feature `_CodeCache`s
    (codes from the encoder itself); dense values through `encode_dense` with the fitted
    statistics. Build it from the bundle's `FeatureEncoder`; it is safe to call from
    several threads at once.

    Args:
        encoder: the fitted encoder.
        cache_capacity: most vocabulary values `prefill` keeps per feature.
        prefill: cache every vocabulary's values now (the most frequent first, up to
            `cache_capacity` each; hashed features fill as queries come). At 1M catalog
            items this holds ~100 MB of Python strings and codes.
        code_cache_size: most values kept per feature from the lookups made while
            encoding (hashed values, and vocabulary values outside the prefilled ones), the
            least recently used dropped first; values a vocabulary does not know are never
            kept.
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        *,
        cache_capacity: int = 1_000_000,
        prefill: bool = False,
        code_cache_size: int = 100_000,
    ) -> None:
        if code_cache_size < 0:
            raise ValueError(f"`code_cache_size` must be >= 0; got {code_cache_size}")
        self.encoder = encoder
        self.code_cache_size = code_cache_size
        self._specs = encoder.schema.query_features
        self._stats: dict[str, DenseStats | None] = {}
        self._caches: dict[str, _CodeCache] = {}
        self._cache_keys: dict[str, str] = {}  # feature -> the key a row holds it under
        for spec in self._specs:
            self._stats[spec.name] = encoder.feature_stats("query", spec)
            space = encoder.code_space("query", spec)
            if space is None:
                continue
            cache = _CodeCache(space, cache_capacity, code_cache_size)
            if prefill and space.vocabulary is not None:
                cache.prefill(space.vocabulary.value_array)
            self._caches[spec.name] = cache
            is_history = spec.kind == FeatureKind.HISTORY
            self._cache_keys[spec.name] = spec.name if is_history else spec.source_column

    def cached_values(self) -> dict[str, int]:
        """Values cached per feature, keyed like a row: by source column, the history by
        its feature name."""
        return {self._cache_keys[name]: len(cache) for name, cache in self._caches.items()}

    def encode(self, rows: Sequence[QueryRow]) -> dict[str, torch.Tensor]:
        """One encoded batch `{feature: tensor}`, row order kept."""
        if not rows:
            raise ValueError("`rows` must hold at least one query row")
        return {
            spec.name: encode_feature(
                spec,
                _row_values(spec, rows),
                self._caches.get(spec.name),
                self._stats[spec.name],
            )
            for spec in self._specs
        }
