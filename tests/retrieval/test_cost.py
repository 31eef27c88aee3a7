"""Cost accounting against hand-computed counts and against the built modules."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from tower_configs import small_tower_config

from retrieval.cost import (
    model_cost,
    scale_mlp,
    tower_cost,
    width_for_param_budget,
)
from retrieval.features import FeatureInput, FeatureKind
from retrieval.towers import ARRANGEMENTS, ModelConfig, TowerConfig, TwoTowerModel, random_batch

CROSS_KINDS = ("full", "lowrank", "mix", "masked")

# d = 3 + 1 = 4: one categorical of 10 x 3 (30 embedding weights) and one dense column.
TINY = (
    FeatureInput("a", FeatureKind.CATEGORICAL, 10, 3),
    FeatureInput("b", FeatureKind.DENSE, 0, 1),
)


def tiny(**changes: Any) -> TowerConfig:
    """The shared small tower, narrower still so the counts below stay hand-checkable:
    1 cross layer of rank 2 (2 experts, mask hidden 3), MLP (5,), no head, output 2."""
    sizes: dict[str, Any] = dict(
        cross_layers=1, rank=2, mlp_hidden=(5,), head_hidden=(), output_dim=2
    )
    return small_tower_config(TINY, **{**sizes, **changes})


@pytest.mark.parametrize(
    ("changes", "params_dense", "flops_matmul", "flops_elementwise"),
    [
        # parallel, full: cross 4*4+4 = 20 params, 2*16 mm + 3*4 ew; MLP 4->5: 20+5, 40 + 5;
        # projection (4+5)->2: 18+2, 36 + 2.  Params 20+25+20 = 65; mm 32+40+36 = 108; ew 12+5+2 = 19
        ({"arrangement": "parallel", "cross_kind": "full"}, 65, 108, 19),
        # cross, lowrank r=2: 2*4*2+4 = 20 params, 4*4*2 = 32 mm, 12 ew; projection 4->2: 10, 16, 2
        ({"arrangement": "cross", "cross_kind": "lowrank"}, 30, 48, 14),
        # cross, mix r=2 K=2: K(2dr + r^2 + d) + d = 2(16+4+4)+4 = 52; mm K(4dr + 2r^2 + 2d)
        # = 2(32+8+8) = 96; ew K r + 4d = 4+16 = 20; projection 10, 16, 2
        ({"arrangement": "cross", "cross_kind": "mix"}, 62, 112, 22),
        # cross, masked r=2 h=3: 2dr+d = 20, mask net 4*3+3 + 3*2+2 = 23; mm 4dr = 32 +
        # 2*4*3 = 24 + 2*3*2 = 12 -> 68; ew 3d + h + 3r = 12+3+6 = 21; projection 10, 16, 2.
        # Params 20+23+10 = 53; mm 68+16 = 84; ew 21+2 = 23
        ({"arrangement": "cross", "cross_kind": "masked"}, 53, 84, 23),
        # stacked, full, 2 layers: cross 2*20 = 40, mm 64, ew 24; MLP 4->5: 25, 40, 5;
        # projection 5->2: 12, 20, 2
        ({"arrangement": "stacked", "cross_layers": 2}, 77, 124, 31),
        # deep + LayerNorm, head (3,): MLP 4->5: 25 + 10 (LN), 40, 5; head 5->3: 18 + 6 (LN),
        # 30, 3; projection 3->2: 8, 12, 2
        ({"arrangement": "deep", "layer_norm": True, "head_hidden": (3,)}, 67, 82, 10),
    ],
)
def test_tower_cost_hand_computed(changes, params_dense, flops_matmul, flops_elementwise) -> None:
    cost = tower_cost(tiny(**changes))
    assert cost.params_embedding == 30 and cost.params_shared == 0
    assert cost.params_dense == params_dense
    assert cost.params == 30 + params_dense
    assert (cost.flops_matmul, cost.flops_elementwise) == (flops_matmul, flops_elementwise)
    assert cost.flops == flops_matmul + flops_elementwise


ITEMS = (
    FeatureInput("item_id", FeatureKind.CATEGORICAL, 20, 6),
    FeatureInput("tags", FeatureKind.HASHED_BAG, 11, 4),
    FeatureInput("price", FeatureKind.DENSE, 0, 2),
)
QUERIES = (
    FeatureInput("user_id", FeatureKind.CATEGORICAL, 9, 6),
    FeatureInput("history", FeatureKind.HISTORY, 20, 6, shared_with="item_id"),
)


def model_config(**changes) -> ModelConfig:
    common: dict[str, Any] = dict(num_experts=3, mask_hidden=5)
    common.update(changes)
    return ModelConfig(
        query=small_tower_config(QUERIES, **common),
        item=small_tower_config(ITEMS, **common),
    )


@pytest.mark.parametrize(
    ("arrangement", "kind", "layer_norm"),
    [(a, k, False) for a, k in itertools.product(ARRANGEMENTS, CROSS_KINDS)]
    + [("parallel", "masked", True)],
)
def test_counts_match_the_built_model(arrangement: str, kind: str, layer_norm: bool) -> None:
    config = model_config(arrangement=arrangement, cross_kind=kind, layer_norm=layer_norm)
    model = TwoTowerModel(config).eval()
    cost = model_cost(config)

    # Parameters: the shared history table (20 x 6) is the item tower's and counted once.
    assert cost.query.params_shared == 120 and cost.item.params_shared == 0
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.item.params == sum(p.numel() for p in model.item_tower.parameters())
    assert cost.query.params_standalone == sum(p.numel() for p in model.query_tower.parameters())

    # Matmul FLOPs: what PyTorch's own counter sees, per example.
    batch_size = 8
    for tower, tower_cfg, tower_cost_ in (
        (model.query_tower, config.query, cost.query),
        (model.item_tower, config.item, cost.item),
    ):
        batch = random_batch(tower_cfg.features, batch_size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            tower(batch)
        assert counter.get_total_flops() == batch_size * tower_cost_.flops_matmul


def test_scale_mlp_keeps_ratios() -> None:
    assert scale_mlp((256, 128, 64), 512) == (512, 256, 128)
    assert scale_mlp((100, 30), 10) == (10, 3)
    assert scale_mlp((64, 1), 4) == (4, 1)  # never below 1


@pytest.mark.parametrize("target", [2_000, 20_000, 200_000])
def test_width_for_param_budget_picks_the_closest_width(target: int) -> None:
    config = tiny(arrangement="parallel", mlp_hidden=(64, 32), head_hidden=(16,))
    fit = width_for_param_budget(config, target)
    assert fit.knob == "mlp_width" and fit.target_params == target
    assert fit.config.mlp_hidden == scale_mlp((64, 32), fit.value)
    assert fit.params == tower_cost(fit.config).params_dense

    def dense(width: int) -> int:
        return tower_cost(
            tiny(arrangement="parallel", mlp_hidden=scale_mlp((64, 32), width), head_hidden=(16,))
        ).params_dense

    error = abs(fit.params - target)
    assert error <= abs(dense(fit.value - 1) - target)
    assert error <= abs(dense(fit.value + 1) - target)


def test_width_for_param_budget_rank_and_embeddings() -> None:
    features = (FeatureInput("a", FeatureKind.CATEGORICAL, 100, 32),)
    config = TowerConfig(
        features=features,
        arrangement="cross",
        cross_kind="lowrank",
        rank=4,
        head_hidden=(),
        output_dim=8,
    )
    # Dense params: cross 3 layers * (2*32*r + 32) + projection 32*8+8 = 192 r + 360
    fit = width_for_param_budget(config, 192 * 10 + 360, knob="rank")
    assert (fit.value, fit.params, fit.config.rank) == (10, 2280, 10)
    # With the 100 x 32 table counted: 3200 more.
    fit = width_for_param_budget(
        config, 192 * 10 + 360 + 3200, knob="rank", include_embeddings=True
    )
    assert fit.value == 10
    # Unreachable targets clamp to the ends of the range [1, d].
    assert width_for_param_budget(config, 10**9, knob="rank").value == 32
    assert width_for_param_budget(config, 1, knob="rank").value == 1


def test_width_for_param_budget_refuses_bad_arguments() -> None:
    deep = tiny(arrangement="deep")
    cross = tiny(arrangement="cross")
    with pytest.raises(ValueError, match="`target_params` must be an integer >= 1; got 0"):
        width_for_param_budget(deep, 0)
    with pytest.raises(
        ValueError, match="'mlp_width' needs an arrangement with an MLP; got 'cross'"
    ):
        width_for_param_budget(cross, 100)
    with pytest.raises(ValueError, match="'rank' needs a low-rank cross network"):
        width_for_param_budget(cross, 100, knob="rank")  # cross_kind is "full"
    with pytest.raises(ValueError, match="`knob` must be 'mlp_width' or 'rank'; got 'depth'"):
        width_for_param_budget(deep, 100, knob="depth")  # type: ignore[arg-type]
