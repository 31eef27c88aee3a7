"""The ablation runner: 2 variants x 1 seed x a few steps on the tiny dataset writes the
report, resumes without retraining, and --match-params sizes variants to the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_data import tiny_train_config

from retrieval.cli import main
from retrieval.encoders import FeatureEncoder
from training import trainer
from training.ablation import (
    CostModel,
    Variant,
    match_variant_params,
    plan_variants,
    run_ablation,
    variant_config,
)
from training.ablation.run import _same_budget


@pytest.fixture(scope="module")
def ablation_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ablation")
    run_ablation(
        tiny_dataset,
        tiny_train_config(),
        out,
        seeds=1,
        arrangements=["parallel", "deep"],
        crosses=["lowrank"],
        max_steps=2,
        progress=False,
    )
    return out


def test_report_files_and_contents(ablation_dir: Path) -> None:
    for name in ("report.md", "report.json", "recall_at_k.png", "recall_vs_flops.png"):
        assert (ablation_dir / name).stat().st_size > 0, name
    report = json.loads((ablation_dir / "report.json").read_text())
    assert [v["variant"] for v in report["variants"]] == ["parallel-lowrank", "deep"]
    assert report["setup"]["ks"] == [10, 20, 50, 100]  # 120 items: no recall@1000
    for entry in report["variants"]:
        assert entry["num_runs"] == 1
        assert 0.0 <= entry["recall@10"]["mean"] <= entry["recall@100"]["mean"] <= 1.0
        assert entry["recall@50"]["std"] == 0.0  # one seed
        assert entry["costs"]["params"] > entry["costs"]["params_dense"] > 0
        assert (
            entry["costs"]["flops"] == entry["costs"]["flops_query"] + entry["costs"]["flops_item"]
        )
    parallel, deep = report["variants"]
    assert parallel["costs"]["params_dense"] > deep["costs"]["params_dense"]  # + cross layers
    assert all(run["steps"] == 2 for run in report["runs"])  # the same step budget
    markdown = (ablation_dir / "report.md").read_text()
    assert "| parallel-lowrank |" in markdown and "| deep |" in markdown
    assert " ± " in markdown and "Machine:" in markdown and "wall s" in markdown
    # Bundles are removed once measured; results stay.
    run = ablation_dir / "runs" / "deep" / "seed0"
    assert (run / "result.json").exists() and not (run / "model").exists()


def test_rerun_resumes_without_training(
    ablation_dir: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = ablation_dir / "runs" / "parallel-lowrank" / "seed0" / "result.json"
    before = result.read_text()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    report = run_ablation(
        tiny_dataset,
        tiny_train_config(),
        ablation_dir,
        seeds=1,
        arrangements=["parallel", "deep"],
        crosses=["lowrank"],
        max_steps=2,
        progress=False,
        plots=False,
    )
    assert result.read_text() == before
    assert len(report["runs"]) == 2
    assert report["setup"]["runs_with_another_config"] == []
    # A finished run is recognised as made with another budget (reported, not retrained).
    config = variant_config(
        tiny_train_config(), Variant("deep", None), seed=0, epochs=None, ks=(10, 20, 50, 100)
    )
    run = ablation_dir / "runs" / "deep" / "seed0"
    assert _same_budget(run, config, max_steps=2)
    assert not _same_budget(run, config, max_steps=5)
    assert not _same_budget(run, config.with_overrides(lr=0.5), max_steps=2)


def test_plan_and_config_give_equal_budgets() -> None:
    variants = plan_variants(["deep", "cross"], ["full", "mix"])
    assert [v.name for v in variants] == ["deep", "cross-full", "cross-mix"]
    config = variant_config(
        tiny_train_config(), Variant("cross", "mix"), seed=4, epochs=3, ks=(10, 1000)
    )
    assert (config.seed, config.epochs, config.model.arrangement, config.model.cross) == (
        4,
        3,
        "cross",
        "mix",
    )
    assert config.eval.patience > config.epochs  # no early stopping: every run trains 3 epochs
    assert 1000 in config.eval.ks
    assert config.eval.baselines == ("popularity",)  # EASE and ALS do not depend on the variant
    plateau = variant_config(
        tiny_train_config(), Variant("cross", "mix"), seed=4, epochs=3, ks=(10,), plateau=True
    )
    assert plateau.eval.patience == tiny_train_config().eval.patience  # early stopping on
    with pytest.raises(ValueError, match="--arrangements"):
        plan_variants(["paralel"], ["full"])


def test_match_params_sizes_variants_to_the_reference(tiny_dataset: Path) -> None:
    from retrieval.data.dataset import load_dataset

    base = tiny_train_config()
    dataset = load_dataset(tiny_dataset)
    schema = trainer.apply_feature_overrides(dataset.schema, base)
    costs = CostModel(
        FeatureEncoder.fit(schema, dataset.users, dataset.items, dataset.interactions)
    )
    target = costs.costs(
        base.with_overrides(**{"model.arrangement": "parallel", "model.cross": "lowrank"})
    )["params_dense"]
    for variant in (Variant("deep", None), Variant("stacked", "mix"), Variant("cross", "masked")):
        config = variant_config(base, variant, seed=0, epochs=1, ks=(10,))
        matched, info = match_variant_params(base, variant, config, costs)
        assert info["target_params_dense"] == target
        assert costs.costs(matched)["params_dense"] == info["params_dense"]
        assert abs(info["params_dense"] / target - 1) < 0.05, (variant, info)
    _, info = match_variant_params(
        base,
        Variant("cross", "full"),
        variant_config(base, Variant("cross", "full"), seed=0, epochs=1, ks=(10,)),
        costs,
    )
    assert info["knob"] is None and "unmatched" in info["note"]


def test_cli_refuses_unknown_cross_kind(tiny_dataset: Path, tmp_path: Path) -> None:
    args = ["ablate", "--data", str(tiny_dataset), "--out", str(tmp_path), "--cross", "lowrnk"]
    assert main(args) == 2
