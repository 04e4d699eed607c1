"""The config system is strict: typos and wrong types fail before any work, naming the key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from engine.config import (
    SEED_MAX,
    Count,
    Fraction,
    NonNegative,
    Positive,
    Raw,
    Seed,
    StageConfig,
    build_config,
    build_stage_config,
    describe,
    field_docs,
    from_dict,
    load_config_file,
    parse_overrides,
    save_config,
    to_dict,
)
from engine.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.98)


@dataclass(frozen=True)
class Toy(StageConfig):
    presets: ClassVar[dict] = {"fast": {"epochs": 1, "optim": {"lr": 0.5}}}
    name: str = "x"  # what the run is called
    # how many passes over the data
    epochs: int = 10
    amp: bool = False
    device: Literal["cpu", "cuda"] = "cpu"
    resume_from: str | None = None
    seeds: tuple[int, ...] = (0, 1)
    optim: Optim = field(default_factory=Optim)

    @property
    def steps(self) -> int:
        return self.epochs * 2


def test_overrides_stay_text_until_the_field_type_is_known():
    got = parse_overrides(["epochs=3", "optim.lr=2e-4", "seeds=[0,1,2]", "amp=true", "name=abc"])
    assert got == {
        "epochs": "3",
        "optim": {"lr": "2e-4"},
        "seeds": "[0,1,2]",
        "amp": "true",
        "name": "abc",
    }
    cfg = build_config(Toy, got)
    assert (cfg.epochs, cfg.optim.lr, cfg.seeds, cfg.amp, cfg.name) == (
        3,
        2e-4,
        (0, 1, 2),
        True,
        "abc",
    )


@pytest.mark.parametrize(
    ("arg", "field", "value"),
    [
        ("name=007", "name", "007"),  # YAML would make this 7
        ("name=0x10", "name", "0x10"),  # ... and this 16
        ("name=yes", "name", "yes"),  # ... and this True
        ("name=null", "name", "null"),  # a str field keeps the text
        ("epochs=0x10", "epochs", 16),
        ("epochs=1_000", "epochs", 1000),
        ("amp=yes", "amp", True),
        ("amp=off", "amp", False),
        ("resume_from=null", "resume_from", None),
        ("resume_from=007", "resume_from", "007"),
        ("seeds=4,5", "seeds", (4, 5)),
        ("seeds=[]", "seeds", ()),
    ],
)
def test_values_are_parsed_by_the_field_type(arg, field, value):
    cfg = build_config(Toy, parse_overrides([arg]))
    assert getattr(cfg, field) == value
    assert type(getattr(cfg, field)) is type(value)


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_overrides(["epochs=1", "epochs=2"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_overrides(["preset=fast", "preset=fast"])


def test_saved_config_reruns_exactly_and_records_the_preset(tmp_path):
    cfg = build_stage_config(Toy, parse_overrides(["preset=fast", "name=007", "seeds=[3]"]))
    assert cfg.preset == "fast" and cfg.epochs == 1 and cfg.optim.lr == 0.5 and cfg.name == "007"
    path = save_config(cfg, tmp_path / "config.yaml")
    again = build_stage_config(Toy, {}, file=load_config_file(path))
    assert again == cfg
    # the file is a layer under key=value
    tweaked = build_stage_config(Toy, parse_overrides(["epochs=4"]), file=load_config_file(path))
    assert tweaked.epochs == 4 and tweaked.name == "007" and tweaked.preset == "fast"


def test_unknown_preset_and_bad_config_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*presets: fast"):
        build_stage_config(Toy, {"preset": "huge"})
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(tmp_path / "list.yaml")


def test_field_docs_come_from_the_comments_in_the_source():
    docs = field_docs(Toy)
    assert docs["name"] == "what the run is called"
    assert docs["epochs"] == "how many passes over the data"
    assert "preset" in docs["preset"]


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
        ({"amp": "yes"}, "amp must be true or false"),  # typed layers (YAML) are not re-parsed
        (parse_overrides(["amp=maybe"]), "amp must be true or false"),
        (parse_overrides(["epochs=3.5"]), "epochs must be an integer"),
        ({"name": 7}, "name must be a string"),
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
    assert "Valid keys here: amp, device, epochs, name, optim, preset, resume_from, seeds" in str(
        err.value
    )


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(Toy, {"epochs": 7, "resume_from": "a.pt", "optim": {"lr": 0.25}})
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    loaded = yaml.safe_load(Path(path).read_text())
    assert loaded == to_dict(cfg)
    assert from_dict(Toy, loaded) == cfg


def test_describe_lists_every_leaf_with_defaults():
    rows = {key: (kind, default) for key, kind, default, _doc in describe(Toy)}
    assert rows["optim.lr"] == ("float", 1e-3)
    assert rows["device"] == ("cpu|cuda", "cpu")
    assert rows["resume_from"] == ("str or null", None)
    assert "steps" not in rows  # derived values are not keys


@dataclass(frozen=True)
class Ranged:
    seeds: tuple[Seed, ...] = (0,)
    workers: Count = 1
    threads: NonNegative = 0
    lr: Positive = 1e-3
    share: Fraction = 0.5
    size: Count | None = None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"seeds": Raw(f"[0,{SEED_MAX + 1}]")},
            f"seeds[1]={SEED_MAX + 1} is out of range: it must be from 0 to {SEED_MAX}",
        ),
        (
            {"seeds": Raw("[100000000000000000000000]")},
            "seeds[0]=100000000000000000000000 is out of range",
        ),
        ({"seeds": Raw("[-1]")}, "seeds[0]=-1 is out of range"),
        ({"workers": Raw("0")}, "workers=0 is out of range: it must be >= 1"),
        ({"threads": -1}, "threads=-1 is out of range: it must be >= 0"),
        ({"lr": Raw("0")}, "lr=0.0 is out of range: it must be > 0"),
        ({"lr": Raw("-1e-3")}, "lr=-0.001 is out of range"),
        ({"share": Raw("1.5")}, "share=1.5 is out of range: it must be from 0 to 1"),
        ({"size": Raw("0")}, "size=0 is out of range: it must be >= 1"),
        ({"lr": Raw("nan")}, "lr must be a finite number, got 'nan'"),
        ({"lr": Raw("inf")}, "lr must be a finite number, got 'inf'"),
        ({"share": float("nan")}, "share must be a finite number"),
    ],
)
def test_numbers_outside_their_range_are_refused_when_the_config_is_built(overrides, message):
    """Every range lives in the field's type, so a value is refused before any work (a seed the
    int32 seed column cannot hold used to fail every shard on write, after the cluster started)."""
    with pytest.raises(ConfigError) as err:
        build_config(Ranged, overrides)
    assert str(err.value).startswith(message)


def test_values_at_the_ends_of_a_range_are_accepted_and_help_shows_the_range():
    cfg = build_config(
        Ranged,
        {"seeds": Raw(f"[0,{SEED_MAX}]"), "workers": Raw("1"), "share": 1, "size": Raw("null")},
    )
    assert cfg.seeds == (0, SEED_MAX) and cfg.workers == 1 and cfg.share == 1 and cfg.size is None
    types = {key: tp for key, tp, _, _ in describe(Ranged)}
    assert types == {
        "seeds": f"list[int from 0 to {SEED_MAX}]",
        "workers": "int >= 1",
        "threads": "int >= 0",
        "lr": "float > 0",
        "share": "float from 0 to 1",
        "size": "int >= 1 or null",
    }
