"""Small tower configurations shared by the tower and export tests."""

from __future__ import annotations

from typing import Any

from retrieval.features import FeatureInput
from retrieval.towers import TowerConfig


def small_tower_config(features: tuple[FeatureInput, ...], **changes: Any) -> TowerConfig:
    """A tower a few hundred parameters large: every layer present, each cross kind able
    to run (`changes` overrides any field, e.g. ``arrangement="stacked"``)."""
    values: dict[str, Any] = dict(
        features=features,
        cross_layers=2,
        rank=3,
        num_experts=2,
        mask_hidden=3,
        mlp_hidden=(16, 8),
        head_hidden=(8,),
        output_dim=4,
    )
    values.update(changes)
    return TowerConfig(**values)
