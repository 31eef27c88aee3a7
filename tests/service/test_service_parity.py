"""Online == offline: for every test user of the tiny dataset, `user_id` + `exclude_seen`
through the service (Flat index) gives the recall of retrieval.evaluation's exact evaluation,
and never returns one of the user's train/valid items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from fastapi.testclient import TestClient

from retrieval.bundle import load_bundle
from retrieval.data.dataset import load_dataset
from retrieval.evaluation import build_eval_queries, embed_in_batches, evaluate_embeddings
from retrieval.evaluation.metrics import ranking_metrics
from service.app import create_app
from service.settings import ServiceSettings

KS = (5, 10, 20)


def test_service_recall_equals_offline_exact_recall(
    tiny_bundle: Path, tiny_index: Path, tiny_dataset: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    encoder = bundle.encoder
    dataset = load_dataset(tiny_dataset)
    queries = build_eval_queries(encoder, dataset, "test")
    with torch.inference_mode():
        query_emb = embed_in_batches(bundle.model.embed_queries, queries.query_batch)
        item_emb = embed_in_batches(bundle.model.embed_items, encoder.encode_items(dataset.items))
    offline = evaluate_embeddings(queries, query_emb, item_emb, KS)

    user_ids = encoder.user_ids.take(pa.array(queries.user_rows)).to_pylist()
    settings = ServiceSettings(
        model_dir=tiny_bundle, index_root=tiny_index, data_dir=tiny_dataset, max_batch_queries=64
    )
    with TestClient(create_app(settings)) as client:
        results = []
        for start in range(0, len(user_ids), 64):
            batch = [
                {"user_id": user, "k": max(KS), "exclude_seen": True}
                for user in user_ids[start : start + 64]
            ]
            response = client.post("/v1/retrieve/batch", json={"queries": batch})
            assert response.status_code == 200
            results.extend(response.json()["results"])
    assert len(results) == len(user_ids) == len(queries)

    ranking = np.full((len(results), max(KS)), -1, dtype=np.int64)
    for row, result in enumerate(results):
        assert len(result["ids"]) == max(KS)  # k results despite the exclusions
        ranking[row] = encoder.item_index(result["ids"])
        bounds = queries.exclude.indptr[row : row + 2].tolist()
        seen = set(queries.exclude.indices[bounds[0] : bounds[1]].tolist())  # train+valid rows
        assert not seen & set(ranking[row].tolist()), f"user {user_ids[row]} got a seen item"
    online = ranking_metrics(torch.from_numpy(ranking), queries.held_out, KS)
    for k in KS:
        assert abs(online[f"recall@{k}"] - offline[f"recall@{k}"]) <= 0.005, (k, online, offline)
    assert offline["recall@20"] > 0.2  # the model learned something: the check is not vacuous
