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

from retrieval.data.dataset import load_dataset
from retrieval.features import ITEM_ID, SPLIT, USER_ID
from service.errors import DependencyError
from service.redis_link import RedisLink, RedisUnavailableError

logger = logging.getLogger(__name__)

CONTEXT_SPLITS = ("train", "valid")  # what a served user's query may see (not 'test')
USER_KEY = "user:"
META_KEY = "features:meta"
PUSH_CHUNK = 1000  # users per Redis pipeline round trip


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
        data = json.loads(text)
        return cls(
            features=dict(data["features"]),
            history=tuple(data["history"]),
            seen=tuple(data["seen"]),
        )


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
    """Reads user records pushed by `push_features` (one GET per lookup)."""

    kind = "redis"

    def __init__(self, link: RedisLink, prefix: str) -> None:
        self.link = link
        self.prefix = prefix

    async def get_user(self, user_id: str) -> UserRecord | None:
        key = f"{self.prefix}{USER_KEY}{user_id}"
        try:
            raw = await self.link.call(lambda client: client.get(key))
        except RedisUnavailableError as exc:
            raise DependencyError(
                "the feature store (Redis) is unavailable, so `user_id` queries cannot be "
                "answered right now; inline `query` requests still work",
                retry_after_s=max(1, math.ceil(self.link.down_backoff_s)),
            ) from exc
        if raw is None:
            return None
        return UserRecord.from_json(raw)

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
