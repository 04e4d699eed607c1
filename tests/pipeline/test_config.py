"""The config system is strict: typos and wrong types fail before any work, naming the key."""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    build_config,
    describe,
    from_dict,
    parse_overrides,
    save_config,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.98)


@dataclass(frozen=True)
class Toy:
    presets: ClassVar[dict] = {"fast": {"epochs": 1, "optim": {"lr": 0.5}}}
    name: str = "x"
    epochs: int = 10
    amp: bool = False
    device: Literal["cpu", "cuda"] = "cpu"
    resume_from: str | None = None
    seeds: tuple[int, ...] = (0, 1)
    optim: Optim = field(default_factory=Optim)

    @property
    def steps(self) -> int:
        return self.epochs * 2


def test_overrides_parse_nested_typed_values():
    got = parse_overrides(["epochs=3", "optim.lr=2e-4", "seeds=[0,1,2]", "amp=true", "name=abc"])
    assert got == {
        "epochs": 3,
        "optim": {"lr": 2e-4},
        "seeds": [0, 1, 2],
        "amp": True,
        "name": "abc",
    }


def test_build_applies_layers_in_order_and_freezes():
    cfg = build_config(Toy, Toy.presets["fast"], parse_overrides(["optim.betas=[0.9,0.999]"]))
    assert cfg.epochs == 1 and cfg.optim.lr == 0.5 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.steps == 2
    with pytest.raises(AttributeError):
        cfg.epochs = 5  # type: ignore[misc]


def test_int_is_accepted_for_float_and_comma_list_for_tuple():
    cfg = build_config(Toy, {"optim": {"lr": 1}, "seeds": "3,4"})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.seeds == (3, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epoch": 3}, "unknown config key 'epoch'. Did you mean 'epochs'?"),
        ({"optim": {"lrr": 3}}, "unknown config key 'optim.lrr'"),
        ({"epochs": "many"}, "epochs must be an integer"),
        ({"amp": "yes"}, "amp must be true or false"),
        ({"device": "tpu"}, "choose one of: cpu, cuda"),
        ({"optim": 3}, "optim is a group of settings"),
        ({"seeds": ["a"]}, "seeds[0] must be an integer"),
    ],
)
def test_bad_keys_and_values_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(Toy, overrides)
    assert message in str(err.value)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_config(Toy, {"bogus": 1})
    assert "Valid keys here: amp, device, epochs, name, optim, resume_from, seeds" in str(err.value)


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(Toy, {"epochs": 7, "resume_from": "a.pt", "optim": {"lr": 0.25}})
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    loaded = yaml.safe_load(path.read_text())
    assert loaded == to_dict(cfg)
    assert from_dict(Toy, loaded) == cfg


def test_describe_lists_every_leaf_with_defaults():
    rows = {key: (kind, default) for key, kind, default in describe(Toy)}
    assert rows["optim.lr"] == ("float", 1e-3)
    assert rows["device"] == ("cpu|cuda", "cpu")
    assert rows["resume_from"] == ("str or null", None)
    assert "steps" not in rows  # derived values are not keys
