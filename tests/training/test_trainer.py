"""The training job on the tiny dataset: learning, resume, bundle, failures, DDP."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import tiny_train_config

from retrieval import bundle as bundle_module
from retrieval.bundle import BundleError, load_bundle, verify_bundle
from retrieval.data.dataset import load_dataset
from retrieval.evaluation import embed_in_batches, encode_users_in_encoder_order
from training import trainer
from training.trainer import TrainingError, train

REPO = Path(__file__).resolve().parents[2]


def test_loss_decreases_and_beats_popularity(tiny_bundle: Path) -> None:
    metrics = load_bundle(tiny_bundle).metrics
    history = metrics["history"]
    assert len(history) == 2
    assert history[1]["train_loss"] < history[0]["train_loss"]
    # Users draw 80 % of their items from one genre of six: a trained model must rank
    # held-out items far better than chance (10 of ~107 candidates -> recall@10 ~ 0.09).
    assert metrics["test"]["recall@10"] > 0.3


def test_loss_decreases_over_steps(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_train_config(epochs=8, eval={"ks": [10], "metric": "recall@10", "patience": 100})
    result = train(tiny_dataset, tmp_path / "m", config, progress=False)
    losses = [h["train_loss"] for h in result.metrics["history"]]
    assert losses[-1] < 0.8 * losses[0], losses


def test_bundle_round_trip_gives_identical_embeddings(
    tiny_bundle: Path, tiny_dataset: Path
) -> None:
    first, second = load_bundle(tiny_bundle), load_bundle(tiny_bundle)
    dataset = load_dataset(tiny_dataset)
    items = first.encoder.encode_items(dataset.items)
    users = encode_users_in_encoder_order(first.encoder, dataset)
    users["history"] = torch.zeros(len(next(iter(users.values()))), 8, dtype=torch.long)
    torch.testing.assert_close(
        embed_in_batches(first.model.embed_items, items),
        embed_in_batches(second.model.embed_items, items),
        rtol=0,
        atol=0,
    )
    q = embed_in_batches(first.model.embed_queries, users)
    assert torch.allclose(q.norm(dim=1), torch.ones(len(q)), atol=1e-5)
    assert first.config == second.config
    assert (
        first.manifest["files"]["weights.safetensors"]
        == second.manifest["files"]["weights.safetensors"]
    )


def test_bundle_records_config_and_metrics(tiny_bundle: Path) -> None:
    loaded = load_bundle(tiny_bundle)
    assert loaded.train_config["batch_size"] == 64
    assert set(loaded.metrics["test"]) >= {"recall@10", "ndcg@10", "hit_rate@10"}
    assert "recall@10" in loaded.metrics["test_baselines"]["popularity"]
    assert not Path(str(tiny_bundle) + ".ckpt").exists()  # checkpoint removed on success


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def test_tampered_bundle_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_bundle, tmp_path)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(copy)


def test_extra_or_missing_file_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_bundle, tmp_path)
    (copy / "surprise.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="not listed"):
        verify_bundle(copy)
    (copy / "surprise.bin").unlink()
    (copy / "metrics.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(copy)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/PWNED-by-bundle-test",))


def test_pickle_weights_are_never_unpickled(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_bundle, tmp_path)
    marker = Path("/tmp/PWNED-by-bundle-test")
    marker.unlink(missing_ok=True)
    weights = copy / "weights.safetensors"
    weights.write_bytes(pickle.dumps({"w": _Payload()}))
    # Even with a manifest re-signed to match, the file is read as safetensors, not pickle.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = bundle_module.sha256_file(weights)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="cannot read weights"):
        load_bundle(copy)
    assert not marker.exists()


def test_resume_reproduces_the_same_next_step(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_train_config(epochs=3)
    straight = train(tiny_dataset, tmp_path / "a", config, max_steps=7, progress=False)
    ckpt = tmp_path / "b.ckpt"
    train(tiny_dataset, tmp_path / "b", config, checkpoint_dir=ckpt, max_steps=5, progress=False)
    assert (ckpt / "state.json").exists()
    resumed = train(
        tiny_dataset,
        tmp_path / "b",
        config,
        checkpoint_dir=ckpt,
        max_steps=7,
        overwrite=True,
        progress=False,
    )
    assert straight.metrics["steps"] == resumed.metrics["steps"] == 7
    a = load_bundle(tmp_path / "a").model.state_dict()
    b = load_bundle(tmp_path / "b").model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_train_config(epochs=3)
    ckpt = tmp_path / "m.ckpt"
    real_loss = trainer.RetrievalTask.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if calls["n"] > 12 else value

    monkeypatch.setattr(trainer.RetrievalTask, "loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(tiny_dataset, tmp_path / "m", config, checkpoint_dir=ckpt, progress=False)
    assert not (tmp_path / "m").exists()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] >= 1  # the checkpoint of the last completed epoch survives
    weights = trainer.load_file(str(ckpt / "weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_disk_full_while_saving_leaves_no_bundle(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module, "save_model", full)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_dataset, tmp_path / "m", tiny_train_config(epochs=1), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".ckpt")) == []


def test_bad_inputs_give_clear_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        train(tmp_path / "nope", tmp_path / "m", tiny_train_config(), progress=False)
    with pytest.raises(ValueError, match="embedding_dims"):
        train(
            tiny_dataset,
            tmp_path / "m",
            tiny_train_config(embedding_dims={"colour": 4}),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"eval\.metric"):
        train(
            tiny_dataset,
            tmp_path / "m",
            tiny_train_config(eval={"ks": [10], "metric": "recall@50"}),
            progress=False,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_ddp_gathers_negatives_across_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config = tiny_train_config(epochs=1, batch_size=32)
    config_path.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "ddp-model"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "training", "--data", str(tiny_dataset), "--out", str(out),
        "--config", str(config_path), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = load_bundle(out).metrics
    assert metrics["world_size"] == 2
    # Each rank scores its 32 queries against both ranks' 32 items.
    assert metrics["candidates_per_step"] == 2 * 32
    assert np.isfinite(metrics["history"][0]["train_loss"])


def test_sparse_embeddings_train_with_sparse_adam(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_train_config(epochs=3, sparse_embeddings=True)
    result = train(tiny_dataset, tmp_path / "m", config, progress=False)
    losses = [h["train_loss"] for h in result.metrics["history"]]
    assert losses[-1] < losses[0]
    model = trainer.TwoTowerModel(
        trainer.build_model_config(load_bundle(tmp_path / "m").encoder, config)
    )
    trainer.enable_sparse_embeddings(model)
    task = trainer.RetrievalTask(temperature=0.1, logq_correction=False)
    optimizers = trainer.build_optimizers(model, task, config)
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "SparseAdam"]


def test_rank_above_the_tower_width_is_clipped(tiny_bundle: Path) -> None:
    encoder = load_bundle(tiny_bundle).encoder
    config = trainer.build_model_config(encoder, tiny_train_config(model={"rank": 10_000}))
    assert config.query.rank == config.query.input_dim
    assert config.item.rank == config.item.input_dim


def test_refit_trains_on_train_plus_valid_for_the_selected_epochs(
    tiny_bundle: Path, tiny_dataset: Path
) -> None:
    loaded = load_bundle(tiny_bundle)
    metrics = loaded.metrics
    splits = load_dataset(tiny_dataset).interactions["split"].to_pylist()
    refit = metrics["refit"]
    assert refit["done"] and refit["epochs"] == metrics["best_epoch"] >= 1
    assert refit["train_events"] == splits.count("train") + splits.count("valid")
    assert len(refit["history"]) == refit["epochs"]
    assert metrics["test"]["trained_on"] == "train+valid"
    # The bundle's encoder was fitted on train + valid: its item-id vocabulary holds every
    # item of those splits (min_count 1), more than the train split alone has.
    dataset = load_dataset(tiny_dataset)
    events = dataset.interactions.to_pydict()
    seen = {i for i, s in zip(events["item_id"], events["split"], strict=True) if s != "test"}
    codes = loaded.encoder.encode_items(dataset.items)["item_id"]
    known = {
        item for item, code in zip(dataset.items["item_id"].to_pylist(), codes.tolist(), strict=True)
        if code >= 2  # 0 PAD, 1 OOV
    }  # fmt: skip
    assert known == seen


def test_the_test_table_holds_the_baselines_on_the_same_queries(tiny_bundle: Path) -> None:
    metrics = load_bundle(tiny_bundle).metrics
    table = metrics["test_baselines"]
    assert {"popularity", "ease", "als"} <= set(table)
    for name in ("popularity", "ease"):
        assert table[name]["num_users"] == metrics["test"]["num_users"]
        assert table[name]["context"] == "train+valid"
    printed = trainer.format_recall_table(metrics)
    assert all(name in printed for name in ("model", "popularity", "ease", "als"))


def test_resume_inside_the_refit_reproduces_the_straight_run(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    config = tiny_train_config(eval={"ks": [10], "metric": "recall@10", "baselines": []})
    straight = train(tiny_dataset, tmp_path / "a", config, progress=False)
    total = straight.metrics["steps"]
    assert straight.metrics["refit"]["done"]
    ckpt = tmp_path / "b.ckpt"
    cut = train(
        tiny_dataset, tmp_path / "b", config, checkpoint_dir=ckpt, max_steps=total - 2,
        progress=False,
    )  # fmt: skip
    assert not cut.metrics["refit"]["done"]  # stopped two steps before the refit's end
    assert json.loads((ckpt / "state.json").read_text())["phase"] == "refit"
    resumed = train(
        tiny_dataset, tmp_path / "b", config, checkpoint_dir=ckpt, overwrite=True, progress=False
    )
    assert resumed.metrics["steps"] == total and resumed.metrics["refit"]["done"]

    def losses(history: list[dict]) -> list[tuple[float, float | None]]:
        return [(h["train_loss"], h.get("valid_recall@10")) for h in history]

    assert losses(resumed.metrics["history"]) == losses(straight.metrics["history"])
    a = load_bundle(tmp_path / "a").model.state_dict()
    b = load_bundle(tmp_path / "b").model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_without_refit_the_selected_weights_are_tested(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_train_config(
        refit=False, eval={"ks": [10], "metric": "recall@10", "baselines": []}
    )
    result = train(tiny_dataset, tmp_path / "m", config, progress=False)
    assert result.metrics["refit"] == {"done": False}
    assert result.metrics["test"]["trained_on"] == "train"
    assert "test_baselines" not in result.metrics


def test_id_dropout_replaces_whole_rows_of_ids_with_oov(tiny_dataset: Path) -> None:
    schema = load_dataset(tiny_dataset).schema
    assert trainer.id_feature_names(schema) == ("user_id", "item_id")
    batch = {
        "user_id": torch.arange(2, 402),
        "zip_prefix": torch.arange(2, 402),
        "item_id": torch.arange(5, 405),
    }
    torch.manual_seed(0)
    out = trainer.drop_ids(batch, ("user_id", "item_id"), 0.25)
    dropped = out["user_id"] == 1  # OOV
    assert 60 < int(dropped.sum()) < 140  # ~100 of 400 rows
    assert torch.equal(out["item_id"] == 1, dropped)  # one draw per row, every id feature
    assert torch.equal(out["zip_prefix"], batch["zip_prefix"])  # other features untouched
    assert torch.equal(out["user_id"][~dropped], batch["user_id"][~dropped])
    assert trainer.drop_ids(batch, ("user_id",), 0.0) is batch
