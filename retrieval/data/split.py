"""The fixed split protocol every reported number uses.

Per user, interactions are sorted by timestamp (stable: ties keep their input order).
Of a user's n interactions the first floor(0.8 n) are `train`, the next ones up to
floor(0.9 n) are `valid`, the rest `test`. Users with fewer than `MIN_INTERACTIONS_TO_SPLIT`
(3) interactions go to train only: they have too little history to hold anything out.

Example (one user with 10 interactions, one with 2):
    >>> import numpy as np
    >>> users = np.array([0] * 10 + [1] * 2)
    >>> codes = split_codes_for_sorted(users)
    >>> [SPLIT_NAMES[c] for c in codes[:10]]
    ['train', 'train', 'train', 'train', 'train', 'train', 'train', 'train', 'valid', 'test']
    >>> [SPLIT_NAMES[c] for c in codes[10:]]
    ['train', 'train']
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from retrieval.features import SPLITS

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = SPLITS  # code c is SPLIT_NAMES[c] (the names themselves live in features.py)
MIN_INTERACTIONS_TO_SPLIT = 3
TRAIN_FRACTION = 0.8
VALID_END_FRACTION = 0.9


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, valid, test) counts for a user with `n` interactions.

    >>> split_sizes(10), split_sizes(3), split_sizes(2), split_sizes(19)
    ((8, 1, 1), (2, 0, 1), (2, 0, 0), (15, 2, 2))
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0; got {n}")
    if n < MIN_INTERACTIONS_TO_SPLIT:
        return n, 0, 0
    n_train = (n * 8) // 10  # floor(0.8 n), exact in integers
    n_valid_end = (n * 9) // 10  # floor(0.9 n)
    return n_train, n_valid_end - n_train, n - n_valid_end


def order_by_user_then_time(
    user_index: npt.ArrayLike, timestamp: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """Permutation sorting rows by (user, timestamp), stable for ties."""
    users = np.asarray(user_index)
    times = np.asarray(timestamp)
    if users.shape != times.shape or users.ndim != 1:
        raise ValueError(
            f"`user_index` and `timestamp` must be 1-d of one length; got {users.shape}, {times.shape}"
        )
    return np.lexsort((np.arange(len(users)), times, users)).astype(np.int64)


def split_codes_for_sorted(user_index_sorted: npt.ArrayLike) -> npt.NDArray[np.int8]:
    """Split code (TRAIN/VALID/TEST) per row, for rows already sorted by (user, time).

    Rows of one user must be contiguous. Vectorised: O(rows).
    """
    users = np.asarray(user_index_sorted)
    n_rows = len(users)
    codes = np.zeros(n_rows, dtype=np.int8)
    if n_rows == 0:
        return codes
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, n_rows])
    if len(np.unique(users[starts])) != len(starts):
        raise ValueError("rows of each user must be contiguous (sort by user, then timestamp)")
    position = np.arange(n_rows) - np.repeat(starts, counts)  # rank within the user
    n = np.repeat(counts, counts)
    train_end = (n * 8) // 10
    valid_end = (n * 9) // 10
    splittable = n >= MIN_INTERACTIONS_TO_SPLIT
    codes[splittable & (position >= train_end)] = VALID
    codes[splittable & (position >= valid_end)] = TEST
    return codes
