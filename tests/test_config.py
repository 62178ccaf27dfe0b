"""Validated config dataclasses: parsing, ranges, choices and error messages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vpeft_viz.config import Config, ConfigError, param, parse_overrides
from vpeft_viz.train import TrainConfig


@dataclass
class Demo(Config):
    prefix = "demo"
    rank: int = param(8, "rank", min=1, max=64)
    scale: float = param(0.1, "scale", min=0.0)
    act: str = param("relu", "activation", choices=("relu", "gelu"))
    flag: bool = param(False, "a switch")
    lr: float | None = param(None, "optional rate", min=0.0)


def test_defaults_and_dict_round_trip():
    d = Demo()
    assert d.to_dict() == {"rank": 8, "scale": 0.1, "act": "relu", "flag": False, "lr": None}
    assert Demo.from_dict(d.to_dict()) == d


@pytest.mark.parametrize("values, needle", [
    ({"rank": 0}, "demo.rank must be in [1, 64]"),
    ({"rank": 65}, "demo.rank must be in [1, 64]"),
    ({"rank": 2.5}, "demo.rank must be an integer"),
    ({"scale": -1.0}, "demo.scale must be in [0.0, inf]"),
    ({"act": "tanh"}, "demo.act must be one of relu, gelu"),
    ({"flag": "yes"}, "demo.flag must be true or false"),
    ({"nope": 1}, "unknown demo setting(s) nope"),
])
def test_errors_name_the_field(values, needle):
    with pytest.raises(ConfigError) as e:
        Demo.from_dict(values)
    assert needle in str(e.value)


def test_from_strings_parses_by_type():
    d = Demo.from_strings({"rank": "4", "scale": "0.5", "flag": "true", "lr": "none"})
    assert (d.rank, d.scale, d.flag, d.lr) == (4, 0.5, True, None)
    assert Demo.from_strings({"lr": "1e-3"}).lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="demo.rank expects a int, got 'abc'"):
        Demo.from_strings({"rank": "abc"})
    with pytest.raises(ConfigError, match="unknown demo setting 'bogus'"):
        Demo.from_strings({"bogus": "1"})


def test_integral_float_accepted_for_int():
    assert Demo(rank=4.0).rank == 4


def test_parse_overrides():
    assert parse_overrides(["a=1", "b = x=y"]) == {"a": "1", "b": " x=y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_field_specs_document_every_field():
    for spec in TrainConfig.field_specs():
        assert spec.help, spec.name


def test_train_config_cross_field_check():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
