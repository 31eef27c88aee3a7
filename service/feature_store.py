"""The online feature store: each user's raw features, recent history and seen items.

What a user record holds is fixed by the offline protocol (`retrieval.evaluation`): a
query for the held-out future is built from the user's features plus the history at the
end of their **train + valid** interactions, and their train + valid items are the ones
excluded. The test split is the future the evaluator holds out, so it is never loaded.

Two stores answer `get_user(user_id) -> UserRecord | None`:

* `InProcessFeatureStore`: built from a dataset directory at start-up (no Redis).
* `RedisFeatureStore`: reads one JSON value per user, ``{prefix}user:{user_id}``, written
  by ``retrieval features push`` (`push_features`); the push writes
  ``{prefix}features:meta`` last, with counts and the history length used.

Both build records with `iter_user_records`, so the embedded store and a pushed Redis
hold the same values.

What Redis holds is checked as it is read: a value that is not such a record (not JSON,
`features` not an object, `history` or `seen` not lists of ids, a stored feature value
the query checks refuse, a key of another Redis type) is the store's fault, answered
with `FeatureStoreCorruptError` (500, code ``feature_store_corrupt``, naming the key),
never a 422 that blames the request; each corrupt key is logged once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, ValidationError

from retrieval.data.dataset import load_dataset
from retrieval.features import ITEM_ID, SPLIT, USER_ID
from service.errors import DependencyError, FeatureStoreCorruptError, InvalidRequestError
from service.query import QuerySchema, normalize_query
from service.redis_link import RedisLink, RedisReplyError, RedisUnavailableError

logger = logging.getLogger(__name__)

CONTEXT_SPLITS = ("train", "valid")  # what a served user's query may see (not 'test')
USER_KEY = "user:"
META_KEY = "features:meta"
PUSH_CHUNK = 1000  # users per Redis pipeline round trip
_MAX_LOGGED_CORRUPT_KEYS = 10_000  # corrupt keys remembered so that each is logged once


class CorruptRecordError(ValueError):
    """A stored value is not a user record; the message says what is wrong with it."""


class _StoredRecord(BaseModel):
    """The JSON a user record is stored as (`UserRecord.to_json`), checked strictly."""

    model_config = ConfigDict(strict=True)  # other keys are ignored

    features: dict[str, Any]
    history: list[str]
    seen: list[str]


@dataclass(frozen=True)
class UserRecord:
    """One user as the service needs them.

    Args:
        features: raw users.parquet values of the query tower's columns (NaN -> None).
        history: the last N train+valid item ids, most recent first.
        seen: every distinct train+valid item id (excluded with `exclude_seen`).
    """

    features: dict[str, Any]
    history: tuple[str, ...]
    seen: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {"features": self.features, "history": list(self.history), "seen": list(self.seen)},
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> UserRecord:
        """The record `to_json` wrote.

        Raises:
            CorruptRecordError: `text` is not JSON, or not an object with `features` (an
                object), `history` and `seen` (lists of item ids).

        >>> UserRecord.from_json('{"features": {}, "history": ["a"], "seen": ["a"]}').history
        ('a',)
        >>> UserRecord.from_json('{"features": [], "history": [], "seen": []}')
        Traceback (most recent call last):
        ...
        service.feature_store.CorruptRecordError: `features`: Input should be an object
        """
        try:
            data = _StoredRecord.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            if first["type"] == "json_invalid":
                raise CorruptRecordError(f"not JSON ({first['msg']})") from None
            raise CorruptRecordError(f"`{where or 'record'}`: {first['msg']}") from None
        return cls(features=data.features, history=tuple(data.history), seen=tuple(data.seen))


class FeatureStore(Protocol):
    """Where `user_id` queries get their features."""

    kind: str

    async def get_user(self, user_id: str) -> UserRecord | None:
        """The user's record, None when unknown; raises `DependencyError` when unreachable."""
        ...

    async def close(self) -> None: ...


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf mean "missing" to the encoder; JSON has no NaN
    return value


def iter_user_records(
    data_dir: str | Path, columns: Sequence[str], history_length: int
) -> Iterator[tuple[str, UserRecord]]:
    """(user_id, record) for every user of a dataset, following the train+valid rule.

    Args:
        data_dir: the dataset directory.
        columns: the users.parquet columns the query tower reads.
        history_length: N, history items kept (most recent first).
    """
    dataset = load_dataset(data_dir, validate=False)
    users = dataset.users
    missing = [c for c in columns if c not in users.column_names]
    if missing:
        raise ValueError(f"{data_dir}: users.parquet lacks query feature columns {missing}")
    interactions = dataset.interactions
    context = interactions.filter(
        pc.is_in(interactions[SPLIT], value_set=pa.array(list(CONTEXT_SPLITS)))
    )
    # Rows are sorted by (user, timestamp) (the dataset format): runs of one user.
    event_users = [str(u) for u in context[USER_ID].to_pylist()]
    event_items = [str(i) for i in context[ITEM_ID].to_pylist()]
    runs: dict[str, tuple[int, int]] = {}
    start = 0
    for position in range(1, len(event_users) + 1):
        if position == len(event_users) or event_users[position] != event_users[start]:
            if event_users[start] in runs:
                raise ValueError(
                    f"{data_dir}: interactions are not sorted by user (user "
                    f"{event_users[start]!r} appears in two runs)"
                )
            runs[event_users[start]] = (start, position)
            start = position
    column_values = {c: users[c].to_pylist() for c in columns}
    for row, user_id in enumerate(users[USER_ID].to_pylist()):
        user = str(user_id)
        begin, end = runs.get(user, (0, 0))
        items = event_items[begin:end]
        history = tuple(reversed(items[-history_length:])) if history_length else ()
        seen = tuple(dict.fromkeys(items))
        features = {c: _clean(column_values[c][row]) for c in columns}
        yield user, UserRecord(features=features, history=history, seen=seen)


class InProcessFeatureStore:
    """Every user's record in a dict, built from a dataset directory (no Redis)."""

    kind = "embedded"

    def __init__(self, records: dict[str, UserRecord], source: str = "") -> None:
        self._records = records
        self.source = source

    @classmethod
    def from_dataset(
        cls, data_dir: str | Path, columns: Sequence[str], history_length: int
    ) -> InProcessFeatureStore:
        started = time.perf_counter()
        records = dict(iter_user_records(data_dir, columns, history_length))
        logger.info(
            "embedded feature store: %d users from %s in %.2fs",
            len(records),
            data_dir,
            time.perf_counter() - started,
        )
        return cls(records, source=str(data_dir))

    def __len__(self) -> int:
        return len(self._records)

    async def get_user(self, user_id: str) -> UserRecord | None:
        return self._records.get(user_id)

    async def close(self) -> None:
        return None


class RedisFeatureStore:
    """Reads user records pushed by `push_features` (one GET per lookup).

    Args:
        link: the shared Redis link.
        prefix: key prefix (as the push's).
        schema: the model's query schema: when given, a record's stored features and
            history are checked as a query is (`service.query.normalize_query`), so a
            value the model cannot take is reported as the store's fault.
    """

    kind = "redis"

    def __init__(self, link: RedisLink, prefix: str, schema: QuerySchema | None = None) -> None:
        self.link = link
        self.prefix = prefix
        self.schema = schema
        self._logged_corrupt: set[str] = set()

    def _corrupt(self, key: str, reason: str) -> FeatureStoreCorruptError:
        if key not in self._logged_corrupt and len(self._logged_corrupt) < _MAX_LOGGED_CORRUPT_KEYS:
            self._logged_corrupt.add(key)
            logger.error("feature store record %r is corrupt: %s", key, reason)
        return FeatureStoreCorruptError(
            f"the feature store record {key!r} is corrupt ({reason}); push the user's "
            "features again (`retrieval features push`)"
        )

    def _check(self, key: str, record: UserRecord) -> None:
        """The stored features and history pass the query checks (else: corrupt)."""
        if self.schema is None:
            return
        raw = dict(record.features)
        if self.schema.history_name is not None:
            raw[self.schema.history_name] = list(record.history)
        try:
            normalize_query(raw, self.schema, field="features")
        except InvalidRequestError as exc:
            raise self._corrupt(key, exc.message) from None

    async def get_user(self, user_id: str) -> UserRecord | None:
        key = f"{self.prefix}{USER_KEY}{user_id}"
        try:
            raw = await self.link.call(lambda client: client.get(key))
        except RedisReplyError as exc:
            if exc.reply.startswith("WRONGTYPE"):
                raise self._corrupt(key, "the key holds another Redis type than a string") from None
            raise DependencyError(
                f"the feature store (Redis) refused to read {key!r} ({exc.reply[:120]})",
                retry_after_s=max(1, math.ceil(self.link.down_backoff_s)),
            ) from None
        except RedisUnavailableError as exc:
            raise DependencyError(
                "the feature store (Redis) is unavailable, so `user_id` queries cannot be "
                "answered right now; inline `query` requests still work",
                retry_after_s=max(1, math.ceil(self.link.down_backoff_s)),
            ) from exc
        if raw is None:
            return None
        try:
            record = UserRecord.from_json(raw)
        except CorruptRecordError as exc:
            raise self._corrupt(key, str(exc)) from None
        self._check(key, record)
        return record

    async def close(self) -> None:
        return None  # the link is closed by its owner


def push_features(
    client: Any,
    data_dir: str | Path,
    columns: Sequence[str],
    history_length: int,
    *,
    prefix: str = "retrieval:",
    model_version: str | None = None,
    chunk: int = PUSH_CHUNK,
) -> dict[str, Any]:
    """Write every user's record to Redis (sync client), then the meta key; returns the meta.

    Records are written in pipelines of `chunk` users; existing keys are overwritten.
    """
    started = time.perf_counter()
    count = 0
    pipe = client.pipeline(transaction=False)
    for user_id, record in iter_user_records(data_dir, columns, history_length):
        pipe.set(f"{prefix}{USER_KEY}{user_id}", record.to_json())
        count += 1
        if count % chunk == 0:
            pipe.execute()
            pipe = client.pipeline(transaction=False)
    pipe.execute()
    meta = {
        "data_dir": str(Path(data_dir).resolve()),
        "users": count,
        "columns": list(columns),
        "history_length": history_length,
        "context_splits": list(CONTEXT_SPLITS),
        "model_version": model_version,
        "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    client.set(f"{prefix}{META_KEY}", json.dumps(meta))
    return meta
