"""Training curves: the bundle's CSV and PNG, TensorBoard events, a missing matplotlib or
tensorboard, and a history that survives resumes (select and refit phases)."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_data import tiny_train_config

from retrieval.bundle import load_bundle, save_bundle, verify_bundle
from retrieval.data.dataset import load_dataset
from training import cli
from training import trainer as trainer_module
from training.config import TrainConfig
from training.curves import CSV_FILE, PNG_FILE, EpochRow, TensorBoardWriter, TrainingHistory
from training.trainer import TrainResult, lr_factor, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BATCH = 64  # tiny_train_config's batch size
KS = [5, 10]


def _config() -> TrainConfig:
    # 3 selection epochs, no early stop, no baselines (not what these tests are about)
    return tiny_train_config(
        epochs=3, eval={"ks": KS, "metric": "recall@10", "patience": 100, "baselines": []}
    )


def _read_csv(bundle: Path) -> list[dict[str, str]]:
    with (bundle / CSV_FILE).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard directory: [(step, value), ...] as TensorBoard
    shows them (purges of restarted runs applied)."""
    accumulator_module = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="reading events back needs the `tensorboard` extra",
    )
    accumulator = accumulator_module.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


@dataclass
class Run:
    config: TrainConfig
    result: TrainResult
    bundle: Path
    tensorboard: Path
    steps_per_epoch: dict[str, int]  # per phase, from the split sizes


@pytest.fixture(scope="module")
def straight_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One uninterrupted run with TensorBoard on: 3 selection epochs, then the refit."""
    tmp = tmp_path_factory.mktemp("curves")
    config = _config()
    result = train(tiny_dataset, tmp / "model", config, progress=False, tensorboard_dir=tmp / "tb")
    splits = load_dataset(tiny_dataset).interactions["split"].to_pylist()
    train_events, valid_events = splits.count("train"), splits.count("valid")
    return Run(
        config=config,
        result=result,
        bundle=tmp / "model",
        tensorboard=tmp / "tb",
        steps_per_epoch={
            "select": train_events // BATCH,
            "refit": (train_events + valid_events) // BATCH,
        },
    )


def test_the_csv_has_one_sane_row_per_epoch(straight_run: Run) -> None:
    config, metrics = straight_run.config, straight_run.result.metrics
    rows = _read_csv(straight_run.bundle)
    best = metrics["best_epoch"]
    assert metrics["refit"]["done"] and best >= 1
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [
        *[("select", e) for e in (1, 2, 3)],
        *[("refit", e) for e in range(1, best + 1)],
    ]
    assert list(rows[0]) == [
        "phase", "epoch", "step", "train_loss", "lr",
        "valid_recall@5", "valid_recall@10", "seconds",
    ]  # fmt: skip
    select_steps = 3 * straight_run.steps_per_epoch["select"]
    for row in rows:
        phase, epoch = row["phase"], int(row["epoch"])
        per_epoch = straight_run.steps_per_epoch[phase]
        step0 = 0 if phase == "select" else select_steps  # steps before the phase
        # Both phases' schedules span config.epochs epochs of their own length.
        total = per_epoch * config.epochs
        assert int(row["step"]) == step0 + epoch * per_epoch
        loss = float(row["train_loss"])
        assert math.isfinite(loss) and loss > 0
        # the learning rate of the epoch's last step (phase step epoch * per_epoch - 1)
        expected_lr = config.lr * lr_factor(epoch * per_epoch - 1, total, config)
        assert float(row["lr"]) == pytest.approx(expected_lr, rel=1e-12)
        assert float(row["seconds"]) > 0
        for k in KS:
            cell = row[f"valid_recall@{k}"]
            if phase == "refit":
                assert cell == ""  # valid is trained on in the refit: never validated
            else:
                assert 0.0 <= float(cell) <= 1.0
    # The CSV and metrics.json tell the same story.
    history = [*metrics["history"], *metrics["refit"]["history"]]
    assert [float(r["train_loss"]) for r in rows] == [h["train_loss"] for h in history]
    assert [r["valid_recall@10"] for r in rows[:3]] == [
        str(h["valid_recall@10"]) for h in metrics["history"]
    ]
    # the learning rate falls within each phase (cosine after a 2-step warmup)
    for phase in ("select", "refit"):
        lrs = [float(r["lr"]) for r in rows if r["phase"] == phase]
        assert lrs == sorted(lrs, reverse=True)


def test_the_bundle_lists_and_verifies_the_curves(straight_run: Run) -> None:
    manifest = verify_bundle(straight_run.bundle)
    assert {CSV_FILE, PNG_FILE} <= set(manifest["files"])
    png = (straight_run.bundle / PNG_FILE).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000  # a drawn figure, not a stub
    loaded = load_bundle(straight_run.bundle)
    assert loaded.manifest["files"][CSV_FILE] == manifest["files"][CSV_FILE]


def test_tensorboard_gets_every_epoch_at_its_step(straight_run: Run) -> None:
    scalars = _scalars(straight_run.tensorboard)
    rows = _read_csv(straight_run.bundle)
    for phase in ("select", "refit"):
        mine = [r for r in rows if r["phase"] == phase]
        steps = [int(r["step"]) for r in mine]
        for name in ("train_loss", "lr"):
            events = scalars[f"{phase}/{name}"]
            assert [step for step, _ in events] == steps, (phase, name)
            expected = [float(r[name]) for r in mine]
            assert [value for _, value in events] == pytest.approx(expected, rel=1e-6)
    recall = scalars["select/valid_recall@10"]
    assert [value for _, value in recall] == pytest.approx(
        [float(r["valid_recall@10"]) for r in rows if r["phase"] == "select"], rel=1e-6
    )
    assert not any(tag.startswith("refit/valid_") for tag in scalars)


def test_history_survives_resumes_in_both_phases(
    straight_run: Run, tiny_dataset: Path, tmp_path: Path
) -> None:
    config, per_epoch = straight_run.config, straight_run.steps_per_epoch
    out, ckpt, board = tmp_path / "model", tmp_path / "model.ckpt", tmp_path / "tb"

    def run(max_steps: int) -> TrainResult:
        return train(
            tiny_dataset, out, config, checkpoint_dir=ckpt, max_steps=max_steps,
            overwrite=True, progress=False, tensorboard_dir=board,
        )  # fmt: skip

    # 1. cut 3 steps into selection epoch 2
    run(per_epoch["select"] + 3)
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["phase"], len(state["history"])) == ("select", 1)
    assert state["partial_epoch"]["examples"] == 3 * BATCH  # the cut epoch's running loss
    # 2. resume, finish the selection, cut 2 steps into refit epoch 2
    run(3 * per_epoch["select"] + per_epoch["refit"] + 2)
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["phase"], len(state["history"])) == ("refit", 1)
    assert len(state["selection"]["history"]) == 3
    # 3. resume to the end
    resumed = run(0)
    assert resumed.metrics["refit"]["done"]

    # Every epoch once, with the values of the uninterrupted run (wall times aside):
    # even the two epochs cut in the middle have the mean loss over all their examples.
    straight_rows = _read_csv(straight_run.bundle)
    assert _without_seconds(_read_csv(out)) == _without_seconds(straight_rows)
    verify_bundle(out)
    # TensorBoard shows each epoch once too: the events of the cut runs are purged and the
    # checkpointed epochs written again.
    scalars = _scalars(board)
    for phase in ("select", "refit"):
        steps = [int(r["step"]) for r in straight_rows if r["phase"] == phase]
        assert [step for step, _ in scalars[f"{phase}/train_loss"]] == steps, phase


def test_training_goes_on_without_matplotlib_and_tensorboard(
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # None in sys.modules makes `import` raise ImportError, as if the package were absent.
    for name in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.backends.backend_agg",
        "tensorboard",
        "torch.utils.tensorboard",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    config = tiny_train_config(epochs=1, refit=False, eval={"ks": [10], "metric": "recall@10"})
    caplog.set_level(logging.WARNING, logger="training.curves")
    out, board = tmp_path / "model", tmp_path / "tb"
    result = train(tiny_dataset, out, config, progress=False, tensorboard_dir=board)
    assert result.metrics["steps"] > 0
    manifest = verify_bundle(out)
    assert CSV_FILE in manifest["files"] and PNG_FILE not in manifest["files"]
    assert not (out / PNG_FILE).exists()
    assert [r["phase"] for r in _read_csv(out)] == ["select"]
    assert not board.exists() or not any(board.iterdir())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("matplotlib is not installed" in w and PNG_FILE in w for w in warnings)
    assert any("tensorboard is not installed" in w and str(board) in w for w in warnings)


def test_a_failing_plot_leaves_the_csv(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: TrainingHistory) -> bytes:
        raise RuntimeError("no fonts")

    monkeypatch.setattr(TrainingHistory, "to_png", broken)
    history = TrainingHistory([EpochRow("select", 1, 5, 2.0, 0.01, 0.5)])
    with caplog.at_level(logging.WARNING, logger="training.curves"):
        files = history.bundle_files()
    assert sorted(files) == [CSV_FILE]
    assert "failed" in caplog.text


def test_csv_columns_and_blank_cells() -> None:
    history = TrainingHistory.from_phases(
        {
            "select": [
                {
                    "epoch": 1,
                    "step": 4,
                    "train_loss": 3.0,
                    "lr": 0.01,
                    "seconds": 0.5,
                    "valid_recall@20": 0.5,
                    "valid_recall@5": 0.25,
                    "valid_ndcg@5": 0.2,
                    "valid_num_users": 48,
                },
                {"epoch": 2, "step": 8, "train_loss": 2.0, "lr": 0.005, "seconds": 0.5},
            ],
            # an older checkpoint's record: no phase, step, lr or seconds
            "refit": [{"epoch": 1, "train_loss": 2.5}],
        },
        selection_metric="ndcg@5",
    )
    # recall@K by K, then the selection metric; num_users is no metric column
    assert history.valid_metrics == ["recall@5", "recall@20", "ndcg@5"]
    lines = history.to_csv().splitlines()
    assert lines == [
        "phase,epoch,step,train_loss,lr,valid_recall@5,valid_recall@20,valid_ndcg@5,seconds",
        "select,1,4,3.0,0.01,0.25,0.5,0.2,0.5",
        "select,2,8,2.0,0.005,,,,0.5",
        "refit,1,,2.5,,,,,",
    ]


def test_an_epoch_record_without_its_keys_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs `phase`, `epoch` and `train_loss`.*\['epoch'\]"):
        EpochRow.from_record({"epoch": 1}, "select")
    with pytest.raises(ValueError, match="phase argument None"):
        EpochRow.from_record({"epoch": 1, "train_loss": 1.0})


def test_plot_writes_a_png(tmp_path: Path) -> None:
    history = TrainingHistory(
        [
            EpochRow("select", 1, 5, 3.0, 0.01, 0.5, {"recall@10": 0.2}),
            EpochRow("select", 2, 10, 2.0, 0.005, 0.5, {"recall@10": 0.3}),
        ],
        selection_metric="recall@10",
    )
    assert history.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_without_a_directory_the_tensorboard_writer_is_a_no_op(tmp_path: Path) -> None:
    with TensorBoardWriter(None) as board:
        assert not board.enabled
        board.log(EpochRow("select", 1, 5, 3.0, 0.01, 0.5))
    assert list(tmp_path.iterdir()) == []


def test_save_bundle_refuses_extra_files_that_clash(straight_run: Run, tmp_path: Path) -> None:
    loaded = load_bundle(straight_run.bundle)
    for name in ("metrics.json", "encoders", "sub/curves.csv", ".hidden", "../up.csv"):
        with pytest.raises(ValueError, match=r"`extra_files` names must be plain"):
            save_bundle(
                tmp_path / "b", loaded.model, loaded.encoder, train_config={}, metrics={},
                extra_files={name: b"x"},
            )  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_the_cli_passes_the_tensorboard_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def fake_train(data: Path, out: Path, config: TrainConfig, **kwargs: object) -> TrainResult:
        seen.update(kwargs)
        return TrainResult(bundle_dir=out, metrics={"best_epoch": 1}, seconds=0.0)

    monkeypatch.setattr(trainer_module, "train", fake_train)
    base = ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "m")]
    assert cli.main([*base, "--tensorboard", str(tmp_path / "tb")]) == 0
    assert seen["tensorboard_dir"] == tmp_path / "tb"
    assert cli.main(base) == 0
    assert seen["tensorboard_dir"] is None
