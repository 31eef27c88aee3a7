"""Feature encoders: parquet columns -> the tensors the towers read (see `FeatureInput`).

Everything fitted here is fitted on the train split only, and saved with the model as JSON
(vocabularies, dense statistics, schema) plus two parquet files of id strings: no pickle.

Fitting rules ("built on train only"):
    * attribute features count each user (item) once, over the users (items) that have at
      least one train interaction; dense mean/std use the same rows;
    * the id features (a categorical feature reading the `user_id` / `item_id` column) count
      train interactions, so an id seen fewer than `min_count` times in train maps to OOV and
      a cold item is represented by its content features only;
    * index 0 is PAD, 1 is OOV; vocabulary values start at 2, ordered by count descending, then
      value ascending (as strings, code point order). Integer columns are read as their
      decimal text, so a vocabulary always holds strings.

Hashed features use `stable_hash_bucket` (64-bit FNV-1a over the UTF-8 bytes, then the
MurmurHash3 finaliser), which is the same in every process and on every machine.

History (query tower): row i of interactions sorted by (user, time) gets the item codes of
the same user's rows i-1, i-2, ..., i-N, most recent first, padded with 0 (`build_history`);
serving uses each user's last N items (`history_at_end`).

Encoding has two entrances with one per-kind dispatch (`encode_feature`) and one padding
step (`pad_codes`): the table path (`FeatureEncoder.encode_users`, `encode_items`,
`encode_queries`: Arrow columns, e.g. users.parquet) and the row path the service runs
on each batch of checked queries (`retrieval.row_encoding.QueryRowEncoder`, in
`retrieval.row_encoding`: Python values, with cached codes), which gives the same tensors.

Example:
    >>> vocab = Vocabulary.fit(["rock", "jazz", "rock", "pop", None], min_count=1)
    >>> vocab.values, len(vocab)
    (['rock', 'jazz', 'pop'], 5)
    >>> vocab.lookup(["jazz", "rock", "metal", None]).tolist()
    [3, 2, 1, 1]
    >>> build_history(np.array([0, 0, 0, 1]), np.array([5, 6, 7, 8]), max_length=2).tolist()
    [[0, 0], [5, 0], [6, 5], [0, 0]]
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from numpy.lib.stride_tricks import sliding_window_view

from retrieval.atomic import atomic_write_bytes, atomic_write_text
from retrieval.data.split import SPLIT_NAMES
from retrieval.features import (
    ITEM_ID,
    NUM_RESERVED,
    OOV_INDEX,
    PAD_INDEX,
    SEQUENCE_KINDS,
    SPLIT,
    TIMESTAMP,
    USER_ID,
    DatasetSchema,
    FeatureInput,
    FeatureKind,
    FeatureSpec,
)

logger = logging.getLogger(__name__)

ENCODER_FORMAT_VERSION = 1
ENCODER_FILE = "encoder.json"
USER_IDS_FILE = "user_ids.parquet"
ITEM_IDS_FILE = "item_ids.parquet"

Side = Literal["query", "item"]
SIDES: tuple[Side, ...] = ("query", "item")

IntArray = npt.NDArray[np.int64]
TokenEncoder = Callable[[pa.Array], IntArray]

# 64-bit FNV-1a (http://www.isthe.com/chongo/tech/comp/fnv/) and the MurmurHash3 fmix64 finaliser.
_FNV_OFFSET_BASIS = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_FMIX_C1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT_33 = np.uint64(33)


# --------------------------------------------------------------------------- arrow inputs


def _as_arrow(values: Any, what: str) -> list[pa.Array]:
    """`values` (Arrow array/chunked array, numpy array or Python list) as Arrow chunks."""
    if isinstance(values, pa.ChunkedArray):
        return list(values.chunks)
    if isinstance(values, pa.Array):
        return [values]
    try:
        return [pa.array(values, from_pandas=True)]  # from_pandas: NaN in object arrays -> null
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"`{what}`: cannot convert to an Arrow array ({exc})") from exc


def _string_chunks(values: Any, what: str) -> list[pa.Array]:
    """`values` as large_string chunks; integer and boolean values become their decimal text.

    Floats are refused: their text form is not a stable category ('1' vs '1.0').
    """
    out = []
    for chunk in _as_arrow(values, what):
        if pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_decode()
        kind = chunk.type
        if not (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
            or pa.types.is_integer(kind)
            or pa.types.is_boolean(kind)
            or pa.types.is_null(kind)
        ):
            raise ValueError(f"`{what}`: expected string or integer values; got type {kind}")
        out.append(chunk if pa.types.is_large_string(kind) else pc.cast(chunk, pa.large_string()))
    return out or [pa.array([], type=pa.large_string())]


def _list_chunks(values: Any, what: str) -> list[pa.Array]:
    """`values` as chunks of an Arrow list type (list, large_list or fixed_size_list)."""
    chunks = _as_arrow(values, what)
    for chunk in chunks:
        kind = chunk.type
        if not (
            pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)
            or pa.types.is_null(kind)
        ):
            raise ValueError(f"`{what}`: expected a list column; got type {kind}")
    return chunks


def _concat_int(parts: list[IntArray]) -> IntArray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# --------------------------------------------------------------------------- stable hashing


def _fnv1a_64_chunk(strings: pa.Array) -> npt.NDArray[np.uint64]:
    """FNV-1a 64 of each value's UTF-8 bytes, vectorised over values, looping over byte positions.

    Values are processed longest first, so step j touches only the values longer than j:
    the work is O(total bytes) plus one numpy call per byte of the longest value.
    Null slots hash like whatever bytes Arrow stores for them; callers mask them.
    """
    n = len(strings)
    hashes = np.full(n, _FNV_OFFSET_BASIS, dtype=np.uint64)
    if n == 0:
        return hashes
    binary = pc.cast(strings, pa.large_binary())
    buffers = binary.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1, offset=binary.offset * 8)
    data = buffers[2]
    if data is None or data.size == 0:
        return hashes
    data_bytes = np.frombuffer(data, dtype=np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")  # longest first
    sorted_lengths = lengths[order]
    sorted_starts = offsets[:-1][order]
    max_length = int(sorted_lengths[0])
    # active[j] = how many values are longer than j (a prefix of the longest-first order)
    active = np.searchsorted(-sorted_lengths, -np.arange(max_length), side="left")
    work = hashes[order]
    for j in range(max_length):
        k = int(active[j])
        work[:k] ^= data_bytes[sorted_starts[:k] + j]
        work[:k] *= _FNV_PRIME  # wraps modulo 2**64, as FNV specifies
    hashes[order] = work
    return hashes


def _mix64(hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """MurmurHash3 fmix64: spreads FNV's weak low bits before taking a modulo."""
    h = hashes.copy()
    h ^= h >> _SHIFT_33
    h *= _FMIX_C1
    h ^= h >> _SHIFT_33
    h *= _FMIX_C2
    h ^= h >> _SHIFT_33
    return h


def fnv1a_64(values: Any) -> npt.NDArray[np.uint64]:
    """64-bit FNV-1a of each value's UTF-8 bytes (integers: of their decimal text).

    Null values hash as the empty string here; `stable_hash_bucket` maps them to OOV instead.

    >>> [hex(h) for h in fnv1a_64(["", "a", "foobar"])]
    ['0xcbf29ce484222325', '0xaf63dc4c8601ec8c', '0x85944171f73967e8']
    """
    parts = []
    for chunk in _string_chunks(values, "values"):
        hashes = _fnv1a_64_chunk(chunk)
        if chunk.null_count:
            hashes[np.asarray(chunk.is_null())] = _FNV_OFFSET_BASIS
        parts.append(hashes)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _hash64_unique(strings: pa.Array) -> npt.NDArray[np.uint64]:
    return _mix64(_fnv1a_64_chunk(strings))


def stable_hash_bucket(values: Any, num_buckets: int) -> IntArray:
    """Hash each value into [NUM_RESERVED, NUM_RESERVED + num_buckets); null -> OOV_INDEX.

    The bucket is `NUM_RESERVED + fmix64(fnv1a_64(utf8 bytes)) % num_buckets`: the same in
    every process and on every machine (Python's `hash()` is salted per process). Integers
    hash as their decimal text, so 7 and "7" share a bucket. Each distinct value is hashed
    once per call.

    Args:
        values: strings or integers (Arrow array, numpy array or list); nulls allowed.
        num_buckets: number of buckets, >= 1.

    Returns:
        int64 `[len(values)]`.

    >>> stable_hash_bucket(["a", "b", None, "a"], num_buckets=1000).tolist()
    [317, 706, 1, 317]
    """
    if num_buckets < 1:
        raise ValueError(f"`num_buckets` must be >= 1; got {num_buckets}")
    modulus = np.uint64(num_buckets)
    parts = []
    for chunk in _string_chunks(values, "values"):
        encoded = chunk.dictionary_encode()
        uniques = encoded.dictionary
        buckets = (_hash64_unique(uniques) % modulus).astype(np.int64) + NUM_RESERVED
        table = np.append(buckets, np.int64(OOV_INDEX))  # last slot: null values
        parts.append(table[encoded.indices.fill_null(len(uniques)).to_numpy()])
    return _concat_int(parts)


class _StringIndex:
    """Position of strings in a fixed array of distinct strings, built once, queried many times.

    `pc.index_in` rebuilds its hash table on every call, which costs about 0.3 s per million
    values; encoders call lookups per chunk against id vocabularies of millions of values.
    Here the values' 64-bit hashes are sorted once; a query hashes its distinct values,
    binary-searches them and confirms each hit by comparing the strings, so a hash collision
    can never return a wrong position. If two indexed values share a hash (about 3e-6 for
    10M values) the index falls back to `pc.index_in`.
    """

    def __init__(self, values: pa.Array) -> None:
        self._values = values
        hashes = _hash64_unique(values)
        self._order = np.argsort(hashes, kind="stable")
        self._sorted_hashes = hashes[self._order]
        self._collisions = bool(np.any(self._sorted_hashes[1:] == self._sorted_hashes[:-1]))

    def find(self, strings: pa.Array) -> IntArray:
        """Position of each string in the indexed values, or -1 (also for nulls)."""
        encoded = strings.dictionary_encode()
        uniques = encoded.dictionary
        if len(self._values) == 0 or len(uniques) == 0:
            positions = np.full(len(uniques), -1, dtype=np.int64)
        elif self._collisions:
            found = pc.index_in(uniques, value_set=self._values)
            positions = found.fill_null(-1).to_numpy().astype(np.int64)
        else:
            hashes = _hash64_unique(uniques)
            slot = np.searchsorted(self._sorted_hashes, hashes)
            slot = np.minimum(slot, len(self._sorted_hashes) - 1)
            candidates = self._order[slot]
            same_hash = self._sorted_hashes[slot] == hashes
            same_text = pc.equal(uniques, self._values.take(pa.array(candidates))).to_numpy(
                zero_copy_only=False
            )
            positions = np.where(same_hash & same_text, candidates, -1).astype(np.int64)
        table = np.append(positions, np.int64(-1))  # last slot: null values
        return table[encoded.indices.fill_null(len(uniques)).to_numpy()]


# --------------------------------------------------------------------------- vocabulary


class Vocabulary:
    """Value -> index for one categorical or bag feature; 0 = PAD, 1 = OOV, values from 2.

    Args:
        values: the distinct values, in index order (index = position + NUM_RESERVED).
        counts: train count of each value (kept for sampling-bias estimates and inspection).
        min_count: the threshold the vocabulary was fitted with (recorded, not re-applied).

    Use `Vocabulary.fit` or `Vocabulary.from_counts` to build one from data.

    >>> vocab = Vocabulary.from_counts({"b": 2, "a": 2, "c": 5, "d": 1}, min_count=2)
    >>> vocab.values, vocab.counts.tolist()
    (['c', 'a', 'b'], [5, 2, 2])
    >>> Vocabulary.from_dict(vocab.to_dict()) == vocab
    True
    """

    def __init__(
        self,
        values: Sequence[str] | pa.Array,
        counts: npt.ArrayLike,
        *,
        min_count: int = 1,
    ) -> None:
        chunks = _string_chunks(values, "values")
        array = chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
        if array.null_count:
            raise ValueError("`values` must not contain nulls")
        if len(pc.unique(array)) != len(array):
            raise ValueError("`values` must be distinct")
        count_array = np.asarray(counts, dtype=np.int64).reshape(-1)
        if len(count_array) != len(array):
            raise ValueError(
                f"`counts` must have one entry per value; got {len(count_array)} for {len(array)}"
            )
        if len(count_array) and count_array.min() < 0:
            raise ValueError("`counts` must be >= 0")
        if min_count < 1:
            raise ValueError(f"`min_count` must be >= 1; got {min_count}")
        self._values = array
        self._counts = count_array
        self.min_count = min_count
        self._index: _StringIndex | None = None

    @classmethod
    def fit(cls, values: Any, min_count: int = 1) -> Vocabulary:
        """Count `values` (nulls ignored) and keep those seen at least `min_count` times."""
        if min_count < 1:
            raise ValueError(f"`min_count` must be >= 1; got {min_count}")
        column = pa.chunked_array(_string_chunks(values, "values"), type=pa.large_string())
        counted = pc.value_counts(column)
        table = pa.table({"value": counted.field("values"), "count": counted.field("counts")})
        return cls._from_count_table(table, min_count)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1) -> Vocabulary:
        """Keep the values of a `{value: count}` mapping seen at least `min_count` times."""
        if min_count < 1:
            raise ValueError(f"`min_count` must be >= 1; got {min_count}")
        table = pa.table(
            {
                "value": pa.array([str(v) for v in counts], type=pa.large_string()),
                "count": pa.array(list(counts.values()), type=pa.int64()),
            }
        )
        return cls._from_count_table(table, min_count)

    @classmethod
    def _from_count_table(cls, table: pa.Table, min_count: int) -> Vocabulary:
        keep = pc.and_(pc.is_valid(table["value"]), pc.greater_equal(table["count"], min_count))
        table = table.filter(keep).sort_by([("count", "descending"), ("value", "ascending")])
        return cls(
            table["value"].combine_chunks(),
            table["count"].to_numpy(),
            min_count=min_count,
        )

    @property
    def values(self) -> list[str]:
        """The values in index order (index = position + NUM_RESERVED)."""
        return [str(v) for v in self._values.to_pylist()]

    @property
    def value_array(self) -> pa.Array:
        """The values in index order as the Arrow array the vocabulary holds (no copy)."""
        return self._values

    @property
    def counts(self) -> IntArray:
        """Train count of each value, in index order."""
        return self._counts.copy()

    def __len__(self) -> int:
        """Embedding table rows: the values plus the reserved PAD and OOV rows."""
        return len(self._values) + NUM_RESERVED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (
            self.min_count == other.min_count
            and self._values.equals(other._values)
            and np.array_equal(self._counts, other._counts)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, compared by content

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self._values)}, min_count={self.min_count})"

    def lookup(self, values: Any) -> IntArray:
        """Index of each value; unknown and null values -> OOV_INDEX. Returns int64 `[n]`."""
        if self._index is None:
            self._index = _StringIndex(self._values)
        index = self._index
        parts = []
        for chunk in _string_chunks(values, "values"):
            positions = index.find(chunk)
            parts.append(np.where(positions >= 0, positions + NUM_RESERVED, OOV_INDEX))
        return _concat_int(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_count": self.min_count,
            "values": self.values,
            "counts": self._counts.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        expected = {"min_count", "values", "counts"}
        if set(data) != expected:
            raise ValueError(f"vocabulary keys must be {sorted(expected)}; got {sorted(data)}")
        return cls(
            pa.array(data["values"], type=pa.large_string()),
            data["counts"],
            min_count=int(data["min_count"]),
        )


# --------------------------------------------------------------------------- dense features


@dataclass(frozen=True)
class DenseStats:
    """Train mean and standard deviation of one dense feature.

    Args:
        mean: mean of the non-missing train values (0 when there are none).
        std: population standard deviation (ddof=0) of the same values; 1 when it is 0 or
            undefined, so a constant feature encodes as 0 instead of dividing by zero.

    >>> stats = DenseStats.fit([1.0, 2.0, None, 3.0])
    >>> stats.mean, round(stats.std, 6)
    (2.0, 0.816497)
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.mean):
            raise ValueError(f"`mean` must be finite; got {self.mean}")
        if not (np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"`std` must be finite and > 0; got {self.std}")

    @classmethod
    def fit(cls, values: Any) -> DenseStats:
        """Statistics of the finite values (nulls, NaN and inf are ignored)."""
        numbers = _dense_values(values, "values")
        finite = numbers[np.isfinite(numbers)]
        if len(finite) == 0:
            return cls(mean=0.0, std=1.0)
        mean = float(finite.mean())
        std = float(finite.std())
        return cls(mean=mean, std=std if np.isfinite(std) and std > 0 else 1.0)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DenseStats:
        return cls(mean=float(data["mean"]), std=float(data["std"]))


def _dense_values(values: Any, what: str) -> npt.NDArray[np.float64]:
    """`values` as float64 with NaN for nulls."""
    parts = []
    for chunk in _as_arrow(values, what):
        kind = chunk.type
        if not (
            pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)
            or pa.types.is_decimal(kind)
            or pa.types.is_null(kind)
        ):
            raise ValueError(f"`{what}`: expected numeric values; got type {kind}")
        floats = pc.cast(chunk, pa.float64())
        parts.append(floats.to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def encode_dense(
    values: Any, stats: DenseStats, missing_indicator: bool
) -> npt.NDArray[np.float32]:
    """Standardise with train statistics; missing (null, NaN, inf) -> 0, plus an indicator.

    Returns:
        float32 `[n, 1]`, or `[n, 2]` with columns (standardised value, was-missing) when
        `missing_indicator` is set.

    >>> encode_dense([4.0, None], DenseStats(mean=2.0, std=2.0), missing_indicator=True).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    numbers = _dense_values(values, "values")
    missing = ~np.isfinite(numbers)
    standardised = np.where(missing, 0.0, (numbers - stats.mean) / stats.std)  # (n,)
    columns = [standardised]
    if missing_indicator:
        columns.append(missing.astype(np.float64))
    return np.stack(columns, axis=1).astype(np.float32)  # (n, width)


# --------------------------------------------------------------------------- bags


def encode_bag(values: Any, max_length: int, encode_tokens: TokenEncoder) -> IntArray:
    """List column -> int64 `[n, max_length]`: the first `max_length` tokens, padded with 0.

    Empty and null lists give all-PAD rows; null tokens are passed to `encode_tokens`
    (which maps them to OOV).

    Args:
        values: a list<string> (or list<int>) column.
        max_length: tokens kept per row, >= 1.
        encode_tokens: maps a flat string array of tokens to int64 codes
            (`Vocabulary.lookup`, or `stable_hash_bucket` with its bucket count).

    >>> vocab = Vocabulary.fit(["a", "b"])
    >>> encode_bag([["b", "x", "a"], [], None], 2, vocab.lookup).tolist()
    [[3, 1], [0, 0], [0, 0]]
    """
    if max_length < 1:
        raise ValueError(f"`max_length` must be >= 1; got {max_length}")
    parts = []
    for chunk in _list_chunks(values, "values"):
        rows = len(chunk)
        if rows == 0 or pa.types.is_null(chunk.type):
            parts.append(np.zeros((rows, max_length), dtype=np.int64))
            continue
        kept = pc.list_slice(chunk, 0, max_length)
        lengths = pc.list_value_length(kept).fill_null(0).to_numpy().astype(np.int64)  # (n,)
        tokens = pc.list_flatten(kept)  # (total,) in row order; null lists contribute nothing
        codes = np.asarray(encode_tokens(tokens), dtype=np.int64)
        parts.append(pad_codes(codes, lengths, max_length))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def pad_codes(codes: IntArray, lengths: IntArray, width: int) -> IntArray:
    """Flat codes, row after row, as an int64 `[n, width]` matrix, PAD (0) after each row's codes.

    The padding step of every list feature, whether its rows come as an Arrow list column
    (`encode_bag`) or as Python lists (`retrieval.row_encoding`).

    Args:
        codes: int64 `[total]`, row 0's codes, then row 1's, ...
        lengths: int64 `[n]`, codes of each row, each at most `width`; they sum to `total`.
        width: columns of the result.

    >>> pad_codes(np.array([5, 6, 7]), np.array([2, 0, 1]), 3).tolist()
    [[5, 6, 0], [0, 0, 0], [7, 0, 0]]
    """
    rows = len(lengths)
    out = np.zeros((rows, width), dtype=np.int64)  # (n, width), PAD = 0
    if len(codes):
        row_of_code = np.repeat(np.arange(rows), lengths)  # (total,)
        first_code = np.cumsum(lengths) - lengths  # (n,) where each row starts in `codes`
        position = np.arange(len(codes)) - np.repeat(first_code, lengths)  # (total,)
        out[row_of_code, position] = codes
    return out


# --------------------------------------------------------------------------- per-kind dispatch


class CodeSource(Protocol):
    """Where a feature's integer codes come from (`CodeSpace`, or a cache in front of one)."""

    def codes(self, values: Any) -> IntArray:
        """int64 `[n]` code of each value."""
        ...

    def padded(self, lists: Any, width: int) -> IntArray:
        """int64 `[n, width]`: the codes of each list's first `width` values, PAD after."""
        ...


@dataclass(frozen=True)
class CodeSpace:
    """The codes of one categorical, bag, hashed, hashed-bag or history feature.

    Args:
        lookup: flat values -> int64 codes: `Vocabulary.lookup`, or `stable_hash_bucket`
            with the feature's bucket count.
        vocabulary: the vocabulary `lookup` reads; None for a hash space.
    """

    lookup: TokenEncoder
    vocabulary: Vocabulary | None = None

    @property
    def unknown_code(self) -> int | None:
        """The code of a value the vocabulary does not know (OOV, the code of null too);
        None for a hash space, where every value has a bucket of its own."""
        return OOV_INDEX if self.vocabulary is not None else None

    def codes(self, values: Any) -> IntArray:
        return self.lookup(values)

    def padded(self, lists: Any, width: int) -> IntArray:
        return encode_bag(lists, width, self.lookup)


def encode_feature(
    spec: FeatureSpec, values: Any, source: CodeSource | None, stats: DenseStats | None
) -> torch.Tensor:
    """One feature's tensor from its raw values (the layout of `FeatureInput`).

    The one per-kind dispatch of both encoding paths: `FeatureEncoder`'s table path
    (Arrow columns, `source` a `CodeSpace`) and the serving row path
    (`retrieval.row_encoding`: Python lists, `source` a code cache).

    Args:
        spec: the feature.
        values: its raw values, one per row (a list feature: one list per row).
        source: where its codes come from (`FeatureEncoder.code_space`); None for dense.
        stats: its train statistics when it is dense, else None.

    Returns:
        categorical, hashed: int64 `[n]`; bag, hashed_bag, history: int64
        `[n, max_length]`; dense: float32 `[n, width]`.
    """
    kind = spec.kind
    if kind == FeatureKind.DENSE:
        if stats is None:
            raise ValueError(f"dense feature {spec.name!r} needs its train statistics")
        return torch.from_numpy(encode_dense(values, stats, spec.missing_indicator))
    if source is None:
        raise ValueError(f"feature {spec.name!r} ({kind}) needs a code source")
    if kind in SEQUENCE_KINDS:
        return torch.from_numpy(source.padded(values, spec.max_length))
    return torch.from_numpy(source.codes(values))  # categorical, hashed


# --------------------------------------------------------------------------- history


def _run_bounds(user_rows: npt.NDArray[Any]) -> tuple[IntArray, IntArray]:
    """(start, end) of each run of equal users; raises if a user has two runs."""
    n = len(user_rows)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    starts = np.flatnonzero(np.r_[True, user_rows[1:] != user_rows[:-1]]).astype(np.int64)
    ends = np.r_[starts[1:], n].astype(np.int64)
    if len(np.unique(user_rows[starts])) != len(starts):
        raise ValueError(
            "each user's rows must be contiguous: sort interactions by user, then timestamp"
        )
    return starts, ends


def _check_history_args(
    user_rows: npt.ArrayLike, item_codes: npt.ArrayLike, max_length: int
) -> tuple[npt.NDArray[Any], IntArray]:
    users = np.asarray(user_rows)
    codes = np.asarray(item_codes)
    if users.ndim != 1 or codes.shape != users.shape:
        raise ValueError(
            f"`user_rows` and `item_codes` must be 1-d of one length; "
            f"got {users.shape}, {codes.shape}"
        )
    if max_length < 1:
        raise ValueError(f"`max_length` must be >= 1; got {max_length}")
    if len(codes) and codes.min() <= PAD_INDEX:
        raise ValueError(f"`item_codes` must be > {PAD_INDEX} (the padding index)")
    return users, codes.astype(np.int64, copy=False)


def build_history(user_rows: npt.ArrayLike, item_codes: npt.ArrayLike, max_length: int) -> IntArray:
    """Causal history of every interaction: the same user's previous `max_length` items.

    Rows must be sorted by (user, time), each user's rows contiguous. Row i gets
    `[code[i-1], code[i-2], ..., code[i-max_length]]` (most recent first), keeping only rows
    of the same user and padding with PAD_INDEX; it never holds row i or a later row.

    Args:
        user_rows: int `[n]`, the user of each interaction.
        item_codes: int64 `[n]`, the item-id vocabulary index of each interaction (>= 1).
        max_length: N, items kept.

    Returns:
        int64 `[n, max_length]`.
    """
    users, codes = _check_history_args(user_rows, item_codes, max_length)
    starts, ends = _run_bounds(users)
    n = len(users)
    if n == 0:
        return np.zeros((0, max_length), dtype=np.int64)
    # rank of each row within its user = how many earlier rows of the same user exist
    rank = np.arange(n) - np.repeat(starts, ends - starts)  # (n,)
    padded = np.concatenate([np.zeros(max_length, dtype=np.int64), codes])  # (N + n,)
    # row i of the view is padded[i : i + N] = codes[i-N .. i-1], reversed: most recent first
    previous = sliding_window_view(padded, max_length)[:n, ::-1]  # (n, N), a view
    same_user = np.arange(max_length)[None, :] < rank[:, None]  # (n, N): offset k+1 <= rank
    return np.where(same_user, previous, PAD_INDEX).astype(np.int64, copy=False)


def history_at_end(
    user_rows: npt.ArrayLike, item_codes: npt.ArrayLike, max_length: int, num_users: int
) -> IntArray:
    """Each user's last `max_length` items of the rows given (most recent first), for serving.

    Pass the rows the model may see (train + valid for test-time queries), sorted by
    (user, time). Users without rows get all-PAD histories.

    Returns:
        int64 `[num_users, max_length]`, row u for user u.

    >>> history_at_end(np.array([2, 2, 2, 0]), np.array([5, 6, 7, 8]), 2, num_users=3).tolist()
    [[8, 0], [0, 0], [7, 6]]
    """
    users, codes = _check_history_args(user_rows, item_codes, max_length)
    if num_users < 0:
        raise ValueError(f"`num_users` must be >= 0; got {num_users}")
    starts, ends = _run_bounds(users)
    run_users = users[starts].astype(np.int64)
    if len(run_users) and (run_users.min() < 0 or run_users.max() >= num_users):
        raise ValueError(
            f"`user_rows` must be in [0, num_users={num_users}); "
            f"got values in [{run_users.min()}, {run_users.max()}]"
        )
    history = np.zeros((num_users, max_length), dtype=np.int64)
    for back in range(max_length):
        position = ends - 1 - back  # (runs,)
        has_item = position >= starts
        history[run_users[has_item], back] = codes[position[has_item]]
    return history


# --------------------------------------------------------------------------- feature encoder


@dataclass(frozen=True, eq=False)  # numpy fields: compare them with np.array_equal
class EncodedInteractions:
    """Interactions as row indices, ready for the trainer to gather batches.

    Args:
        user_row: int64 `[n]`, row of the user in the fitted users table.
        item_row: int64 `[n]`, row of the item in the fitted items table.
        history: int64 `[n, N]`, item-id codes of the user's previous N events (causal).
        split: int8 `[n]`, TRAIN / VALID / TEST codes of `retrieval.data.split`.
    """

    user_row: IntArray
    item_row: IntArray
    history: IntArray
    split: npt.NDArray[np.int8]

    def __len__(self) -> int:
        return len(self.user_row)


def _require_columns(table: pa.Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} table lacks columns {missing}; it has {table.column_names}")


def _id_strings(column: Any, what: str) -> pa.Array:
    chunks = _string_chunks(column, what)
    return chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)


def _write_ids(path: Path, column: str, ids: pa.Array) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column: ids}), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class FeatureEncoder:
    """Fitted encoders of both towers: schema, vocabularies, dense statistics, id tables.

    Build with `FeatureEncoder.fit` (train split only, see the module docstring) or
    `FeatureEncoder.load`. Tensors follow the layout of `FeatureInput`: categorical and
    hashed int64 `[B]`, bag and hashed_bag int64 `[B, max_length]`, dense float32
    `[B, width]`.

    Args:
        schema: the dataset schema whose features are encoded.
        vocabularies: side ('query' | 'item') -> feature name -> vocabulary, for every
            categorical and bag feature.
        dense_stats: side -> feature name -> statistics, for every dense feature.
        user_ids: user id of each row of the users table the encoder was fitted with.
        item_ids: item id of each row of the items table (row = item index).
    """

    def __init__(
        self,
        schema: DatasetSchema,
        vocabularies: Mapping[str, Mapping[str, Vocabulary]],
        dense_stats: Mapping[str, Mapping[str, DenseStats]],
        user_ids: Any,
        item_ids: Any,
    ) -> None:
        self.schema = schema
        self._vocabularies = {side: dict(vocabularies.get(side, {})) for side in SIDES}
        self._dense_stats = {side: dict(dense_stats.get(side, {})) for side in SIDES}
        for side in SIDES:
            for spec in self._specs(side, with_history=False):
                if spec.kind in (FeatureKind.CATEGORICAL, FeatureKind.BAG):
                    if spec.name not in self._vocabularies[side]:
                        raise ValueError(f"{side} feature {spec.name!r} has no vocabulary")
                elif spec.kind == FeatureKind.DENSE and spec.name not in self._dense_stats[side]:
                    raise ValueError(f"{side} feature {spec.name!r} has no dense statistics")
        items_by_name = {s.name: s for s in schema.item_features}
        for spec in schema.query_features:
            if spec.kind == FeatureKind.HISTORY:
                shared = items_by_name[spec.shared_with or ""]
                if shared.source_column != ITEM_ID:
                    raise ValueError(
                        f"history feature {spec.name!r} shares {shared.name!r}, which reads "
                        f"column {shared.source_column!r}; it must read {ITEM_ID!r}"
                    )
        self._user_ids = _id_strings(user_ids, "user_ids")
        self._item_ids = _id_strings(item_ids, "item_ids")
        for what, ids in (("user_ids", self._user_ids), ("item_ids", self._item_ids)):
            if ids.null_count:
                raise ValueError(f"`{what}` must not contain nulls")
            if len(pc.unique(ids)) != len(ids):
                counts = pc.value_counts(ids)
                dupes = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
                raise ValueError(f"`{what}` must be distinct; repeated: {dupes[:5].to_pylist()}")
        self._user_index: _StringIndex | None = None
        self._item_index: _StringIndex | None = None

    # ----------------------------------------------------------------- fitting

    @classmethod
    def fit(
        cls,
        schema: DatasetSchema,
        users: pa.Table,
        items: pa.Table,
        interactions: pa.Table,
    ) -> FeatureEncoder:
        """Fit every vocabulary and dense statistic on the train split (see module docstring).

        Args:
            schema: features to encode.
            users: `user_id` plus the query features' columns, one row per user.
            items: `item_id` plus the item features' columns, one row per item (row = index).
            interactions: at least `user_id`, `item_id`, `split`.
        """
        _require_columns(users, [USER_ID], "users")
        _require_columns(items, [ITEM_ID], "items")
        _require_columns(interactions, [USER_ID, ITEM_ID, SPLIT], "interactions")
        splits = pc.unique(interactions[SPLIT]).to_pylist()
        unknown_splits = sorted(str(s) for s in splits if s not in SPLIT_NAMES)
        if unknown_splits:
            raise ValueError(
                f"interactions `split` must be one of {list(SPLIT_NAMES)}; got {unknown_splits}"
            )
        train = interactions.filter(pc.equal(interactions[SPLIT], SPLIT_NAMES[0]))
        train_user_ids = pa.chunked_array(_string_chunks(train[USER_ID], USER_ID))
        train_item_ids = pa.chunked_array(_string_chunks(train[ITEM_ID], ITEM_ID))
        tables = {"query": users, "item": items}
        id_columns = {"query": (USER_ID, train_user_ids), "item": (ITEM_ID, train_item_ids)}
        vocabularies: dict[str, dict[str, Vocabulary]] = {side: {} for side in SIDES}
        dense_stats: dict[str, dict[str, DenseStats]] = {side: {} for side in SIDES}
        for side in SIDES:
            table = tables[side]
            id_column, train_ids = id_columns[side]
            specs = [
                s
                for s in (schema.query_features if side == "query" else schema.item_features)
                if s.kind != FeatureKind.HISTORY
            ]
            _require_columns(
                table, [s.source_column for s in specs], "users" if side == "query" else "items"
            )
            table_ids = pa.chunked_array(_string_chunks(table[id_column], id_column))
            active = table.filter(pc.is_in(table_ids, value_set=pc.unique(train_ids)))
            logger.info(
                "fitting %s features on %d of %d rows with train interactions",
                side,
                active.num_rows,
                table.num_rows,
            )
            for spec in specs:
                column = active[spec.source_column]
                if spec.kind == FeatureKind.CATEGORICAL:
                    # the id feature counts train interactions; attributes count rows once
                    source = train_ids if spec.source_column == id_column else column
                    vocab = Vocabulary.fit(source, min_count=spec.min_count)
                    vocabularies[side][spec.name] = vocab
                elif spec.kind == FeatureKind.BAG:
                    tokens = [pc.list_flatten(c) for c in _list_chunks(column, spec.name)]
                    vocab = Vocabulary.fit(pa.chunked_array(tokens), min_count=spec.min_count)
                    vocabularies[side][spec.name] = vocab
                elif spec.kind == FeatureKind.DENSE:
                    dense_stats[side][spec.name] = DenseStats.fit(column)
                if spec.name in vocabularies[side]:
                    logger.info(
                        "%s feature %r: %d values (min_count %d)",
                        side,
                        spec.name,
                        len(vocabularies[side][spec.name]) - NUM_RESERVED,
                        spec.min_count,
                    )
        return cls(schema, vocabularies, dense_stats, users[USER_ID], items[ITEM_ID])

    # ----------------------------------------------------------------- model-side view

    def _specs(self, side: Side, *, with_history: bool) -> tuple[FeatureSpec, ...]:
        if side == "query":
            specs = self.schema.query_features
        elif side == "item":
            specs = self.schema.item_features
        else:
            raise ValueError(f"`side` must be 'query' or 'item'; got {side!r}")
        return tuple(s for s in specs if with_history or s.kind != FeatureKind.HISTORY)

    def vocabulary(self, side: Side, name: str) -> Vocabulary:
        """The fitted vocabulary of a categorical or bag feature."""
        self._specs(side, with_history=False)
        if name not in self._vocabularies[side]:
            raise ValueError(
                f"{side} feature {name!r} has no vocabulary; "
                f"vocabularies: {sorted(self._vocabularies[side])}"
            )
        return self._vocabularies[side][name]

    def dense_stats(self, side: Side, name: str) -> DenseStats:
        """The fitted statistics of a dense feature."""
        self._specs(side, with_history=False)
        if name not in self._dense_stats[side]:
            raise ValueError(
                f"{side} feature {name!r} has no dense statistics; "
                f"dense features: {sorted(self._dense_stats[side])}"
            )
        return self._dense_stats[side][name]

    @property
    def item_id_vocabulary(self) -> Vocabulary:
        """Vocabulary of the item id feature (its codes are what history features hold)."""
        return self.vocabulary("item", self.schema.item_id_feature)

    def feature_inputs(self, side: Side) -> tuple[FeatureInput, ...]:
        """What the tower of `side` needs to build its embeddings, in schema order."""
        inputs = []
        for spec in self._specs(side, with_history=True):
            if spec.kind in (FeatureKind.CATEGORICAL, FeatureKind.BAG):
                cardinality = len(self._vocabularies[side][spec.name])
                width = spec.embedding_dim
            elif spec.kind in (FeatureKind.HASHED, FeatureKind.HASHED_BAG):
                cardinality = NUM_RESERVED + spec.num_buckets
                width = spec.embedding_dim
            elif spec.kind == FeatureKind.DENSE:
                cardinality = 0
                width = spec.dense_width
            else:  # history: the shared item id table
                cardinality = len(self._vocabularies["item"][spec.shared_with or ""])
                width = spec.embedding_dim
            inputs.append(
                FeatureInput(
                    name=spec.name,
                    kind=spec.kind,
                    cardinality=cardinality,
                    embedding_dim=width,
                    shared_with=spec.shared_with,
                )
            )
        return tuple(inputs)

    # ----------------------------------------------------------------- encoding

    def code_space(self, side: Side, spec: FeatureSpec) -> CodeSpace | None:
        """Where the codes of a feature of `side` come from; None for a dense feature.

        Categorical and bag features read their fitted vocabulary, the history feature the
        item id vocabulary (its codes are the item id feature's), hashed kinds
        `stable_hash_bucket` with the feature's bucket count.
        """
        kind = spec.kind
        if kind == FeatureKind.DENSE:
            return None
        if kind in (FeatureKind.HASHED, FeatureKind.HASHED_BAG):
            return CodeSpace(functools.partial(stable_hash_bucket, num_buckets=spec.num_buckets))
        if kind == FeatureKind.HISTORY:
            vocab = self.item_id_vocabulary
        else:
            vocab = self.vocabulary(side, spec.name)
        return CodeSpace(vocab.lookup, vocab)

    def feature_stats(self, side: Side, spec: FeatureSpec) -> DenseStats | None:
        """The train statistics of a dense feature of `side`; None for any other kind."""
        return self.dense_stats(side, spec.name) if spec.kind == FeatureKind.DENSE else None

    def _encode_column(self, side: Side, spec: FeatureSpec, column: Any) -> torch.Tensor:
        try:
            return encode_feature(
                spec, column, self.code_space(side, spec), self.feature_stats(side, spec)
            )
        except ValueError as exc:
            raise ValueError(f"{side} feature {spec.name!r} ({spec.kind}): {exc}") from exc

    def _encode_table(
        self, side: Side, table: pa.Table, what: str, *, with_history: bool = False
    ) -> dict[str, torch.Tensor]:
        specs = self._specs(side, with_history=with_history)
        _require_columns(table, [s.source_column for s in specs], what)
        return {s.name: self._encode_column(side, s, table[s.source_column]) for s in specs}

    def encode_items(self, items: pa.Table) -> dict[str, torch.Tensor]:
        """Every item feature of `items` (any rows, e.g. a chunk of the catalog), row order kept."""
        return self._encode_table("item", items, "items")

    def encode_users(self, users: pa.Table) -> dict[str, torch.Tensor]:
        """Every non-history query feature of `users`, row order kept."""
        return self._encode_table("query", users, "users")

    def encode_queries(self, queries: pa.Table) -> dict[str, torch.Tensor]:
        """Every query feature of `queries`, the history included, row order kept.

        `queries` holds the columns of `users.parquet` plus, when the schema has a history
        feature, a list column named after it: each row's item ids, most recent first. The
        first `max_length` ids are kept, unknown ids map to OOV, PAD (0) follows. This is
        the table path of inline queries, which the serving row encoder
        (`retrieval.row_encoding.QueryRowEncoder`) equals row for row.
        """
        return self._encode_table("query", queries, "queries", with_history=True)

    # ----------------------------------------------------------------- ids

    @property
    def num_users(self) -> int:
        return len(self._user_ids)

    @property
    def num_items(self) -> int:
        return len(self._item_ids)

    @property
    def user_ids(self) -> pa.Array:
        """User id of each row of the fitted users table."""
        return self._user_ids

    @property
    def item_ids(self) -> pa.Array:
        """Item id of each row of the fitted items table (row = item index)."""
        return self._item_ids

    @staticmethod
    def _rows(index: _StringIndex, ids: Any, what: str) -> IntArray:
        parts = []
        for chunk in _string_chunks(ids, what):
            rows = index.find(chunk)
            if (rows < 0).any():
                unknown = chunk.filter(pa.array(rows < 0))
                examples = unknown[:5].to_pylist()
                raise ValueError(
                    f"{len(unknown)} unknown {what} (not in the table the encoder was "
                    f"fitted with), e.g. {examples}"
                )
            parts.append(rows)
        return _concat_int(parts)

    def user_index(self, user_ids: Any) -> IntArray:
        """Row of each user id in the fitted users table; raises ValueError on unknown ids."""
        if self._user_index is None:
            self._user_index = _StringIndex(self._user_ids)
        return self._rows(self._user_index, user_ids, "user_ids")

    def item_index(self, item_ids: Any) -> IntArray:
        """Row of each item id in the fitted items table; raises ValueError on unknown ids."""
        if self._item_index is None:
            self._item_index = _StringIndex(self._item_ids)
        return self._rows(self._item_index, item_ids, "item_ids")

    # ----------------------------------------------------------------- interactions

    def _history_length(self, history_max_length: int | None) -> int:
        if history_max_length is not None:
            if history_max_length < 0:
                raise ValueError(f"`history_max_length` must be >= 0; got {history_max_length}")
            return history_max_length
        lengths = [
            s.max_length for s in self.schema.query_features if s.kind == FeatureKind.HISTORY
        ]
        return max(lengths, default=0)

    def _sorted_rows(self, interactions: pa.Table) -> tuple[IntArray, IntArray]:
        _require_columns(interactions, [USER_ID, ITEM_ID, TIMESTAMP], "interactions")
        user_row = self.user_index(interactions[USER_ID])
        item_row = self.item_index(interactions[ITEM_ID])
        _run_bounds(user_row)
        times = interactions[TIMESTAMP].to_numpy()
        if len(times) > 1 and np.any((user_row[1:] == user_row[:-1]) & (times[1:] < times[:-1])):
            raise ValueError("interactions must be sorted by user, then timestamp")
        return user_row, item_row

    def encode_interactions(
        self, interactions: pa.Table, history_max_length: int | None = None
    ) -> EncodedInteractions:
        """Rows, causal histories and split codes of interactions sorted by (user, time).

        The history is built over all rows given, so a valid/test event sees the train
        events (and earlier valid events) before it.

        Args:
            interactions: `user_id`, `item_id`, `timestamp`, `split`, sorted by user then
                timestamp; every id must be in the fitted tables.
            history_max_length: N; defaults to the schema's history feature's `max_length`
                (0, an empty history, when the schema has none).
        """
        _require_columns(interactions, [SPLIT], "interactions")
        user_row, item_row = self._sorted_rows(interactions)
        length = self._history_length(history_max_length)
        if length:
            codes = self.item_id_vocabulary.lookup(interactions[ITEM_ID])
            history = build_history(user_row, codes, length)
        else:
            history = np.zeros((len(user_row), 0), dtype=np.int64)
        split_names = pa.chunked_array(_string_chunks(interactions[SPLIT], SPLIT))
        split_index = pc.index_in(split_names, value_set=pa.array(SPLIT_NAMES, pa.large_string()))
        if split_index.null_count:
            bad = pc.unique(split_names.filter(pc.is_null(split_index))).to_pylist()
            raise ValueError(f"interactions `split` must be one of {list(SPLIT_NAMES)}; got {bad}")
        split = split_index.to_numpy().astype(np.int8)
        return EncodedInteractions(
            user_row=user_row, item_row=item_row, history=history, split=split
        )

    def histories_at_end(
        self, interactions: pa.Table, history_max_length: int | None = None
    ) -> IntArray:
        """Each fitted user's last N items among `interactions` (pass train + valid rows).

        Returns:
            int64 `[num_users, N]`, row = the user's row in the fitted users table.
        """
        user_row, _ = self._sorted_rows(interactions)
        length = self._history_length(history_max_length)
        if length == 0:
            return np.zeros((self.num_users, 0), dtype=np.int64)
        codes = self.item_id_vocabulary.lookup(interactions[ITEM_ID])
        return history_at_end(user_row, codes, length, self.num_users)

    # ----------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """Everything but the id tables, as JSON-ready data."""
        return {
            "format_version": ENCODER_FORMAT_VERSION,
            "schema": self.schema.to_dict(),
            "vocabularies": {
                side: {name: v.to_dict() for name, v in self._vocabularies[side].items()}
                for side in SIDES
            },
            "dense_stats": {
                side: {name: s.to_dict() for name, s in self._dense_stats[side].items()}
                for side in SIDES
            },
            "num_users": self.num_users,
            "num_items": self.num_items,
            "user_ids_file": USER_IDS_FILE,
            "item_ids_file": ITEM_IDS_FILE,
        }

    def save(self, directory: str | Path) -> None:
        """Write `encoder.json` plus the id tables `user_ids.parquet` and `item_ids.parquet`.

        Each file is written atomically; `encoder.json` goes last, so its presence means the
        id tables it names are complete.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_ids(directory / USER_IDS_FILE, USER_ID, self._user_ids)
        _write_ids(directory / ITEM_IDS_FILE, ITEM_ID, self._item_ids)
        text = json.dumps(self.to_dict(), allow_nan=False)
        atomic_write_text(directory / ENCODER_FILE, text + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> FeatureEncoder:
        """Read an encoder written by `save`."""
        directory = Path(directory)
        path = directory / ENCODER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"encoder file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        version = data.get("format_version")
        if version != ENCODER_FORMAT_VERSION:
            raise ValueError(
                f"{path}: `format_version` must be {ENCODER_FORMAT_VERSION}; got {version!r}"
            )
        ids = {}
        for key, column, count in (
            ("user_ids_file", USER_ID, data["num_users"]),
            ("item_ids_file", ITEM_ID, data["num_items"]),
        ):
            id_path = directory / data[key]
            if not id_path.is_file():
                raise FileNotFoundError(f"encoder id table not found: {id_path}")
            values = pq.read_table(id_path, columns=[column])[column]
            if len(values) != count:
                raise ValueError(f"{id_path}: expected {count} ids; found {len(values)}")
            ids[column] = values
        return cls(
            DatasetSchema.from_dict(data["schema"]),
            vocabularies={
                side: {n: Vocabulary.from_dict(v) for n, v in data["vocabularies"][side].items()}
                for side in SIDES
            },
            dense_stats={
                side: {n: DenseStats.from_dict(s) for n, s in data["dense_stats"][side].items()}
                for side in SIDES
            },
            user_ids=ids[USER_ID],
            item_ids=ids[ITEM_ID],
        )
