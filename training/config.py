"""Training configuration: one frozen object, loaded from YAML, overridable from the CLI.

The default model is the packaged `training/configs/default.yaml`: what `retrieval train` and
`retrieval demo` train without `--config`. The code defaults of `TrainConfig` are the same
values (a test keeps the two equal), so `TrainConfig()` in code and the CLI default agree.
Other named configs ship beside it (`synth`, `scale_1m`, `ablation`); `--config` takes such a
name or the path of a YAML file (`load_train_config`). The repository's top-level `configs/`
holds the same files for the Dockerfiles, the benchmarks and the docs (a test keeps them equal).

Every field is validated by pydantic when the config is built (unknown keys refused, types and
ranges checked) and errors name the field. Every field is recorded in the model bundle
(`train_config.json`), so a bundle says exactly how it was made.

Example:
    >>> cfg = TrainConfig.from_dict({"epochs": 3, "model": {"arrangement": "stacked"}})
    >>> cfg.epochs, cfg.model.arrangement, cfg.loss.temperature
    (3, 'stacked', 0.05)
    >>> TrainConfig.from_dict({"model": {"rank": 0}})
    Traceback (most recent call last):
    ...
    training.config.ConfigError: invalid train config: model.rank: Input should be greater than 0 (got 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrieval.cli import UsageError
from retrieval.kinds import (
    ARRANGEMENTS,
    BASELINES,
    CROSS_KINDS,
    HISTORY_POOLINGS,
    Arrangement,
    CrossKind,
    HistoryPooling,
)

__all__ = [
    "ARRANGEMENTS",
    "CROSS_KINDS",
    "DEFAULT_CONFIG_NAME",
    "HISTORY_POOLINGS",
    "PACKAGED_CONFIGS",
    "ConfigError",
    "EvalSection",
    "LossSection",
    "ModelSection",
    "TrainConfig",
    "describe_errors",
    "load_train_config",
    "packaged_config_names",
    "resolve_config_file",
]

# The named configs shipped inside the package (`--config default`, `--config synth`, ...),
# found next to this module (package data of a regular or an editable install alike).
PACKAGED_CONFIGS: Traversable = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG_NAME = "default"

PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(UsageError, ValueError):
    """An invalid training config: one line naming every bad field (and the file, if any).

    A usage error: the command exits with status 2."""


class _Section(BaseModel):
    """Frozen, strict about unknown keys, no NaN or infinity in float fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelSection(_Section):
    """Shape of both towers (the same block for query and item towers)."""

    arrangement: Arrangement = "parallel"  # parallel | stacked | deep | cross
    cross: CrossKind = "lowrank"  # cross layer kind: full | lowrank | mix | masked
    cross_layers: Annotated[int, Field(ge=0)] = 2  # stacked cross layers L
    rank: PositiveInt = 32  # low-rank r (lowrank, mix, masked); clipped to the input width
    num_experts: PositiveInt = 4  # experts K (mix)
    mlp_hidden: tuple[PositiveInt, ...] = (256, 128)  # the deep branch
    head_hidden: tuple[PositiveInt, ...] = (128,)  # head MLP before the output projection
    output_dim: PositiveInt = 64  # embedding size D (query and item)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout in the MLPs
    layer_norm: bool = False  # LayerNorm in the MLPs
    history_pooling: HistoryPooling = "position"  # query history: mean | position (recency)


class LossSection(_Section):
    """The retrieval task (in-batch softmax)."""

    temperature: Annotated[float, Field(gt=0)] = 0.05  # softmax temperature (initial if learned)
    learn_temperature: bool = False  # learn the temperature as a parameter
    logq_correction: bool = True  # subtract log sampling probability (train frequencies)
    mask_accidental_hits: bool = True  # a repeated item in the batch is not its own negative
    num_extra_negatives: Annotated[int, Field(ge=0)] = 0  # mixed negatives: uniform samples
    full_catalog: bool = False  # exact softmax over every item (small catalogs; no logQ)


class EvalSection(_Section):
    """Validation during training and the final offline test."""

    ks: tuple[PositiveInt, ...] = (10, 20, 50, 100)  # recall@K reported
    metric: str = "recall@50"  # model selection / early stopping metric on valid
    patience: PositiveInt = 4  # evaluations without improvement before stopping
    every_epochs: PositiveInt = 1  # validate every N epochs
    max_users: Annotated[int, Field(ge=0)] = 0  # 0 = all users; else a fixed random sample
    baselines: tuple[str, ...] = ("popularity", "ease", "als")  # in the test table

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in BASELINES]
        if unknown:
            raise ValueError(f"entries must be in {list(BASELINES)}; got {unknown}")
        return value


class TrainConfig(_Section):
    """Everything `retrieval train` needs besides the data and output paths."""

    seed: Annotated[int, Field(ge=0)] = 0  # seeds torch, numpy and the data order
    epochs: PositiveInt = 10  # upper bound; the best epoch on valid is kept (and refitted)
    batch_size: Annotated[int, Field(ge=2)] = 1024  # examples per step (per rank under DDP)
    lr: Annotated[float, Field(gt=0)] = 3e-3  # peak learning rate (AdamW)
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5  # AdamW decoupled weight decay (dense)
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup
    warmup_steps: Annotated[int, Field(ge=0)] = 30  # linear warmup steps
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.05  # cosine floor as a share of lr
    grad_clip_norm: Annotated[float, Field(ge=0)] = 1.0  # 0 disables clipping
    sparse_embeddings: bool = False  # sparse gradients + SparseAdam for large id tables
    history_length: Annotated[int, Field(ge=0)] = 0  # 0 = the schema's history max_length
    id_embedding_dim: Annotated[int, Field(ge=0)] = 64  # user and item id widths (0 = schema's)
    embedding_dims: dict[str, PositiveInt] = Field(default_factory=dict)  # per-feature widths
    id_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # share of rows with OOV ids (cold start)
    num_threads: Annotated[int, Field(ge=0)] = 0  # torch intra-op threads; 0 = all cores
    refit: bool = True  # after selecting the epochs on valid, retrain on train + valid for test
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @field_validator("model", "loss", "eval", mode="before")
    @classmethod
    def _empty_section_is_default(cls, value: Any) -> Any:
        """A section left empty in YAML (`loss:` with every line commented out) is the default."""
        return {} if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """Every field, sections as nested dicts, sequences as tuples (what bundles record)."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Validate `data` (e.g. parsed YAML); `ConfigError` names every bad field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(f"invalid train config: {describe_errors(exc)}") from None

    @classmethod
    def load(cls, path: str | Path | Traversable) -> TrainConfig:
        """Read a YAML file; errors name the file and the field."""
        if isinstance(path, str):
            path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

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


def describe_errors(exc: ValidationError) -> str:
    """One line per pydantic error, joined: `model.rank: Input should be greater than 0 (got 0)`."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field (known: {_known_fields(error['loc'])})")
            continue
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message} (got {error['input']!r})")
    return "; ".join(parts)


def _known_fields(loc: tuple[int | str, ...]) -> str:
    """The field names of the model that holds `loc`'s last key, sorted, comma-separated."""
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return ", ".join(sorted(model.model_fields))


def packaged_config_names() -> list[str]:
    """Names of the configs shipped in the package (`default`, `synth`, ...), sorted."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in PACKAGED_CONFIGS.iterdir()
        if entry.name.endswith(".yaml")
    )


def resolve_config_file(name_or_path: str | Path) -> Path | Traversable:
    """The config file `--config` means: an existing file at that path, else the packaged
    config of that name (`default`, `synth`, also written `synth.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.name == str(name_or_path):  # a bare name, no directory part
        packaged = PACKAGED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
        if packaged.is_file():
            return packaged
    raise FileNotFoundError(
        f"train config not found: {str(name_or_path)!r} is neither a file nor a packaged "
        f"config name ({', '.join(packaged_config_names())})"
    )


def load_train_config(name_or_path: str | Path | None = None) -> TrainConfig:
    """The config `--config` names (a packaged name or a YAML path); None: the default model,
    the packaged `default.yaml`.

    >>> load_train_config() == TrainConfig()
    True
    >>> load_train_config("synth").batch_size
    4096
    """
    return TrainConfig.load(resolve_config_file(name_or_path or DEFAULT_CONFIG_NAME))
