"""The CLI lists stages and keys, and refuses bad configs before any work."""

import subprocess
import sys

import pytest

from engine.config import ConfigError
from pipeline.cli import build_stage_config, main
from pipeline.stages import STAGES


def test_every_registered_stage_has_an_importable_config_with_defaults():
    for stage in STAGES.values():
        cls = stage.config_class()
        cls()  # all defaults construct
        for preset in getattr(cls, "presets", {}):
            build_stage_config(stage.name, {"preset": preset})


def test_stages_command_lists_every_stage(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in STAGES:
        assert name in out


def test_run_help_lists_keys_with_defaults(capsys):
    assert main(["run", "stage=pack", "--help"]) == 0
    out = capsys.readouterr().out
    assert "shard_size=" in out and "presets:" in out


def test_unknown_stage_and_key_fail_with_exit_2(capsys):
    assert main(["run", "stage=nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["run", "stage=pack", "shard_sise=3"]) == 2
    assert "Did you mean 'shard_size'" in capsys.readouterr().err


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_stage_config("pack", {"preset": "huge"})


def test_console_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "pipeline run stage=<name>" in done.stdout
