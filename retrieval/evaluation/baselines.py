"""Non-neural baselines ranked under the same split protocol as the two-tower model.

Every baseline sees exactly what the model's query sees at evaluation time: the *context*
interactions of the target split (train for valid; train + valid for test, see
`retrieval.evaluation.protocol`), and ranks the full catalog minus each user's context items.

One protocol for every tunable baseline (`tune_then_refit`): each point of its grid is
fitted on train and scored on the valid split; the best point by valid recall@50 is refitted
on the target split's context (train + valid for test) and scored there. The trained model
follows the same protocol (`training.trainer`: epochs picked on valid, then refitted).

- **popularity**: every user gets the items ordered by their number of context interactions
  (ties: lower item row first; `retrieval.ranking.popularity_top_k`). Nothing to tune.
- **ease**: EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).
  With the binary user x item context matrix X and ``G = XᵀX + λI``::

      P = G⁻¹;   B = I - P diag(1 / diag P)   (so diag B = 0);   scores = X B

  It needs a dense ``N x N`` inverse: catalogs above `EASE_MAX_ITEMS` items are refused
  with `BaselineUnavailable` (at 25,000 items the float32 Gram matrix, its inverse and B
  take about 7.5 GB).
- **als**: implicit-feedback matrix factorisation (Hu, Koren & Volinsky, "Collaborative
  Filtering for Implicit Feedback Datasets", ICDM 2008) from the maintained `implicit`
  library (optional extra ``cf``: ``pip install 'two-tower-retrieval[cf]'``). With
  interaction counts r_ui, preference p_ui = 1[r_ui > 0] and confidence
  c_ui = 1 + alpha r_ui, ALS minimises::

      sum_{u,i} c_ui (p_ui - x_u^T y_i)^2 + lambda (sum_u |x_u|^2 + sum_i |y_i|^2)

  and scores s(u, i) = x_u^T y_i.

Example (popularity on a 3-item catalog; user 0 already saw item 1):
    >>> import torch
    >>> exclude = ItemSets.from_lists([[1], []])
    >>> popularity_top_k(torch.tensor([2, 9, 4]), exclude.num_queries, k=2, exclude=exclude)[1]
    tensor([[2, 0],
            [1, 2]])
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from retrieval.data.dataset import Dataset
from retrieval.encoders import FeatureEncoder
from retrieval.evaluation.metrics import chunked_ranking_metrics
from retrieval.evaluation.protocol import (
    CONTEXT_SPLITS,
    EvalQueries,
    context_item_counts,
    user_item_matrix,
)
from retrieval.ranking import ItemSets, exact_top_k, popularity_top_k, slice_item_sets

logger = logging.getLogger(__name__)

COLD_BASELINES = ("popularity", "random", "ease", "als")
# Why a collaborative baseline cannot score a cold-start evaluation (`retrieval.data.cold`).
NOT_FOR_COLD = {
    "items": "n/a: a cold item has no interaction to fit on, so it gets no factors or weights",
    "users": "n/a: a cold user has no interaction to score from",
}
TUNING_METRIC = "recall@50"
EASE_MAX_ITEMS = 25_000
IMPLICIT_MISSING = (
    "the `implicit` package is not installed (pip install 'two-tower-retrieval[cf]' "
    "or pip install 'implicit>=0.7')"
)


class BaselineUnavailable(RuntimeError):
    """A baseline cannot run here (its library is missing, the catalog is too large for it);
    the message says why."""


def implicit_available() -> bool:
    """Whether the optional `implicit` library (ALS) can be imported."""
    return importlib.util.find_spec("implicit") is not None


# --------------------------------------------------------------------------- ranking


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


def random_ranking(
    num_items: int, exclude: ItemSets, k: int, *, seed: int = 0, query_chunk_size: int = 64
) -> torch.Tensor:
    """`[Q, k]` uniformly random item rows per query (seeded), excluded items removed;
    ``-1`` pads when fewer than k items are left.

    >>> random_ranking(4, ItemSets.from_lists([[0, 1, 2]]), k=2).tolist()
    [[3, -1]]
    """
    generator = torch.Generator().manual_seed(seed)
    take = min(k, num_items)
    parts = []
    for start in range(0, exclude.num_queries, query_chunk_size):
        stop = min(start + query_chunk_size, exclude.num_queries)
        chunk = slice_item_sets(exclude, start, stop)
        scores = torch.rand(stop - start, num_items, generator=generator)  # (q, N)
        rows = torch.repeat_interleave(torch.arange(stop - start), chunk.sizes())
        scores[rows, chunk.indices] = -1.0  # below every random score
        values, ranking = torch.topk(scores, take, dim=1)  # (q, take)
        ranking = ranking.masked_fill(values < 0, -1)
        if take < k:
            ranking = torch.cat([ranking, torch.full((stop - start, k - take), -1)], dim=1)
        parts.append(ranking)
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.int64)


# --------------------------------------------------------------------------- EASE


def check_ease_size(num_items: int) -> None:
    """Raise `BaselineUnavailable` when EASE's dense N x N inverse is refused for this catalog."""
    if num_items > EASE_MAX_ITEMS:
        raise BaselineUnavailable(
            f"EASE needs a dense {num_items:,} x {num_items:,} inverse; catalogs above "
            f"{EASE_MAX_ITEMS:,} items are refused (EASE_MAX_ITEMS) to stay within memory"
        )


def fit_ease(matrix: Any, l2: float) -> npt.NDArray[np.float32]:
    """EASE item-item weights ``B [N, N]`` (zero diagonal) of a users x items matrix.

    The matrix is binarised (a repeated event counts once). Raises `BaselineUnavailable`
    above `EASE_MAX_ITEMS` items, before allocating anything of size N x N.

    >>> from scipy.sparse import csr_matrix
    >>> X = csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=np.float32))
    >>> fit_ease(X, l2=1.0).round(4) + 0.0  # + 0.0 turns -0.0 into 0.0
    array([[0. , 0.5, 0. ],
           [0.5, 0. , 0.5],
           [0. , 0.5, 0. ]], dtype=float32)
    """
    if not l2 > 0:
        raise ValueError(f"`l2` must be > 0; got {l2}")
    num_items = matrix.shape[1]
    check_ease_size(num_items)
    binary = (matrix.tocsr() > 0).astype(np.float64 if num_items <= 8192 else np.float32)
    gram = np.asarray((binary.T @ binary).todense())  # (N, N) co-occurrence counts
    gram[np.diag_indices(num_items)] += l2
    inverse = np.linalg.inv(gram)  # P
    weights = inverse / -np.diag(inverse)  # B = -P / diag(P) column-wise, i.e. I - P diag(1/dP)
    weights[np.diag_indices(num_items)] = 0.0
    return weights.astype(np.float32)


def ease_ranking(
    matrix: Any,
    weights: npt.NDArray[np.float32],
    user_rows: npt.NDArray[np.int64],
    exclude: ItemSets,
    k: int,
    *,
    query_chunk_size: int = 512,
) -> torch.Tensor:
    """`[Q, k]` top-k of ``X[user_rows] B`` (binary context rows times EASE weights)."""
    binary = (matrix.tocsr() > 0).astype(np.float32)
    items = torch.from_numpy(np.ascontiguousarray(weights.T))  # (N, N): row j = column j of B
    parts = []
    for start in range(0, len(user_rows), query_chunk_size):
        stop = min(start + query_chunk_size, len(user_rows))
        rows = torch.from_numpy(np.asarray(binary[user_rows[start:stop]].todense()))  # (q, N)
        _, ranking = exact_top_k(rows, items, k, slice_item_sets(exclude, start, stop))
        parts.append(ranking)
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.int64)


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
    """The ALS tuning grid: every combination is fitted once on train."""

    factors: tuple[int, ...] = (16, 32, 64, 128)
    regularization: tuple[float, ...] = (0.1, 1.0, 10.0)
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


def _implicit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("implicit")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- the protocol

# fit(context matrix, params) -> rank(queries, k) -> [Q, k] ranking
Ranker = Callable[[EvalQueries, int], torch.Tensor]
Fitter = Callable[[Any, Any], Ranker]


@dataclass
class BaselineResult:
    """A baseline's metrics on the target split and how its parameters were chosen."""

    name: str
    metrics: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    tuning: list[dict[str, Any]] = field(default_factory=list)
    fit_seconds: float = 0.0
    context: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.metrics, "context": self.context}
        if self.params:
            out["params"] = self.params
            out["tuned_on"] = "valid (fitted on train)"
            out["tuning_metric"] = f"valid {TUNING_METRIC}"
            out["tuning"] = self.tuning
        out["fit_seconds"] = self.fit_seconds
        if self.name == "als":
            out["library"] = f"implicit {_implicit_version()}"
        return out


def tune_then_refit(
    name: str,
    fit: Fitter,
    grid: Sequence[Any],
    encoder: FeatureEncoder,
    dataset: Dataset,
    queries: EvalQueries,
    ks: Sequence[int],
    *,
    valid_queries: EvalQueries,
) -> BaselineResult:
    """The protocol: every grid point fitted on train and scored on `valid_queries`; the best
    by valid recall@50 refitted on the context of `queries.split` and scored on `queries`.

    Args:
        name: the baseline's name (logs and the result).
        fit: ``fit(context matrix, params) -> rank`` with ``rank(queries, k) -> [Q, k]``.
        grid: parameter points (dataclasses); must not be empty.
        encoder: the encoder whose rows index everything.
        dataset: the dataset.
        queries: the target split's queries.
        ks: cut-offs reported on `queries`.
        valid_queries: the valid split's queries used for tuning (may be a user sample).
    """
    points = list(grid)
    if not points:
        raise ValueError(f"the {name} grid is empty")
    train_matrix = user_item_matrix(encoder, dataset, "valid")  # the valid context: train
    tuning: list[dict[str, Any]] = []
    best: tuple[float, Any] | None = None
    for params in points:
        start = time.perf_counter()
        rank = fit(train_matrix, params)
        seconds = time.perf_counter() - start
        ranking = rank(valid_queries, 50)
        value = float(chunked_ranking_metrics(ranking, valid_queries.held_out, [50])[TUNING_METRIC])
        tuning.append({**asdict(params), f"valid_{TUNING_METRIC}": value, "fit_seconds": seconds})
        logger.info("%s %s: valid %s %.4f (%.1fs)", name, params, TUNING_METRIC, value, seconds)
        if best is None or value > best[0]:
            best = (value, params)
    assert best is not None
    chosen = best[1]
    context_matrix = user_item_matrix(encoder, dataset, queries.split)
    start = time.perf_counter()
    rank = fit(context_matrix, chosen)
    fit_seconds = time.perf_counter() - start
    metrics = chunked_ranking_metrics(rank(queries, max(ks)), queries.held_out, ks)
    return BaselineResult(
        name=name,
        metrics=dict(metrics),
        params=asdict(chosen),
        tuning=tuning,
        fit_seconds=fit_seconds,
        context="+".join(CONTEXT_SPLITS[queries.split]),
    )


@dataclass(frozen=True)
class EASEParams:
    """EASE's one hyper-parameter."""

    l2: float = 500.0  # lambda on the diagonal of the Gram matrix


@dataclass(frozen=True)
class BaselineGrids:
    """The grids `evaluate_baselines` tunes on (ALS: `ALSGrid`; EASE: lambda values)."""

    als: ALSGrid = ALSGrid()
    ease_l2: tuple[float, ...] = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)


def _fit_ease(matrix: Any, params: EASEParams) -> Ranker:
    weights = fit_ease(matrix, params.l2)

    def rank(queries: EvalQueries, k: int) -> torch.Tensor:
        return ease_ranking(matrix, weights, queries.user_rows, queries.exclude, k)

    return rank


def _fit_als(seed: int) -> Fitter:
    def fit(matrix: Any, params: ALSParams) -> Ranker:
        user_factors, item_factors = fit_als(matrix, params, seed=seed)

        def rank(queries: EvalQueries, k: int) -> torch.Tensor:
            return factor_ranking(user_factors[queries.user_rows], item_factors, queries.exclude, k)

        return rank

    return fit


def evaluate_popularity(
    encoder: FeatureEncoder, dataset: Dataset, queries: EvalQueries, ks: Sequence[int]
) -> BaselineResult:
    """Popularity by context counts (train + valid for test) on prepared queries."""
    start = time.perf_counter()
    counts = context_item_counts(encoder, dataset, queries.split)
    _, ranking = popularity_top_k(counts, queries.exclude.num_queries, max(ks), queries.exclude)
    return BaselineResult(
        name="popularity",
        metrics=dict(chunked_ranking_metrics(ranking, queries.held_out, ks)),
        fit_seconds=time.perf_counter() - start,
        context="+".join(CONTEXT_SPLITS[queries.split]),
    )


def evaluate_random(
    encoder: FeatureEncoder, queries: EvalQueries, ks: Sequence[int], *, seed: int = 0
) -> BaselineResult:
    """Uniformly random rankings (context items excluded): the floor of every table."""
    start = time.perf_counter()
    ranking = random_ranking(encoder.num_items, queries.exclude, max(ks), seed=seed)
    return BaselineResult(
        name="random",
        metrics=dict(chunked_ranking_metrics(ranking, queries.held_out, ks)),
        fit_seconds=time.perf_counter() - start,
        context="none",
    )


def evaluate_baseline(
    name: str,
    encoder: FeatureEncoder,
    dataset: Dataset,
    queries: EvalQueries,
    ks: Sequence[int],
    *,
    valid_queries: EvalQueries,
    grids: BaselineGrids = BaselineGrids(),
    seed: int = 0,
) -> BaselineResult:
    """One baseline by name ('popularity', 'ease', 'als' or 'random') under the protocol.

    Raises:
        BaselineUnavailable: the baseline cannot run here (the message says why).
    """
    if name == "popularity":
        return evaluate_popularity(encoder, dataset, queries, ks)
    if name == "random":
        return evaluate_random(encoder, queries, ks, seed=seed)
    if name == "ease":
        check_ease_size(encoder.num_items)
        points = [EASEParams(l2) for l2 in grids.ease_l2]
        return tune_then_refit(
            "ease", _fit_ease, points, encoder, dataset, queries, ks, valid_queries=valid_queries
        )
    if name == "als":
        if not implicit_available():
            raise BaselineUnavailable(IMPLICIT_MISSING)
        return tune_then_refit(
            "als",
            _fit_als(seed),
            grids.als.points(),
            encoder,
            dataset,
            queries,
            ks,
            valid_queries=valid_queries,
        )
    raise ValueError(f"baseline must be one of {list(COLD_BASELINES)}; got {name!r}")


def evaluate_baselines(
    names: Sequence[str],
    encoder: FeatureEncoder,
    dataset: Dataset,
    queries: EvalQueries,
    ks: Sequence[int],
    *,
    valid_queries: EvalQueries,
    grids: BaselineGrids = BaselineGrids(),
    seed: int = 0,
    cold: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Each named baseline's `BaselineResult.to_dict()`, or ``{"skipped": reason}`` when it
    cannot run here. What `retrieval train`'s test table and `retrieval evaluate` both call.

    With `cold` ("items" or "users", a cold-start evaluation), EASE and ALS are reported as
    not applicable (`NOT_FOR_COLD`) and "random" may be named."""
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        start = time.perf_counter()
        if cold is not None and name in ("ease", "als"):
            results[name] = {"skipped": NOT_FOR_COLD[cold]}
            continue
        try:
            result = evaluate_baseline(
                name,
                encoder,
                dataset,
                queries,
                ks,
                valid_queries=valid_queries,
                grids=grids,
                seed=seed,
            )
            results[name] = {**result.to_dict(), "seconds": time.perf_counter() - start}
        except BaselineUnavailable as exc:
            logger.warning("baseline %s skipped: %s", name, exc)
            results[name] = {"skipped": str(exc)}
    return results
