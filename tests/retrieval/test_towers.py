"""Tests of the feature embedding, combination blocks, towers, configs and serving export."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tower_configs import small_tower_config

from retrieval import towers as towers_module
from retrieval.features import FeatureInput, FeatureKind
from retrieval.towers import (
    ARRANGEMENTS,
    CombinationBlock,
    ExportedQueryTower,
    FeatureEmbedding,
    ModelConfig,
    Tower,
    TowerConfig,
    TwoTowerModel,
    _dense_embedding_bag,
    export_query_tower,
    random_batch,
)

CROSS_KINDS = ("full", "lowrank", "mix", "masked")

ITEM_FEATURES = (
    FeatureInput("item_id", FeatureKind.CATEGORICAL, 12, 4),
    FeatureInput("genres", FeatureKind.BAG, 6, 3),
    FeatureInput("title", FeatureKind.HASHED_BAG, 9, 2),
    FeatureInput("price", FeatureKind.DENSE, 0, 2),
)
QUERY_FEATURES = (
    FeatureInput("user_id", FeatureKind.CATEGORICAL, 7, 4),
    FeatureInput("zip", FeatureKind.HASHED, 5, 2),
    FeatureInput("history", FeatureKind.HISTORY, 12, 4, shared_with="item_id"),
)


def table_weight(embedding: FeatureEmbedding, name: str) -> torch.Tensor:
    table = embedding.tables[name]
    assert isinstance(table, nn.Embedding)
    return table.weight


def small_model_config(**changes) -> ModelConfig:
    return ModelConfig(
        query=small_tower_config(QUERY_FEATURES, **changes),
        item=small_tower_config(ITEM_FEATURES, **changes),
        seed=3,
    )


def item_batch() -> dict[str, torch.Tensor]:
    return {
        "item_id": torch.tensor([2, 3, 11]),
        "genres": torch.tensor([[2, 3, 0], [0, 0, 0], [5, 0, 0]]),
        "title": torch.tensor([[1, 8], [4, 4], [0, 7]]),
        "price": torch.tensor([[0.5, 0.0], [-1.0, 1.0], [2.0, 0.0]]),
    }


def query_batch() -> dict[str, torch.Tensor]:
    return {
        "user_id": torch.tensor([2, 6]),
        "zip": torch.tensor([1, 4]),
        "history": torch.tensor([[2, 3, 11, 0], [0, 0, 0, 0]]),
    }


# ----------------------------------------------------------------------------- embeddings


def test_feature_embedding_lookup_pooling_dense_and_order() -> None:
    embedding = FeatureEmbedding(ITEM_FEATURES)
    assert embedding.output_dim == 4 + 3 + 2 + 2
    batch = item_batch()
    x0 = embedding(batch)
    assert x0.shape == (3, 11)
    ids, genres, title = (table_weight(embedding, n) for n in ("item_id", "genres", "title"))
    # Row 0: item 2; genres mean of rows 2, 3 (PAD skipped); title mean of 1, 8; price as is.
    expected_0 = torch.cat(
        [ids[2], (genres[2] + genres[3]) / 2, (title[1] + title[8]) / 2, torch.tensor([0.5, 0.0])]
    )
    torch.testing.assert_close(x0[0], expected_0)
    # Row 1: the empty genre bag gives zeros; a repeated token counts twice in the mean.
    assert torch.equal(x0[1, 4:7], torch.zeros(3))
    torch.testing.assert_close(x0[1, 7:9], title[4])
    # Row 2: a bag with one non-PAD entry is that entry.
    torch.testing.assert_close(x0[2, 4:7], genres[5])


def test_feature_embedding_pad_row_is_zero_and_tables_are_per_feature() -> None:
    embedding = FeatureEmbedding(ITEM_FEATURES)
    assert sorted(embedding.tables) == ["genres", "item_id", "title"]  # dense has no table
    for name, table in embedding.tables.items():
        assert isinstance(table, nn.Embedding)
        assert torch.equal(table.weight[0], torch.zeros_like(table.weight[0])), name
    assert embedding.tables["item_id"].weight.shape == (12, 4)
    assert embedding.tables["title"].weight.shape == (9, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.pop("genres"), "feature 'genres' is missing from the batch"),
        (
            lambda b: b.update(item_id=b["item_id"].int()),
            "feature 'item_id' (categorical) must be int64 [batch_size]; got torch.int32 [3]",
        ),
        (
            lambda b: b.update(item_id=b["item_id"][:, None]),
            "feature 'item_id' (categorical) must be int64 [batch_size]; got torch.int64 [3, 1]",
        ),
        (
            lambda b: b.update(title=b["title"][:, 0]),
            "feature 'title' (hashed_bag) must be int64 [batch_size, length]",
        ),
        (
            lambda b: b.update(price=b["price"][:, :1]),
            "feature 'price' (dense) must be float32 [batch_size, 2]; got torch.float32 [3, 1]",
        ),
        (
            lambda b: b.update(price=b["price"].double()),
            "feature 'price' (dense) must be float32 [batch_size, 2]; got torch.float64",
        ),
        (
            lambda b: b.update(genres=b["genres"][:2]),
            "feature 'genres' has batch size 2; earlier features have 3",
        ),
        (lambda b: b.update(title=[[1, 2]]), "feature 'title' must be a torch.Tensor; got list"),
    ],
)
def test_bad_batch_raises_value_error_naming_the_feature(change, message: str) -> None:
    embedding = FeatureEmbedding(ITEM_FEATURES)
    batch = item_batch()
    change(batch)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        embedding(batch)


def test_extra_batch_keys_are_ignored() -> None:
    embedding = FeatureEmbedding(ITEM_FEATURES)
    batch = item_batch()
    expected = embedding(batch)
    batch["unused"] = torch.zeros(3)
    assert torch.equal(embedding(batch), expected)


def test_history_needs_a_matching_shared_table() -> None:
    with pytest.raises(ValueError, match="'history' shares table 'item_id', which is not in"):
        FeatureEmbedding(QUERY_FEATURES)
    wrong = nn.Embedding(12, 5)
    with pytest.raises(ValueError, match=r"has shape \(12, 5\); the feature needs \(12, 4\)"):
        FeatureEmbedding(QUERY_FEATURES, shared_tables={"item_id": wrong})
    with pytest.raises(ValueError, match=r"duplicate names \['zip'\]"):
        FeatureEmbedding((*QUERY_FEATURES[:2], QUERY_FEATURES[1]))


def test_history_uses_the_item_id_table_object() -> None:
    model = TwoTowerModel(small_model_config())
    history = model.query_tower.embedding.tables["history"]
    item_ids = model.item_tower.embedding.tables["item_id"]
    assert history is item_ids and isinstance(item_ids, nn.Embedding)
    # Counted once by parameters(); gradients from both towers land in the one tensor.
    assert sum(1 for p in model.parameters() if p is item_ids.weight) == 1
    q, _ = model(query_batch(), item_batch())
    (q * torch.randn_like(q)).sum().backward()
    grad = item_ids.weight.grad
    assert grad is not None
    assert grad[11].abs().sum() > 0  # item 11 appears only in the query's history
    # Pooled history = mean of the item rows 2, 3, 11.
    x0 = model.query_tower.embedding(query_batch())
    torch.testing.assert_close(x0[0, 6:10], item_ids.weight[[2, 3, 11]].mean(0))


# ----------------------------------------------------------------------------- blocks


def test_parallel_block_is_the_concatenation_of_both_branches_on_x0() -> None:
    torch.manual_seed(0)
    block = CombinationBlock(6, "parallel", cross_kind="lowrank", rank=2, mlp_hidden=(5, 3))
    x0 = torch.randn(4, 6)
    assert block.cross is not None and block.deep is not None
    expected = torch.cat([block.cross(x0), block.deep(x0)], dim=-1)
    assert torch.equal(block(x0), expected)
    assert block.output_dim == 6 + 3 == block(x0).shape[1]


def test_stacked_deep_and_cross_blocks() -> None:
    torch.manual_seed(1)
    x0 = torch.randn(4, 6)
    stacked = CombinationBlock(6, "stacked", cross_kind="full", mlp_hidden=(5, 3))
    assert stacked.cross is not None and stacked.deep is not None
    assert torch.equal(stacked(x0), stacked.deep(stacked.cross(x0)))
    assert stacked.output_dim == 3
    deep = CombinationBlock(6, "deep", mlp_hidden=(5, 3))
    assert deep.cross is None and deep.deep is not None
    assert torch.equal(deep(x0), deep.deep(x0)) and deep.output_dim == 3
    cross = CombinationBlock(6, "cross", cross_kind="mix", rank=2, num_experts=2)
    assert cross.deep is None and cross.cross is not None
    assert torch.equal(cross(x0), cross.cross(x0)) and cross.output_dim == 6


def test_block_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`arrangement` must be one of .*; got 'serial'"):
        CombinationBlock(4, "serial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`cross_layers` must be an integer >= 1 .*; got 0"):
        CombinationBlock(4, "parallel", cross_layers=0)
    with pytest.raises(ValueError, match=r"`mlp_hidden` must be non-empty .*'deep'; got \(\)"):
        CombinationBlock(4, "deep", mlp_hidden=())


# ----------------------------------------------------------------------------- towers, model


@pytest.mark.parametrize(
    ("arrangement", "kind"), list(itertools.product(ARRANGEMENTS, CROSS_KINDS))
)
def test_gradients_reach_every_parameter(arrangement: str, kind: str) -> None:
    # One backward step of a loss that depends on every output coordinate; a batch of 16
    # so that no ReLU unit of the small MLPs is dead on the whole batch.
    model = TwoTowerModel(small_model_config(arrangement=arrangement, cross_kind=kind))
    generator = torch.Generator().manual_seed(0)
    queries = random_batch(QUERY_FEATURES, 16, generator=generator)
    items = random_batch(ITEM_FEATURES, 16, generator=generator)
    q, i = model(queries, items)
    loss = model.score(q, i).mul(torch.randn(16, 16, generator=generator)).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_embeddings_are_l2_normalised(arrangement: str) -> None:
    model = TwoTowerModel(small_model_config(arrangement=arrangement, cross_kind="mix"))
    q, i = model(query_batch(), item_batch())
    assert q.shape == (2, 4) and i.shape == (3, 4)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.score(q, i), q @ i.t())
    assert model.embed_queries(query_batch()).shape == (2, 4)


def test_tower_is_the_head_on_the_block_on_the_embeddings() -> None:
    torch.manual_seed(2)
    tower = Tower(ITEM_FEATURES, cross_kind="masked", rank=2, mlp_hidden=(6,), head_hidden=(5,))
    batch = item_batch()
    z = tower.projection(tower.head(tower.block(tower.embedding(batch))))
    torch.testing.assert_close(tower(batch), z / z.norm(dim=-1, keepdim=True))
    assert tower.feature_names == ("item_id", "genres", "title", "price")


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = TwoTowerModel(small_model_config())
    after = torch.rand(1)
    assert torch.equal(before, after)  # building the model did not consume the global RNG
    b = TwoTowerModel(small_model_config())
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


# ----------------------------------------------------------------------------- configs


def test_config_json_round_trip_rebuilds_the_same_model() -> None:
    config = small_model_config(arrangement="stacked", cross_kind="masked", layer_norm=True)
    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    original, rebuilt = TwoTowerModel(config), TwoTowerModel(restored)
    shapes = {n: tuple(p.shape) for n, p in original.state_dict().items()}
    assert shapes == {n: tuple(p.shape) for n, p in rebuilt.state_dict().items()}
    for name, value in original.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[name]), name


def test_tower_config_defaults() -> None:
    config = TowerConfig(features=ITEM_FEATURES)
    assert (config.arrangement, config.cross_kind, config.cross_layers) == ("parallel", "full", 3)
    assert (config.rank, config.num_experts, config.output_dim) == (32, 4, 64)
    assert config.mlp_hidden == (256, 128, 64) and config.head_hidden == (128,)
    assert config.input_dim == 11


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arrangement": "serial"}, "`arrangement` must be one of"),
        ({"cross_kind": "cubic"}, "`cross_kind` must be one of"),
        ({"cross_kind": "lowrank", "rank": 12}, r"`rank` must be in \[1, in_features=11\]; got 12"),
        ({"cross_layers": 0}, "`cross_layers` must be an integer >= 1; got 0"),
        ({"num_experts": 0}, "`num_experts` must be an integer >= 1; got 0"),
        ({"expert_activation": "gelu"}, "`expert_activation` must be one of"),
        ({"mlp_hidden": (8, -1)}, r"`mlp_hidden` must hold integers >= 1; got \(8, -1\)"),
        ({"arrangement": "deep", "mlp_hidden": ()}, "`mlp_hidden` must be non-empty"),
        ({"output_dim": 0}, "`output_dim` must be an integer >= 1; got 0"),
        ({"dropout": 1.5}, r"`dropout` must be in \[0, 1\); got 1.5"),
        ({"features": ()}, "`features` must be a non-empty tuple"),
        ({"history_pooling": "max"}, "`history_pooling` must be one of"),
        ({"history_pooling": "position"}, "`history_max_length` must be an integer >= 1; got 0"),
    ],
)
def test_tower_config_refuses_bad_values(changes: dict, message: str) -> None:
    values = {"features": ITEM_FEATURES, **changes}
    with pytest.raises(ValueError, match=message):
        TowerConfig(**values)


def test_tower_config_ignores_cross_fields_without_a_cross_network() -> None:
    config = TowerConfig(features=ITEM_FEATURES, arrangement="deep", cross_kind="lowrank", rank=99)
    assert config.rank == 99


def test_model_config_refuses_inconsistent_towers() -> None:
    query = small_tower_config(QUERY_FEATURES)
    item = small_tower_config(ITEM_FEATURES)
    with pytest.raises(
        ValueError, match=r"`query.output_dim` \(8\) must equal `item.output_dim` \(4\)"
    ):
        ModelConfig(query=small_tower_config(QUERY_FEATURES, output_dim=8), item=item)
    no_ids = small_tower_config(ITEM_FEATURES[1:])
    with pytest.raises(ValueError, match="'history': `shared_with` must name a categorical"):
        ModelConfig(query=query, item=no_ids)
    other_size = (FeatureInput("item_id", FeatureKind.CATEGORICAL, 13, 4), *ITEM_FEATURES[1:])
    with pytest.raises(ValueError, match="must match the shared item feature 'item_id'"):
        ModelConfig(query=query, item=small_tower_config(other_size))
    with pytest.raises(ValueError, match="`seed` must be an integer >= 0; got -1"):
        ModelConfig(query=query, item=item, seed=-1)
    data = ModelConfig(query=query, item=item).to_dict()
    with pytest.raises(ValueError, match="`format_version` must be 1; got 2"):
        ModelConfig.from_dict({**data, "format_version": 2})
    with pytest.raises(ValueError, match=r"unknown tower config keys \['width'\]"):
        ModelConfig.from_dict({**data, "item": {**data["item"], "width": 3}})


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("mode", ["eager", "trace", "export", "onnxruntime", "auto"])
def test_exported_query_tower_matches_eager(mode: str) -> None:
    model = TwoTowerModel(small_model_config(cross_kind="mix"))
    model.eval()
    with torch.no_grad():
        expected = model.embed_queries(query_batch())
    tower = export_query_tower(model, mode=mode)  # type: ignore[arg-type]
    assert isinstance(tower, ExportedQueryTower)
    out = tower(query_batch())
    assert out.is_inference()
    torch.testing.assert_close(out, expected)
    # Another batch size and history length than the trace example.
    batch = random_batch(QUERY_FEATURES, 17, lengths={"history": 3})
    with torch.no_grad():
        torch.testing.assert_close(tower(batch), model.embed_queries(batch))
    with pytest.raises(ValueError, match="feature 'history' is missing"):
        tower({"user_id": torch.tensor([1]), "zip": torch.tensor([1])})


@pytest.mark.skipif(
    os.environ.get("RETRIEVAL_TEST_COMPILE") != "1",
    reason="torch.compile takes over a minute on a 2-core CPU; set RETRIEVAL_TEST_COMPILE=1",
)
def test_compiled_query_tower_matches_eager() -> None:
    model = TwoTowerModel(small_model_config()).eval()
    tower = export_query_tower(model, mode="compile")
    for size in (1, 5):
        batch = random_batch(QUERY_FEATURES, size)
        with torch.no_grad():
            torch.testing.assert_close(tower(batch), model.embed_queries(batch))


def test_export_refuses_unknown_mode() -> None:
    model = TwoTowerModel(small_model_config())
    with pytest.raises(ValueError, match=r"`mode` must be one of .*; got 'onnx'"):
        export_query_tower(model, mode="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`threads` must be .*; got 0"):
        export_query_tower(model, mode="onnxruntime", threads=0)


@pytest.mark.parametrize("auto", ["export", "onnxruntime"])
def test_auto_follows_auto_export_mode(auto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting `AUTO_EXPORT_MODE` to a new mode is all "auto" needs (what the service asks)."""
    monkeypatch.setattr(towers_module, "AUTO_EXPORT_MODE", auto)
    model = TwoTowerModel(small_model_config(arrangement="stacked", cross_kind="masked")).eval()
    tower = export_query_tower(model)
    assert tower.mode == auto
    for size, length in ((1, 1), (1, 4), (64, 9)):  # batch 1 and larger, several lengths
        batch = random_batch(QUERY_FEATURES, size, lengths={"history": length})
        batch["history"][0] = 0  # an all-PAD history
        with torch.no_grad():
            expected = model.embed_queries(batch)
        assert float((tower(batch) - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("mode", ["trace", "export", "onnxruntime"])
def test_exported_tower_refuses_bad_batches_like_eager(mode: str) -> None:
    model = TwoTowerModel(small_model_config()).eval()
    tower = export_query_tower(model, mode=mode)  # type: ignore[arg-type]
    good = query_batch()
    bad_batches = [
        {k: v for k, v in good.items() if k != "zip"},
        {**good, "user_id": good["user_id"].float()},
        {**good, "history": good["history"][:, 0]},
        {**good, "user_id": torch.tensor([1, 2, 3])},
    ]
    for bad in bad_batches:
        with pytest.raises(ValueError) as eager_error:
            model.embed_queries(bad)
        with pytest.raises(ValueError) as exported_error:
            tower(bad)
        assert str(exported_error.value) == str(eager_error.value)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [0, None])
def test_dense_embedding_bag_equals_embedding_bag(mode: str, padding_idx: int | None) -> None:
    """The plain-ops pooling the exported graphs record gives embedding_bag's values."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 3, generator=generator)
    values = torch.tensor([[3, 4, 0, 0], [0, 0, 0, 0], [7, 7, 9, 1], [0, 5, 0, 2]])
    weights = torch.rand(4, 4, generator=generator) if mode == "sum" else None
    expected = F.embedding_bag(
        values, weight, mode=mode, per_sample_weights=weights, padding_idx=padding_idx
    )
    got = _dense_embedding_bag(
        values, weight, mode=mode, per_sample_weights=weights, padding_idx=padding_idx
    )
    assert got is not None
    torch.testing.assert_close(got, expected)
    # Cases it does not cover are left to embedding_bag itself.
    assert _dense_embedding_bag(values.reshape(-1), weight, torch.tensor([0, 8])) is None
    assert _dense_embedding_bag(values, weight, mode="max") is None


def test_random_batch_layouts() -> None:
    batch = random_batch(
        ITEM_FEATURES, 5, lengths={"genres": 6}, generator=torch.Generator().manual_seed(0)
    )
    assert batch["item_id"].shape == (5,) and batch["item_id"].dtype == torch.int64
    assert batch["genres"].shape == (5, 6) and batch["title"].shape == (5, 8)
    assert batch["price"].shape == (5, 2) and batch["price"].dtype == torch.float32
    assert int(batch["item_id"].min()) >= 1 and int(batch["item_id"].max()) < 12
    FeatureEmbedding(ITEM_FEATURES).check_batch(batch)


# ----------------------------------------------------------------------------- history pooling


def test_position_pooling_starts_as_the_mean_and_weights_recent_items_when_trained() -> None:
    item_table = nn.Embedding(12, 4, padding_idx=0)
    shared = {"item_id": item_table}
    mean = FeatureEmbedding(QUERY_FEATURES[2:], shared)
    position = FeatureEmbedding(QUERY_FEATURES[2:], shared, "position", history_max_length=5)
    history = torch.tensor([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    batch = {"history": history}
    # a = 0 everywhere: w_t = 1 on non-PAD positions, i.e. exactly the mean.
    torch.testing.assert_close(position(batch), mean(batch))
    # a = (log 3, 0, 0, ...): row 0 = (3 e_3 + e_4 + e_5) / 5; an all-PAD row stays zero.
    with torch.no_grad():
        position.position_logits["history"][0] = torch.log(torch.tensor(3.0))
    weights = item_table.weight.detach()
    expected = (3 * weights[3] + weights[4] + weights[5]) / 5
    out = position(batch)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], weights[7])
    assert torch.equal(out[2], torch.zeros(4))
    # Gradients reach the position weights.
    position(batch).sum().backward()
    assert position.position_logits["history"].grad is not None
    with pytest.raises(ValueError, match="holds 6 items; position pooling was built for at most 5"):
        position({"history": torch.ones(1, 6, dtype=torch.long)})


def test_position_pooled_tower_exports_and_round_trips() -> None:
    config = small_model_config()
    query = dataclasses.replace(config.query, history_pooling="position", history_max_length=8)
    model = TwoTowerModel(ModelConfig(query=query, item=config.item)).eval()
    rebuilt = ModelConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    assert rebuilt.query.history_pooling == "position" and rebuilt.query.history_max_length == 8
    with torch.no_grad():
        model.query_tower.embedding.position_logits["history"].copy_(torch.linspace(1, -1, 8))
    for mode in ("trace", "export", "onnxruntime"):
        tower = export_query_tower(model, mode=mode)  # type: ignore[arg-type]
        for size, length in ((5, 8), (5, 3), (1, 1)):  # any length up to 8
            batch = random_batch(QUERY_FEATURES, size, lengths={"history": length})
            with torch.no_grad():
                expected = model.embed_queries(batch)
            assert float((tower(batch) - expected).abs().max()) <= 1e-5, (mode, size, length)
        too_long = random_batch(QUERY_FEATURES, 2, lengths={"history": 9})
        with pytest.raises(
            ValueError, match="holds 9 items; position pooling was built for at most 8"
        ):
            tower(too_long)
