"""Cold-start datasets: where two towers can score what matrix factorisation cannot.

Usage::

    retrieval data cold items --data data/ml-100k --out data/ml-100k-cold-items
    retrieval data cold users --data data/ml-100k --out data/ml-100k-cold-users --quantile 0.9

Both modes take a time cutoff ``T``: the `quantile` of all interaction timestamps (by
default 0.5 for items and 0.8 for users: on ml-100k, 216 cold items with 471 test
interactions of 176 users, and 192 cold users with 17,048 interactions), or an explicit
`cutoff` timestamp.

- **items**: an item whose first interaction comes after ``T`` is *cold*. Every train and
  valid interaction of a cold item is dropped, so no model or baseline ever trains on it;
  its test interactions stay. The evaluation (`retrieval evaluate --cold items`) ranks the
  full catalog for the test users and counts only cold items as held out: the item tower
  scores a cold item from its content features (its id is out of vocabulary).
- **users**: a user whose first interaction comes after ``T`` is *cold*. All of a cold
  user's interactions become test interactions, so the user has no history and an
  out-of-vocabulary id: the query tower scores them from their features alone
  (`retrieval evaluate --cold users` evaluates those users only).

The written dataset keeps every other row and split unchanged and records the cold ids and
the cutoff in its schema stats (``cold``); `retrieval.data.dataset.validate_dataset` then
checks that no cold id appears in train or valid. A cutoff that leaves fewer than
`min_cold` cold ids, or fewer than `min_users` users with a cold test interaction, is
refused with a message naming the counts.

Example (items 'c' and 'd' first appear after the cutoff 25):
    >>> import pyarrow as pa
    >>> events = pa.table({
    ...     "user_id": ["u"] * 4, "item_id": ["a", "b", "c", "d"],
    ...     "timestamp": pa.array([10, 20, 30, 40], pa.int64()),
    ...     "split": ["train", "train", "train", "test"]})
    >>> cold_ids(events, "items", cutoff=25)
    ['c', 'd']
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.data.dataset import COLD_STATS_KEY, Dataset, load_dataset, write_dataset
from retrieval.features import ITEM_ID, SPLIT, TIMESTAMP, USER_ID

logger = logging.getLogger(__name__)

ColdMode = Literal["items", "users"]
COLD_MODES = ("items", "users")
DEFAULT_QUANTILE = {"items": 0.5, "users": 0.8}
DEFAULT_MIN_COLD = 10
DEFAULT_MIN_USERS = 10


class ColdSplitError(ValueError):
    """The cutoff leaves too few cold ids or evaluated users (the message gives the counts)."""


def cutoff_timestamp(interactions: pa.Table, quantile: float) -> int:
    """The `quantile` of all interaction timestamps (lower interpolation, an actual value)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"`quantile` must be in (0, 1); got {quantile}")
    times = interactions.column(TIMESTAMP).to_numpy()
    return int(np.quantile(times, quantile, method="lower"))


def cold_ids(interactions: pa.Table, mode: ColdMode, cutoff: int) -> list[str]:
    """Sorted ids (items or users, by `mode`) whose first interaction is after `cutoff`."""
    if mode not in COLD_MODES:
        raise ValueError(f"`mode` must be one of {list(COLD_MODES)}; got {mode!r}")
    column = ITEM_ID if mode == "items" else USER_ID
    first = interactions.group_by(column).aggregate([(TIMESTAMP, "min")])
    late = first.filter(pc.greater(first.column(f"{TIMESTAMP}_min"), cutoff))
    return sorted(str(v) for v in late.column(column).to_pylist())


def make_cold_dataset(
    dataset: Dataset | str | Path,
    out_dir: str | Path,
    mode: ColdMode,
    *,
    quantile: float | None = None,
    cutoff: int | None = None,
    min_cold: int = DEFAULT_MIN_COLD,
    min_users: int = DEFAULT_MIN_USERS,
    overwrite: bool = False,
) -> Dataset:
    """Write the cold-start variant of `dataset` to `out_dir` (see the module docstring).

    Args:
        dataset: a dataset or its directory (a regular one, not already cold).
        out_dir: the dataset directory to write (atomically).
        mode: "items" or "users".
        quantile: the cutoff as a quantile of interaction timestamps (ignored with `cutoff`;
            None: `DEFAULT_QUANTILE` of the mode).
        cutoff: an explicit cutoff timestamp.
        min_cold: fewest cold ids accepted.
        min_users: fewest users with a cold test interaction (items) or cold users with a
            test interaction (users) accepted.
        overwrite: replace an existing `out_dir`.

    Raises:
        ColdSplitError: too few cold ids or users for the cutoff.
    """
    if mode not in COLD_MODES:
        raise ValueError(f"`mode` must be one of {list(COLD_MODES)}; got {mode!r}")
    if not isinstance(dataset, Dataset):
        dataset = load_dataset(dataset)
    if COLD_STATS_KEY in dataset.schema.stats:
        raise ValueError(f"{dataset.path}: already a cold-start dataset; start from a regular one")
    events = dataset.interactions
    if quantile is None:
        quantile = DEFAULT_QUANTILE[mode]
    threshold = cutoff if cutoff is not None else cutoff_timestamp(events, quantile)
    ids = cold_ids(events, mode, threshold)
    what = f"quantile {quantile:g}" if cutoff is None else "the given cutoff"
    if len(ids) < min_cold:
        raise ColdSplitError(
            f"cutoff {threshold} ({what}) leaves {len(ids)} cold {mode}; at least {min_cold} "
            "are needed: choose an earlier cutoff (a lower --quantile)"
        )
    value_set = pa.array(ids, pa.string())
    column = ITEM_ID if mode == "items" else USER_ID
    is_cold = pc.is_in(events.column(column), value_set=value_set)
    if mode == "items":
        # Drop every train/valid event of a cold item; its test events are what is scored.
        in_test = pc.equal(events.column(SPLIT), "test")
        keep = pc.or_(pc.invert(is_cold), in_test)
        out_events = events.filter(keep)
        scored = out_events.filter(pc.is_in(out_events.column(ITEM_ID), value_set=value_set))
    else:
        # Every event of a cold user becomes a test event: no history, no trained id.
        split = pc.if_else(is_cold, "test", events.column(SPLIT))
        out_events = events.set_column(events.schema.get_field_index(SPLIT), SPLIT, split)
        scored = out_events.filter(is_cold)
    num_users = len(pc.unique(scored.column(USER_ID)))
    if num_users < min_users:
        raise ColdSplitError(
            f"cutoff {threshold} ({what}): {len(ids)} cold {mode}, but only {num_users} users "
            f"with a cold test interaction; at least {min_users} are needed: choose an "
            "earlier cutoff (a lower --quantile)"
        )
    cold: dict[str, Any] = {
        "mode": mode,
        "cutoff_timestamp": threshold,
        "quantile": None if cutoff is not None else quantile,
        "ids": ids,
        "scored_interactions": scored.num_rows,
        "scored_users": num_users,
        "dropped_interactions": events.num_rows - out_events.num_rows,
    }
    schema = dataclasses.replace(
        dataset.schema,
        name=f"{dataset.schema.name}-cold-{mode}",
        stats={**dataset.schema.stats, COLD_STATS_KEY: cold},
    )
    logger.info(
        "cold %s: %d ids after %d; %d test events of %d users scored; %d events dropped",
        mode,
        len(ids),
        threshold,
        scored.num_rows,
        num_users,
        cold["dropped_interactions"],
    )
    return write_dataset(
        out_dir, dataset.users, dataset.items, out_events, schema, overwrite=overwrite
    )


def cold_spec(dataset: Dataset) -> dict[str, Any] | None:
    """The cold-start record of a dataset (mode, cutoff, ids), or None for a regular one."""
    cold = dataset.schema.stats.get(COLD_STATS_KEY)
    return dict(cold) if isinstance(cold, dict) else None
