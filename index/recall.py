"""ANN recall against exact search: the check the index job records in every manifest.

`index.factory.measure_recall` uses it to tune search parameters and to gate a build
(`index.build`); the manifest's `recall` section records the figure.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def recall_against_exact(
    ann_rows: npt.ArrayLike,
    ann_true_scores: npt.ArrayLike,
    exact_scores: npt.ArrayLike,
    num_items: int,
    *,
    tolerance: float = 1e-5,
) -> float:
    """Mean ANN recall@k against exact search, counting ties at the k-th score as hits.

    An ANN result is a hit when its exact score is at least the exact k-th score (minus
    `tolerance`): items above the k-th score are exactly the exact top-k, and items tied
    with it are interchangeable, so duplicated embeddings cannot lower the figure. The
    denominator is min(k, num_items).

    Args:
        ann_rows: int `[Q, k]` rows returned by the ANN index (-1 = empty slot, a miss).
        ann_true_scores: `[Q, k]` exact inner products of those rows with the query.
        exact_scores: `[Q, k]` exact top-k scores, descending.
        num_items: catalog size N.
        tolerance: slack for float rounding between the two score computations.

    >>> recall_against_exact([[0, 2]], [[0.9, 0.5]], [[0.9, 0.7]], num_items=3)
    0.5
    >>> recall_against_exact([[0, -1]], [[0.9, 0.0]], [[0.9, 0.7]], num_items=3)
    0.5
    """
    rows = np.asarray(ann_rows)
    true_scores = np.asarray(ann_true_scores, dtype=np.float64)
    exact = np.asarray(exact_scores, dtype=np.float64)
    if rows.shape != true_scores.shape or rows.shape[0] != exact.shape[0] or rows.ndim != 2:
        raise ValueError(
            f"`ann_rows`, `ann_true_scores` [Q, k] and `exact_scores` [Q, k'] disagree: "
            f"{rows.shape}, {true_scores.shape}, {exact.shape}"
        )
    k = min(exact.shape[1], num_items)
    if rows.shape[0] == 0 or k == 0:
        return float("nan")
    kth = exact[:, k - 1 : k]  # (Q, 1)
    hits = (rows[:, :k] >= 0) & (true_scores[:, :k] >= kth - tolerance)
    return float(hits.sum(axis=1).mean() / k)
