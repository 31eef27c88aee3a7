"""`retrieval export --format onnx`: both towers as ONNX models run by onnxruntime give the
PyTorch towers' embeddings (every feature kind, batch 1 and larger, lists of several lengths);
the export directory (models, encoders, manifest) is complete, checksummed and atomic."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tower_configs import small_tower_config

from retrieval import towers as towers_module
from retrieval.bundle import BundleError, load_bundle, save_bundle
from retrieval.cli import main
from retrieval.data.dataset import load_dataset
from retrieval.encoders import FeatureEncoder
from retrieval.export import (
    EXPORT_MANIFEST,
    TOWER_FILES,
    ExportError,
    export_onnx,
    verify_export,
)
from retrieval.features import FeatureInput, FeatureKind
from retrieval.row_encoding import QueryRow, encode_query_rows
from retrieval.towers import (
    ONNX_OUTPUT_NAME,
    ModelConfig,
    Tower,
    TwoTowerModel,
    export_tower_onnx,
    onnxruntime_session,
    random_batch,
    tower_inputs,
)

TOLERANCE = 1e-5

# Every feature kind: the item tower holds categorical, bag, hashed bag and dense features;
# the query tower categorical, hashed, bag, dense and a history sharing the item id table.
ITEM_FEATURES = (
    FeatureInput("item_id", FeatureKind.CATEGORICAL, 30, 4),
    FeatureInput("genres", FeatureKind.BAG, 8, 3),
    FeatureInput("title", FeatureKind.HASHED_BAG, 11, 2),
    FeatureInput("price", FeatureKind.DENSE, 0, 2),
)
QUERY_FEATURES = (
    FeatureInput("user_id", FeatureKind.CATEGORICAL, 9, 4),
    FeatureInput("zip", FeatureKind.HASHED, 5, 2),
    FeatureInput("interests", FeatureKind.BAG, 7, 3),
    FeatureInput("age", FeatureKind.DENSE, 0, 2),
    FeatureInput("history", FeatureKind.HISTORY, 30, 4, shared_with="item_id"),
)


def model_config(**changes: Any) -> ModelConfig:
    return ModelConfig(
        query=small_tower_config(QUERY_FEATURES, **changes),
        item=small_tower_config(ITEM_FEATURES, **changes),
        seed=5,
    )


def onnx_embed(session: Any, tower: Tower, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    feeds = {name: batch[name].numpy() for name in tower.feature_names}
    (out,) = session.run([ONNX_OUTPUT_NAME], feeds)
    return torch.from_numpy(out)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def ragged_batch(
    features: tuple[FeatureInput, ...], batch_size: int, length: int, seed: int
) -> dict[str, torch.Tensor]:
    """A random batch whose list features are `length` wide with rows of every fill:
    row 0 all PAD, row 1 one entry, the others about 3/4 full (`random_batch`)."""
    lengths = {f.name: length for f in features}
    batch = random_batch(
        features, batch_size, lengths, generator=torch.Generator().manual_seed(seed)
    )
    for feature in features:
        if feature.kind in (FeatureKind.BAG, FeatureKind.HASHED_BAG, FeatureKind.HISTORY):
            batch[feature.name][0] = 0
            if batch_size > 1:
                batch[feature.name][1, 1:] = 0
                batch[feature.name][1, 0] = 3
    return batch


# ----------------------------------------------------------------------------- the towers


@pytest.mark.parametrize(
    "changes",
    [
        {"cross_kind": "mix"},
        {"arrangement": "stacked", "cross_kind": "masked"},
        {"arrangement": "deep"},
    ],
    ids=["parallel-mix", "stacked-masked", "deep"],
)
def test_onnx_towers_equal_pytorch_for_every_feature_kind(
    changes: dict[str, Any], tmp_path: Path
) -> None:
    model = TwoTowerModel(model_config(**changes)).eval()
    for side, tower, features in (
        ("query", model.query_tower, QUERY_FEATURES),
        ("item", model.item_tower, ITEM_FEATURES),
    ):
        path = tmp_path / f"{side}.onnx"
        export_tower_onnx(tower).save(path)
        session = onnxruntime_session(path)
        names = [i.name for i in session.get_inputs()]
        assert names == [f.name for f in features]
        # Batch 1 and a larger batch; lists of length 1, 5 and 23 (the export traced 4).
        for batch_size, length, seed in ((1, 1, 0), (1, 5, 1), (64, 5, 2), (37, 23, 3)):
            batch = ragged_batch(features, batch_size, length, seed)
            with torch.inference_mode():
                expected = tower(batch)
            got = onnx_embed(session, tower, batch)
            assert max_abs_diff(got, expected) <= TOLERANCE, (side, batch_size, length)
            assert torch.allclose(got.norm(dim=-1), torch.ones(batch_size), atol=1e-5)
        # The all-PAD row of a list feature counts as zeros, as in PyTorch; a row differs
        # from another only through its own features (no batch coupling).
        batch = ragged_batch(features, 4, 6, seed=9)
        alone = {name: t[2:3] for name, t in batch.items()}
        torch.testing.assert_close(
            onnx_embed(session, tower, alone)[0], onnx_embed(session, tower, batch)[2]
        )


def test_position_pooled_history_exports_and_lists_its_inputs(tmp_path: Path) -> None:
    config = model_config()
    query = dataclasses.replace(config.query, history_pooling="position", history_max_length=8)
    model = TwoTowerModel(ModelConfig(query=query, item=config.item)).eval()
    with torch.no_grad():
        model.query_tower.embedding.position_logits["history"].copy_(torch.linspace(1, -1, 8))
    tower = model.query_tower
    path = tmp_path / "query.onnx"
    export_tower_onnx(tower).save(path)
    session = onnxruntime_session(path)
    for batch_size, length in ((1, 8), (50, 3), (7, 1)):
        batch = ragged_batch(QUERY_FEATURES, batch_size, length, seed=length)
        with torch.inference_mode():
            expected = tower(batch)
        assert max_abs_diff(onnx_embed(session, tower, batch), expected) <= TOLERANCE
    # The graph's inputs are the documented ones: names, dtypes and named dimensions.
    declared = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
    assert declared == [
        ("user_id", "tensor(int64)", ["batch"]),
        ("zip", "tensor(int64)", ["batch"]),
        ("interests", "tensor(int64)", ["batch", "interests_length"]),
        ("age", "tensor(float)", ["batch", 2]),
        ("history", "tensor(int64)", ["batch", "history_length"]),
    ]
    assert [(o.name, list(o.shape)) for o in session.get_outputs()] == [
        ("embeddings", ["batch", 4])
    ]
    assert [i.to_dict()["shape"] for i in tower_inputs(tower)] == [d[2] for d in declared]


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert main(["export", "--model", str(tiny_bundle), "--out", str(out), "--format", "onnx"]) == 0
    return out


def test_export_directory_holds_models_encoders_and_a_checksummed_manifest(
    exported: Path, tiny_bundle: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    manifest = json.loads((exported / EXPORT_MANIFEST).read_text())
    assert verify_export(exported) == manifest
    assert manifest["bundle"]["checksum"] == bundle.checksum
    assert manifest["opset"] == 18
    files = manifest["files"]
    assert set(files) == {
        *TOWER_FILES.values(),
        *(rel for rel in bundle.manifest["files"] if rel.startswith("encoders/")),
    }
    for rel, digest in files.items():
        assert hashlib.sha256((exported / rel).read_bytes()).hexdigest() == digest, rel
        if rel.startswith("encoders/"):
            assert digest == bundle.manifest["files"][rel]  # the bundle's own files
    for side, tower in (("query", bundle.model.query_tower), ("item", bundle.model.item_tower)):
        entry = manifest["models"][side]
        assert entry["file"] == TOWER_FILES[side]
        assert entry["inputs"] == [spec.to_dict() for spec in tower_inputs(tower)]
        assert entry["output"] == {
            "name": "embeddings",
            "dtype": "float32",
            "shape": ["batch", bundle.model.output_dim],
        }
        assert 0 <= entry["check"]["max_abs_diff"] <= TOLERANCE
    history = manifest["models"]["query"]["inputs"][-1]
    assert history == {
        "name": "history",
        "kind": "history",
        "dtype": "int64",
        "shape": ["batch", "history_length"],
    }


def test_exported_encoders_and_models_embed_real_rows_like_the_bundle(
    exported: Path, tiny_bundle: Path, tiny_dataset: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    encoder = FeatureEncoder.load(exported / "encoders")
    query = onnxruntime_session(exported / TOWER_FILES["query"])
    item = onnxruntime_session(exported / TOWER_FILES["item"])
    # Every catalog item (120 rows), encoded with the copied encoder.
    items = encoder.encode_items(load_dataset(tiny_dataset).items)
    with torch.inference_mode():
        expected = bundle.model.embed_items(items)
    assert max_abs_diff(onnx_embed(item, bundle.model.item_tower, items), expected) <= TOLERANCE
    # Queries of one row and of several, histories of 0 to 3 known items plus an unknown one.
    item_ids = encoder.item_ids.to_pylist()
    rows = [
        QueryRow({"gender": "F", "occupation": "engineer"}, ("m 003/x", "nope")),
        QueryRow({}),
        QueryRow({"age_bucket": "25-34"}, tuple(item_ids[:3])),
    ]
    for batch_rows in (rows[:1], rows):
        batch = encode_query_rows(encoder, batch_rows)
        with torch.inference_mode():
            expected = bundle.model.embed_queries(batch)
        got = onnx_embed(query, bundle.model.query_tower, batch)
        assert max_abs_diff(got, expected) <= TOLERANCE


def test_missing_bundle_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "retrieval export: error: model bundle not found" in err and "nope" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # A directory that is not a bundle is refused as such.
    (tmp_path / "empty").mkdir()
    assert main(["export", "--model", str(tmp_path / "empty"), "--out", str(out)]) != 0
    assert "not a model bundle (manifest.json missing)" in capsys.readouterr().err
    assert not out.exists()


def test_existing_out_needs_overwrite_and_is_left_untouched(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["export", "--model", str(tiny_bundle), "--out", str(out)]) != 0
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporaries
    # With --overwrite it is replaced by a complete export.
    assert main(["export", "--model", str(tiny_bundle), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    verify_export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_a_failure_half_way_leaves_no_directory_and_keeps_the_old_one(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real: Callable[..., Any] = towers_module.export_tower_onnx
    calls: list[int] = []

    def failing_second_tower(tower: Tower, opset: int = 18) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the query tower is written, the item tower fails
            raise RuntimeError("disk on fire")
        return real(tower, opset)

    monkeypatch.setattr(towers_module, "export_tower_onnx", failing_second_tower)
    out = tmp_path / "onnx"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_onnx(tiny_bundle, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_onnx(tiny_bundle, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_out_inside_the_bundle_and_bad_opsets_are_refused(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bundle = (
        tmp_path / "models" / "model"
    )  # a copy: an --overwrite here must not hit the shared one
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(ValueError, match="must lie outside the model bundle"):
        export_onnx(bundle, bundle / "onnx")
    with pytest.raises(ValueError, match="must lie outside the model bundle"):
        export_onnx(bundle, bundle.parent, overwrite=True)
    with pytest.raises(ValueError, match=r"`opset` must be an integer >= 18; got 11"):
        export_onnx(bundle, tmp_path / "x", opset=11)
    with pytest.raises(SystemExit):
        main(["export", "--model", str(bundle), "--out", "x", "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["model"]
    load_bundle(bundle)  # intact


def test_tampered_export_is_refused(exported: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    verify_export(copy)
    with (copy / "encoders" / "encoder.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(ExportError, match=r"encoder\.json: checksum mismatch"):
        verify_export(copy)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"files not listed in the manifest: \['extra.bin'\]"):
        verify_export(copy)
    with pytest.raises(ExportError, match="not an export directory"):
        verify_export(tmp_path)


def test_a_bundle_changed_after_loading_is_not_copied(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from retrieval import bundle as bundle_module

    bundle_copy = tmp_path / "model"
    shutil.copytree(tiny_bundle, bundle_copy)
    real_load = bundle_module.load_bundle

    def load_then_tamper(path: Path, **kwargs: Any) -> Any:
        loaded = real_load(path, **kwargs)
        with (bundle_copy / "encoders" / "encoder.json").open("a") as handle:
            handle.write(" ")
        return loaded

    monkeypatch.setattr(bundle_module, "load_bundle", load_then_tamper)
    with pytest.raises(BundleError, match="changed since the bundle was verified"):
        export_onnx(bundle_copy, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_a_bundle_of_every_feature_kind_exports_through_the_command(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A model with dense, hashed and bag query features and position pooling, bundled with
    the tiny encoder (the export copies encoders; it does not read them)."""
    config = model_config(cross_kind="lowrank")
    query = dataclasses.replace(config.query, history_pooling="position", history_max_length=6)
    model = TwoTowerModel(ModelConfig(query=query, item=config.item)).eval()
    bundle_dir = save_bundle(
        tmp_path / "model", model, load_bundle(tiny_bundle).encoder, train_config={}, metrics={}
    )
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(bundle_dir), "--out", str(out), "--opset", "18"]) == 0
    manifest = verify_export(out)
    assert [i["name"] for i in manifest["models"]["query"]["inputs"]] == [
        f.name for f in QUERY_FEATURES
    ]
    query_session = onnxruntime_session(out / TOWER_FILES["query"])
    item_session = onnxruntime_session(out / TOWER_FILES["item"])
    for batch_size in (1, 33):
        queries = ragged_batch(QUERY_FEATURES, batch_size, 6, seed=batch_size)
        items = ragged_batch(ITEM_FEATURES, batch_size, 9, seed=batch_size)
        with torch.inference_mode():
            q, i = model(queries, items)
        assert max_abs_diff(onnx_embed(query_session, model.query_tower, queries), q) <= TOLERANCE
        assert max_abs_diff(onnx_embed(item_session, model.item_tower, items), i) <= TOLERANCE
    # Scores from the ONNX embeddings rank items as the model does.
    scores = onnx_embed(query_session, model.query_tower, queries).numpy() @ (
        onnx_embed(item_session, model.item_tower, items).numpy().T
    )
    np.testing.assert_allclose(scores, (q @ i.T).numpy(), atol=1e-5)
