"""Training curves: per-epoch train loss, learning rate and validation recall, written as a
CSV and a PNG into the model bundle and, while training runs, as TensorBoard scalars.

Usage::

    retrieval train --data DIR --out MODEL_DIR        # MODEL_DIR/training_curves.csv + .png
    retrieval train --data DIR --out MODEL_DIR --tensorboard runs/first   # + live events
    tensorboard --logdir runs

In code::

    history = TrainingHistory.from_phases({"select": records, "refit": refit_records})
    files = history.bundle_files()  # {"training_curves.csv": b"...", "training_curves.png": ...}
    with TensorBoardWriter("runs/first") as board:  # a no-op without the `tensorboard` extra
        board.log(EpochRow.from_record(record))

A row is one finished epoch of one phase (`select` on train, validated; `refit` on train +
valid, not validated). It is read from the trainer's per-epoch record, the dict kept in the
checkpoint state (so the history survives a resume) and in `metrics.json`: ``phase``,
``epoch``, ``step`` (global optimizer steps after the epoch, both phases counted),
``train_loss`` (mean over the epoch's examples), ``lr`` (the learning rate of the epoch's
last step), ``seconds`` (the epoch's wall time) and ``valid_<metric>@K`` values. Keys
missing from a record (older checkpoints) become empty CSV cells.

The PNG needs matplotlib (the `plots` or `dev` extra) and TensorBoard the `tensorboard`
extra; without them that output is skipped with a logged warning and training goes on.

Example:
    >>> history = TrainingHistory.from_phases({"select": [
    ...     {"epoch": 1, "step": 12, "train_loss": 2.5, "lr": 0.003, "seconds": 1.5,
    ...      "valid_recall@10": 0.25, "valid_recall@5": 0.125, "valid_ndcg@10": 0.1},
    ... ]})
    >>> print(history.to_csv(), end="")
    phase,epoch,step,train_loss,lr,valid_recall@5,valid_recall@10,seconds
    select,1,12,2.5,0.003,0.125,0.25,1.5
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from retrieval.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "CSV_FILE",
    "PNG_FILE",
    "EpochRow",
    "TensorBoardWriter",
    "TrainingHistory",
]

logger = logging.getLogger(__name__)

CSV_FILE = "training_curves.csv"
PNG_FILE = "training_curves.png"
VALID_PREFIX = "valid_"
PHASE_COLORS = {"select": "tab:blue", "refit": "tab:orange"}
METRIC_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


@dataclass(frozen=True)
class EpochRow:
    """One finished epoch of one training phase."""

    phase: str  # "select" | "refit"
    epoch: int  # 1-based, within the phase
    step: int | None  # global optimizer steps after this epoch (both phases counted)
    train_loss: float  # mean loss over the epoch's examples
    lr: float | None  # learning rate of the epoch's last step
    seconds: float | None  # wall time of the epoch
    valid: dict[str, float] = field(default_factory=dict)  # "recall@10" -> value; {} unvalidated

    @classmethod
    def from_record(cls, record: Mapping[str, Any], phase: str | None = None) -> EpochRow:
        """The row of a trainer epoch record (see the module docstring).

        Args:
            record: the per-epoch dict of the trainer's history.
            phase: the phase, when the record does not name it (older checkpoints).

        Raises:
            ValueError: the record lacks `epoch` or `train_loss`, or names no phase.
        """
        name = record.get("phase", phase)
        if name is None or "epoch" not in record or "train_loss" not in record:
            raise ValueError(
                "an epoch record needs `phase`, `epoch` and `train_loss`; got keys "
                f"{sorted(record)} (phase argument {phase!r})"
            )
        valid = {
            key.removeprefix(VALID_PREFIX): float(value)
            for key, value in record.items()
            if key.startswith(VALID_PREFIX) and "@" in key
        }
        step, lr, seconds = record.get("step"), record.get("lr"), record.get("seconds")
        return cls(
            phase=str(name),
            epoch=int(record["epoch"]),
            step=None if step is None else int(step),
            train_loss=float(record["train_loss"]),
            lr=None if lr is None else float(lr),
            seconds=None if seconds is None else float(seconds),
            valid=valid,
        )


class TrainingHistory:
    """The rows of a training run, in the order they were trained, with their CSV and plot.

    Args:
        rows: the epochs so far.
        selection_metric: the metric that picked the best epoch (`eval.metric`); it gets a
            CSV column (beside every recall@K) and a marker on the plot.
    """

    def __init__(self, rows: Iterable[EpochRow] = (), selection_metric: str | None = None):
        self.rows: list[EpochRow] = list(rows)
        self.selection_metric = selection_metric

    @classmethod
    def from_phases(
        cls,
        records: Mapping[str, Sequence[Mapping[str, Any]]],
        selection_metric: str | None = None,
    ) -> TrainingHistory:
        """The history of the trainer's per-phase records (``{"select": [...], "refit": [...]}``,
        phases in training order)."""
        rows = [
            EpochRow.from_record(record, phase)
            for phase, phase_records in records.items()
            for record in phase_records
        ]
        return cls(rows, selection_metric)

    def append(self, row: EpochRow) -> None:
        self.rows.append(row)

    @property
    def valid_metrics(self) -> list[str]:
        """The validation columns: every recall@K seen, by K, then the selection metric."""
        seen = {name for row in self.rows for name in row.valid}
        recalls = sorted(
            (name for name in seen if name.startswith("recall@")),
            key=lambda name: int(name.split("@")[1]),
        )
        extra = self.selection_metric
        return recalls + ([extra] if extra in seen and extra not in recalls else [])

    @property
    def columns(self) -> list[str]:
        """The CSV header."""
        valid = [VALID_PREFIX + name for name in self.valid_metrics]
        return ["phase", "epoch", "step", "train_loss", "lr", *valid, "seconds"]

    def to_csv(self) -> str:
        """One line per row; a value the row does not have (no validation) is an empty cell."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        metrics = self.valid_metrics
        for row in self.rows:
            valid = [row.valid.get(name) for name in metrics]
            cells = [row.phase, row.epoch, row.step, row.train_loss, row.lr, *valid, row.seconds]
            writer.writerow(["" if cell is None else cell for cell in cells])
        return buffer.getvalue()

    def to_png(self) -> bytes | None:
        """The curves as a PNG (matplotlib's Agg canvas; no pyplot, no global backend change):
        train loss, learning rate and valid recall@K against the global step, one colour per
        phase, the best epoch by the selection metric starred. None, with a logged warning,
        when matplotlib is not installed."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            logger.warning(
                "matplotlib is not installed (%s): %s skipped; install the `plots` extra "
                "(pip install 'two-tower-retrieval[plots]') to get it",
                exc,
                PNG_FILE,
            )
            return None
        figure = Figure(figsize=(8, 9), layout="constrained")
        FigureCanvasAgg(figure)
        loss_ax, lr_ax, valid_ax = figure.subplots(3, 1, sharex=True)
        phases = list(dict.fromkeys(row.phase for row in self.rows))
        for phase in phases:
            rows = [row for row in self.rows if row.phase == phase]
            xs = [_x(row) for row in rows]
            color = PHASE_COLORS.get(phase)
            loss_ax.plot(xs, [r.train_loss for r in rows], "o-", color=color, label=phase)
            lr_ax.plot(xs, [_nan(r.lr) for r in rows], "o-", color=color, label=phase)
        for index, metric in enumerate(self.valid_metrics):
            rows = [row for row in self.rows if metric in row.valid]
            xs = [_x(row) for row in rows]
            color = METRIC_COLORS[index % len(METRIC_COLORS)]
            valid_ax.plot(xs, [row.valid[metric] for row in rows], "s-", color=color, label=metric)
        best = self._best_row()
        if best is not None and self.selection_metric is not None:
            value = best.valid[self.selection_metric]
            valid_ax.plot([_x(best)], [value], "*", color="black", markersize=14, zorder=3)
            valid_ax.annotate(
                f"best {self.selection_metric} {value:.4f} (epoch {best.epoch})",
                (_x(best), value),
                textcoords="offset points",
                xytext=(6, -14),
                fontsize=8,
            )
        loss_ax.set_ylabel("train loss (epoch mean)")
        lr_ax.set_ylabel("learning rate (epoch end)")
        valid_ax.set_ylabel("valid metric (validated epochs)")
        valid_ax.set_xlabel("optimizer step (phases in training order)")
        loss_ax.set_title("Training curves")
        for ax in (loss_ax, lr_ax, valid_ax):
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    def plot(self, path: str | Path) -> bool:
        """Write the PNG to `path` atomically; False (nothing written) without matplotlib."""
        png = self.to_png()
        if png is None:
            return False
        atomic_write_bytes(path, png)
        return True

    def bundle_files(self) -> dict[str, bytes]:
        """The files for the model bundle: the CSV always, the PNG when it could be drawn.

        A plot that fails for any reason is logged and left out: the bundle of a finished
        training run is never lost to a figure.
        """
        files = {CSV_FILE: self.to_csv().encode("utf-8")}
        try:
            png = self.to_png()
        except Exception:
            logger.warning("drawing %s failed; the bundle goes without it", PNG_FILE, exc_info=True)
            png = None
        if png is not None:
            files[PNG_FILE] = png
        return files

    def _best_row(self) -> EpochRow | None:
        """The first row with the highest selection metric (the epoch the trainer kept)."""
        metric = self.selection_metric
        candidates = [row for row in self.rows if metric is not None and metric in row.valid]
        if not candidates or metric is None:
            return None
        return max(candidates, key=lambda row: row.valid[metric])


def _x(row: EpochRow) -> float:
    """A row's x position: its global step (its epoch number for records without one)."""
    return float(row.epoch if row.step is None else row.step)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


class TensorBoardWriter:
    """Per-epoch scalars for TensorBoard (`<phase>/train_loss`, `<phase>/lr`,
    `<phase>/valid_recall@K`, ... at the global step), flushed after every epoch so a running
    job shows up at once. A no-op without `log_dir`; without the `tensorboard` package it logs
    one warning and is a no-op too.

    Args:
        log_dir: the event directory (created); None: write nothing.
        resumed_rows: None for a fresh run. For a run resumed from a checkpoint, the epochs
            already done: whatever the interrupted run wrote to `log_dir` is hidden from
            TensorBoard (a purge from step 0) and these rows are written again, so every epoch
            shows exactly once. A resumed run therefore takes the directory to be its own.
    """

    def __init__(
        self, log_dir: str | Path | None, *, resumed_rows: Sequence[EpochRow] | None = None
    ):
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._writer: SummaryWriter | None = None
        if self.log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            logger.warning(
                "tensorboard is not installed (%s): no TensorBoard events in %s; install the "
                "`tensorboard` extra (pip install 'two-tower-retrieval[tensorboard]')",
                exc,
                self.log_dir,
            )
            return
        purge_step = None if resumed_rows is None else 0
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        logger.info("TensorBoard events: %s (tensorboard --logdir %s)", self.log_dir, self.log_dir)
        for row in resumed_rows or ():
            self.log(row)

    @property
    def enabled(self) -> bool:
        """Whether events are written."""
        return self._writer is not None

    def log(self, row: EpochRow) -> None:
        """Write one epoch's scalars at its global step and flush them."""
        if self._writer is None:
            return
        step = int(_x(row))
        scalars: dict[str, float | None] = {"train_loss": row.train_loss, "lr": row.lr}
        scalars.update({VALID_PREFIX + name: value for name, value in row.valid.items()})
        for name, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(f"{row.phase}/{name}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
