"""Offline evaluation under the fixed split protocol.

For a target split S (valid or test), the *context* of a user is every interaction of an
earlier split (train for valid; train + valid for test). A user is evaluated when they have
at least one interaction in S. Their query is their user features plus the history at the
end of their context; candidates are the whole catalog minus their context items; the
held-out set is their items in S. This is also exactly what the service does online for
`{"user_id": ..., "exclude_seen": true}`, so offline and online numbers agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import torch

from retrieval.data.dataset import Dataset
from retrieval.encoders import FeatureEncoder
from retrieval.evaluation.metrics import ItemSets, evaluate_retrieval
from retrieval.features import ITEM_ID, SPLIT, SPLITS, USER_ID, FeatureKind

Batch = dict[str, torch.Tensor]

# The splits a split's queries see as context (their items are excluded from the ranking).
CONTEXT_SPLITS = {SPLITS[1]: SPLITS[:1], SPLITS[2]: SPLITS[:2]}  # valid: train; test: both


def history_feature_name(encoder: FeatureEncoder) -> str | None:
    """Name of the query tower's history feature, or None when the schema has none."""
    for spec in encoder.schema.query_features:
        if spec.kind == FeatureKind.HISTORY:
            return spec.name
    return None


def slice_batch(batch: Mapping[str, torch.Tensor], index: torch.Tensor | slice) -> Batch:
    """Rows `index` of every tensor of a batch."""
    return {name: tensor[index] for name, tensor in batch.items()}


@torch.inference_mode()
def embed_in_batches(
    embed: Callable[[Batch], torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    batch_size: int = 4096,
) -> torch.Tensor:
    """Run a tower over a large feature batch in slices of `batch_size` rows; `[N, D]`."""
    num_rows = len(next(iter(batch.values())))
    parts = [
        embed(slice_batch(batch, slice(start, start + batch_size)))
        for start in range(0, num_rows, batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@dataclass
class EvalQueries:
    """The users evaluated on one split, with everything needed to score them.

    Args:
        split: the target split ('valid' or 'test').
        user_rows: int64 `[U]` rows (in the encoder's users table) of the evaluated users.
        query_batch: the query tower's features for those users (history at end of context).
        held_out: per evaluated user, the item rows of their interactions in `split`.
        exclude: per evaluated user, the item rows of their context interactions.
    """

    split: str
    user_rows: npt.NDArray[np.int64]
    query_batch: Batch
    held_out: ItemSets
    exclude: ItemSets

    def __len__(self) -> int:
        return len(self.user_rows)


def build_eval_queries(
    encoder: FeatureEncoder,
    dataset: Dataset,
    split: str = "test",
    *,
    max_users: int = 0,
    seed: int = 0,
    user_features: Batch | None = None,
) -> EvalQueries:
    """Queries, held-out sets and exclusions for `split` (see the module docstring).

    Args:
        encoder: fitted encoder (its user/item rows index everything returned).
        dataset: the dataset (interactions with a `split` column, users).
        split: 'valid' or 'test'.
        max_users: evaluate a fixed random sample of this many users (0 = all).
        seed: seed of that sample.
        user_features: `encoder.encode_users(dataset.users)` reordered to the encoder's
            user rows, when the caller already has it (saves re-encoding).
    """
    if split not in CONTEXT_SPLITS:
        raise ValueError(f"`split` must be one of {sorted(CONTEXT_SPLITS)}; got {split!r}")
    if max_users < 0:
        raise ValueError(f"`max_users` must be >= 0; got {max_users}")
    interactions = dataset.interactions
    split_column = interactions[SPLIT]
    target_mask = pc.equal(split_column, split)
    context_mask = pc.is_in(split_column, value_set=pa.array(CONTEXT_SPLITS[split]))
    target = interactions.filter(target_mask)
    context = interactions.filter(context_mask)
    if target.num_rows == 0:
        raise ValueError(f"dataset {dataset.schema.name!r} has no {split!r} interactions")

    num_users = encoder.num_users
    target_users = encoder.user_index(target[USER_ID])
    user_rows = np.unique(target_users)
    if max_users and len(user_rows) > max_users:
        rng = np.random.default_rng(seed)
        user_rows = np.sort(rng.choice(user_rows, size=max_users, replace=False))
    position = np.full(num_users, -1, dtype=np.int64)
    position[user_rows] = np.arange(len(user_rows))

    def per_user(table: pa.Table, users: npt.NDArray[np.int64]) -> ItemSets:
        items = encoder.item_index(table[ITEM_ID]) if table.num_rows else np.zeros(0, np.int64)
        keep = position[users] >= 0
        return ItemSets.from_pairs(position[users[keep]], items[keep], num_queries=len(user_rows))

    held_out = per_user(target, target_users)
    context_users = (
        encoder.user_index(context[USER_ID]) if context.num_rows else np.zeros(0, np.int64)
    )
    exclude = per_user(context, context_users)

    if user_features is None:
        user_features = encode_users_in_encoder_order(encoder, dataset)
    rows = torch.from_numpy(user_rows)
    query_batch = slice_batch(user_features, rows)
    history_name = history_feature_name(encoder)
    if history_name is not None:
        histories = encoder.histories_at_end(context)  # (num_users, N)
        query_batch[history_name] = torch.from_numpy(histories[user_rows])
    return EvalQueries(
        split=split,
        user_rows=user_rows.astype(np.int64),
        query_batch=query_batch,
        held_out=held_out,
        exclude=exclude,
    )


def encode_users_in_encoder_order(encoder: FeatureEncoder, dataset: Dataset) -> Batch:
    """Encode the dataset's users table, rows reordered to the encoder's user rows."""
    users = dataset.users
    rows = encoder.user_index(users[USER_ID])
    if len(rows) != encoder.num_users or len(np.unique(rows)) != encoder.num_users:
        raise ValueError(
            f"dataset users ({users.num_rows}) do not match the encoder's users "
            f"({encoder.num_users})"
        )
    order = torch.from_numpy(np.argsort(rows, kind="stable"))
    return slice_batch(encoder.encode_users(users), order)


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


def evaluate_embeddings(
    queries: EvalQueries,
    query_emb: torch.Tensor,
    item_emb: torch.Tensor,
    ks: Sequence[int],
) -> dict[str, float | int]:
    """Exact full-catalog metrics of given embeddings on prepared queries."""
    start = time.perf_counter()
    metrics = evaluate_retrieval(query_emb, item_emb, queries.held_out, ks, queries.exclude)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def select_queries(queries: EvalQueries, keep: npt.NDArray[np.bool_]) -> EvalQueries:
    """The queries whose `keep` flag is set (same order), as a new `EvalQueries`."""
    positions = np.flatnonzero(keep)
    index = torch.from_numpy(positions)
    new_row = torch.full((len(queries),), -1, dtype=torch.int64)
    new_row[index] = torch.arange(len(positions))

    def rows(sets: ItemSets) -> ItemSets:
        owner = new_row[torch.repeat_interleave(torch.arange(sets.num_queries), sets.sizes())]
        kept = owner >= 0
        return ItemSets.from_pairs(owner[kept], sets.indices[kept], num_queries=len(positions))

    return EvalQueries(
        split=queries.split,
        user_rows=queries.user_rows[positions],
        query_batch=slice_batch(queries.query_batch, index),
        held_out=rows(queries.held_out),
        exclude=rows(queries.exclude),
    )


def cold_queries(
    queries: EvalQueries, encoder: FeatureEncoder, cold: Mapping[str, Any]
) -> EvalQueries:
    """The cold-start evaluation of a cold dataset (`retrieval.data.cold`) on prepared queries.

    - mode "items": the held-out set of each user keeps only cold items; users left with
      none are dropped. The ranking still covers the full catalog.
    - mode "users": only the cold users are kept (no context: no history, no exclusions).

    Raises:
        ValueError: `cold` is not a cold-start record, or no evaluated user is left.
    """
    mode = cold.get("mode")
    ids = [str(v) for v in cold.get("ids", [])]
    if mode == "items":
        cold_rows = torch.from_numpy(np.asarray(encoder.item_index(pa.array(ids)), np.int64))
        held = queries.held_out
        owner = torch.repeat_interleave(torch.arange(held.num_queries), held.sizes())
        is_cold = torch.isin(held.indices, cold_rows)
        cold_held = ItemSets.from_pairs(
            owner[is_cold], held.indices[is_cold], num_queries=held.num_queries
        )
        narrowed = EvalQueries(
            split=queries.split,
            user_rows=queries.user_rows,
            query_batch=queries.query_batch,
            held_out=cold_held,
            exclude=queries.exclude,
        )
        result = select_queries(narrowed, (cold_held.sizes() > 0).numpy())
    elif mode == "users":
        user_rows = np.asarray(encoder.user_index(pa.array(ids)), np.int64)
        result = select_queries(queries, np.isin(queries.user_rows, user_rows))
    else:
        raise ValueError(f"not a cold-start record (mode 'items' or 'users'): {dict(cold)!r}")
    if len(result) == 0:
        raise ValueError(f"no {queries.split} user has a cold {mode} interaction to score")
    return result
