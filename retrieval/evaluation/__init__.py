"""Offline evaluation: one home for the split protocol, the metrics and the baselines.

- `retrieval.evaluation.protocol`: what a user's query, context and held-out set are for a
  target split (train is the context of valid; train + valid the context of test), and the
  cold-start variants.
- `retrieval.evaluation.metrics`: recall / hit rate / NDCG at K of the exact full-catalog
  top-K, and the overlap of two rankings. The ranking kernels themselves (exact top-K,
  popularity, dropping a user's context items from a candidate list) are `retrieval.ranking`,
  shared with the index job and the index store.
- `retrieval.evaluation.baselines`: popularity, EASE and ALS, each tuned on valid and
  refitted on the target split's context (`tune_then_refit`).

The training job's test table, `retrieval evaluate` and the benchmarks all call these.
"""

from retrieval.evaluation.metrics import (
    chunked_ranking_metrics,
    evaluate_retrieval,
    ranking_metrics,
    top_k_overlap,
)
from retrieval.evaluation.protocol import (
    CONTEXT_SPLITS,
    EvalQueries,
    build_eval_queries,
    context_interactions,
    context_item_counts,
    embed_in_batches,
    encode_users_in_encoder_order,
    evaluate_embeddings,
    history_feature_name,
    slice_batch,
    user_item_matrix,
)
from retrieval.ranking import ItemSets, slice_item_sets

__all__ = [
    "CONTEXT_SPLITS",
    "EvalQueries",
    "ItemSets",
    "build_eval_queries",
    "chunked_ranking_metrics",
    "context_interactions",
    "context_item_counts",
    "embed_in_batches",
    "encode_users_in_encoder_order",
    "evaluate_embeddings",
    "evaluate_retrieval",
    "history_feature_name",
    "ranking_metrics",
    "slice_batch",
    "slice_item_sets",
    "top_k_overlap",
    "user_item_matrix",
]
