"""The two towers: feature embeddings -> DCN-V2 combination block -> head -> unit vector.

Each tower maps an encoded batch (``{feature name: tensor}``, layouts in
`retrieval.features.FeatureInput`) to L2-normalised embeddings ``[batch_size, D]``::

    x_0 = concat(embedding of each feature)          [B, d]
    z   = block(x_0)                                 parallel | stacked | deep | cross
    e   = normalize(W_out head_mlp(z) + b_out)       [B, D]

The block arrangements of DCN-V2 (Wang et al., WWW 2021, Fig. 2 and Sec. 3):

- ``parallel``: ``concat(cross(x_0), mlp(x_0))`` (the default; the paper's parallel structure)
- ``stacked``:  ``mlp(cross(x_0))``
- ``deep``:     ``mlp(x_0)`` (no cross network; a plain two-tower DNN baseline)
- ``cross``:    ``cross(x_0)`` (no deep network)

`TwoTowerModel` is the only module built from a config (`ModelConfig`, holding one
`TowerConfig` per side); it is rebuilt from ``config.to_dict()`` alone. A query history
feature shares the item tower's id embedding table (the same ``nn.Embedding`` object).

Example:
    >>> from retrieval.features import FeatureInput, FeatureKind
    >>> item = TowerConfig(
    ...     features=(FeatureInput("item_id", FeatureKind.CATEGORICAL, 10, 8),),
    ...     mlp_hidden=(16,), head_hidden=(), output_dim=4, rank=4,
    ... )
    >>> query = TowerConfig(
    ...     features=(
    ...         FeatureInput("user_id", FeatureKind.CATEGORICAL, 6, 8),
    ...         FeatureInput("history", FeatureKind.HISTORY, 10, 8, shared_with="item_id"),
    ...     ),
    ...     mlp_hidden=(16,), head_hidden=(), output_dim=4, rank=4,
    ... )
    >>> model = TwoTowerModel(ModelConfig(query=query, item=item))
    >>> q = model.embed_queries({"user_id": torch.tensor([2, 3]),
    ...                          "history": torch.tensor([[4, 5, 0], [0, 0, 0]])})
    >>> i = model.embed_items({"item_id": torch.tensor([4, 5, 6])})
    >>> model.score(q, i).shape
    torch.Size([2, 3])
    >>> bool(torch.allclose(q.norm(dim=-1), torch.ones(2)))
    True
    >>> model.query_tower.embedding.tables["history"] is model.item_tower.embedding.tables["item_id"]
    True
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from retrieval.features import PAD_INDEX, FeatureInput, FeatureKind
from retrieval.kinds import (  # re-exported: the names' home
    ARRANGEMENTS,
    HISTORY_POOLINGS,
    Arrangement,
    HistoryPooling,
)
from retrieval.layers import (
    CROSS_KINDS,
    EXPERT_ACTIVATIONS,
    MLP,
    CrossKind,
    CrossNetwork,
    ExpertActivation,
    check_dropout,
    check_positive,
    check_rank,
)

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

USES_CROSS = frozenset({"parallel", "stacked", "cross"})
USES_MLP = frozenset({"parallel", "stacked", "deep"})

Batch = Mapping[str, torch.Tensor]

MODEL_CONFIG_FORMAT_VERSION = 1

# Kinds looked up as one row per example, kinds mean-pooled over a padded list.
SINGLE_KINDS = frozenset({FeatureKind.CATEGORICAL, FeatureKind.HASHED})
POOLED_KINDS = frozenset({FeatureKind.BAG, FeatureKind.HASHED_BAG, FeatureKind.HISTORY})


# --------------------------------------------------------------------------- layers


class FeatureEmbedding(nn.Module):
    """Embeds every feature of one tower and concatenates them into the tower input x_0.

    ``x_0 = concat_f(e_f)`` in feature order, where for feature f:

    - categorical, hashed: ``e_f = E_f[idx]`` (one row of table ``E_f``, ``[cardinality, dim]``)
    - bag, hashed_bag, history: ``e_f = mean_{t: idx_t != PAD} E_f[idx_t]``; a row with only
      PAD (index 0) entries gives zeros
    - dense: ``e_f = the float tensor itself`` (width = `embedding_dim`)

    Tables are ``nn.Embedding(cardinality, dim, padding_idx=0)``: the PAD row is zero and
    never trained. They are initialised N(0, 1/dim), so each embedding has norm ~1. A
    history feature does not own a table: it uses ``shared_tables[feature.shared_with]``,
    the item tower's id table, and registers that same object under its own name.

    Batches are checked cheaply (key present, dtype, number of dimensions, dense width,
    equal batch sizes; no pass over the values): a bad one raises ``ValueError`` naming
    the feature. Out-of-range indices are left to the lookup ops (``IndexError`` or
    ``RuntimeError``).

    History pooling (``history_pooling``), over a history ordered most recent first:

    - ``"mean"``: the plain mean above;
    - ``"position"``: learned recency weights, ``e_f = sum_t w_t E_f[idx_t] / sum_t w_t`` over
      the non-PAD positions t, with ``w_t = exp(a_t)`` and one learned ``a_t`` per position
      (``history_max_length`` of them, initialised to 0, i.e. the mean). Causal as the mean:
      it reads only the history it is given.

    Args:
        features: the tower's features, in the order their embeddings are concatenated.
        shared_tables: tables owned by the other tower, by feature name (the history
            feature's `shared_with`). Required when `features` holds a history feature.
        history_pooling: "mean" or "position" (history features only).
        history_max_length: longest history "position" pooling accepts (its number of
            weights); required (>= 1) with "position".

    Shapes:
        input: ``{name: [batch_size] | [batch_size, length] | [batch_size, width]}``;
        output x_0: ``[batch_size, output_dim]``, ``output_dim = sum of embedding_dim``.
    """

    def __init__(
        self,
        features: Sequence[FeatureInput],
        shared_tables: Mapping[str, nn.Embedding] | None = None,
        history_pooling: HistoryPooling = "mean",
        history_max_length: int = 0,
    ) -> None:
        super().__init__()
        if history_pooling not in HISTORY_POOLINGS:
            raise ValueError(
                f"`history_pooling` must be one of {list(HISTORY_POOLINGS)}; got {history_pooling!r}"
            )
        features = tuple(features)
        if not features:
            raise ValueError("`features` must hold at least one FeatureInput; got ()")
        names = [f.name for f in features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"`features` has duplicate names {duplicates}")
        shared_tables = dict(shared_tables or {})
        self.features = features
        self.tables = nn.ModuleDict()
        self.position_logits = nn.ParameterDict()  # history name -> a, [history_max_length]
        for feature in features:
            if feature.kind == FeatureKind.DENSE:
                continue
            if feature.kind == FeatureKind.HISTORY:
                self.tables[feature.name] = self._shared_table(feature, shared_tables)
                if history_pooling == "position":
                    check_positive("history_max_length", history_max_length)
                    self.position_logits[feature.name] = nn.Parameter(
                        torch.zeros(history_max_length)
                    )
                continue
            table = nn.Embedding(feature.cardinality, feature.embedding_dim, padding_idx=PAD_INDEX)
            nn.init.normal_(table.weight, std=feature.embedding_dim**-0.5)
            with torch.no_grad():
                table.weight[PAD_INDEX].zero_()
            self.tables[feature.name] = table
        self._output_dim = sum(f.output_dim for f in features)

    @staticmethod
    def _shared_table(feature: FeatureInput, shared: Mapping[str, nn.Embedding]) -> nn.Embedding:
        table = shared.get(feature.shared_with or "")
        if table is None:
            raise ValueError(
                f"feature {feature.name!r} shares table {feature.shared_with!r}, which is not "
                f"in `shared_tables` (got {sorted(shared)})"
            )
        expected = (feature.cardinality, feature.embedding_dim)
        if tuple(table.weight.shape) != expected:
            raise ValueError(
                f"feature {feature.name!r}: shared table {feature.shared_with!r} has shape "
                f"{tuple(table.weight.shape)}; the feature needs {expected}"
            )
        return table

    @property
    def output_dim(self) -> int:
        """Width d of x_0: the sum of the features' embedding widths."""
        return self._output_dim

    def check_batch(self, batch: Batch) -> None:
        """Raise ``ValueError`` naming the feature if `batch` lacks it or has a wrong layout."""
        batch_size: int | None = None
        for feature in self.features:
            tensor = batch.get(feature.name)
            if tensor is None:
                raise ValueError(
                    f"feature {feature.name!r} is missing from the batch; got keys {sorted(batch)}"
                )
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"feature {feature.name!r} must be a torch.Tensor; got {type(tensor).__name__}"
                )
            if feature.kind == FeatureKind.DENSE:
                ok = (
                    tensor.dtype == torch.float32
                    and tensor.dim() == 2
                    and tensor.shape[1] == feature.embedding_dim
                )
                layout = f"float32 [batch_size, {feature.embedding_dim}]"
            else:
                ndim = 1 if feature.kind in SINGLE_KINDS else 2
                ok = tensor.dtype == torch.int64 and tensor.dim() == ndim
                layout = "int64 [batch_size]" if ndim == 1 else "int64 [batch_size, length]"
            if not ok:
                raise ValueError(
                    f"feature {feature.name!r} ({feature.kind}) must be {layout}; "
                    f"got {tensor.dtype} {list(tensor.shape)}"
                )
            if batch_size is None:
                batch_size = tensor.shape[0]
            elif tensor.shape[0] != batch_size:
                raise ValueError(
                    f"feature {feature.name!r} has batch size {tensor.shape[0]}; "
                    f"earlier features have {batch_size}"
                )

    def forward(self, batch: Batch) -> torch.Tensor:
        self.check_batch(batch)
        parts: list[torch.Tensor] = []
        for feature in self.features:
            values = batch[feature.name]
            if feature.kind == FeatureKind.DENSE:
                parts.append(values)  # (B, width)
                continue
            table = cast(nn.Embedding, self.tables[feature.name])
            weight, sparse = table.weight, table.sparse  # sparse: row-wise grads (SparseAdam)
            if feature.kind in SINGLE_KINDS:
                parts.append(
                    F.embedding(values, weight, padding_idx=PAD_INDEX, sparse=sparse)
                )  # (B, dim)
            elif feature.name in self.position_logits:
                logits = self.position_logits[feature.name]
                if values.shape[1] > logits.shape[0]:
                    raise ValueError(
                        f"feature {feature.name!r} holds {values.shape[1]} items; position "
                        f"pooling was built for at most {logits.shape[0]}"
                    )
                present = (values != PAD_INDEX).to(logits.dtype)  # (B, L)
                position_weights = torch.exp(logits[: values.shape[1]]) * present  # (B, L)
                total = position_weights.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1)
                parts.append(
                    F.embedding_bag(
                        values,
                        weight,
                        mode="sum",
                        per_sample_weights=position_weights / total,
                        padding_idx=PAD_INDEX,
                        sparse=sparse,
                    )
                )  # (B, dim): all-PAD rows give zeros
            else:
                # Mean over the non-PAD entries of each row; an all-PAD row gives zeros.
                parts.append(
                    F.embedding_bag(
                        values, weight, mode="mean", padding_idx=PAD_INDEX, sparse=sparse
                    )
                )  # (B, dim)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (B, d)


class CombinationBlock(nn.Module):
    """How the cross network and the MLP combine, DCN-V2 (Wang et al. 2021, Fig. 2).

    - ``parallel``: ``z = concat(cross(x_0), mlp(x_0))``, width ``d + mlp_hidden[-1]``
    - ``stacked``:  ``z = mlp(cross(x_0))``, width ``mlp_hidden[-1]``
    - ``deep``:     ``z = mlp(x_0)``, width ``mlp_hidden[-1]``
    - ``cross``:    ``z = cross(x_0)``, width ``d``

    Args:
        in_features: d, the width of x_0.
        arrangement: "parallel", "stacked", "deep" or "cross".
        cross_kind: cross layer kind: "full", "lowrank", "mix" or "masked".
        cross_layers: number of cross layers (>= 1 when the arrangement has a cross network).
        rank: low-rank kinds: r in [1, d].
        num_experts: "mix": number of experts K.
        expert_activation: "mix": the nonlinearity g.
        mask_hidden: "masked": hidden width of the mask network.
        mlp_hidden: MLP layer widths (non-empty when the arrangement has an MLP).
        dropout: MLP dropout in [0, 1).
        layer_norm: LayerNorm in the MLP.

    Shapes:
        input x_0 ``[batch_size, in_features]``; output ``[batch_size, output_dim]``.
    """

    def __init__(
        self,
        in_features: int,
        arrangement: Arrangement = "parallel",
        cross_kind: CrossKind = "full",
        cross_layers: int = 3,
        rank: int = 32,
        num_experts: int = 4,
        expert_activation: ExpertActivation = "tanh",
        mask_hidden: int = 32,
        mlp_hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        if arrangement not in ARRANGEMENTS:
            raise ValueError(
                f"`arrangement` must be one of {list(ARRANGEMENTS)}; got {arrangement!r}"
            )
        self.arrangement = arrangement
        self.in_features = in_features
        self.cross: CrossNetwork | None = None
        self.deep: MLP | None = None
        if arrangement in USES_CROSS:
            if (
                isinstance(cross_layers, bool)
                or not isinstance(cross_layers, int)
                or cross_layers < 1
            ):
                raise ValueError(
                    f"`cross_layers` must be an integer >= 1 for arrangement "
                    f"{arrangement!r}; got {cross_layers!r}"
                )
            self.cross = CrossNetwork(
                in_features,
                cross_layers,
                kind=cross_kind,
                rank=rank,
                num_experts=num_experts,
                expert_activation=expert_activation,
                mask_hidden=mask_hidden,
            )
        if arrangement in USES_MLP:
            if not tuple(mlp_hidden):
                raise ValueError(
                    f"`mlp_hidden` must be non-empty for arrangement {arrangement!r}; got {mlp_hidden!r}"
                )
            self.deep = MLP(in_features, mlp_hidden, dropout=dropout, layer_norm=layer_norm)
        if arrangement == "parallel":
            assert self.deep is not None
            self._output_dim = in_features + self.deep.output_dim
        elif arrangement == "cross":
            self._output_dim = in_features
        else:
            assert self.deep is not None
            self._output_dim = self.deep.output_dim

    @property
    def output_dim(self) -> int:
        """Width of the block output z."""
        return self._output_dim

    def forward(self, x_0: torch.Tensor) -> torch.Tensor:
        if self.arrangement == "parallel":
            assert self.cross is not None and self.deep is not None
            return torch.cat([self.cross(x_0), self.deep(x_0)], dim=-1)  # (B, d + h)
        if self.arrangement == "stacked":
            assert self.cross is not None and self.deep is not None
            return self.deep(self.cross(x_0))  # (B, h)
        if self.arrangement == "deep":
            assert self.deep is not None
            return self.deep(x_0)  # (B, h)
        assert self.cross is not None
        return self.cross(x_0)  # (B, d)


class Tower(nn.Module):
    """One tower: ``e = normalize(W_out head_mlp(block(x_0)) + b_out)``, ``x_0`` the embeddings.

    ``normalize(v) = v / max(||v||_2, 1e-12)``, so scores between towers are cosines.
    DCN-V2 (Wang et al. 2021) block; the two-tower setup of Yi et al., "Sampling-Bias-
    Corrected Neural Modeling for Large Corpus Item Recommendations", RecSys 2019.

    Args:
        features: the tower's features (see `FeatureEmbedding`).
        arrangement, cross_kind, cross_layers, rank, num_experts, expert_activation,
            mask_hidden, mlp_hidden, dropout, layer_norm: the block (see `CombinationBlock`).
        history_pooling, history_max_length: how history features are pooled (see
            `FeatureEmbedding`).
        head_hidden: widths of the head MLP between the block and the output projection
            (may be empty: the projection then reads the block output directly).
        output_dim: D, the embedding width.
        shared_tables: embedding tables of the other tower, for history features.

    Shapes:
        input: an encoded batch (see `FeatureEmbedding`); output ``[batch_size, output_dim]``,
        every row of unit L2 norm.
    """

    def __init__(
        self,
        features: Sequence[FeatureInput],
        *,
        arrangement: Arrangement = "parallel",
        cross_kind: CrossKind = "full",
        cross_layers: int = 3,
        rank: int = 32,
        num_experts: int = 4,
        expert_activation: ExpertActivation = "tanh",
        mask_hidden: int = 32,
        mlp_hidden: Sequence[int] = (256, 128, 64),
        head_hidden: Sequence[int] = (128,),
        output_dim: int = 64,
        dropout: float = 0.0,
        layer_norm: bool = False,
        history_pooling: HistoryPooling = "mean",
        history_max_length: int = 0,
        shared_tables: Mapping[str, nn.Embedding] | None = None,
    ) -> None:
        super().__init__()
        check_positive("output_dim", output_dim)
        self.embedding = FeatureEmbedding(
            features, shared_tables, history_pooling, history_max_length
        )
        self.block = CombinationBlock(
            self.embedding.output_dim,
            arrangement=arrangement,
            cross_kind=cross_kind,
            cross_layers=cross_layers,
            rank=rank,
            num_experts=num_experts,
            expert_activation=expert_activation,
            mask_hidden=mask_hidden,
            mlp_hidden=mlp_hidden,
            dropout=dropout,
            layer_norm=layer_norm,
        )
        self.head = MLP(self.block.output_dim, head_hidden, dropout=dropout, layer_norm=layer_norm)
        self.projection = nn.Linear(self.head.output_dim, output_dim)
        self.output_dim = output_dim

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the batch entries this tower reads."""
        return tuple(f.name for f in self.embedding.features)

    def forward(self, batch: Batch) -> torch.Tensor:
        x_0 = self.embedding(batch)  # (B, d)
        z = self.head(self.block(x_0))  # (B, head width)
        return F.normalize(self.projection(z), dim=-1)  # (B, D)


# --------------------------------------------------------------------------- configs


def _check_widths(name: str, widths: tuple[int, ...]) -> None:
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"`{name}` must hold integers >= 1; got {widths!r}")


@dataclass(frozen=True)
class TowerConfig:
    """Architecture of one tower; see `Tower` and `CombinationBlock` for the formulas."""

    # The tower's features in concatenation order (name, kind, table size, width).
    features: tuple[FeatureInput, ...]
    # How cross network and MLP combine: "parallel" | "stacked" | "deep" | "cross".
    arrangement: Arrangement = "parallel"
    # Cross layer variant: "full" (W: d x d) | "lowrank" (U V^T) | "mix" (K low-rank
    # experts with a softmax gate) | "masked" (low-rank with a per-example mask).
    cross_kind: CrossKind = "full"
    # Number of stacked cross layers L (>= 1 when the arrangement has a cross network).
    cross_layers: int = 3
    # Low-rank kinds: rank r of U, V in R^{d x r}, in [1, d] with d = input_dim.
    rank: int = 32
    # "mix": number of low-rank experts K.
    num_experts: int = 4
    # "mix": nonlinearity g in the projected space: "tanh" | "relu" | "identity".
    expert_activation: ExpertActivation = "tanh"
    # "masked": hidden width of the mask network m(x_0).
    mask_hidden: int = 32
    # Widths of the block's MLP ("deep" network); each layer Linear -> [LayerNorm] -> ReLU.
    mlp_hidden: tuple[int, ...] = (256, 128, 64)
    # Widths of the head MLP between block and output projection; may be empty.
    head_hidden: tuple[int, ...] = (128,)
    # D: width of the L2-normalised output embedding (equal in both towers).
    output_dim: int = 64
    # Dropout after every MLP activation (block MLP and head), in [0, 1).
    dropout: float = 0.0
    # LayerNorm before every MLP activation.
    layer_norm: bool = False
    # How a history feature is pooled: "mean" | "position" (learned recency weights).
    history_pooling: HistoryPooling = "mean"
    # "position": the longest history accepted (one weight per position); 0 otherwise.
    history_max_length: int = 0

    def __post_init__(self) -> None:
        features = tuple(
            FeatureInput.from_dict(dict(f)) if isinstance(f, Mapping) else f for f in self.features
        )
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "mlp_hidden", tuple(self.mlp_hidden))
        object.__setattr__(self, "head_hidden", tuple(self.head_hidden))
        if not features or not all(isinstance(f, FeatureInput) for f in features):
            raise ValueError(
                f"`features` must be a non-empty tuple of FeatureInput; got {features!r}"
            )
        names = [f.name for f in features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"`features` has duplicate names {duplicates}")
        if self.arrangement not in ARRANGEMENTS:
            raise ValueError(
                f"`arrangement` must be one of {list(ARRANGEMENTS)}; got {self.arrangement!r}"
            )
        if self.cross_kind not in CROSS_KINDS:
            raise ValueError(
                f"`cross_kind` must be one of {list(CROSS_KINDS)}; got {self.cross_kind!r}"
            )
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ValueError(
                f"`history_pooling` must be one of {list(HISTORY_POOLINGS)}; got "
                f"{self.history_pooling!r}"
            )
        if self.history_pooling == "position":
            check_positive("history_max_length", self.history_max_length)
        if self.arrangement in USES_CROSS:
            check_positive("cross_layers", self.cross_layers)
            if self.cross_kind != "full":
                check_rank(self.rank, self.input_dim)
        elif (
            isinstance(self.cross_layers, bool)
            or not isinstance(self.cross_layers, int)
            or self.cross_layers < 0
        ):
            raise ValueError(f"`cross_layers` must be an integer >= 0; got {self.cross_layers!r}")
        check_positive("rank", self.rank)
        check_positive("num_experts", self.num_experts)
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ValueError(
                f"`expert_activation` must be one of {list(EXPERT_ACTIVATIONS)}; "
                f"got {self.expert_activation!r}"
            )
        check_positive("mask_hidden", self.mask_hidden)
        _check_widths("mlp_hidden", self.mlp_hidden)
        _check_widths("head_hidden", self.head_hidden)
        if self.arrangement in USES_MLP and not self.mlp_hidden:
            raise ValueError(
                f"`mlp_hidden` must be non-empty for arrangement {self.arrangement!r}; got ()"
            )
        check_positive("output_dim", self.output_dim)
        check_dropout(self.dropout)
        if not isinstance(self.layer_norm, bool):
            raise ValueError(f"`layer_norm` must be a bool; got {self.layer_norm!r}")

    @property
    def input_dim(self) -> int:
        """d, the width of x_0: the sum of the features' embedding widths."""
        return sum(f.output_dim for f in self.features)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `from_dict` inverts it."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "features":
                value = [f.to_dict() for f in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[item.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TowerConfig:
        """Build from `to_dict` output (lists for tuples); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown tower config keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        values["features"] = tuple(FeatureInput.from_dict(dict(f)) for f in data["features"])
        for key in ("mlp_hidden", "head_hidden"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def tower_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Tower` (everything but `features` and `shared_tables`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "features"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a `TwoTowerModel` (the model bundle stores it as JSON)."""

    # Query tower: user-side features (history included) and architecture.
    query: TowerConfig
    # Item tower: catalog-side features and architecture; output_dim equals the query's.
    item: TowerConfig
    # Seed of the parameter initialisation (the global RNG is left untouched).
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.query, TowerConfig) or not isinstance(self.item, TowerConfig):
            raise ValueError(
                "`query` and `item` must be TowerConfig; got "
                f"{type(self.query).__name__}, {type(self.item).__name__}"
            )
        if self.query.output_dim != self.item.output_dim:
            raise ValueError(
                f"`query.output_dim` ({self.query.output_dim}) must equal "
                f"`item.output_dim` ({self.item.output_dim})"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0; got {self.seed!r}")
        items = {f.name: f for f in self.item.features}
        for feature in self.item.features:
            if feature.kind == FeatureKind.HISTORY:
                raise ValueError(f"item feature {feature.name!r}: history features are query-side")
        for feature in self.query.features:
            if feature.kind != FeatureKind.HISTORY:
                continue
            shared = items.get(feature.shared_with or "")
            if shared is None or shared.kind not in SINGLE_KINDS:
                raise ValueError(
                    f"query feature {feature.name!r}: `shared_with` must name a categorical "
                    f"or hashed item feature (have {sorted(items)}); got {feature.shared_with!r}"
                )
            if (shared.cardinality, shared.embedding_dim) != (
                feature.cardinality,
                feature.embedding_dim,
            ):
                raise ValueError(
                    f"query feature {feature.name!r} (cardinality {feature.cardinality}, dim "
                    f"{feature.embedding_dim}) must match the shared item feature "
                    f"{shared.name!r} (cardinality {shared.cardinality}, dim {shared.embedding_dim})"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a format version; `from_dict` inverts it."""
        return {
            "format_version": MODEL_CONFIG_FORMAT_VERSION,
            "query": self.query.to_dict(),
            "item": self.item.to_dict(),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from `to_dict` output; a wrong format version or unknown key is refused."""
        version = data.get("format_version")
        if version != MODEL_CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"model config `format_version` must be {MODEL_CONFIG_FORMAT_VERSION}; got {version!r}"
            )
        unknown = set(data) - {"format_version", "query", "item", "seed"}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(
            query=TowerConfig.from_dict(data["query"]),
            item=TowerConfig.from_dict(data["item"]),
            seed=data.get("seed", 0),
        )


# --------------------------------------------------------------------------- model


class TwoTowerModel(nn.Module):
    """Query tower and item tower whose dot product scores a (query, item) pair.

    ``s(q, i) = <f(q), g(i)>`` with ``f``, ``g`` the L2-normalised towers (Yi et al.,
    RecSys 2019; towers of DCN-V2 blocks, Wang et al. 2021). The item tower is built
    first; its id table is handed to the query tower's history feature, so both towers
    hold the same ``nn.Embedding``. Parameters are initialised under ``config.seed``
    without touching the global RNG. The loss lives outside the towers.

    Args:
        config: the frozen `ModelConfig`; the model is rebuilt from it alone.

    Shapes:
        `embed_queries`: query batch -> ``[batch_size, D]``; `embed_items`: item batch ->
        ``[num_items, D]``; `score`: ``[B, D] x [N, D] -> [B, N]``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            item_tower = Tower(config.item.features, **config.item.tower_kwargs())
            shared = {
                name: table
                for name, table in item_tower.embedding.tables.items()
                if isinstance(table, nn.Embedding)
            }
            query_tower = Tower(
                config.query.features, shared_tables=shared, **config.query.tower_kwargs()
            )
        self.query_tower = query_tower
        self.item_tower = item_tower

    @property
    def output_dim(self) -> int:
        """D, the embedding width of both towers."""
        return self.query_tower.output_dim

    def embed_queries(self, batch: Batch) -> torch.Tensor:
        """Query embeddings ``[batch_size, D]``, unit L2 norm."""
        return self.query_tower(batch)

    def embed_items(self, batch: Batch) -> torch.Tensor:
        """Item embeddings ``[num_items, D]``, unit L2 norm."""
        return self.item_tower(batch)

    @staticmethod
    def score(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Dot products of every query with every item: ``[B, D] x [N, D] -> [B, N]``.

        Row b of ``score(q, i)`` against the matching row of the item batch (the
        diagonal for aligned pairs) is the positive of in-batch softmax training.
        """
        return queries @ items.t()  # (B, N)

    def forward(self, query_batch: Batch, item_batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings: ``([B, D], [N, D])``."""
        return self.embed_queries(query_batch), self.embed_items(item_batch)


# --------------------------------------------------------------------------- serving export


def random_batch(
    features: Sequence[FeatureInput],
    batch_size: int,
    lengths: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A random encoded batch with the layouts `FeatureEmbedding` expects (tests, benchmarks).

    Args:
        features: the tower's features.
        batch_size: B.
        lengths: list length per pooled feature (default 8); about a quarter of the
            entries are PAD.
        generator: RNG for reproducible batches.

    Returns:
        ``{name: tensor}``: int64 ``[B]`` / ``[B, length]`` indices in [1, cardinality)
        (pooled ones partly PAD), float32 ``[B, width]`` for dense features.
    """
    check_positive("batch_size", batch_size)
    lengths = lengths or {}
    batch: dict[str, torch.Tensor] = {}
    for feature in features:
        if feature.kind == FeatureKind.DENSE:
            batch[feature.name] = torch.randn(
                batch_size, feature.embedding_dim, generator=generator
            )
            continue
        shape: tuple[int, ...] = (batch_size,)
        if feature.kind in POOLED_KINDS:
            shape = (batch_size, lengths.get(feature.name, 8))
        values = torch.randint(1, feature.cardinality, shape, generator=generator)
        if feature.kind in POOLED_KINDS:
            keep = torch.rand(shape, generator=generator) < 0.75
            values = values * keep
        batch[feature.name] = values
    return batch


ExportMode = Literal["auto", "eager", "trace", "compile", "export", "onnxruntime"]
EXPORT_MODES: tuple[str, ...] = get_args(ExportMode)

# What `export_query_tower(mode="auto")` picks: the fastest mode in bench/bench_model.py
# on a 2-core CPU (see `export_query_tower`); trace is the fallback when it fails.
AUTO_EXPORT_MODE: Literal["eager", "trace", "compile", "export", "onnxruntime"] = "onnxruntime"

# The ONNX opset of exported towers (torch.onnx's default; onnxruntime >= 1.14 runs it).
ONNX_OPSET = 18
# The one output of an exported tower: float32 [batch, D], unit L2 norm per row.
ONNX_OUTPUT_NAME = "embeddings"
# The name of the batch dimension, shared by every input and the output.
BATCH_DIM = "batch"


@dataclass(frozen=True)
class TowerInput:
    """One input tensor of an exported tower: one graph input per feature of the batch.

    Attributes:
        name: the feature name, also the key of its tensor in an encoded batch.
        kind: the feature kind (how the tower reads the tensor).
        dtype: "int64" (indices, 0 = PAD) or "float32" (dense values).
        shape: named dimensions (``"batch"``, ``"<name>_length"``) or fixed widths.
    """

    name: str
    kind: FeatureKind
    dtype: Literal["int64", "float32"]
    shape: tuple[str | int, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"name", "kind", "dtype", "shape"}``."""
        return {
            "name": self.name,
            "kind": str(self.kind),
            "dtype": self.dtype,
            "shape": list(self.shape),
        }


def tower_inputs(tower: Tower) -> tuple[TowerInput, ...]:
    """The inputs of `tower` once exported (torch.export, ONNX), one per feature, in order.

    - categorical, hashed: int64 ``[batch]``
    - bag, hashed_bag, history: int64 ``[batch, <name>_length]``, right-padded with 0 (PAD);
      each feature has its own length dimension (at most ``history_max_length`` under
      position pooling; a history of at most one item has length 1)
    - dense: float32 ``[batch, width]``

    Example:
        >>> tower = Tower(
        ...     (FeatureInput("user_id", FeatureKind.CATEGORICAL, 5, 4),
        ...      FeatureInput("tags", FeatureKind.BAG, 7, 2),
        ...      FeatureInput("age", FeatureKind.DENSE, 0, 2)),
        ...     mlp_hidden=(8,), head_hidden=(), output_dim=4, rank=2,
        ... )
        >>> [(i.name, i.dtype, i.shape) for i in tower_inputs(tower)]
        [('user_id', 'int64', ('batch',)), ('tags', 'int64', ('batch', 'tags_length')), ('age', 'float32', ('batch', 2))]
    """
    inputs = []
    for feature in tower.embedding.features:
        if feature.kind == FeatureKind.DENSE:
            inputs.append(
                TowerInput(
                    feature.name, feature.kind, "float32", (BATCH_DIM, feature.embedding_dim)
                )
            )
        elif feature.kind in POOLED_KINDS:
            logits = tower.embedding.position_logits.get(feature.name)
            # A history of at most one item (position pooling) is exported with length 1.
            one = logits is not None and logits.shape[0] == 1
            length: str | int = 1 if one else f"{feature.name}_length"
            inputs.append(TowerInput(feature.name, feature.kind, "int64", (BATCH_DIM, length)))
        else:
            inputs.append(TowerInput(feature.name, feature.kind, "int64", (BATCH_DIM,)))
    return tuple(inputs)


class TowerOnTensors(nn.Module):
    """`tower` called with one tensor per feature, positionally, in feature order.

    What torch.export and the ONNX exporter trace: each tensor of the encoded batch becomes
    one graph input (`tower_inputs`) instead of one entry of a dict.

    Args:
        tower: the tower to call.

    Shapes:
        inputs as `tower_inputs(tower)`; output ``[batch_size, D]``.
    """

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower
        self.names = tower.feature_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.tower(dict(zip(self.names, tensors, strict=True)))


def _dense_embedding_bag(
    input: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> torch.Tensor | None:
    """`F.embedding_bag` of a padded 2-D input as plain tensor ops, or None if not that case.

    ``mean``: ``sum_t m_t E[x_t] / max(sum_t m_t, 1)``; ``sum``: ``sum_t m_t w_t E[x_t]``,
    with ``m_t = [x_t != padding_idx]`` and ``w_t`` the per-sample weights: what
    embedding_bag computes (an all-PAD row gives zeros), as a gather and a batched product.
    """
    if (
        input.dim() != 2
        or offsets is not None
        or max_norm is not None
        or include_last_offset
        or mode not in ("mean", "sum")
        or (mode == "mean" and per_sample_weights is not None)
    ):
        return None
    rows = F.embedding(input, weight)  # (B, L, dim)
    if padding_idx is None:
        present = torch.ones_like(input, dtype=weight.dtype)  # (B, L)
    else:
        present = (input != padding_idx).to(weight.dtype)  # (B, L)
    weights = present if per_sample_weights is None else present * per_sample_weights  # (B, L)
    # A batched (1 x L) @ (L x dim) product: one pass over the rows (multiply + sum: three).
    pooled = torch.bmm(weights.unsqueeze(1), rows).squeeze(1)  # (B, dim)
    if mode == "mean":
        return pooled / present.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, dim)
    return pooled


class _DenseEmbeddingBags(TorchFunctionMode):
    """While active, `F.embedding_bag` on padded 2-D input runs as `_dense_embedding_bag`.

    The ONNX exporter turns embedding_bag into a Loop over the bags: onnxruntime (1 thread)
    took ~240 ms on the ml-100k query tower at batch 1024, history of 50, against ~3 ms
    for the plain ops (one run on a shared 2-core VM). The plain ops give the same values.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.embedding_bag:
            out = _dense_embedding_bag(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _example_inputs(tower: Tower) -> tuple[torch.Tensor, ...]:
    """A random batch of 4, pooled lengths 4 (at most `history_max_length`), as a tuple.

    Sizes of 2 or more: torch.export specialises a dimension whose example size is 0 or 1.
    """
    lengths = {
        name: min(4, logits.shape[0]) for name, logits in tower.embedding.position_logits.items()
    }
    batch = random_batch(
        tower.embedding.features, 4, lengths, generator=torch.Generator().manual_seed(0)
    )
    return tuple(batch[name] for name in tower.feature_names)


def _dynamic_shapes(tower: Tower) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export's `dynamic_shapes` for `TowerOnTensors(tower)`: a dynamic batch size
    shared by every input, and a dynamic length per pooled feature (at most
    ``history_max_length`` under position pooling)."""
    from torch.export import Dim

    batch = Dim(BATCH_DIM)
    shapes: list[dict[int, Any]] = []
    for index, spec in enumerate(tower_inputs(tower)):
        dims: dict[int, Any] = {0: batch}
        if len(spec.shape) == 2 and isinstance(spec.shape[1], str):  # a pooled length
            logits = tower.embedding.position_logits.get(spec.name)
            # Dim names must be identifiers; the ONNX export renames them (`tower_inputs`).
            name = f"length_{index}"
            dims[1] = Dim(name) if logits is None else Dim(name, max=int(logits.shape[0]))
        shapes.append(dims)
    return (tuple(shapes),)  # one entry: the *tensors argument of TowerOnTensors


def export_tower_program(tower: Tower) -> torch.export.ExportedProgram:
    """`torch.export` of `tower` (put in eval mode): a graph with a dynamic batch size and
    dynamic bag and history lengths, one input per feature (`tower_inputs`).

    Bag and history pooling are recorded as gather + reduce (`_dense_embedding_bag`, the
    values of embedding_bag): the ONNX exporter turns embedding_bag into a loop over the
    bags, and torch.export's embedding_bag graph refuses batch 1 (its guards assume
    batch >= 2). The batch checks of `FeatureEmbedding` are Python conditions: the graph
    keeps them only as guards, so callers check batches first.

    Args:
        tower: the tower to export (traced on a random batch; values do not steer it).

    Returns:
        The `torch.export.ExportedProgram`; ``program.module()(*tensors) -> [batch_size, D]``.
    """
    tower.eval()
    with warnings.catch_warnings(), torch.no_grad(), _DenseEmbeddingBags():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecations
        return torch.export.export(
            TowerOnTensors(tower), _example_inputs(tower), dynamic_shapes=_dynamic_shapes(tower)
        )


def export_tower_onnx(tower: Tower, opset: int = ONNX_OPSET) -> torch.onnx.ONNXProgram:
    """`tower` as an ONNX model (torch.onnx's dynamo exporter on `export_tower_program`).

    Inputs are named and shaped as `tower_inputs(tower)` (dimension names included);
    the output is `ONNX_OUTPUT_NAME`, float32 ``[batch, D]``. Needs the onnx and
    onnxscript packages.

    Args:
        tower: the tower to export.
        opset: the ONNX opset version.

    Returns:
        The `torch.onnx.ONNXProgram` (``.save(path)``, ``.model_proto``).

    Raises:
        RuntimeError: the exported model's inputs differ from `tower_inputs`.
    """
    program = export_tower_program(tower)
    specs = tower_inputs(tower)
    # The exporter's chatter: a warning per torchvision op it cannot find, an info line per
    # optimisation pass (verbose=False keeps its progress lines off stdout).
    quiet = {"torch.onnx": logging.ERROR, "onnxscript": logging.WARNING, "onnx_ir": logging.WARNING}
    levels = {logger_name: logging.getLogger(logger_name).level for logger_name in quiet}
    try:
        for logger_name, level in quiet.items():
            logging.getLogger(logger_name).setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                input_names=[spec.name for spec in specs],
                output_names=[ONNX_OUTPUT_NAME],
                opset_version=opset,
                verbose=False,
            )
    finally:
        for logger_name, level in levels.items():
            logging.getLogger(logger_name).setLevel(level)
    if onnx_program is None:  # only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    graph_inputs = onnx_program.model.graph.inputs
    renames: dict[Any, str] = {}  # symbolic dim name -> ours
    for value, spec in zip(graph_inputs, specs, strict=True):
        assert value.shape is not None
        for dim, name in zip(value.shape, spec.shape, strict=True):
            if isinstance(name, str) and not isinstance(dim, int) and dim.value is not None:
                renames[dim.value] = name
    onnx_program.rename_axes(renames)
    got = [
        (value.name, [d if isinstance(d, int) else d.value for d in value.shape or ()])
        for value in graph_inputs
    ]
    expected = [(spec.name, list(spec.shape)) for spec in specs]
    if got != expected:
        raise RuntimeError(f"the ONNX tower's inputs are {got}; expected {expected}")
    return onnx_program


class _OnnxRuntimeTower:
    """An ONNX tower in an onnxruntime session, called like the tower: batch -> tensor.

    Inputs go to onnxruntime as numpy arrays sharing the tensors' memory (contiguous ones);
    the output comes back as a tensor over onnxruntime's array.
    """

    def __init__(self, session: onnxruntime.InferenceSession, names: Sequence[str]) -> None:
        self.session = session
        self.names = tuple(names)
        self.output_names = [ONNX_OUTPUT_NAME]

    def __call__(self, inputs: Batch) -> torch.Tensor:
        feeds = {name: inputs[name].contiguous().numpy() for name in self.names}
        (out,) = self.session.run(self.output_names, feeds)
        return torch.from_numpy(out)  # (B, D)


def onnxruntime_session(path: str | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session over the ONNX model at `path` (weights beside it too).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (inter-op: 1, sequential execution).

    Returns:
        The `onnxruntime.InferenceSession`.
    """
    import onnxruntime

    check_positive("threads", threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ExportedQueryTower:
    """A query tower prepared for serving: one Python call embeds one batch.

    Calls run under ``torch.inference_mode()`` on the tower in eval mode. The batch is
    checked (`FeatureEmbedding.check_batch`, and the history length under position
    pooling) before the compiled, traced, exported or onnxruntime function runs, so bad
    input gets the same ``ValueError`` as in eager mode.

    Args:
        tower: the query tower (put in eval mode).
        function: the callable that runs it (the tower, its trace, its compiled form, its
            exported program or its onnxruntime session), ``{name: tensor} -> [B, D]``.
        mode: "eager", "trace", "compile", "export" or "onnxruntime", for logs and metrics.

    Shapes:
        ``__call__``: an encoded query batch -> ``[batch_size, D]``.
    """

    def __init__(self, tower: Tower, function: Callable[[Batch], torch.Tensor], mode: str) -> None:
        self.tower = tower
        self.function = function
        self.mode = mode
        self.feature_names = tower.feature_names
        self.max_lengths = {
            name: int(logits.shape[0]) for name, logits in tower.embedding.position_logits.items()
        }

    def __call__(self, batch: Batch) -> torch.Tensor:
        self.tower.embedding.check_batch(batch)
        for name, max_length in self.max_lengths.items():  # eager raises it in `forward`
            if batch[name].shape[1] > max_length:
                raise ValueError(
                    f"feature {name!r} holds {batch[name].shape[1]} items; position "
                    f"pooling was built for at most {max_length}"
                )
        inputs = {name: batch[name] for name in self.feature_names}
        with torch.inference_mode():
            return self.function(inputs)

    def __repr__(self) -> str:
        return f"ExportedQueryTower(mode={self.mode!r}, features={list(self.feature_names)})"


def export_query_tower(
    model: TwoTowerModel | Tower,
    mode: ExportMode = "auto",
    example_batch: Batch | None = None,
    *,
    threads: int = 1,
) -> ExportedQueryTower:
    """Prepare the query tower for serving under ``torch.inference_mode``.

    Measured with ``bench/bench_model.py --export-only`` (``bench/results/
    bench_model_export.json``) on the ml-100k default config, torch 2.13 CPU, onnxruntime
    1.32, a quiet 2-core VM (a Python loop of 10^7 additions: 0.53 s). Best of 7
    interleaved rounds of block medians, ms per call, `ExportedQueryTower` overhead (the
    batch check) included; two runs gave the same figures within 4 %:

    ===========  =======  =======  ==========  =============================
    mode         threads  batch 1  batch 1024  first call (export included)
    ===========  =======  =======  ==========  =============================
    eager        1        0.152    3.17        0.005 s
    trace        1        0.075    2.89        0.07 s
    export       1        0.284    3.08        1.2 s
    onnxruntime  1        0.040    2.40        2.0 s
    eager        2        0.154    2.55
    trace        2        0.077    2.36
    export       2        0.282    2.36
    onnxruntime  2        0.039    1.78        1.1 s
    ===========  =======  =======  ==========  =============================

    onnxruntime takes 0.53x trace's time at batch 1 and 0.83x at batch 1024, so ``"auto"``
    means ``"onnxruntime"`` (`AUTO_EXPORT_MODE`); torch.export's ``.module()`` checks its
    guards in Python on every call and is the slowest at batch 1. Outputs equal eager's
    within 1.1e-7. torch.compile (an earlier run, 1 thread) brought no gain over trace and
    costs a minute or more of cold start.

    The modes:

    - ``"eager"``: the tower itself.
    - ``"trace"``: `torch.jit.trace` (deprecated by PyTorch; the warning is silenced here),
      frozen: the weights become constants, so export again after loading new weights.
      Kept as the fallback for when the two below fail (the service's order).
    - ``"export"``: `torch.export` (`export_tower_program`), run as
      ``ExportedProgram.module()``: an aten-level graph, guards checked on every call.
    - ``"onnxruntime"``: the ONNX export of the tower (`export_tower_onnx`, a few
      seconds) in an onnxruntime `InferenceSession` with `threads` intra-op threads;
      inputs go in as numpy arrays, the output comes back as a tensor. The session holds
      its own copy of the weights (the shared item id table included). Needs onnx,
      onnxscript and onnxruntime.
    - ``"compile"``: `torch.compile` with ``dynamic=True``, so new batch sizes do not
      recompile.

    Every mode generalises over batch size and bag lengths (no shape-dependent branches);
    the batch check stays in Python, so bad input still gets the `FeatureEmbedding`
    ``ValueError``.

    Args:
        model: a `TwoTowerModel` (its query tower is used) or a `Tower`.
        mode: "auto", "eager", "trace", "compile", "export" or "onnxruntime".
        example_batch: a batch to trace with (mode "trace"); default a random batch of 8.
        threads: "onnxruntime": intra-op threads of the session (the torch modes use
            torch's own setting, `torch.set_num_threads`).

    Returns:
        An `ExportedQueryTower`: ``tower(batch) -> [batch_size, D]``.
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"`mode` must be one of {list(EXPORT_MODES)}; got {mode!r}")
    check_positive("threads", threads)
    tower = model.query_tower if isinstance(model, TwoTowerModel) else model
    tower.eval()
    chosen = AUTO_EXPORT_MODE if mode == "auto" else mode
    started = time.perf_counter()
    function: Callable[[Batch], torch.Tensor]
    if chosen == "eager":
        function = tower
    elif chosen == "trace":
        if example_batch is None:
            example_batch = random_batch(tower.embedding.features, 8)
        inputs = {name: example_batch[name] for name in tower.feature_names}
        tower.embedding.check_batch(inputs)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # check_batch's shape tests
            traced = torch.jit.trace(tower, (inputs,), strict=False, check_trace=False)
            function = torch.jit.freeze(traced.eval())  # weights become constants
    elif chosen == "export":
        module = export_tower_program(tower).module()
        names = tower.feature_names

        def function(inputs: Batch) -> torch.Tensor:
            return module(*(inputs[name] for name in names))

    elif chosen == "onnxruntime":
        # Through a file: a model over protobuf's 2 GiB limit keeps its weights beside it.
        with tempfile.TemporaryDirectory(prefix="query-tower-onnx-") as tmp:
            path = Path(tmp) / "query_tower.onnx"
            export_tower_onnx(tower).save(path)
            session = onnxruntime_session(path, threads)
        function = _OnnxRuntimeTower(session, tower.feature_names)
    else:
        function = torch.compile(tower, dynamic=True)
    logger.info(
        "query tower exported: mode=%s (asked %s) in %.2fs",
        chosen,
        mode,
        time.perf_counter() - started,
    )
    return ExportedQueryTower(tower, function, chosen)
