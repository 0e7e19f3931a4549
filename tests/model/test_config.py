from __future__ import annotations

from pathlib import Path

import pytest

from model.config import ModelConfig, as_config
from model.errors import ConfigError


def test_defaults_match_the_replaced_system() -> None:
    c = ModelConfig()
    assert (c.sequence_length, c.hidden_size, c.num_layers, c.dropout) == (48, 256, 3, 0.2)
    assert (c.attention_heads, c.learning_rate, c.weight_decay, c.batch_size) == (8, 1e-3, 1e-5, 32)
    assert (c.horizon, c.features, c.calendar, c.distribution) == (1, (), True, "gaussian")
    assert c.input_size == 5


def test_features_list_becomes_tuple_and_counts_in_input_size() -> None:
    c = ModelConfig(features=["temp", "load"], calendar=False)  # type: ignore[arg-type]
    assert c.features == ("temp", "load")
    assert c.input_size == 3
    hash(c)  # frozen and hashable


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sequence_length", 1),
        ("hidden_size", 0),
        ("num_layers", 1.5),
        ("dropout", 1.0),
        ("dropout", float("nan")),
        ("attention_heads", 3),  # 256 % 3 != 0
        ("learning_rate", 0.0),
        ("weight_decay", -1.0),
        ("batch_size", True),
        ("horizon", 0),
        ("features", "temp"),
        ("features", ["a", "a"]),
        ("calendar", "yes"),
        ("distribution", "laplace"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({field: value})


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})


def test_json_and_yaml_round_trip(tmp_path: Path) -> None:
    c = ModelConfig(hidden_size=64, num_layers=2, horizon=12, features=("a", "b"))
    c.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == c
    assert ModelConfig.from_dict(c.to_dict()) == c
    (tmp_path / "c.yaml").write_text(
        "model:\n  hidden_size: 64\n  num_layers: 2\n  horizon: 12\n  features: [a, b]\n"
    )
    assert ModelConfig.from_yaml(tmp_path / "c.yaml", section="model") == c
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        ModelConfig.from_json(tmp_path / "bad.json")


def test_as_config_and_replace() -> None:
    assert as_config(None) == ModelConfig()
    assert as_config({"horizon": 3}, hidden_size=64).hidden_size == 64
    assert ModelConfig().replace(horizon=4).horizon == 4
    with pytest.raises(ConfigError, match="config"):
        as_config(42)  # type: ignore[arg-type]
