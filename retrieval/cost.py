"""Parameter and FLOP counts of the towers, computed from the config (no model is built).

Conventions (the same for every variant, so variants compare fairly):

- **Parameters**: every trainable number. A tower's `params_embedding` counts the tables it
  owns; a history feature's table belongs to the item tower (it is the item id table) and
  shows up in the query tower as `params_shared`, so `ModelCost.params` counts it once.
- **FLOPs per example**, forward pass, in eval mode:
    * matrix products: 2 FLOPs per multiply-add (``[1, n] x [n, m]`` is ``2 n m``);
    * elementwise additions and multiplications in the formulas (biases, the Hadamard
      product with x_0, residuals, gate and mask scaling): 1 FLOP per output element;
    * 0 FLOPs for embedding lookups and mean pooling (memory gathers, reported as
      nothing here), nonlinearities (ReLU, tanh, sigmoid, softmax), LayerNorm, dropout,
      concatenation and the final L2 normalisation. These are O(width) and small next to
      the products; they still take time, which the benchmark measures.

Per layer, with d = tower input width, r = rank, K = experts, h = mask hidden width
(matmul FLOPs + elementwise FLOPs; parameters):

==========================  ========================================  ====================
layer                       FLOPs                                     parameters
==========================  ========================================  ====================
Linear n -> m (with bias)   2 n m + m                                 n m + m
cross "full"                2 d^2 + 3d                                d^2 + d
cross "lowrank"             4 d r + 3d                                2 d r + d
cross "mix"                 K (4 d r + 2 r^2 + 2 d) + K r + 4d        K (2 d r + r^2 + d) + d
cross "masked"              4 d r + 2 d h + 2 h r + 3d + h + 3r       2 d r + d + d h + h + h r + r
==========================  ========================================  ====================

("mix": V, C, U products and the gate ``2 d K``; elementwise: gate scaling of the K r
projected values, ``(sum_i G_i) b``, bias add, Hadamard, residual. "masked": the two
mask-network Linears, then ``2 sigmoid``, mask product, bias, Hadamard, residual.)
LayerNorm adds ``2 m`` parameters per MLP layer. The matmul part equals what
``torch.utils.flop_counter.FlopCounterMode`` reports for one example.

Example:
    >>> from retrieval.features import FeatureInput, FeatureKind
    >>> cfg = TowerConfig(
    ...     features=(FeatureInput("a", FeatureKind.CATEGORICAL, 10, 4),),
    ...     arrangement="cross", cross_kind="full", cross_layers=1,
    ...     head_hidden=(), output_dim=2,
    ... )
    >>> cost = tower_cost(cfg)
    >>> cost.params_embedding, cost.params_dense  # 10*4; (4*4 + 4) + (4*2 + 2)
    (40, 30)
    >>> cost.flops  # (2*16 + 3*4) + (2*4*2 + 2)
    62
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from retrieval.features import FeatureKind
from retrieval.layers import check_positive
from retrieval.towers import USES_CROSS, USES_MLP, ModelConfig, TowerConfig


@dataclass(frozen=True)
class TowerCost:
    """Parameter and per-example FLOP counts of one tower (see the module conventions).

    Args:
        params_embedding: weights of the embedding tables the tower owns.
        params_shared: weights of tables it reads but another tower owns (history).
        params_dense: all other weights (cross layers, MLPs, head, projection).
        flops_matmul: matrix-product FLOPs per example (2 per multiply-add).
        flops_elementwise: elementwise add/multiply FLOPs per example.
    """

    params_embedding: int
    params_shared: int
    params_dense: int
    flops_matmul: int
    flops_elementwise: int

    @property
    def params(self) -> int:
        """Parameters this tower owns (shared tables excluded)."""
        return self.params_embedding + self.params_dense

    @property
    def params_standalone(self) -> int:
        """Parameters needed to run this tower alone (shared tables included)."""
        return self.params + self.params_shared

    @property
    def flops(self) -> int:
        """FLOPs per example: matmul + elementwise."""
        return self.flops_matmul + self.flops_elementwise


@dataclass(frozen=True)
class ModelCost:
    """Costs of both towers; `params` counts each shared table once.

    Args:
        query: the query tower's costs.
        item: the item tower's costs.
    """

    query: TowerCost
    item: TowerCost

    @property
    def params(self) -> int:
        """All parameters of the model, each shared table once."""
        return self.query.params + self.item.params


@dataclass(frozen=True)
class _Count:
    params: int = 0
    matmul: int = 0
    elementwise: int = 0

    def __add__(self, other: _Count) -> _Count:
        return _Count(
            self.params + other.params,
            self.matmul + other.matmul,
            self.elementwise + other.elementwise,
        )


def _linear(n: int, m: int, bias: bool = True) -> _Count:
    return _Count(n * m + (m if bias else 0), 2 * n * m, m if bias else 0)


def _mlp(in_features: int, hidden: Sequence[int], layer_norm: bool) -> tuple[_Count, int]:
    total = _Count()
    width = in_features
    for out in hidden:
        total = total + _linear(width, out) + _Count(params=2 * out if layer_norm else 0)
        width = out
    return total, width


def cross_layer_cost(kind: str, d: int, rank: int, num_experts: int, mask_hidden: int) -> _Count:
    """Parameters and per-example FLOPs of one cross layer (the table in the module doc)."""
    r, k, h = rank, num_experts, mask_hidden
    if kind == "full":
        return _Count(d * d + d, 2 * d * d, 3 * d)
    if kind == "lowrank":
        return _Count(2 * d * r + d, 4 * d * r, 3 * d)
    if kind == "mix":
        return _Count(
            params=k * (2 * d * r + r * r + d) + d,
            matmul=k * (4 * d * r + 2 * r * r + 2 * d),
            elementwise=k * r + 4 * d,
        )
    if kind == "masked":
        mask_net = _linear(d, h) + _linear(h, r)
        return mask_net + _Count(2 * d * r + d, 4 * d * r, 3 * d + 2 * r)
    raise ValueError(f"`kind` must be one of full, lowrank, mix, masked; got {kind!r}")


def tower_cost(config: TowerConfig) -> TowerCost:
    """Parameters and FLOPs per example of the tower `config` describes.

    Args:
        config: the tower's architecture.

    Returns:
        A `TowerCost`.
    """
    own = shared = 0
    for feature in config.features:
        if feature.kind == FeatureKind.DENSE:
            continue
        size = feature.cardinality * feature.embedding_dim
        if feature.kind == FeatureKind.HISTORY:
            shared += size
        else:
            own += size
    d = config.input_dim
    total = _Count()
    width = d
    if config.arrangement in USES_CROSS:
        layer = cross_layer_cost(
            config.cross_kind, d, config.rank, config.num_experts, config.mask_hidden
        )
        for _ in range(config.cross_layers):
            total = total + layer
    if config.arrangement in USES_MLP:
        mlp, mlp_out = _mlp(d, config.mlp_hidden, config.layer_norm)
        total = total + mlp
        width = d + mlp_out if config.arrangement == "parallel" else mlp_out
    head, head_out = _mlp(width, config.head_hidden, config.layer_norm)
    total = total + head + _linear(head_out, config.output_dim)
    return TowerCost(
        params_embedding=own,
        params_shared=shared,
        params_dense=total.params,
        flops_matmul=total.matmul,
        flops_elementwise=total.elementwise,
    )


def model_cost(config: ModelConfig) -> ModelCost:
    """Costs of both towers of `config` (shared tables counted once in `.params`)."""
    return ModelCost(query=tower_cost(config.query), item=tower_cost(config.item))


@dataclass(frozen=True)
class BudgetFit:
    """Result of `width_for_param_budget`.

    Args:
        knob: what was searched, "mlp_width" or "rank".
        value: the chosen width or rank.
        params: the parameter count reached (same counting as the target).
        target_params: the requested count.
        config: the input config with the chosen value applied.
    """

    knob: str
    value: int
    params: int
    target_params: int
    config: TowerConfig


def scale_mlp(hidden: Sequence[int], width: int) -> tuple[int, ...]:
    """`hidden` rescaled so its first layer is `width`, keeping the layer ratios.

    >>> scale_mlp((256, 128, 64), 100)
    (100, 50, 25)
    """
    check_positive("width", width)
    first = hidden[0]
    return tuple(max(1, round(width * h / first)) for h in hidden)


def width_for_param_budget(
    config: TowerConfig,
    target_params: int,
    knob: Literal["mlp_width", "rank"] = "mlp_width",
    include_embeddings: bool = False,
    max_width: int = 16384,
) -> BudgetFit:
    """Find the MLP width (or cross rank) whose tower is closest to `target_params`.

    ``mlp_width`` rescales the block MLP with `scale_mlp` (first layer = the width, the
    others in the same ratios as ``config.mlp_hidden``); ``rank`` sets the cross rank in
    [1, d]. Parameters grow monotonically with either knob, so the search is a bisection
    for the first value reaching the target, then the closer of it and its predecessor.

    Args:
        config: the tower to resize (its other fields are kept).
        target_params: the wanted parameter count, >= 1.
        knob: "mlp_width" or "rank" (low-rank cross kinds with a cross network only).
        include_embeddings: count embedding tables too (default: dense weights only, which
            is what the architectures differ in).
        max_width: the largest MLP width tried.

    Returns:
        A `BudgetFit` with the value, the count reached and the resized config.

    Example:
        >>> from retrieval.features import FeatureInput, FeatureKind
        >>> cfg = TowerConfig(features=(FeatureInput("a", FeatureKind.CATEGORICAL, 10, 16),),
        ...                   arrangement="deep", mlp_hidden=(64, 32), head_hidden=(), output_dim=8)
        >>> fit = width_for_param_budget(cfg, 5000)
        >>> fit.value, fit.config.mlp_hidden, fit.params  # (16*81+81) + (81*40+40) + (40*8+8)
        (81, (81, 40), 4985)
    """
    check_positive("target_params", target_params)
    check_positive("max_width", max_width)

    def count(value: int) -> tuple[int, TowerConfig]:
        if knob == "mlp_width":
            resized = replace(config, mlp_hidden=scale_mlp(config.mlp_hidden, value))
        else:
            resized = replace(config, rank=value)
        cost = tower_cost(resized)
        return (cost.params if include_embeddings else cost.params_dense), resized

    if knob == "mlp_width":
        if config.arrangement not in USES_MLP:
            raise ValueError(
                f"`knob` 'mlp_width' needs an arrangement with an MLP; got {config.arrangement!r}"
            )
        high = max_width
    elif knob == "rank":
        if config.arrangement not in USES_CROSS or config.cross_kind == "full":
            raise ValueError(
                "`knob` 'rank' needs a low-rank cross network; got arrangement "
                f"{config.arrangement!r}, cross_kind {config.cross_kind!r}"
            )
        high = config.input_dim
    else:
        raise ValueError(f"`knob` must be 'mlp_width' or 'rank'; got {knob!r}")
    low = 1
    while low < high:  # first value whose count reaches the target (or `high`)
        mid = (low + high) // 2
        if count(mid)[0] >= target_params:
            high = mid
        else:
            low = mid + 1
    candidates = [low - 1, low] if low > 1 else [low]
    best = min(candidates, key=lambda v: (abs(count(v)[0] - target_params), v))
    params, resized = count(best)
    return BudgetFit(knob, best, params, target_params, resized)
