"""The ablation's plan: which variants run, with which config, the report's cut-offs, and
(for ``--match-params``) each variant resized to the reference variant's dense parameters.
Parameters and FLOPs follow `retrieval.cost`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retrieval.kinds import ARRANGEMENTS, CROSS_KINDS

if TYPE_CHECKING:
    from retrieval.encoders import FeatureEncoder
    from retrieval.towers import ModelConfig
    from training.config import TrainConfig

DEFAULT_ARRANGEMENTS = ARRANGEMENTS  # parallel, stacked, deep, cross
DEFAULT_CROSS = CROSS_KINDS  # full, lowrank, mix, masked
REFERENCE = ("parallel", "lowrank")  # the default variant whose size --match-params targets
BASE_KS = (10, 20, 50, 100)
BIG_CATALOG = 20_000  # from this many items on, recall@1000 is the headline metric


@dataclass(frozen=True)
class Variant:
    """One tower shape: an arrangement and (unless "deep") a cross layer kind."""

    arrangement: str
    cross: str | None

    @property
    def name(self) -> str:
        return self.arrangement if self.cross is None else f"{self.arrangement}-{self.cross}"


def plan_variants(arrangements: Sequence[str], crosses: Sequence[str]) -> list[Variant]:
    """Every arrangement x cross kind; "deep" (no cross network) once.

    >>> [v.name for v in plan_variants(["parallel", "deep"], ["full", "lowrank"])]
    ['parallel-full', 'parallel-lowrank', 'deep']
    """
    for name in arrangements:
        if name not in ARRANGEMENTS:
            raise ValueError(
                f"`--arrangements` entries must be in {list(ARRANGEMENTS)}; got {name!r}"
            )
    for name in crosses:
        if name not in CROSS_KINDS:
            raise ValueError(f"`--cross` entries must be in {list(CROSS_KINDS)}; got {name!r}")
    variants: list[Variant] = []
    for arrangement in dict.fromkeys(arrangements):
        if arrangement == "deep":
            variants.append(Variant("deep", None))
        else:
            if not crosses:
                raise ValueError(f"arrangement {arrangement!r} needs at least one `--cross` kind")
            variants.extend(Variant(arrangement, cross) for cross in dict.fromkeys(crosses))
    if not variants:
        raise ValueError("no variants to run (empty `--arrangements`)")
    return variants


def report_ks(num_items: int) -> tuple[int, ...]:
    """Cut-offs of the report: 10, 20, 50, 100, plus 1000 when the catalog is larger.

    >>> report_ks(1682), report_ks(500)
    ((10, 20, 50, 100, 1000), (10, 20, 50, 100))
    """
    return (*BASE_KS, 1000) if num_items > 1000 else BASE_KS


def headline_k(num_items: int) -> int:
    """recall@50, or recall@1000 for big catalogs (>= `BIG_CATALOG` items)."""
    return 1000 if num_items >= BIG_CATALOG else 50


def variant_config(
    base: TrainConfig,
    variant: Variant,
    *,
    seed: int,
    epochs: int | None,
    ks: Sequence[int],
    plateau: bool = False,
) -> TrainConfig:
    """The base `TrainConfig` with the variant's shape, the seed, the epoch budget, the
    report's K in `eval.ks`, early stopping off (patience beyond the budget) and popularity
    as the only baseline of each run's test table (EASE and ALS do not depend on the variant).
    With `plateau`, early stopping stays on (the base config's patience): every run trains
    to its validation plateau, at most `epochs` epochs."""
    epochs = epochs or base.epochs
    return base.with_overrides(
        seed=seed,
        epochs=epochs,
        **{
            "model.arrangement": variant.arrangement,
            "model.cross": variant.cross or base.model.cross,
            "eval.ks": sorted({*base.eval.ks, *ks}),
            "eval.patience": base.eval.patience if plateau else epochs + 1,
            "eval.baselines": ["popularity"],
        },
    )


@dataclass
class CostModel:
    """Builds a variant's `ModelConfig` as the trainer would (from the fitted encoder)."""

    encoder: FeatureEncoder

    def model_config(self, config: TrainConfig) -> ModelConfig:
        from training.trainer import build_model_config

        return build_model_config(self.encoder, config)

    def costs(self, config: TrainConfig) -> dict[str, int]:
        return model_costs(self.model_config(config))

    def max_rank(self) -> int:
        """Largest cross rank valid in both towers (the narrower tower's input width d)."""
        return min(
            sum(f.output_dim for f in self.encoder.feature_inputs(side))
            for side in ("query", "item")
        )


def model_costs(model_config: ModelConfig) -> dict[str, int]:
    """Parameters and per-example FLOPs of a `ModelConfig` (see `retrieval.cost`)."""
    from retrieval.cost import model_cost

    cost = model_cost(model_config)
    return {
        "params": cost.params,
        "params_dense": cost.query.params_dense + cost.item.params_dense,
        "params_embedding": cost.query.params_embedding + cost.item.params_embedding,
        "flops_query": cost.query.flops,
        "flops_item": cost.item.flops,
        "flops": cost.query.flops + cost.item.flops,
    }


def fit_knob_to_params(
    config: TrainConfig,
    target_dense: int,
    knob: str,
    dense_params: Callable[[TrainConfig], int],
    *,
    max_value: int = 16384,
) -> tuple[TrainConfig, int, int]:
    """Resize `config` with one knob so both towers' dense parameters come closest to
    `target_dense`; returns ``(config, value, dense params)``.

    The trainer builds both towers from one `model` section, so the width (or rank) is
    shared by the two towers; `retrieval.cost.width_for_param_budget` sizes one tower, so
    the same bisection is done here over the sum (monotone in either knob), with the same
    `scale_mlp` rescaling.

    Args:
        config: the variant's `TrainConfig`.
        target_dense: wanted dense parameter count of the two towers.
        knob: "mlp_width" (rescale `model.mlp_hidden`, first layer = width) or "rank".
        dense_params: counts a config's dense parameters (both towers).
        max_value: the largest width or rank tried.
    """
    from retrieval.cost import scale_mlp

    def resized(value: int) -> TrainConfig:
        if knob == "mlp_width":
            return config.with_overrides(
                **{"model.mlp_hidden": list(scale_mlp(config.model.mlp_hidden, value))}
            )
        return config.with_overrides(**{"model.rank": value})

    if knob not in ("mlp_width", "rank"):
        raise ValueError(f"`knob` must be 'mlp_width' or 'rank'; got {knob!r}")
    low, high = 1, max_value
    while low < high:  # first value reaching the target
        mid = (low + high) // 2
        if dense_params(resized(mid)) >= target_dense:
            high = mid
        else:
            low = mid + 1
    candidates = [low - 1, low] if low > 1 else [low]
    best = min(candidates, key=lambda v: (abs(dense_params(resized(v)) - target_dense), v))
    best_config = resized(best)
    return best_config, best, dense_params(best_config)


def knob_for(variant: Variant) -> str | None:
    """Which knob `--match-params` turns for a variant (None: none exists)."""
    if variant.arrangement in ("parallel", "stacked", "deep"):
        return "mlp_width"
    if variant.cross in ("lowrank", "mix", "masked"):
        return "rank"
    return None  # cross-only network with full d x d layers: its size is fixed by d


def match_variant_params(
    base: TrainConfig, variant: Variant, config: TrainConfig, costs: CostModel
) -> tuple[TrainConfig, dict[str, Any]]:
    """`config` resized to the reference variant's dense parameter count, plus a record."""
    reference = base.with_overrides(
        **{"model.arrangement": REFERENCE[0], "model.cross": REFERENCE[1]}
    )
    target = costs.costs(reference)["params_dense"]
    before = costs.costs(config)["params_dense"]
    info: dict[str, Any] = {"target_params_dense": target, "params_dense_before": before}
    if (variant.arrangement, variant.cross) == REFERENCE:
        return config, {
            **info,
            "knob": None,
            "value": None,
            "params_dense": before,
            "note": "reference",
        }
    knob = knob_for(variant)
    if knob is None:
        return config, {
            **info,
            "knob": None,
            "value": None,
            "params_dense": before,
            "note": "unmatched: a cross-only network of full layers has no width or rank knob",
        }
    matched, value, params = fit_knob_to_params(
        config,
        target,
        knob,
        lambda c: costs.costs(c)["params_dense"],
        max_value=16384 if knob == "mlp_width" else costs.max_rank(),
    )
    deviation = params / target - 1.0
    note = "matched" if abs(deviation) <= 0.05 else f"closest reachable ({deviation:+.1%})"
    return matched, {**info, "knob": knob, "value": value, "params_dense": params, "note": note}
