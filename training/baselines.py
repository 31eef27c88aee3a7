"""Non-neural baselines ranked under the same split protocol as the two-tower model.

Both baselines see exactly what the model's query sees at evaluation time: the *context*
interactions of the target split (train for valid; train + valid for test, see
`retrieval.evaluation`), and rank the full catalog minus each user's context items.

- **popularity**: every user gets the items ordered by their number of context interactions
  (ties: lower item row first).
- **als**: implicit-feedback matrix factorisation (Hu, Koren & Volinsky, "Collaborative
  Filtering for Implicit Feedback Datasets", ICDM 2008) from the maintained `implicit`
  library (optional extra ``cf``: ``pip install 'two-tower-retrieval[cf]'``). With
  interaction counts r_ui, preference p_ui = 1[r_ui > 0] and confidence
  c_ui = 1 + alpha r_ui, ALS minimises::

      sum_{u,i} c_ui (p_ui - x_u^T y_i)^2 + lambda (sum_u |x_u|^2 + sum_i |y_i|^2)

  and scores s(u, i) = x_u^T y_i. It is tuned lightly on the valid split (a small grid over
  factors, lambda and alpha, fitted on train, picked by valid recall@50); for the test split
  the chosen parameters are refitted on train + valid (the test context).

Example (popularity on a 3-item catalog; user 0 already saw item 1):
    >>> import torch
    >>> from retrieval.metrics import ItemSets
    >>> popularity_ranking(torch.tensor([2, 9, 4]), ItemSets.from_lists([[1], []]), k=2)
    tensor([[2, 0],
            [1, 2]])
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch

from retrieval.data.dataset import Dataset
from retrieval.encoders import FeatureEncoder
from retrieval.evaluation import CONTEXT_SPLITS, EvalQueries
from retrieval.features import ITEM_ID, SPLIT, USER_ID
from retrieval.metrics import ItemSets, exact_top_k, ranking_metrics

logger = logging.getLogger(__name__)

BASELINES = ("popularity", "als")
TUNING_METRIC = "recall@50"
IMPLICIT_MISSING = (
    "the `implicit` package is not installed (pip install 'two-tower-retrieval[cf]' "
    "or pip install 'implicit>=0.7')"
)


class BaselineUnavailable(RuntimeError):
    """A baseline cannot run here (e.g. its library is missing); the message says why."""


def implicit_available() -> bool:
    """Whether the optional `implicit` library (ALS) can be imported."""
    return importlib.util.find_spec("implicit") is not None


# --------------------------------------------------------------------------- context data


def context_interactions(dataset: Dataset, split: str) -> pa.Table:
    """The interactions a user has before `split` (train for valid; train + valid for test)."""
    if split not in CONTEXT_SPLITS:
        raise ValueError(f"`split` must be one of {sorted(CONTEXT_SPLITS)}; got {split!r}")
    interactions = dataset.interactions
    mask = pc.is_in(interactions[SPLIT], value_set=pa.array(CONTEXT_SPLITS[split]))
    return interactions.filter(mask)


def context_item_counts(encoder: FeatureEncoder, dataset: Dataset, split: str) -> torch.Tensor:
    """`[num_items]` context interactions per item row (the popularity baseline's scores)."""
    context = context_interactions(dataset, split)
    rows = encoder.item_index(context[ITEM_ID]) if context.num_rows else np.zeros(0, np.int64)
    return torch.from_numpy(np.bincount(rows, minlength=encoder.num_items).astype(np.int64))


def user_item_matrix(encoder: FeatureEncoder, dataset: Dataset, split: str) -> Any:
    """Sparse `[num_users, num_items]` CSR matrix of context interaction counts (float32)."""
    from scipy.sparse import csr_matrix

    context = context_interactions(dataset, split)
    users = encoder.user_index(context[USER_ID]) if context.num_rows else np.zeros(0, np.int64)
    items = encoder.item_index(context[ITEM_ID]) if context.num_rows else np.zeros(0, np.int64)
    matrix = csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)),
        shape=(encoder.num_users, encoder.num_items),
    )
    matrix.sum_duplicates()  # repeated (user, item) events become counts
    return matrix


# --------------------------------------------------------------------------- ranking


def slice_item_sets(sets: ItemSets, start: int, stop: int) -> ItemSets:
    """Rows `[start, stop)` of an `ItemSets`, as a new `ItemSets`."""
    offset = sets.indptr[start]
    return ItemSets(
        sets.indptr[start : stop + 1] - offset, sets.indices[offset : sets.indptr[stop]]
    )


def chunked_ranking_metrics(
    ranking: torch.Tensor, held_out: ItemSets, ks: Sequence[int], *, chunk_size: int = 8192
) -> dict[str, float | int]:
    """Same result as `retrieval.metrics.ranking_metrics` (up to float summation order),
    computed `chunk_size` queries at a time.

    >>> import torch
    >>> from retrieval.metrics import ranking_metrics
    >>> ranking = torch.tensor([[3, 1], [0, 2], [2, 0]])
    >>> held = ItemSets.from_lists([[1, 2], [4], []])
    >>> chunked_ranking_metrics(ranking, held, [2], chunk_size=1) == ranking_metrics(ranking, held, [2])
    True
    """
    num_queries = ranking.shape[0]
    totals: dict[str, float] = {}
    num_users = 0
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        held = slice_item_sets(held_out, start, stop)
        if not bool((held.sizes() > 0).any()):
            continue
        part = ranking_metrics(ranking[start:stop], held, ks)
        users = int(part["num_users"])
        num_users += users
        for key, value in part.items():
            if "@" in key:
                totals[key] = totals.get(key, 0.0) + float(value) * users
    if num_users == 0:
        raise ValueError("`held_out` has no user with held-out items; nothing to evaluate")
    result: dict[str, float | int] = {key: total / num_users for key, total in totals.items()}
    result["num_users"] = num_users
    result["num_users_skipped"] = num_queries - num_users
    return result


def popularity_ranking(
    item_counts: torch.Tensor, exclude: ItemSets, k: int, *, query_chunk_size: int = 1024
) -> torch.Tensor:
    """`[Q, k]` item rows by descending count (ties: lower row first), each query's
    excluded items removed: the same ranking as `retrieval.metrics.popularity_top_k`.

    Every query shares one order, so it is sorted once; a chunk of queries takes its first
    ``k + (most excluded items of a query in the chunk)`` entries and drops the excluded
    ones, which costs O(Q (k + e)) instead of scoring the catalog for every query.
    """
    from training.evaluate import drop_excluded

    counts = torch.as_tensor(item_counts)
    if counts.dim() != 1 or bool((counts < 0).any()):
        raise ValueError("`item_counts` must be a 1-d tensor of non-negative counts")
    order = torch.sort(counts, descending=True, stable=True).indices  # (N,)
    num_queries = exclude.num_queries
    parts = []
    for start in range(0, num_queries, query_chunk_size):
        stop = min(start + query_chunk_size, num_queries)
        chunk = slice_item_sets(exclude, start, stop)
        sizes = chunk.sizes()
        fetch = min(len(order), k + (int(sizes.max()) if len(sizes) else 0))
        candidates = order[:fetch].expand(stop - start, fetch)  # (q, fetch)
        parts.append(drop_excluded(candidates, chunk, k))
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.int64)


def factor_ranking(
    user_factors: npt.NDArray[np.floating[Any]],
    item_factors: npt.NDArray[np.floating[Any]],
    exclude: ItemSets,
    k: int,
) -> torch.Tensor:
    """`[Q, k]` exact top-k of `user_factors @ item_factors.T`, excluded items removed."""
    _, ranking = exact_top_k(
        torch.from_numpy(np.ascontiguousarray(user_factors, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(item_factors, dtype=np.float32)),
        k,
        exclude,
        query_chunk_size=512,
        item_chunk_size=65536,  # wide blocks: fewer top-k merges on big catalogs
    )
    return ranking


def evaluate_popularity_baseline(
    encoder: FeatureEncoder, dataset: Dataset, queries: EvalQueries, ks: Sequence[int]
) -> dict[str, Any]:
    """Popularity by context counts on prepared queries; metrics plus timing."""
    start = time.perf_counter()
    counts = context_item_counts(encoder, dataset, queries.split)
    ranking = popularity_ranking(counts, queries.exclude, max(ks))
    metrics: dict[str, Any] = dict(chunked_ranking_metrics(ranking, queries.held_out, ks))
    metrics["counts"] = "+".join(CONTEXT_SPLITS[queries.split])
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


# --------------------------------------------------------------------------- ALS


@dataclass(frozen=True)
class ALSParams:
    """Hyper-parameters of implicit ALS (Hu, Koren & Volinsky 2008)."""

    factors: int = 64  # latent dimension f of x_u, y_i
    regularization: float = 0.05  # lambda, L2 weight on both factor matrices
    alpha: float = 10.0  # confidence slope: c_ui = 1 + alpha * r_ui
    iterations: int = 15  # alternating sweeps

    def __post_init__(self) -> None:
        if self.factors < 1:
            raise ValueError(f"`factors` must be >= 1; got {self.factors}")
        if self.regularization < 0:
            raise ValueError(f"`regularization` must be >= 0; got {self.regularization}")
        if self.alpha <= 0:
            raise ValueError(f"`alpha` must be > 0; got {self.alpha}")
        if self.iterations < 1:
            raise ValueError(f"`iterations` must be >= 1; got {self.iterations}")

    def label(self) -> str:
        return f"f={self.factors}, reg={self.regularization:g}, alpha={self.alpha:g}"


@dataclass(frozen=True)
class ALSGrid:
    """The small tuning grid: every combination is fitted once on train."""

    factors: tuple[int, ...] = (32, 64, 128)
    regularization: tuple[float, ...] = (0.01, 0.1)
    alpha: tuple[float, ...] = (1.0, 10.0)
    iterations: int = 15

    def points(self) -> list[ALSParams]:
        return [
            ALSParams(f, r, a, self.iterations)
            for f, r, a in itertools.product(self.factors, self.regularization, self.alpha)
        ]


def fit_als(
    matrix: Any, params: ALSParams, *, seed: int = 0, num_threads: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Fit implicit's CPU ALS on a users x items count matrix.

    Args:
        matrix: scipy CSR `[num_users, num_items]` interaction counts r_ui.
        params: the hyper-parameters.
        seed: factor initialisation seed.
        num_threads: implicit's threads (0 = all cores).

    Returns:
        ``(user_factors [num_users, f], item_factors [num_items, f])`` float32.

    Raises:
        BaselineUnavailable: `implicit` is not installed.
    """
    if not implicit_available():
        raise BaselineUnavailable(IMPLICIT_MISSING)
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit parallelises over users itself and warns (once, when the model is built) if a
    # multi-threaded BLAS runs underneath, which slows it down: build and fit single-BLAS.
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=seed,
            num_threads=num_threads,
        )
        model.fit(matrix.tocsr().astype(np.float32), show_progress=False)
    return (
        np.asarray(model.user_factors, dtype=np.float32),
        np.asarray(model.item_factors, dtype=np.float32),
    )


@dataclass
class ALSResult:
    """ALS metrics on the target split plus how its parameters were chosen."""

    params: ALSParams
    metrics: dict[str, Any]
    tuning: list[dict[str, Any]]
    fit_seconds: float
    tuned_on: str

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "params": asdict(self.params),
            "tuned_on": self.tuned_on,
            "tuning_metric": f"valid {TUNING_METRIC}",
            "tuning": self.tuning,
            "fit_seconds": self.fit_seconds,
            "library": f"implicit {_implicit_version()}",
        }


def _implicit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("implicit")
    except PackageNotFoundError:
        return "unknown"


def _als_metrics(
    matrix: Any, params: ALSParams, queries: EvalQueries, ks: Sequence[int], seed: int
) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    user_factors, item_factors = fit_als(matrix, params, seed=seed)
    fit_seconds = time.perf_counter() - start
    ranking = factor_ranking(
        user_factors[queries.user_rows], item_factors, queries.exclude, max(ks)
    )
    return dict(chunked_ranking_metrics(ranking, queries.held_out, ks)), fit_seconds


def tune_and_evaluate_als(
    encoder: FeatureEncoder,
    dataset: Dataset,
    queries: EvalQueries,
    ks: Sequence[int],
    *,
    valid_queries: EvalQueries,
    grid: ALSGrid | Iterable[ALSParams] = ALSGrid(),
    seed: int = 0,
) -> ALSResult:
    """Pick ALS parameters by valid recall@50 (fitted on train), then evaluate on `queries`.

    The chosen parameters are then refitted on the context of `queries.split` (train +
    valid for test; train again for valid, which is then tuned on the split it is scored
    on) and scored on all of `queries`.

    Args:
        encoder: the model bundle's encoder (its rows index everything).
        dataset: the dataset.
        queries: the target split's queries (held-out sets and exclusions).
        ks: cut-offs reported on `queries`.
        valid_queries: the valid split's queries used for tuning (may be a user sample).
        grid: an `ALSGrid`, or explicit parameter points.
        seed: factor initialisation seed (the same for every fit).
    """
    if not implicit_available():
        raise BaselineUnavailable(IMPLICIT_MISSING)
    points = grid.points() if isinstance(grid, ALSGrid) else list(grid)
    if not points:
        raise ValueError("the ALS grid is empty")
    train_matrix = user_item_matrix(encoder, dataset, "valid")  # the valid context: train
    tuning: list[dict[str, Any]] = []
    best: tuple[float, ALSParams] | None = None
    for params in points:
        tune_metrics, seconds = _als_metrics(train_matrix, params, valid_queries, [50], seed)
        value = float(tune_metrics[TUNING_METRIC])
        tuning.append({**asdict(params), f"valid_{TUNING_METRIC}": value, "fit_seconds": seconds})
        logger.info("ALS %s: valid %s %.4f (%.1fs)", params.label(), TUNING_METRIC, value, seconds)
        if best is None or value > best[0]:
            best = (value, params)
    assert best is not None
    chosen = best[1]
    # Refit with the chosen parameters on the target split's context (train + valid for test).
    context_matrix = user_item_matrix(encoder, dataset, queries.split)
    metrics, fit_seconds = _als_metrics(context_matrix, chosen, queries, ks, seed)
    return ALSResult(
        params=chosen,
        metrics=metrics,
        tuning=tuning,
        fit_seconds=fit_seconds,
        tuned_on="valid (fitted on train)",
    )
