"""Full-catalog retrieval metrics: exact top-K by chunked scoring, then recall, hit rate and
NDCG at K against each user's held-out items.

Every user is ranked against the whole catalog (no sampled candidates), with the items the
user already interacted with in train (``exclude``) removed from the ranking.

Ordering is total and deterministic: by score descending, ties broken by the lower item
row first, exactly as a stable descending sort of the full score row would give. When
fewer than k items are available to a query (k > N, or exclusions), the tail is padded
with index ``-1`` and score ``-inf``. Excluded items are never returned.

Example (2 users, 4 items; user 0 already saw item 0; user 1's held-out set is empty):
    >>> import torch
    >>> items = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    >>> users = torch.tensor([[1.0], [1.0]])
    >>> scores, ranking = exact_top_k(users, items, k=2, exclude=[[0], []])
    >>> ranking
    tensor([[1, 2],
            [0, 1]])
    >>> held_out = ItemSets.from_lists([[2, 3], []])
    >>> ranking_metrics(ranking, held_out, ks=[1, 2])
    {'recall@1': 0.0, 'hit_rate@1': 0.0, 'ndcg@1': 0.0, 'recall@2': 0.5, 'hit_rate@2': 1.0, 'ndcg@2': 0.38685280723454163, 'num_users': 1, 'num_users_skipped': 1}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = [
    "ItemSets",
    "chunked_ranking_metrics",
    "drop_excluded",
    "evaluate_retrieval",
    "exact_top_k",
    "hit_rate_at_k",
    "ndcg_at_k",
    "popularity_top_k",
    "ranking_metrics",
    "recall_at_k",
    "slice_item_sets",
    "top_k_overlap",
]

DEFAULT_QUERY_CHUNK_SIZE = 512
DEFAULT_ITEM_CHUNK_SIZE = 65536


class ItemSets:
    """One set of item rows per query (user), stored CSR-style.

    Row q's items are ``indices[indptr[q]:indptr[q + 1]]``. The constructor normalises each
    row to sorted unique items, so sizes count distinct items.

    Args:
        indptr: ``[Q + 1]`` non-decreasing offsets starting at 0.
        indices: ``[nnz]`` item rows (>= 0), ``nnz == indptr[-1]``.

    >>> sets = ItemSets.from_lists([[5, 1, 5], [], [2]])
    >>> sets.indptr.tolist(), sets.indices.tolist(), sets.sizes().tolist()
    ([0, 2, 2, 3], [1, 5, 2], [2, 0, 1])
    >>> ItemSets.from_pairs([2, 0, 2], [7, 3, 7], num_queries=3).row(2).tolist()
    [7]
    """

    def __init__(self, indptr: npt.ArrayLike | Tensor, indices: npt.ArrayLike | Tensor) -> None:
        indptr_t = _as_int64(indptr)
        indices_t = _as_int64(indices).reshape(-1)
        if indptr_t.dim() != 1 or len(indptr_t) == 0 or int(indptr_t[0]) != 0:
            raise ValueError("`indptr` must be 1-d of length num_queries + 1, starting at 0")
        if bool((indptr_t[1:] < indptr_t[:-1]).any()):
            raise ValueError("`indptr` must be non-decreasing")
        if int(indptr_t[-1]) != len(indices_t):
            raise ValueError(
                f"`indptr[-1]` ({int(indptr_t[-1])}) must equal len(`indices`) ({len(indices_t)})"
            )
        if len(indices_t) and int(indices_t.min()) < 0:
            raise ValueError(f"`indices` must be item rows >= 0; got {int(indices_t.min())}")
        num_queries = len(indptr_t) - 1
        rows = torch.repeat_interleave(torch.arange(num_queries), indptr_t.diff())
        self.indptr, self.indices = _canonical_csr(rows, indices_t, num_queries)

    @classmethod
    def from_lists(cls, rows: Sequence[npt.ArrayLike | Tensor]) -> ItemSets:
        """One array (or list) of item rows per query."""
        arrays = [_as_int64(row).numpy().reshape(-1) for row in rows]
        indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(a) for a in arrays])
        indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(indptr, indices)

    @classmethod
    def from_pairs(
        cls,
        query_rows: npt.ArrayLike | Tensor,
        item_rows: npt.ArrayLike | Tensor,
        num_queries: int,
    ) -> ItemSets:
        """From parallel arrays of (query row, item row) pairs, e.g. interactions."""
        queries = _as_int64(query_rows).reshape(-1)
        items = _as_int64(item_rows).reshape(-1)
        if queries.shape != items.shape:
            raise ValueError(
                f"`query_rows` and `item_rows` must have one length; got {len(queries)}, {len(items)}"
            )
        if len(queries) and (int(queries.min()) < 0 or int(queries.max()) >= num_queries):
            raise ValueError(f"`query_rows` must be in [0, {num_queries})")
        counts = torch.bincount(queries, minlength=num_queries)
        order = torch.argsort(queries, stable=True)
        indptr = torch.zeros(num_queries + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        return cls(indptr, items[order])

    @property
    def num_queries(self) -> int:
        return len(self.indptr) - 1

    def sizes(self) -> Tensor:
        """``[Q]`` number of distinct items per query."""
        return self.indptr.diff()

    def row(self, query: int) -> Tensor:
        """Sorted item rows of one query."""
        return self.indices[int(self.indptr[query]) : int(self.indptr[query + 1])]

    def __len__(self) -> int:
        return self.num_queries

    def __repr__(self) -> str:
        return f"ItemSets(num_queries={self.num_queries}, nnz={len(self.indices)})"


def _as_int64(values: npt.ArrayLike | Tensor) -> Tensor:
    """An int64 CPU tensor from a tensor (any device), array or list."""
    if isinstance(values, Tensor):
        return values.detach().cpu().to(torch.int64)
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def _canonical_csr(rows: Tensor, items: Tensor, num_queries: int) -> tuple[Tensor, Tensor]:
    """Sorted, de-duplicated (row, item) pairs as (indptr, indices)."""
    if len(items) == 0:
        return torch.zeros(num_queries + 1, dtype=torch.int64), items
    stride = int(items.max()) + 1
    keys = torch.unique(rows * stride + items)  # sorted by (row, item), duplicates removed
    rows, items = keys // stride, keys % stride
    indptr = torch.zeros(num_queries + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=num_queries), 0)
    return indptr, items


ItemSetsLike = ItemSets | Sequence[npt.ArrayLike | Tensor]


def _as_item_sets(name: str, sets: ItemSetsLike, num_queries: int) -> ItemSets:
    item_sets = sets if isinstance(sets, ItemSets) else ItemSets.from_lists(sets)
    if item_sets.num_queries != num_queries:
        raise ValueError(
            f"`{name}` must have one row per query ({num_queries}); got {item_sets.num_queries}"
        )
    return item_sets


@torch.no_grad()
def exact_top_k(
    query_emb: Tensor,
    item_emb: Tensor,
    k: int,
    exclude: ItemSetsLike | None = None,
    *,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    item_chunk_size: int = DEFAULT_ITEM_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Exact top-k items per query by inner product, over the full catalog.

    Scores are computed block by block (`query_chunk_size` x `item_chunk_size`, which bounds
    memory) and merged into a running top-k per query. The result equals a stable
    descending sort of each full score row (ties: lower item row first).

    Args:
        query_emb: ``[Q, D]`` finite query embeddings.
        item_emb: ``[N, D]`` finite item embeddings (row = item row).
        k: number of items per query, >= 1; may exceed N (then padded).
        exclude: per-query item rows never returned (e.g. the user's train items), as
            `ItemSets` or one array per query.
        query_chunk_size: queries scored per block.
        item_chunk_size: items scored per block.

    Returns:
        ``(scores [Q, k], indices [Q, k])``; unavailable slots hold ``-inf`` and ``-1``.
    """
    if query_emb.dim() != 2 or item_emb.dim() != 2 or query_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            "`query_emb` [Q, D] and `item_emb` [N, D] must be 2-d with one D; got "
            f"{tuple(query_emb.shape)} and {tuple(item_emb.shape)}"
        )
    for name, emb in (("query_emb", query_emb), ("item_emb", item_emb)):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"`{name}` must be finite (found NaN or inf)")
    item_emb = item_emb.to(query_emb.device, query_emb.dtype)

    def score_block(q0: int, q1: int, i0: int, i1: int) -> Tensor:
        return query_emb[q0:q1] @ item_emb[i0:i1].T  # (q, n)

    return _chunked_top_k(
        score_block,
        num_queries=query_emb.shape[0],
        num_items=item_emb.shape[0],
        k=k,
        exclude=exclude,
        query_chunk_size=query_chunk_size,
        item_chunk_size=item_chunk_size,
        dtype=query_emb.dtype,
        device=query_emb.device,
    )


@torch.no_grad()
def popularity_top_k(
    item_counts: Tensor,
    num_queries: int,
    k: int,
    exclude: ItemSetsLike | None = None,
    *,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Popularity baseline: every query scores item j by its train count; the same
    exclusion, tie-breaking (lower row first) and padding as `exact_top_k`.

    The order is global, so it is sorted once; each query then walks the first
    ``k + max |exclude|`` items of it: O(N log N + Q (k + max |exclude|)), no Q x N scores.

    Args:
        item_counts: ``[N]`` non-negative train interaction counts per item row.
        num_queries: Q, the number of rankings to produce.
        k, exclude, query_chunk_size: as in `exact_top_k`.

    Returns:
        ``(scores [Q, k], indices [Q, k])`` with the counts as scores (float64).

    >>> popularity_top_k(torch.tensor([5, 9, 5, 1]), num_queries=2, k=3, exclude=[[1], []])[1]
    tensor([[0, 2, 3],
            [1, 0, 2]])
    """
    counts = torch.as_tensor(item_counts).to(torch.float64)
    if counts.dim() != 1:
        raise ValueError(f"`item_counts` must be 1-d; got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("`item_counts` must be finite and non-negative")
    if num_queries < 0:
        raise ValueError(f"`num_queries` must be >= 0; got {num_queries}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1; got {k!r}")
    if query_chunk_size < 1:
        raise ValueError(f"`query_chunk_size` must be >= 1; got {query_chunk_size}")
    num_items = len(counts)
    excluded = None if exclude is None else _as_item_sets("exclude", exclude, num_queries)
    if excluded is not None and len(excluded.indices) and int(excluded.indices.max()) >= num_items:
        raise ValueError(
            f"`exclude` holds item row {int(excluded.indices.max())}; the catalog has {num_items}"
        )
    # Every query ranks the same global order (count desc, lower row first); a query loses
    # at most its own exclusions, so the first k + max|exclude| items always suffice.
    order = torch.sort(counts, descending=True, stable=True).indices  # (N,)
    max_excluded = int(excluded.sizes().max()) if excluded is not None and num_queries else 0
    num_candidates = min(num_items, k + max_excluded)
    candidates = order[:num_candidates]  # (M,)
    position = torch.full((num_items,), -1, dtype=torch.int64)
    position[candidates] = torch.arange(num_candidates)
    all_scores = torch.full((num_queries, k), float("-inf"), dtype=torch.float64)
    all_indices = torch.full((num_queries, k), -1, dtype=torch.int64)
    for q0 in range(0, num_queries, query_chunk_size):
        q1 = min(q0 + query_chunk_size, num_queries)
        keep = torch.ones((q1 - q0, num_candidates), dtype=torch.bool)  # (q, M)
        if excluded is not None:
            start, end = int(excluded.indptr[q0]), int(excluded.indptr[q1])
            ex_pos = position[excluded.indices[start:end]]  # (e,)
            ex_rows = torch.repeat_interleave(torch.arange(q1 - q0), excluded.sizes()[q0:q1])
            hit = ex_pos >= 0
            keep[ex_rows[hit], ex_pos[hit]] = False
        rank = keep.cumsum(dim=1)  # (q, M): 1-based rank among the kept candidates
        rows, cols = (keep & (rank <= k)).nonzero(as_tuple=True)
        slots = rank[rows, cols] - 1
        all_indices[q0 + rows, slots] = candidates[cols]
        all_scores[q0 + rows, slots] = counts[candidates[cols]]
    return all_scores, all_indices


def _chunked_top_k(
    score_block: Callable[[int, int, int, int], Tensor],
    *,
    num_queries: int,
    num_items: int,
    k: int,
    exclude: ItemSetsLike | None,
    query_chunk_size: int,
    item_chunk_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Shared engine: `score_block(q0, q1, i0, i1)` returns a fresh ``[q1-q0, i1-i0]`` block."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1; got {k!r}")
    if query_chunk_size < 1:
        raise ValueError(f"`query_chunk_size` must be >= 1; got {query_chunk_size}")
    if item_chunk_size < 1:
        raise ValueError(f"`item_chunk_size` must be >= 1; got {item_chunk_size}")
    excluded = None if exclude is None else _as_item_sets("exclude", exclude, num_queries)
    if excluded is not None and len(excluded.indices) and int(excluded.indices.max()) >= num_items:
        raise ValueError(
            f"`exclude` holds item row {int(excluded.indices.max())}; the catalog has {num_items}"
        )

    all_scores = torch.full((num_queries, k), float("-inf"), dtype=dtype, device=device)
    all_indices = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    for q0 in range(0, num_queries, query_chunk_size):
        q1 = min(q0 + query_chunk_size, num_queries)
        if excluded is not None:
            start, end = int(excluded.indptr[q0]), int(excluded.indptr[q1])
            ex_cols = excluded.indices[start:end].to(device)  # (e,)
            ex_rows = torch.repeat_interleave(torch.arange(q1 - q0), excluded.sizes()[q0:q1]).to(
                device
            )  # (e,), row within the query chunk
        best_scores = all_scores[q0:q1]  # (q, k): -inf / -1 until filled
        best_indices = all_indices[q0:q1]
        for i0 in range(0, num_items, item_chunk_size):
            i1 = min(i0 + item_chunk_size, num_items)
            block = score_block(q0, q1, i0, i1)  # (q, n)
            if excluded is not None:
                inside = (ex_cols >= i0) & (ex_cols < i1)
                block[ex_rows[inside], ex_cols[inside] - i0] = float("-inf")
            block_scores, block_indices = _ordered_top_k(block, min(k, i1 - i0))  # (q, k')
            # Running entries come from earlier chunks (lower rows), so among equal scores the
            # concatenation is already in row order; a stable sort keeps it.
            merged_scores = torch.cat([best_scores, block_scores], dim=1)
            merged_indices = torch.cat([best_indices, block_indices + i0], dim=1)
            order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
            best_scores = merged_scores.gather(1, order)
            best_indices = merged_indices.gather(1, order)
        best_indices = best_indices.masked_fill(torch.isneginf(best_scores), -1)
        all_scores[q0:q1] = best_scores
        all_indices[q0:q1] = best_indices
    return all_scores, all_indices


def _ordered_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``[q, n]`` (k <= n) ordered by (score desc, column asc).

    `torch.topk` leaves the choice among equal scores unspecified, so only its k-th value is
    used: keep everything above it, then the lowest-column entries equal to it.
    """
    kth = torch.topk(scores, k, dim=1).values[:, -1:]  # (q, 1)
    keep = scores >= kth  # (q, n)
    overfull = keep.sum(dim=1) > k  # rows with ties at the k-th value
    if bool(overfull.any()):
        sub, sub_kth = scores[overfull], kth[overfull]
        above = sub > sub_kth
        tied = sub == sub_kth
        needed = k - above.sum(dim=1, keepdim=True)
        keep[overfull] = above | (tied & (tied.cumsum(dim=1) <= needed))
    columns = keep.nonzero()[:, 1].view(scores.shape[0], k)  # (q, k), ascending columns
    values = scores.gather(1, columns)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


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
    held = _as_item_sets("held_out", held_out, ranking.shape[0])
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
        query_chunk_size, item_chunk_size: as in `exact_top_k`.
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


def slice_item_sets(sets: ItemSets, start: int, stop: int) -> ItemSets:
    """Rows `[start, stop)` of an `ItemSets`, as a new `ItemSets`."""
    offset = sets.indptr[start]
    return ItemSets(
        sets.indptr[start : stop + 1] - offset, sets.indices[offset : sets.indptr[stop]]
    )


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


def drop_excluded(candidates: Tensor, exclude: ItemSets, k: int) -> Tensor:
    """Keep, per row, the first `k` candidates that are not excluded (and not ``-1``).

    Args:
        candidates: ``[q, m]`` int64 item rows, best first, ``-1`` padded (an ANN answer).
        exclude: `ItemSets` with q rows.
        k: columns of the result.

    Returns:
        ``[q, k]`` int64, ``-1`` padded when fewer than k candidates survive.

    >>> drop_excluded(torch.tensor([[4, 2, 7, -1], [1, 0, 3, 5]]), ItemSets.from_lists([[2], [9]]), 3)
    tensor([[ 4,  7, -1],
            [ 1,  0,  3]])
    """
    candidates = torch.as_tensor(candidates, dtype=torch.int64)
    num_rows, width = candidates.shape
    valid = candidates >= 0  # (q, m)
    if len(exclude.indices):
        stride = max(int(candidates.max()), int(exclude.indices.max())) + 1
        excluded_rows = torch.repeat_interleave(torch.arange(num_rows), exclude.sizes())
        excluded_keys = excluded_rows * stride + exclude.indices  # (e,)
        keys = torch.arange(num_rows)[:, None] * stride + candidates  # (q, m)
        valid &= ~torch.isin(keys, excluded_keys)
    position = valid.cumsum(dim=1) - 1  # (q, m): slot of each surviving candidate
    keep = valid & (position < k)
    out = torch.full((num_rows, k), -1, dtype=torch.int64)
    rows = torch.arange(num_rows)[:, None].expand(num_rows, width)
    out[rows[keep], position[keep]] = candidates[keep]
    return out


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
