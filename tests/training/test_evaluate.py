"""`retrieval evaluate` on the tiny dataset and bundle: the CLI table and JSON, agreement
with the trainer's own test evaluation, the popularity baseline against a plain reference,
and the ANN path through a real Flat FAISS index."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch

from retrieval.bundle import load_bundle
from retrieval.cli import main
from retrieval.data.dataset import load_dataset
from retrieval.evaluation import baselines
from retrieval.features import ITEM_ID, SPLIT, USER_ID
from retrieval.index_store import CURRENT_FILE, write_index_version
from retrieval.ranking import ItemSets
from training.evaluate import (
    ann_ranking,
    evaluate_bundle,
    format_report,
    resolve_ks,
)

KS = (5, 10, 20, 50)


@pytest.fixture(scope="module")
def exact_report(tiny_bundle: Path, tiny_dataset: Path) -> dict:
    return evaluate_bundle(
        tiny_bundle, tiny_dataset, ks=KS, baselines=("popularity",), progress=False
    )


def test_cli_prints_table_and_writes_json(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(tiny_bundle), "--data", str(tiny_dataset)]
    args += ["--k", "5,10,20,1000", "--json", str(out), "--no-progress"]
    args += ["--baselines", "popularity,ease,als", "--als-factors", "8", "--als-regularization"]
    args += ["0.1", "--als-alpha", "1,10", "--als-iterations", "5", "--ease-l2", "10,100"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert report["split"] == "test" and report["ks"] == [5, 10, 20]
    assert report["dropped_ks"] == [1000]  # the catalog has 120 items
    assert report["num_items"] == 120 and report["num_users"] > 0
    assert set(report["results"]) == {"model", "popularity", "ease", "als"}
    assert report["results"]["ease"]["params"]["l2"] in (10.0, 100.0)
    for name in ("model", "popularity", "ease"):
        recalls = [report["results"][name][f"recall@{k}"] for k in (5, 10, 20)]
        assert recalls == sorted(recalls) and recalls[0] >= 0 and recalls[-1] <= 1
        assert {"hit_rate@5", "ndcg@20", "num_users"} <= set(report["results"][name])
    als = report["results"]["als"]
    if baselines.implicit_available():
        assert als["params"]["factors"] == 8 and len(als["tuning"]) == 2
        assert als["params"]["alpha"] in (1.0, 10.0) and "recall@20" in als
    else:
        assert "not installed" in als["skipped"]
    assert report["machine"]["cores"] >= 1 and report["timings"]["total"] > 0
    # The table: one block per metric, each with the model and the baselines.
    assert "recall@5" in printed and "ndcg@20" in printed and "hit_rate@10" in printed
    assert printed.count("model (exact)") == 3 and printed.count("popularity (train+valid)") == 3
    assert printed.count("ease (lambda=") == 3


def test_exact_metrics_equal_the_trainers_test_evaluation(
    tiny_bundle: Path, exact_report: dict
) -> None:
    # Same protocol, same weights: the evaluator must reproduce the bundle's test metrics.
    recorded = load_bundle(tiny_bundle).metrics["test"]
    for k in (5, 10, 20, 50):
        for metric in ("recall", "hit_rate", "ndcg"):
            assert exact_report["results"]["model"][f"{metric}@{k}"] == pytest.approx(
                recorded[f"{metric}@{k}"], abs=1e-12
            )
    assert exact_report["num_users"] == recorded["num_users"]


def test_popularity_matches_a_plain_reference(tiny_dataset: Path, exact_report: dict) -> None:
    # Reference: count train+valid events per item; per test user rank the items they have
    # not seen in train+valid by (count desc, item row asc); recall@K = hits / |test items|.
    dataset = load_dataset(tiny_dataset)
    events = dataset.interactions.to_pydict()
    item_row = {item: row for row, item in enumerate(dataset.items[ITEM_ID].to_pylist())}
    counts = np.zeros(len(item_row))
    seen: dict[str, set[int]] = {}
    held: dict[str, set[int]] = {}
    for user, item, split in zip(events[USER_ID], events[ITEM_ID], events[SPLIT], strict=True):
        if split == "test":
            held.setdefault(user, set()).add(item_row[item])
        else:
            counts[item_row[item]] += 1
            seen.setdefault(user, set()).add(item_row[item])
    order = sorted(range(len(counts)), key=lambda j: (-counts[j], j))
    for k in KS:
        recalls = []
        for user, items in held.items():
            ranked = [j for j in order if j not in seen.get(user, set())][:k]
            recalls.append(len(items & set(ranked)) / len(items))
        assert exact_report["results"]["popularity"][f"recall@{k}"] == pytest.approx(
            float(np.mean(recalls)), abs=1e-12
        )


def test_als_skips_with_a_clear_message_when_implicit_is_missing(
    tiny_bundle: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(baselines, "implicit_available", lambda: False)
    report = evaluate_bundle(
        tiny_bundle, tiny_dataset, ks=(10,), baselines=("als",), progress=False
    )
    assert "`implicit` package is not installed" in report["results"]["als"]["skipped"]
    assert "skipped: the `implicit` package" in format_report(report)


def test_resolve_ks_refuses_only_oversized_cut_offs() -> None:
    assert resolve_ks([5, 120, 500], 120) == ((5,), (120, 500))
    with pytest.raises(ValueError, match="catalog size"):
        resolve_ks([200], 120)


def _build_flat_index(tiny_bundle: Path, tiny_dataset: Path, root: Path) -> None:
    from index.build import BuildOptions, build_index

    build_index(
        tiny_bundle, tiny_dataset, root, BuildOptions(factory="Flat", device="cpu", progress=False)
    )


def test_ann_path_through_a_flat_index_equals_exact(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path, exact_report: dict
) -> None:
    root = tmp_path / "index"
    _build_flat_index(tiny_bundle, tiny_dataset, root)
    report = evaluate_bundle(
        tiny_bundle, tiny_dataset, ks=KS, index_root=root, baselines=(), progress=False
    )
    exact, ann = exact_report["results"]["model"], report["results"]["model_ann"]
    for k in KS:
        assert ann[f"recall@{k}"] == pytest.approx(exact[f"recall@{k}"], abs=1e-12)
        assert ann[f"ndcg@{k}"] == pytest.approx(exact[f"ndcg@{k}"], abs=1e-9)
        assert report["ann"][f"recall_ratio@{k}"] == pytest.approx(1.0)
        assert report["ann"][f"overlap@{k}"] == pytest.approx(1.0)
    assert "ANN/exact recall" in format_report(report)


def test_ann_path_maps_index_labels_to_item_rows() -> None:
    # An index whose labels are the catalog in reverse order must give the exact ranking
    # once labels are mapped back to item rows (random embeddings: no ties).
    gen = torch.Generator().manual_seed(0)
    item_emb = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1)
    exclude = ItemSets.from_lists([[0, 1], [], [5], [39], [3, 4, 7]])

    class ReversedIndex:
        num_items = 40

        def __init__(self) -> None:
            self.index = faiss.IndexFlatIP(8)
            self.index.add(item_emb.flip(0).numpy())

        def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return self.index.search(q, k)

    row_map = torch.arange(39, -1, -1)
    via_index = ann_ranking(ReversedIndex(), queries, exclude, 10, row_map=row_map, progress=False)
    scores = queries @ item_emb.T  # (5, 40)
    rows = torch.repeat_interleave(torch.arange(5), exclude.sizes())
    scores[rows, exclude.indices] = float("-inf")
    assert via_index.tolist() == torch.topk(scores, 10).indices.tolist()


def test_index_of_another_model_is_refused(
    tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    root = tmp_path / "other"
    write_index_version(
        root,
        "v1",
        faiss.IndexFlatIP(bundle.config.item.output_dim),
        np.eye(120, bundle.config.item.output_dim, dtype=np.float32),
        pa.array(bundle.encoder.item_ids.to_pylist()),
        manifest_extra={"model": {"checksum": "0" * 64}},
    )
    (root / CURRENT_FILE).write_text("v1\n")
    with pytest.raises(ValueError, match="built from model checksum"):
        evaluate_bundle(
            tiny_bundle, tiny_dataset, ks=(10,), index_root=root, baselines=(), progress=False
        )
