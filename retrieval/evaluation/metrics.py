"""Full-catalog retrieval metrics: recall, hit rate and NDCG at K of each user's exact
top-K (`retrieval.ranking.exact_top_k`) against their held-out items.

Every user is ranked against the whole catalog (no sampled candidates), with the items the
user already interacted with in train (``exclude``) removed from the ranking; the ordering,
tie-breaking (lower item row first) and ``-1`` padding are `retrieval.ranking`'s.

Example (2 users, 4 items; user 0 already saw item 0; user 1's held-out set is empty):
    >>> import torch
    >>> from retrieval.ranking import exact_top_k
    >>> items = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    >>> users = torch.tensor([[1.0], [1.0]])
    >>> scores, ranking = exact_top_k(users, items, k=2, exclude=[[0], []])
    >>> held_out = ItemSets.from_lists([[2, 3], []])
    >>> ranking_metrics(ranking, held_out, ks=[1, 2])
    {'recall@1': 0.0, 'hit_rate@1': 0.0, 'ndcg@1': 0.0, 'recall@2': 0.5, 'hit_rate@2': 1.0, 'ndcg@2': 0.38685280723454163, 'num_users': 1, 'num_users_skipped': 1}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retrieval.ranking import (
    DEFAULT_ITEM_CHUNK_SIZE,
    DEFAULT_QUERY_CHUNK_SIZE,
    ItemSets,
    ItemSetsLike,
    as_item_sets,
    exact_top_k,
    slice_item_sets,
)

__all__ = [
    "ItemSets",  # the per-user item sets these metrics take (defined in `retrieval.ranking`)
    "chunked_ranking_metrics",
    "evaluate_retrieval",
    "hit_rate_at_k",
    "ndcg_at_k",
    "ranking_metrics",
    "recall_at_k",
    "top_k_overlap",
]


def _relevance(ranking: Tensor, held_out: ItemSets) -> Tensor:
    """``[Q, K]`` bool: is ranking[q, j] one of query q's held-out items."""
    num_queries = ranking.shape[0]
    if ranking.numel() == 0 or len(held_out.indices) == 0:
        return torch.zeros(ranking.shape, dtype=torch.bool)
    stride = max(int(ranking.max()), int(held_out.indices.max())) + 1
    held_rows = torch.repeat_interleave(torch.arange(num_queries), held_out.sizes())
    held_keys = held_rows * stride + held_out.indices  # (nnz,)
    ranked_keys = torch.arange(num_queries)[:, None] * stride + ranking  # (Q, K)
    return torch.isin(ranked_keys, held_keys) & (ranking >= 0)


def _check_ranking(ranking: Tensor) -> Tensor:
    ranking = torch.as_tensor(ranking).cpu()
    if ranking.dim() != 2 or ranking.dtype != torch.int64:
        raise ValueError(
            f"`ranking` must be a 2-d int64 [Q, K] tensor; got {ranking.dtype} {tuple(ranking.shape)}"
        )
    if ranking.numel() and int(ranking.min()) < -1:
        raise ValueError("`ranking` entries must be item rows >= 0, or -1 for padding")
    ordered = torch.sort(ranking, dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError("`ranking` rows must not repeat an item")
    return ranking


def ranking_metrics(
    ranking: Tensor, held_out: ItemSetsLike, ks: Sequence[int]
) -> dict[str, float | int]:
    """Recall, hit rate and NDCG at every K in `ks`, in one pass over the ranking.

    For a user u with held-out set H_u (distinct items) and top-K list R_u (first K
    columns of `ranking`, ``-1`` entries never relevant)::

        recall@K   = |R_u ∩ H_u| / |H_u|
        hit_rate@K = 1 if |R_u ∩ H_u| > 0 else 0
        ndcg@K     = sum_{j < K, R_u[j] in H_u} 1 / log2(j + 2)
                     / sum_{j < min(|H_u|, K)} 1 / log2(j + 2)      (binary relevance)

    Each is averaged over users with a non-empty H_u; the others are skipped and counted.

    Args:
        ranking: ``[Q, K_max]`` int64 item rows, best first, no repeats; ``-1`` pads.
        held_out: per-user held-out item rows (`ItemSets` or one array per user).
        ks: cut-offs, each in [1, K_max].

    Returns:
        ``{"recall@K": ..., "hit_rate@K": ..., "ndcg@K": ... for each K,
        "num_users": users evaluated, "num_users_skipped": users without held-out items}``.
    """
    ranking = _check_ranking(ranking)
    held = as_item_sets("held_out", held_out, ranking.shape[0])
    ks = list(ks)
    if not ks:
        raise ValueError("`ks` must name at least one cut-off")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ranking.shape[1]:
            raise ValueError(f"`ks` entries must be ints in [1, {ranking.shape[1]}]; got {k!r}")
    sizes = held.sizes()  # (Q,)
    evaluated = sizes > 0
    num_users = int(evaluated.sum())
    if num_users == 0:
        raise ValueError("`held_out` has no user with held-out items; nothing to evaluate")

    relevant = _relevance(ranking, held)[evaluated].to(torch.float64)  # (U, K_max)
    sizes = sizes[evaluated].to(torch.float64)  # (U,)
    discounts = 1.0 / torch.log2(torch.arange(ranking.shape[1], dtype=torch.float64) + 2.0)
    hits_at = relevant.cumsum(dim=1)  # (U, K_max): hits within the first j + 1
    dcg_at = (relevant * discounts).cumsum(dim=1)  # (U, K_max)
    ideal_at = discounts.cumsum(dim=0)  # (K_max,): IDCG with j + 1 relevant items
    result: dict[str, float | int] = {}
    for k in ks:
        hits = hits_at[:, k - 1]
        ideal = ideal_at[(sizes.clamp(max=k) - 1).long()]
        result[f"recall@{k}"] = float((hits / sizes).mean())
        result[f"hit_rate@{k}"] = float((hits > 0).to(torch.float64).mean())
        result[f"ndcg@{k}"] = float((dcg_at[:, k - 1] / ideal).mean())
    result["num_users"] = num_users
    result["num_users_skipped"] = ranking.shape[0] - num_users
    return result


def recall_at_k(ranking: Tensor, held_out: ItemSetsLike, k: int) -> float:
    """Mean ``|top-k ∩ held-out| / |held-out|`` over users with held-out items.

    >>> recall_at_k(torch.tensor([[3, 1], [0, 2]]), [[1, 2], [4]], k=2)
    0.25
    """
    return float(ranking_metrics(ranking, held_out, [k])[f"recall@{k}"])


def hit_rate_at_k(ranking: Tensor, held_out: ItemSetsLike, k: int) -> float:
    """Fraction of users with held-out items who have at least one in their top-k.

    >>> hit_rate_at_k(torch.tensor([[3, 1], [0, 2]]), [[1, 2], [4]], k=2)
    0.5
    """
    return float(ranking_metrics(ranking, held_out, [k])[f"hit_rate@{k}"])


def ndcg_at_k(ranking: Tensor, held_out: ItemSetsLike, k: int) -> float:
    """Mean binary-relevance NDCG@k (ideal DCG over min(|held-out|, k) items).

    >>> round(ndcg_at_k(torch.tensor([[3, 1], [0, 2]]), [[1, 2], [4]], k=2), 6)  # (1/log2(3)) / (1 + 1/log2(3)) / 2
    0.193426
    """
    return float(ranking_metrics(ranking, held_out, [k])[f"ndcg@{k}"])


def evaluate_retrieval(
    query_emb: Tensor,
    item_emb: Tensor,
    held_out: ItemSetsLike,
    ks: Sequence[int],
    exclude: ItemSetsLike | None = None,
    *,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    item_chunk_size: int = DEFAULT_ITEM_CHUNK_SIZE,
) -> dict[str, float | int]:
    """Exact full-catalog top-max(ks) retrieval, then `ranking_metrics` at every K.

    Args:
        query_emb: ``[Q, D]`` one row per evaluated user.
        item_emb: ``[N, D]`` the whole catalog.
        held_out: per-user held-out item rows (valid or test interactions).
        ks: cut-offs.
        exclude: per-user item rows removed from the ranking (normally train items).
        query_chunk_size, item_chunk_size: as in `retrieval.ranking.exact_top_k`.
    """
    ks = list(ks)
    if not ks:
        raise ValueError("`ks` must name at least one cut-off")
    _, ranking = exact_top_k(
        query_emb,
        item_emb,
        max(ks),
        exclude,
        query_chunk_size=query_chunk_size,
        item_chunk_size=item_chunk_size,
    )
    return ranking_metrics(ranking.cpu(), held_out, ks)


def chunked_ranking_metrics(
    ranking: torch.Tensor, held_out: ItemSets, ks: Sequence[int], *, chunk_size: int = 8192
) -> dict[str, float | int]:
    """Same result as `retrieval.evaluation.metrics.ranking_metrics` (up to float summation order),
    computed `chunk_size` queries at a time.

    >>> import torch
    >>> from retrieval.evaluation.metrics import ranking_metrics
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


def top_k_overlap(
    ranking: Tensor, reference: Tensor, ks: Sequence[int], *, chunk_size: int = 4096
) -> dict[str, float]:
    """Mean ``|ranking[:, :K] ∩ reference[:, :K]| / |reference[:, :K]|`` per K: the usual
    "ANN recall" of an index against exact search (``-1`` padding ignored; queries whose
    reference row is empty are left out). Works `chunk_size` queries at a time.

    >>> import torch
    >>> top_k_overlap(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 3, 4]]), [1, 3])
    {'overlap@1': 1.0, 'overlap@3': 0.6666666666666666}
    """
    sums = dict.fromkeys(ks, 0.0)
    counts = dict.fromkeys(ks, 0)
    for start in range(0, ranking.shape[0], chunk_size):
        ours_all = ranking[start : start + chunk_size]
        ref_all = reference[start : start + chunk_size]
        rows = torch.arange(len(ours_all))[:, None]  # (q, 1)
        stride = max(int(ours_all.max()), int(ref_all.max()), 0) + 1
        for k in ks:
            ours, ref = ours_all[:, :k], ref_all[:, :k]
            ref_keys = (rows * stride + ref)[ref >= 0]  # (n,) one key per (query, item)
            found = torch.isin(rows * stride + ours, ref_keys) & (ours >= 0)  # (q, k)
            sizes = (ref >= 0).sum(dim=1)  # (q,)
            has = sizes > 0
            share = found.sum(dim=1)[has].to(torch.float64) / sizes[has].to(torch.float64)
            sums[k] += float(share.sum())
            counts[k] += int(has.sum())
    return {f"overlap@{k}": sums[k] / counts[k] if counts[k] else 1.0 for k in ks}
