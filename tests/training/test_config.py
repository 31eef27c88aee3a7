import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from training.config import (
    PACKAGED_CONFIGS,
    ConfigError,
    TrainConfig,
    load_train_config,
    packaged_config_names,
    resolve_config_file,
)

REPO = Path(__file__).resolve().parents[2]
NAMED = ["ablation", "default", "scale_1m", "synth"]

# `TrainConfig().to_dict()` as bundles (`train_config.json`) and result files record it:
# the same keys in the same order, sequences as tuples, sections as nested dicts.
DEFAULT_AS_DICT = {
    "seed": 0,
    "epochs": 10,
    "batch_size": 1024,
    "lr": 0.003,
    "weight_decay": 1e-05,
    "lr_schedule": "cosine",
    "warmup_steps": 30,
    "min_lr_ratio": 0.05,
    "grad_clip_norm": 1.0,
    "sparse_embeddings": False,
    "history_length": 0,
    "id_embedding_dim": 64,
    "embedding_dims": {},
    "id_dropout": 0.1,
    "num_threads": 0,
    "refit": True,
    "model": {
        "arrangement": "parallel",
        "cross": "lowrank",
        "cross_layers": 2,
        "rank": 32,
        "num_experts": 4,
        "mlp_hidden": (256, 128),
        "head_hidden": (128,),
        "output_dim": 64,
        "dropout": 0.0,
        "layer_norm": False,
        "history_pooling": "position",
    },
    "loss": {
        "temperature": 0.05,
        "learn_temperature": False,
        "logq_correction": True,
        "mask_accidental_hits": True,
        "num_extra_negatives": 0,
        "full_catalog": False,
    },
    "eval": {
        "ks": (10, 20, 50, 100),
        "metric": "recall@50",
        "patience": 4,
        "every_epochs": 1,
        "max_users": 0,
        "baselines": ("popularity", "ease", "als"),
    },
}


def _types(value: object) -> object:
    """`value` with every leaf replaced by its type (dicts and tuples kept as structure)."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_types(v) for v in value)
    return type(value)


@pytest.mark.parametrize("name", ["default.yaml", "synth.yaml", "scale_1m.yaml"])
def test_named_configs_load(name: str) -> None:
    config = TrainConfig.load(REPO / "configs" / name)
    assert config.model.arrangement == "parallel"


def test_the_packaged_configs_are_the_repository_configs() -> None:
    # configs/ (Dockerfiles, benchmarks, docs) and training/configs/ (the package) hold the same
    # files, byte for byte: edit one, copy it to the other.
    repo_files = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert repo_files == [f"{name}.yaml" for name in NAMED]
    assert packaged_config_names() == NAMED
    for name in repo_files:
        packaged = (PACKAGED_CONFIGS / name).read_text(encoding="utf-8")
        assert packaged == (REPO / "configs" / name).read_text(encoding="utf-8"), name


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 1e-5\nloss:\n  temperature: 5e-2\n")
    config = TrainConfig.load(path)
    assert config.weight_decay == pytest.approx(1e-5)
    assert config.loss.temperature == pytest.approx(0.05)


def test_bad_values_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: .*lr: Input should be a valid number.*'fast'"):
        TrainConfig.load(path)
    with pytest.raises(ValueError, match=r"model\.arrangement: Input should be 'parallel'"):
        TrainConfig.from_dict({"model": {"arrangement": "sideways"}})
    with pytest.raises(ValueError, match=r"loss\.temp: unknown field \(known: .*temperature"):
        TrainConfig.from_dict({"loss": {"temp": 1}})
    with pytest.raises(ValueError, match=r"batch_size: Input should be greater than or equal to 2"):
        TrainConfig.from_dict({"batch_size": 1})


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"epoch: unknown field \(known: batch_size, "):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match=r"eval\.metrics: unknown field \(known: baselines, "):
        TrainConfig.from_dict({"eval": {"metrics": "recall@10"}})


def test_a_wrong_type_or_range_is_named_with_the_value() -> None:
    with pytest.raises(ConfigError, match=r"model\.rank: Input should be greater than 0 \(got 0\)"):
        TrainConfig.from_dict({"model": {"rank": 0}})
    with pytest.raises(ConfigError, match=r"epochs: Input should be a valid integer.*'ten'"):
        TrainConfig.from_dict({"epochs": "ten"})
    with pytest.raises(ConfigError, match=r"model\.mlp_hidden\.1: Input should be greater than 0"):
        TrainConfig.from_dict({"model": {"mlp_hidden": [64, 0]}})
    with pytest.raises(ConfigError, match=r"eval\.baselines: entries must be in .*\['bm25'\]"):
        TrainConfig.from_dict({"eval": {"baselines": ["popularity", "bm25"]}})
    with pytest.raises(ConfigError, match=r"lr: Input should be a finite number"):
        TrainConfig.from_dict({"lr": float("nan")})
    # every bad field at once, in one line
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"lr_schedule": "linear", "loss": {"temperature": -1.0}})
    message = str(info.value)
    assert "\n" not in message
    assert "lr_schedule: Input should be 'cosine' or 'constant'" in message
    assert "loss.temperature: Input should be greater than 0 (got -1.0)" in message


def test_the_config_is_frozen() -> None:
    config = TrainConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.epochs = 3
    with pytest.raises(ValidationError, match="frozen"):
        config.model.rank = 8
    assert config.epochs == 10 and config.model.rank == 32


def test_an_empty_section_is_the_default() -> None:
    assert TrainConfig.from_dict({"loss": None}) == TrainConfig()


def test_overrides_replace_fields() -> None:
    config = TrainConfig().with_overrides(epochs=2, **{"model.cross": "mix", "seed": None})
    assert (config.epochs, config.model.cross, config.seed) == (2, "mix", 0)
    with pytest.raises(ConfigError, match=r"model\.cross: Input should be"):
        TrainConfig().with_overrides(**{"model.cross": "quadratic"})


def test_to_dict_is_the_recorded_format() -> None:
    # Same keys, order, values and value types as bundles and result files already hold.
    recorded = load_train_config("default").to_dict()
    assert recorded == DEFAULT_AS_DICT
    assert list(recorded) == list(DEFAULT_AS_DICT)
    assert _types(recorded) == _types(DEFAULT_AS_DICT)
    assert TrainConfig.from_dict(recorded) == TrainConfig()
    # a round trip through JSON (lists for tuples) gives the same config back
    for name in NAMED:
        config = load_train_config(name)
        assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_default_config_file_is_the_code_default() -> None:
    # One default: `retrieval train` without --config loads the packaged default.yaml, which
    # equals the code defaults (and configs/default.yaml, its repository copy).
    assert load_train_config() == TrainConfig()
    assert load_train_config(None) == load_train_config("default")
    assert TrainConfig.load(REPO / "configs" / "default.yaml") == TrainConfig()


def test_a_bare_name_resolves_to_the_packaged_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: names resolve to the package
    assert resolve_config_file("synth") == PACKAGED_CONFIGS / "synth.yaml"
    assert resolve_config_file("synth.yaml") == PACKAGED_CONFIGS / "synth.yaml"
    assert load_train_config("synth").batch_size == 4096
    assert load_train_config("ablation").refit is False
    # a path to an existing file is that file, even when it has a packaged config's name
    (tmp_path / "synth.yaml").write_text("epochs: 7\n")
    assert load_train_config("synth.yaml").epochs == 7
    assert load_train_config(tmp_path / "synth.yaml").epochs == 7
    assert load_train_config("synth").batch_size == 4096
    with pytest.raises(
        FileNotFoundError, match=r"'sinth' is neither a file nor a packaged .*synth"
    ):
        load_train_config("sinth")
    with pytest.raises(FileNotFoundError, match=r"'configs/synth.yaml' is neither a file"):
        load_train_config("configs/synth.yaml")  # a path is never looked up by name


def test_the_cli_names_the_field_and_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nmodel:\n  rank: 0\n  ranks: 3\n")
    command = [sys.executable, "-m", "retrieval", "train", "--data", str(tmp_path / "data")]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "m"), "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"retrieval train: error: {bad}: invalid train config: ")
    assert "model.rank: Input should be greater than 0 (got 0)" in error
    assert "model.ranks: unknown field" in error
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()
