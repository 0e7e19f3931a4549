from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig, as_config
from model.errors import ConfigError
from model.network import STD_EPS, ForecastNet


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
        ("calendar_year", 1),
        ("distribution", "laplace"),
        ("ar_skip", "yes"),
        ("interval_scale", 0.0),
        ("interval_scale", float("nan")),
        ("interval_scale", True),
        ("tail_scale", 0.5),  # below Z80 / Z95: the 95 % interval would lie inside the 80 % one
        ("tail_scale", float("inf")),
        ("tail_scale", "1"),
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


def test_new_configs_have_the_ar_skip_and_no_interval_scale() -> None:
    assert ModelConfig().ar_skip is True and ModelConfig().interval_scale == 1.0
    assert as_config(None).ar_skip is True
    assert as_config({"horizon": 3}).ar_skip is True  # a partial dict is a new config
    c = ModelConfig(ar_skip=False, interval_scale=1.3, horizon=5)
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert ModelConfig.from_dict(ModelConfig().to_dict()).ar_skip is True


def test_saved_config_without_the_new_keys_loads_with_the_old_behaviour(tmp_path: Path) -> None:
    """A config.json written before ``ar_skip`` / ``interval_scale`` / ``tail_scale`` existed
    means: no AR path, no interval scaling; its network has exactly the old parameters and the
    old outputs."""
    old = ModelConfig(hidden_size=16, num_layers=1, attention_heads=2, horizon=3).to_dict()
    del old["ar_skip"], old["interval_scale"], old["tail_scale"], old["calendar_year"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    for c in (ModelConfig.from_json(tmp_path / "config.json"), ModelConfig.from_dict(old)):
        assert c.ar_skip is False and c.interval_scale == 1.0 and c.tail_scale == 1.0
        assert c.calendar_year is False
    c = ModelConfig.from_dict(old)
    net = ForecastNet(c).eval()
    assert net.ar is None and not any(k.startswith("ar.") for k in net.state_dict())
    # The old location: the last normalised value plus the head's output (zeroed here), the
    # scale unscaled: softplus(0) + eps.
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    x = torch.randn(5, 48, c.input_size)
    mean, std, *_ = net(x)
    torch.testing.assert_close(mean, x[:, -1:, 0].expand(5, 3), rtol=1e-5, atol=1e-5)
    sd = x[:, :, 0].std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(std, (math.log(2.0) + STD_EPS) * sd.expand(5, 3), rtol=1e-4, atol=0)
    # A network of the new kind does not accept the old weights silently (and vice versa).
    new_net = ForecastNet(c.replace(ar_skip=True))
    with pytest.raises(RuntimeError, match="ar"):
        new_net.load_state_dict(net.state_dict())


def test_yaml_and_trainer_settings_without_the_new_keys_are_new_configs(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("model:\n  horizon: 2\n")
    c = ModelConfig.from_yaml(tmp_path / "c.yaml", section="model")
    assert c.ar_skip is True and c.interval_scale == 1.0 and c.horizon == 2
