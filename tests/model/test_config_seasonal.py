"""The model config's seasonal fields (issue 18, work in progress)."""

from __future__ import annotations

import pytest

from model.config import ModelConfig
from model.errors import ConfigError


def test_a_seasonal_config_round_trips_and_gives_its_spec() -> None:
    c = ModelConfig(seasons=[48, 336], season_gammas=[0.2, 0.4], season_alpha=0.03,
                    season_spacing_s=1800.0)  # fmt: skip
    assert c.seasons == (48, 336) and ModelConfig.from_dict(c.to_dict()) == c
    spec = c.seasonal()
    assert spec is not None and spec.gammas == (0.2, 0.4) and spec.longest == 336
    assert ModelConfig().seasonal() is None


def test_a_saved_config_without_the_fields_is_the_plain_path() -> None:
    old = ModelConfig().to_dict()
    for k in ("seasons", "season_alpha", "season_gammas", "season_spacing_s"):
        del old[k]
    assert ModelConfig.from_dict(old).seasonal() is None


@pytest.mark.parametrize(
    "kw",
    [
        {"seasons": [336, 48], "season_gammas": [0.1, 0.1], "season_spacing_s": 1800.0},
        {"seasons": [48], "season_gammas": [], "season_spacing_s": 1800.0},
        {"seasons": [48], "season_gammas": [0.1], "season_spacing_s": 0.0},
        {"season_gammas": [0.1]},
        {"seasons": "48"},
    ],
)
def test_bad_seasonal_fields_name_the_field(kw: dict) -> None:
    with pytest.raises(ConfigError, match="season"):
        ModelConfig(**kw)


def test_a_hybrid_has_the_level_channel_unless_saved_before_it() -> None:
    """New hybrids end their input with the seasonal state's level; a saved hybrid without the
    ``season_level`` key keeps the input it was trained on; the plain network never has it."""
    kw = {"seasons": [24], "season_gammas": [0.1], "season_spacing_s": 3600.0}
    new = ModelConfig(**kw)
    assert new.level_channel and new.input_size == ModelConfig().input_size + 1
    saved = new.to_dict()
    del saved["season_level"]
    old = ModelConfig.from_dict(saved)
    assert not old.level_channel and old.input_size == ModelConfig().input_size
    assert not ModelConfig(season_level=True).level_channel  # no seasons: no level
    with pytest.raises(ConfigError, match="season_level"):
        ModelConfig(**kw, season_level="yes")
