from pathlib import Path

import pytest

from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["default.yaml", "synth.yaml", "scale_1m.yaml"])
def test_named_configs_load(name: str) -> None:
    config = TrainConfig.load(REPO / "configs" / name)
    assert config.model.arrangement == "parallel"


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 1e-5\nloss:\n  temperature: 5e-2\n")
    config = TrainConfig.load(path)
    assert config.weight_decay == pytest.approx(1e-5)
    assert config.loss.temperature == pytest.approx(0.05)


def test_bad_values_are_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match=r"`lr` must be a number; got .fast."):
        TrainConfig.load(path)
    with pytest.raises(ValueError, match=r"model\.arrangement"):
        TrainConfig.from_dict({"model": {"arrangement": "sideways"}})
    with pytest.raises(ValueError, match="unknown `loss` section keys"):
        TrainConfig.from_dict({"loss": {"temp": 1}})
    with pytest.raises(ValueError, match="`batch_size` is out of range"):
        TrainConfig.from_dict({"batch_size": 1})


def test_overrides_replace_fields() -> None:
    config = TrainConfig().with_overrides(epochs=2, **{"model.cross": "mix", "seed": None})
    assert (config.epochs, config.model.cross, config.seed) == (2, "mix", 0)


def test_the_default_config_file_is_the_code_default() -> None:
    # One default: `retrieval train` without --config and configs/default.yaml agree.
    assert TrainConfig.load(REPO / "configs" / "default.yaml") == TrainConfig()
