"""Training configuration: one frozen object, loaded from YAML, overridable from the CLI.

The code defaults are the default model: what `retrieval train` trains without `--config` and
what `make demo` trains; `configs/default.yaml` writes them out (a test keeps the two equal).
Other named configs live in `configs/` (`synth.yaml`, `scale_1m.yaml`). Every field is recorded in
the model bundle (`train_config.json`), so a bundle says exactly how it was made.

Example:
    >>> cfg = TrainConfig.from_dict({"epochs": 3, "model": {"arrangement": "stacked"}})
    >>> cfg.epochs, cfg.model.arrangement, cfg.loss.temperature
    (3, 'stacked', 0.05)
    >>> TrainConfig.from_dict({"epoch": 3})
    Traceback (most recent call last):
    ...
    ValueError: unknown train config keys ['epoch']; known: ['batch_size', 'embedding_dims', 'epochs', 'eval', 'grad_clip_norm', 'history_length', 'id_dropout', 'id_embedding_dim', 'loss', 'lr', 'lr_schedule', 'min_lr_ratio', 'model', 'num_threads', 'refit', 'seed', 'sparse_embeddings', 'warmup_steps', 'weight_decay']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from retrieval.evaluation.baselines import BASELINES
from retrieval.layers import CROSS_KINDS
from retrieval.towers import ARRANGEMENTS, HISTORY_POOLINGS

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSection:
    """Shape of both towers (the same block for query and item towers)."""

    arrangement: str = "parallel"  # parallel | stacked | deep | cross
    cross: str = "lowrank"  # cross layer kind: full | lowrank | mix | masked
    cross_layers: int = 2  # stacked cross layers L
    rank: int = 32  # low-rank r (lowrank, mix, masked)
    num_experts: int = 4  # experts K (mix)
    mlp_hidden: tuple[int, ...] = (256, 128)  # the deep branch
    head_hidden: tuple[int, ...] = (128,)  # head MLP before the output projection
    output_dim: int = 64  # embedding size D (query and item)
    dropout: float = 0.0  # dropout in the MLPs
    layer_norm: bool = False  # LayerNorm in the MLPs
    history_pooling: str = "position"  # query history: mean | position (learned recency weights)

    def __post_init__(self) -> None:
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ValueError(
                f"`model.history_pooling` must be one of {HISTORY_POOLINGS}; got {self.history_pooling!r}"
            )
        if self.arrangement not in ARRANGEMENTS:
            raise ValueError(
                f"`model.arrangement` must be one of {ARRANGEMENTS}; got {self.arrangement!r}"
            )
        if self.cross not in CROSS_KINDS:
            raise ValueError(f"`model.cross` must be one of {CROSS_KINDS}; got {self.cross!r}")
        object.__setattr__(self, "mlp_hidden", tuple(int(h) for h in self.mlp_hidden))
        object.__setattr__(self, "head_hidden", tuple(int(h) for h in self.head_hidden))


@dataclass(frozen=True)
class LossSection:
    """The retrieval task (in-batch softmax)."""

    temperature: float = 0.05  # softmax temperature (initial value when learned)
    learn_temperature: bool = False  # learn the temperature as a parameter
    logq_correction: bool = True  # subtract log sampling probability (train frequencies)
    mask_accidental_hits: bool = True  # a repeated item in the batch is not its own negative
    num_extra_negatives: int = 0  # mixed negatives: uniform catalog samples per batch
    full_catalog: bool = False  # exact softmax over every item (small catalogs; no logQ)


@dataclass(frozen=True)
class EvalSection:
    """Validation during training and the final offline test."""

    ks: tuple[int, ...] = (10, 20, 50, 100)  # recall@K reported
    metric: str = "recall@50"  # model selection / early stopping metric on valid
    patience: int = 4  # evaluations without improvement before stopping
    every_epochs: int = 1  # validate every N epochs
    max_users: int = 0  # 0 = all users; else a fixed random sample (valid and test; big data)
    baselines: tuple[str, ...] = ("popularity", "ease", "als")  # in the test table

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        unknown = [name for name in self.baselines if name not in BASELINES]
        if unknown:
            raise ValueError(f"`eval.baselines` entries must be in {BASELINES}; got {unknown}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `retrieval train` needs besides the data and output paths."""

    seed: int = 0  # seeds torch, numpy and the data order
    epochs: int = 10  # upper bound; the best epoch on valid is kept (and refitted)
    batch_size: int = 1024  # examples per step (per rank under DDP)
    lr: float = 3e-3  # peak learning rate (AdamW)
    weight_decay: float = 1e-5  # AdamW decoupled weight decay (dense parameters)
    lr_schedule: str = "cosine"  # cosine | constant (after warmup)
    warmup_steps: int = 30  # linear warmup steps
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr
    grad_clip_norm: float = 1.0  # 0 disables clipping
    sparse_embeddings: bool = False  # sparse gradients + SparseAdam for large id tables
    history_length: int = 0  # 0 = the schema's history max_length; else override
    id_embedding_dim: int = 64  # width of the user and item id embeddings (0 = the schema's)
    embedding_dims: dict[str, int] = field(default_factory=dict)  # per-feature overrides
    id_dropout: float = 0.1  # share of training rows whose user / item ids become OOV (cold start)
    num_threads: int = 0  # torch intra-op threads; 0 = all cores (set 1 for runs side by side)
    refit: bool = True  # after selecting the epochs on valid, retrain on train + valid for test
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
            "history_length": self.history_length >= 0,
            "id_embedding_dim": self.id_embedding_dim >= 0,
            "id_dropout": 0 <= self.id_dropout < 1,
            "num_threads": self.num_threads >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"`{name}` is out of range; got {getattr(self, name)!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"`lr_schedule` must be 'cosine' or 'constant'; got {self.lr_schedule!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        sections = {"model": ModelSection, "loss": LossSection, "eval": EvalSection}
        _check_keys(cls, data, "train config")
        _coerce_numbers(cls, data, "train config")
        for key, section_cls in sections.items():
            if key in data:
                section = dict(data[key] or {})
                _check_keys(section_cls, section, f"`{key}` section")
                _coerce_numbers(section_cls, section, f"`{key}` section")
                data[key] = section_cls(**section)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """Copy with top-level fields or `section.field` keys replaced (None values ignored)."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if "." in key:
                section, name = key.split(".", 1)
                data[section][name] = value
            else:
                data[key] = value
        return TrainConfig.from_dict(data)


def _coerce_numbers(cls: type, data: dict[str, Any], what: str) -> None:
    """YAML 1.1 reads `1e-5` (no dot) as a string: turn such values of float fields into floats."""
    for item in dataclasses.fields(cls):
        value = data.get(item.name)
        if (
            isinstance(item.default, float)
            and isinstance(value, str | int)
            and not isinstance(value, bool)
        ):
            try:
                data[item.name] = float(value)
            except ValueError:
                raise ValueError(f"{what}: `{item.name}` must be a number; got {value!r}") from None


def _check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known: {sorted(known)}")
