"""The training job: dataset directory in, model bundle out.

Usage::

    retrieval train --data artifacts/demo/data --out artifacts/demo/model
    retrieval train --data DIR --out MODEL_DIR --config configs/synth.yaml
    torchrun --nproc-per-node 2 -m training --data DIR --out MODEL_DIR

Stages (each timed and logged): resolve config -> load data and fit encoders on train ->
encode users, items and causal histories -> **select**: train with in-batch softmax
(validation recall every epoch, early stopping, best epoch kept, checkpoints for resume) ->
**refit**: fit the encoders on train + valid and train a fresh model for the selected
number of epochs -> test recall next to the baselines (popularity, EASE, ALS) on the same
queries -> write the bundle.

Training curves (`training.curves`): every epoch's loss, learning rate and valid recall go
to the bundle as `training_curves.csv` and `training_curves.png`, and, with
`--tensorboard DIR`, to TensorBoard as the epochs finish. The per-epoch records live in the
checkpoint state, so a resumed run's curves hold every epoch once.

Determinism: the data order of epoch e is a permutation seeded by (seed, e) and the RNG is
reseeded from (seed, global step) before every step, so a run resumed from a checkpoint
takes exactly the step the uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from retrieval.atomic import (
    atomic_directory,
    atomic_write_text,
    interrupted_replace_pending,
    recover_interrupted_replace,
    remove_stale_temporaries,
)
from retrieval.bundle import save_bundle
from retrieval.data.dataset import Dataset, load_dataset
from retrieval.data.split import SPLIT_NAMES
from retrieval.encoders import EncodedInteractions, FeatureEncoder
from retrieval.evaluation import (
    EvalQueries,
    build_eval_queries,
    embed_in_batches,
    encode_users_in_encoder_order,
    evaluate_embeddings,
    history_feature_name,
)
from retrieval.evaluation.baselines import BaselineGrids, evaluate_baselines
from retrieval.features import (
    ITEM_ID,
    OOV_INDEX,
    SPLIT,
    USER_ID,
    DatasetSchema,
    FeatureKind,
)
from retrieval.loss import RetrievalTask
from retrieval.stages import stage
from retrieval.towers import ModelConfig, TowerConfig, TwoTowerModel
from training import distributed as dist_utils
from training.config import TrainConfig
from training.curves import EpochRow, TensorBoardWriter, TrainingHistory

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 2  # 2: phases (select, refit)
Batch = dict[str, torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def id_feature_names(schema: DatasetSchema) -> tuple[str, ...]:
    """The id features: categorical or hashed reads of the `user_id` / `item_id` column."""
    return tuple(
        spec.name
        for spec in (*schema.query_features, *schema.item_features)
        if spec.kind in (FeatureKind.CATEGORICAL, FeatureKind.HASHED)
        and (spec.source_column in (USER_ID, ITEM_ID) or spec.name == schema.item_id_feature)
    )


def drop_ids(batch: Batch, names: tuple[str, ...], rate: float) -> Batch:
    """`batch` with each row's id features set to OOV with probability `rate` (one draw per
    row, from the global RNG the loop seeds per step): the towers learn to embed a user or an
    item from its other features, which is all a cold one has."""
    present = [name for name in names if name in batch]
    if not present or rate <= 0:
        return batch
    rows = next(iter(batch.values())).shape[0]
    dropped = torch.rand(rows) < rate  # (B,)
    out = dict(batch)
    for name in present:
        out[name] = batch[name].masked_fill(dropped, OOV_INDEX)
    return out


def apply_feature_overrides(schema: DatasetSchema, config: TrainConfig) -> DatasetSchema:
    """Schema with the config's history length and embedding sizes applied: `id_embedding_dim`
    for the user and item id features, then the per-feature `embedding_dims` (which win)."""
    dims = dict(config.embedding_dims)
    if config.id_embedding_dim:
        for name in id_feature_names(schema):
            dims.setdefault(name, config.id_embedding_dim)
    known = {s.name for s in schema.query_features} | {s.name for s in schema.item_features}
    unknown = sorted(set(dims) - known)
    if unknown:
        raise ValueError(
            f"`embedding_dims` names features not in schema {schema.name!r}: {unknown} "
            f"(known: {sorted(known)})"
        )

    def patch(spec: Any) -> Any:
        changes: dict[str, Any] = {}
        if spec.name in dims:
            changes["embedding_dim"] = dims[spec.name]
        if spec.kind == FeatureKind.HISTORY:
            if config.history_length:
                changes["max_length"] = config.history_length
            shared = spec.shared_with
            if shared in dims and spec.name not in dims:
                changes["embedding_dim"] = dims[shared]
        return dataclasses.replace(spec, **changes) if changes else spec

    return dataclasses.replace(
        schema,
        query_features=tuple(patch(s) for s in schema.query_features),
        item_features=tuple(patch(s) for s in schema.item_features),
    )


def build_model_config(encoder: FeatureEncoder, config: TrainConfig) -> ModelConfig:
    section = config.model

    history_lengths = [
        spec.max_length
        for spec in encoder.schema.query_features
        if spec.kind == FeatureKind.HISTORY and spec.max_length
    ]
    positional = section.history_pooling == "position" and bool(history_lengths)

    def tower(side: str) -> TowerConfig:
        features = encoder.feature_inputs(side)  # type: ignore[arg-type]
        input_dim = sum(f.output_dim for f in features)
        pooled = positional and side == "query"
        return TowerConfig(
            features=features,
            arrangement=section.arrangement,
            cross_kind=section.cross,
            cross_layers=section.cross_layers,
            rank=min(section.rank, input_dim),  # a rank above the input width is clipped
            num_experts=section.num_experts,
            mlp_hidden=section.mlp_hidden,
            head_hidden=section.head_hidden,
            output_dim=section.output_dim,
            dropout=section.dropout,
            layer_norm=section.layer_norm,
            history_pooling="position" if pooled else "mean",
            history_max_length=max(history_lengths) if pooled else 0,
        )

    return ModelConfig(query=tower("query"), item=tower("item"), seed=config.seed)


@dataclass
class PreparedData:
    """Everything the loop gathers batches from, encoded once."""

    dataset: Dataset
    encoder: FeatureEncoder  # fitted on the `fit_splits` events
    fit_splits: tuple[str, ...]  # the splits trained on: ("train",) or ("train", "valid")
    user_features: Batch  # query features per user row (no history)
    item_features: Batch  # item features per item row
    interactions: EncodedInteractions
    train_rows: np.ndarray  # indices into `interactions` of the events trained on
    history_name: str | None
    item_counts: torch.Tensor  # (num_items,) counts over the events trained on (logQ)


def prepare_data(
    data_dir: str | Path | Dataset, config: TrainConfig, fit_splits: tuple[str, ...] = ("train",)
) -> PreparedData:
    """Load (or take) the dataset and encode it for training on `fit_splits`.

    With ``fit_splits=("train", "valid")`` (the refit before the test evaluation) the
    encoder's vocabularies and statistics are fitted on train + valid, exactly as on train
    alone otherwise: the valid events are then training events in every respect.
    """
    if fit_splits not in (("train",), ("train", "valid")):
        raise ValueError(f"`fit_splits` must be ('train',) or ('train', 'valid'); got {fit_splits}")
    dataset = data_dir if isinstance(data_dir, Dataset) else load_dataset(data_dir)
    schema = apply_feature_overrides(dataset.schema, config)
    # The tables already read (the refit's second call) are reused, not read again.
    dataset = Dataset(schema, dataset.users, dataset.items, dataset.interactions, path=dataset.path)
    fit_interactions = dataset.interactions
    if fit_splits != ("train",):  # the encoder fits on rows labelled train
        split = fit_interactions[SPLIT]
        relabelled = pc.if_else(pc.is_in(split, value_set=pa.array(fit_splits)), "train", split)
        index = fit_interactions.schema.get_field_index(SPLIT)
        fit_interactions = fit_interactions.set_column(index, SPLIT, relabelled)
    encoder = FeatureEncoder.fit(schema, dataset.users, dataset.items, fit_interactions)
    user_features = encode_users_in_encoder_order(encoder, dataset)
    item_features = encoder.encode_items(dataset.items)
    interactions = encoder.encode_interactions(dataset.interactions)
    codes = [SPLIT_NAMES.index(name) for name in fit_splits]
    train_rows = np.flatnonzero(np.isin(interactions.split, codes))
    if len(train_rows) == 0:
        raise ValueError(f"{dataset.path}: the {'+'.join(fit_splits)} split is empty")
    counts = np.bincount(interactions.item_row[train_rows], minlength=encoder.num_items)
    return PreparedData(
        dataset=dataset,
        encoder=encoder,
        fit_splits=fit_splits,
        user_features=user_features,
        item_features=item_features,
        interactions=interactions,
        train_rows=train_rows,
        history_name=history_feature_name(encoder),
        item_counts=torch.from_numpy(counts.astype(np.int64)),
    )


def gather_batch(data: PreparedData, rows: np.ndarray) -> tuple[Batch, Batch, torch.Tensor]:
    """Query batch, item batch and positive item rows of interaction rows `rows`."""
    idx = torch.from_numpy(rows)
    inter = data.interactions
    users = torch.from_numpy(inter.user_row)[idx]
    items = torch.from_numpy(inter.item_row)[idx]
    query = {name: t[users] for name, t in data.user_features.items()}
    if data.history_name is not None:
        query[data.history_name] = torch.from_numpy(inter.history)[idx]
    item = {name: t[items] for name, t in data.item_features.items()}
    return query, item, items


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio` (or constant)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_optimizers(
    model: TwoTowerModel, task: RetrievalTask, config: TrainConfig
) -> list[torch.optim.Optimizer]:
    """AdamW for dense parameters; with `sparse_embeddings`, SparseAdam for id tables."""
    params = list(model.parameters()) + list(task.parameters())
    if not config.sparse_embeddings:
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": config.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=config.lr,
                foreach=True,  # one fused pass over all parameters: faster on CPU too
            )
        ]
    sparse_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.sparse:
            sparse_ids.add(id(module.weight))
    sparse = [p for p in params if id(p) in sparse_ids]
    dense = [p for p in params if id(p) not in sparse_ids]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(dense, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    ]
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=config.lr))
    return optimizers


def enable_sparse_embeddings(model: TwoTowerModel) -> int:
    """Switch every embedding table to sparse gradients; returns the number of tables."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.sparse = True
            count += 1
    return count


# --------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(
    optimizers: list[torch.optim.Optimizer],
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[Any] = []
    for o_index, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        meta.append({"param_groups": state["param_groups"], "keys": {}})
        for p_index, param_state in state["state"].items():
            keys = []
            for key, value in param_state.items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt{o_index}.{p_index}.{key}"] = tensor.contiguous()
                keys.append(key)
            meta[-1]["keys"][str(p_index)] = keys
    return tensors, meta


def save_checkpoint(
    directory: Path,
    model: TwoTowerModel,
    task: RetrievalTask,
    optimizers: list[torch.optim.Optimizer],
    state: dict[str, Any],
    best_state: dict[str, torch.Tensor] | None,
) -> None:
    """Crash-safe checkpoint: a new directory replaces the old one atomically."""
    with atomic_directory(directory, overwrite=True) as tmp:
        weights = {
            f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()
        }
        weights.update(
            {f"task.{k}": v.detach().clone().contiguous() for k, v in task.state_dict().items()}
        )
        save_file(_dedupe(weights), str(tmp / "weights.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizers)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if best_state is not None:
            save_file(_dedupe(best_state), str(tmp / "best.safetensors"))
        (tmp / "state.json").write_text(
            json.dumps(
                {"format_version": CHECKPOINT_FORMAT_VERSION, **state, "optimizers": opt_meta}
            )
        )


def _dedupe(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: store independent copies."""
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def read_checkpoint_state(directory: Path) -> dict[str, Any]:
    """The training state of a checkpoint (phase, epoch, step, history...), version checked."""
    state = json.loads((directory / "state.json").read_text())
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{directory}: unsupported checkpoint format {state.get('format_version')!r}"
        )
    state.pop("optimizers", None)
    state.pop("format_version", None)
    return state


def load_checkpoint(
    directory: Path,
    model: TwoTowerModel,
    task: RetrievalTask,
    optimizers: list[torch.optim.Optimizer],
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    state = json.loads((directory / "state.json").read_text())
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{directory}: unsupported checkpoint format {state.get('format_version')!r}"
        )
    weights = load_file(str(directory / "weights.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("model.")})
    task.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("task.")})
    opt_tensors = load_file(str(directory / "optimizer.safetensors"))
    for o_index, (optimizer, meta) in enumerate(zip(optimizers, state["optimizers"], strict=True)):
        restored: dict[int, dict[str, Any]] = {}
        for p_index, keys in meta["keys"].items():
            restored[int(p_index)] = {k: opt_tensors[f"opt{o_index}.{p_index}.{k}"] for k in keys}
        optimizer.load_state_dict({"state": restored, "param_groups": meta["param_groups"]})
    best_path = directory / "best.safetensors"
    best = load_file(str(best_path)) if best_path.exists() else None
    return state, best


# --------------------------------------------------------------------------- the job


@dataclass
class TrainResult:
    bundle_dir: Path
    metrics: dict[str, Any]
    seconds: float


def evaluate(
    model: TwoTowerModel, data: PreparedData, queries: EvalQueries, ks: tuple[int, ...]
) -> dict[str, Any]:
    model.eval()
    with torch.inference_mode():
        item_emb = embed_in_batches(model.embed_items, data.item_features)
        query_emb = embed_in_batches(model.embed_queries, queries.query_batch)
    metrics = evaluate_embeddings(queries, query_emb, item_emb, ks)
    model.train()
    return metrics


def build_task(data: PreparedData, config: TrainConfig) -> RetrievalTask:
    """The retrieval loss of `config.loss`, with logQ from the counts of the events trained on."""
    loss_cfg = config.loss
    return RetrievalTask(
        temperature=loss_cfg.temperature,
        learn_temperature=loss_cfg.learn_temperature,
        logq_correction=loss_cfg.logq_correction,
        item_frequencies=data.item_counts.to(torch.float64) if loss_cfg.logq_correction else None,
        mask_accidental_hits=loss_cfg.mask_accidental_hits,
        num_extra_negatives=loss_cfg.num_extra_negatives,
        num_items=data.encoder.num_items,
        full_catalog=loss_cfg.full_catalog,
    )


@dataclass
class Phase:
    """One training pass: the selection on train (validated every epoch), or the refit on
    train + valid for the selected number of epochs (no validation: valid is trained on)."""

    name: str  # "select" | "refit"
    data: PreparedData
    epochs: int  # epochs to run
    schedule_epochs: int  # epochs the learning-rate schedule spans (config.epochs)
    valid_queries: EvalQueries | None  # None: no validation, keep the last weights


def run_phase(
    phase: Phase,
    config: TrainConfig,
    state: dict[str, Any],
    ckpt: Path,
    *,
    resume: bool,
    max_steps: int,
    progress: bool,
    board: TensorBoardWriter | None = None,
) -> tuple[TwoTowerModel, RetrievalTask, bool]:
    """Run the epochs of `phase` from `state` (updated in place; with `resume`, weights and
    optimizer state come from the checkpoint `ckpt`); returns the model with its kept
    weights (the best validated ones, or the last), its task, and whether `max_steps`
    stopped it. A checkpoint is written after every epoch (rank 0), and each epoch's record
    (appended to ``state["history"]``) goes to `board` (rank 0).

    An epoch cut by `max_steps` keeps its running loss sum, example count and seconds in
    ``state["partial_epoch"]``, so the resumed epoch's record equals the uninterrupted one's
    (its wall time aside)."""
    data = phase.data
    world, rank = dist_utils.world_size(), dist_utils.rank()
    model = TwoTowerModel(build_model_config(data.encoder, config))
    if config.sparse_embeddings:
        enable_sparse_embeddings(model)
    task = build_task(data, config)
    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizers = build_optimizers(model, task, config)
    best_state: dict[str, torch.Tensor] | None = None
    if resume:
        _, best_state = load_checkpoint(ckpt, model, task, optimizers)

    per_rank = len(data.train_rows) // world
    steps_per_epoch = max(1, per_rank // config.batch_size)
    total_steps = steps_per_epoch * phase.schedule_epochs
    ks = tuple(sorted(set(config.eval.ks)))
    metric_name = config.eval.metric
    step0 = state["phase_start_step"]  # global steps taken before this phase
    id_names = id_feature_names(data.encoder.schema)

    model.train()
    stopped_by_max_steps = False
    # A run resumed after its early stop has nothing left to train in this phase.
    stop = phase.valid_queries is not None and (
        state["epochs_without_improvement"] >= config.eval.patience
    )
    while state["epoch"] < phase.epochs and not stop:
        epoch = state["epoch"]
        order = np.random.default_rng([config.seed, epoch]).permutation(data.train_rows)
        order = order[rank::world][: steps_per_epoch * config.batch_size]
        first = state["step"] - step0 - epoch * steps_per_epoch
        bar = tqdm(
            range(first, steps_per_epoch),
            desc=f"{phase.name} epoch {epoch + 1}/{phase.epochs}",
            disable=not progress or rank != 0,
            leave=False,
            file=sys.stderr,
        )
        epoch_loss, seen, epoch_start = 0.0, 0, time.perf_counter()
        partial = state.pop("partial_epoch", None)
        if partial is not None and first > 0:  # the part of this epoch run before the resume
            epoch_loss, seen = float(partial["loss_sum"]), int(partial["examples"])
            epoch_start -= float(partial["seconds"])
        for local_step in bar:
            step = state["step"]
            phase_step = step - step0
            torch.manual_seed(config.seed * 1_000_003 + step)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(phase_step, total_steps, config)
            rows = order[local_step * config.batch_size : (local_step + 1) * config.batch_size]
            query, item, item_ids = gather_batch(data, rows)
            if config.id_dropout:
                query = drop_ids(query, id_names, config.id_dropout)
                item = drop_ids(item, id_names, config.id_dropout)
            extra: dict[str, Any] = {}
            if task.full_catalog:
                # Exact softmax over the whole catalog: every item is a candidate.
                query_emb, item_emb = ddp_model(query, data.item_features)  # (B, D), (N, D)
                loss = task.catalog_loss(query_emb, item_emb, item_ids)
                state["candidates_per_step"] = int(item_emb.shape[0])
            else:
                query_emb, item_emb = ddp_model(query, item)
                offset = 0
                if world > 1:
                    item_emb = dist_utils.gather_with_grad(item_emb)
                    item_ids = dist_utils.gather_with_grad(item_ids)
                    offset = rank * len(rows)
                if task.num_extra_negatives:
                    extra_ids = task.sample_extra_negative_ids()
                    extra_batch = {n: t[extra_ids] for n, t in data.item_features.items()}
                    extra = {
                        "extra_item_emb": model.embed_items(extra_batch),
                        "extra_item_ids": extra_ids,
                    }
                loss = task.loss(query_emb, item_emb, item_ids, positive_offset=offset, **extra)
                state["candidates_per_step"] = int(item_emb.shape[0]) + task.num_extra_negatives
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss {loss.item()} in {phase.name} epoch {epoch + 1} step "
                    f"{step}; the last good checkpoint is kept at {ckpt}. Lower `lr` or "
                    "raise `temperature`."
                )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm:
                dense = [
                    p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse
                ]
                torch.nn.utils.clip_grad_norm_(dense, config.grad_clip_norm)
            for optimizer in optimizers:
                optimizer.step()
            state["step"] = step + 1
            epoch_loss += float(loss.detach()) * len(rows)
            seen += len(rows)
            rate = seen * world / max(1e-9, time.perf_counter() - epoch_start)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", ex_s=f"{rate:,.0f}")
            if max_steps and state["step"] >= max_steps:
                stop = stopped_by_max_steps = True
                break
        bar.close()
        epoch_seconds = time.perf_counter() - epoch_start
        if stop and state["step"] - step0 < (epoch + 1) * steps_per_epoch:
            # Interrupted mid-epoch by max_steps: keep the position for an exact resume.
            state["partial_epoch"] = {
                "loss_sum": epoch_loss,
                "examples": seen,
                "seconds": epoch_seconds,
            }
            if rank == 0:
                save_checkpoint(ckpt, model, task, optimizers, state, best_state)
            break
        state["epoch"] = epoch + 1
        record: dict[str, Any] = {
            "phase": phase.name,
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": epoch_loss / max(1, seen),
            "lr": optimizers[0].param_groups[0]["lr"],  # the epoch's last step's
            "examples_per_second": seen * world / max(1e-9, epoch_seconds),
            "seconds": epoch_seconds,
        }
        validate = phase.valid_queries is not None and (
            (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == phase.epochs
        )
        if validate:
            assert phase.valid_queries is not None
            metrics = evaluate(model, data, phase.valid_queries, ks)
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            value = float(metrics[metric_name])
            if value > state["best_metric"]:
                state.update(best_metric=value, best_epoch=epoch + 1, epochs_without_improvement=0)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["epochs_without_improvement"] += 1
            if state["epochs_without_improvement"] >= config.eval.patience:
                logger.info(
                    "early stopping: no %s gain in %d evaluations",
                    metric_name,
                    config.eval.patience,
                )
                stop = True
        state["history"].append(record)
        if rank == 0:
            logger.info(
                "%s epoch %d: loss %.4f, %.0f ex/s, valid %s %s",
                phase.name,
                epoch + 1,
                record["train_loss"],
                record["examples_per_second"],
                metric_name,
                f"{record.get('valid_' + metric_name, float('nan')):.4f}",
            )
            if board is not None:
                board.log(EpochRow.from_record(record))
            save_checkpoint(ckpt, model, task, optimizers, state, best_state)
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, task, stopped_by_max_steps


def _fresh_state(phase: str, step: int) -> dict[str, Any]:
    return {
        "phase": phase,
        "phase_start_step": step,
        "epoch": 0,
        "step": step,
        "best_metric": -1.0,
        "best_epoch": -1,
        "epochs_without_improvement": 0,
        "history": [],
    }


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    max_steps: int = 0,
    progress: bool = True,
    tensorboard_dir: str | Path | None = None,
) -> TrainResult:
    """Train a two-tower model and write its bundle to `out_dir` (rank 0 under DDP).

    Two phases, the protocol every baseline follows too (`retrieval.evaluation.baselines`):

    1. **select**: train on the train split, validating every `eval.every_epochs` epochs;
       the best epoch by `eval.metric` on valid (with early stopping) is kept.
    2. **refit** (``config.refit``, the default): fit the encoder and train a fresh model on
       train + valid for the selected number of epochs, with the same seed and learning-rate
       schedule. The test split's context is train + valid, so the refit has seen every
       interaction a test query is built from. Without it, the selected weights are tested.

    The test table then holds the model next to the baselines in `eval.baselines`, all on the
    same queries, exclusions and held-out sets.

    Args:
        data_dir: dataset directory (see `retrieval.features`).
        out_dir: bundle directory to create.
        config: the resolved training configuration.
        checkpoint_dir: where checkpoints go (default: `<out_dir>.ckpt`); removed on success.
        resume: continue from the checkpoint when one exists.
        overwrite: replace an existing bundle at `out_dir`.
        max_steps: stop after this many optimizer steps in total, both phases counted; a run
            stopped during selection skips the refit (0 = no limit; tests).
        progress: show a progress bar.
        tensorboard_dir: also write each epoch's scalars there for TensorBoard (rank 0; needs
            the `tensorboard` extra, else a warning and no events). None: no TensorBoard.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".ckpt")
    world, rank = dist_utils.world_size(), dist_utils.rank()
    # Checked here, before any training, not when the bundle is written at the end: a
    # bundle that an interrupted run moved aside counts as existing (and is put back).
    moved_aside = interrupted_replace_pending(out)
    if (out.exists() or moved_aside) and not overwrite:
        if moved_aside and rank == 0 and recover_interrupted_replace(out):
            logger.info("restored %s, moved aside by an interrupted run", out)
        raise FileExistsError(
            f"{out} already exists"
            + (" (put back: an interrupted run had moved it aside)" if moved_aside else "")
            + " (pass --overwrite to replace it)"
        )
    if rank == 0:  # leftovers of a run killed while it wrote its bundle or a checkpoint
        # every moved-aside directory goes back first: `<out>.ckpt`'s temporaries start
        # with `<out>.`, so cleaning `out`'s would delete the checkpoint moved aside
        for path in (out, ckpt):
            if recover_interrupted_replace(path):
                logger.info("restored %s, moved aside by an interrupted run", path)
        for path in (out, ckpt):
            for stale in remove_stale_temporaries(path.parent, path.name):
                logger.info("removed leftover of an interrupted run: %s", stale)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    logger.info("resolved config: %s", json.dumps(config.to_dict(), default=str))
    ks = tuple(sorted(set(config.eval.ks)))
    metric_name = config.eval.metric
    if (
        metric_name.split("@")[0] not in ("recall", "ndcg", "hit_rate")
        or int(metric_name.split("@")[1]) not in ks
    ):
        raise ValueError(
            f"`eval.metric` must be recall/ndcg/hit_rate@K with K in eval.ks {ks}; got {metric_name!r}"
        )

    with stage("prepare data"):
        data = prepare_data(data_dir, config)
        logger.info(
            "users %d, items %d, train events %d, history %s",
            data.encoder.num_users,
            data.encoder.num_items,
            len(data.train_rows),
            data.history_name,
        )
    loaded: dict[str, Any] | None = None
    if resume and (ckpt / "state.json").exists():
        loaded = read_checkpoint_state(ckpt)
        logger.info(
            "resuming from %s: %s phase, epoch %d, step %d",
            ckpt,
            loaded["phase"],
            loaded["epoch"],
            loaded["step"],
        )

    resumed_rows: list[EpochRow] | None = None
    if loaded is not None:  # the epochs done before the resume: TensorBoard shows each once
        done = {"select": loaded["history"]}
        if loaded["phase"] == "refit":
            done = {"select": loaded["selection"]["history"], "refit": loaded["history"]}
        resumed_rows = TrainingHistory.from_phases(done).rows
    board = TensorBoardWriter(tensorboard_dir if rank == 0 else None, resumed_rows=resumed_rows)
    run_options: dict[str, Any] = {"max_steps": max_steps, "progress": progress, "board": board}
    try:
        # Phase 1: select the epoch count on valid.
        if loaded is not None and loaded["phase"] == "refit":
            selection = loaded["selection"]
            model = task = None
            stopped = False
        else:
            with stage("validation queries"):
                valid_queries = split_queries(data, config, "valid")
            state = loaded if loaded is not None else _fresh_state("select", 0)
            phase = Phase("select", data, config.epochs, config.epochs, valid_queries)
            with stage("train (select on valid)"):
                model, task, stopped = run_phase(
                    phase, config, state, ckpt, resume=loaded is not None, **run_options
                )
            selection = {
                "best_epoch": state["best_epoch"],
                "best_metric": state["best_metric"],
                "history": state["history"],
                "steps": state["step"],
                "candidates_per_step": state.get("candidates_per_step", 0),
            }
            loaded = None

        # Phase 2: refit on train + valid for the selected number of epochs.
        final_data = data
        refit: dict[str, Any] = {"done": False}
        steps = selection["steps"]
        if config.refit and not stopped and selection["best_epoch"] >= 1:
            with stage("prepare data (train + valid)"):
                refit_data = prepare_data(data.dataset, config, ("train", "valid"))
            state = loaded if loaded is not None else _fresh_state("refit", selection["steps"])
            state["selection"] = selection
            phase = Phase("refit", refit_data, selection["best_epoch"], config.epochs, None)
            with stage(f"refit on train + valid ({selection['best_epoch']} epochs)"):
                model, task, stopped = run_phase(
                    phase, config, state, ckpt, resume=loaded is not None, **run_options
                )
            steps = state["step"]
            final_data = refit_data
            refit = {
                "done": not stopped,
                "epochs": selection["best_epoch"],
                "train_events": len(refit_data.train_rows),
                "history": state["history"],
            }
        elif config.refit:
            refit["skipped"] = "stopped by max_steps" if stopped else "no validated epoch"
    finally:
        board.close()
    assert model is not None and task is not None

    result_metrics: dict[str, Any] = {
        "best_epoch": selection["best_epoch"],
        f"best_valid_{metric_name}": selection["best_metric"],
        "history": selection["history"],
        "refit": refit,
        "steps": steps,
        "candidates_per_step": selection["candidates_per_step"],
        "world_size": world,
    }
    if rank == 0:
        with stage("test evaluation"):
            result_metrics.update(test_table(model, final_data, config))
        result_metrics["train_seconds"] = time.perf_counter() - start
        with stage("write bundle"):
            curves = TrainingHistory.from_phases(
                {"select": selection["history"], "refit": refit.get("history", [])},
                selection_metric=metric_name,
            )
            curve_files = curves.bundle_files()
            logger.info("training curves: %d epochs in %s", len(curves.rows), sorted(curve_files))
            train_config = {
                **config.to_dict(),
                "data": str(Path(data_dir).resolve()),
                "world_size": world,
            }
            save_bundle(
                out,
                model,
                final_data.encoder,
                train_config=train_config,
                metrics=result_metrics,
                overwrite=overwrite,
                extra_files=curve_files,
            )
        if not stopped:
            shutil.rmtree(ckpt, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(bundle_dir=out, metrics=result_metrics, seconds=time.perf_counter() - start)


def split_queries(data: PreparedData, config: TrainConfig, split: str) -> EvalQueries:
    """The evaluation queries of `split` ('valid' or 'test') under `data`'s encoder."""
    return build_eval_queries(
        data.encoder,
        data.dataset,
        split,
        max_users=config.eval.max_users,
        seed=config.seed,
        user_features=data.user_features,
    )


def test_table(model: TwoTowerModel, data: PreparedData, config: TrainConfig) -> dict[str, Any]:
    """Test metrics of the model and of `config.eval.baselines` on the same test queries
    (``{"test": ..., "test_baselines": {name: ...}}``)."""
    test_queries = split_queries(data, config, "test")
    test_ks = tuple(sorted(set(config.eval.ks) | {10, 20, 50, 100}))
    metrics = evaluate(model, data, test_queries, test_ks)
    metrics["trained_on"] = "+".join(data.fit_splits)
    out: dict[str, Any] = {"test": metrics}
    if config.eval.baselines:
        valid_queries = split_queries(data, config, "valid")
        out["test_baselines"] = evaluate_baselines(
            config.eval.baselines,
            data.encoder,
            data.dataset,
            test_queries,
            test_ks,
            valid_queries=valid_queries,
            grids=BaselineGrids(),
            seed=config.seed,
        )
    return out


def format_recall_table(metrics: dict[str, Any], ks: tuple[int, ...] = (10, 20, 50, 100)) -> str:
    """Test recall of the model next to the baselines, as a small text table."""
    rows: list[tuple[str, dict[str, Any]]] = [("model", metrics.get("test", {}))]
    rows += list(metrics.get("test_baselines", {}).items())
    lines = [f"{'':<12}" + "".join(f"{'recall@' + str(k):>12}" for k in ks)]
    for label, row in rows:
        if "skipped" in row:
            lines.append(f"{label:<12}skipped: {row['skipped']}")
            continue
        lines.append(
            f"{label:<12}" + "".join(f"{row.get(f'recall@{k}', float('nan')):>12.4f}" for k in ks)
        )
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
