"""The CLI: help that answers, consistent exit codes (0 ok, 1 the work failed, 2 bad input)."""

import logging
import subprocess
import sys

import pytest

from engine.errors import ConfigError, UserError
from pipeline.cli import build_stage_config, main
from pipeline.stages import STAGES
from pipeline.tools import TOOLS


def test_every_registered_stage_has_an_importable_config_with_defaults():
    for stage in STAGES.values():
        cls = stage.config_class()
        cls()  # all defaults construct
        for preset in getattr(cls, "presets", {}):
            build_stage_config(stage.name, {"preset": preset})


def test_presets_and_stage_all_share_one_layout():
    from engine.layout import DEMO

    tokens = build_stage_config("tokenize", {"preset": "demo"})
    assert tokens.out_dir == DEMO.tokenize and tokens.images == DEMO.pack_shards
    assert tokens.aug.size == build_stage_config("vqkd", {"preset": "demo"}).model.image_size
    assert build_stage_config("pretrain", {"preset": "demo"}).tokens == DEMO.tokenize


def test_stages_command_lists_every_stage(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in STAGES:
        assert name in out


def test_run_help_lists_stages(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in STAGES)


def test_stage_help_gives_meanings_preset_values_and_an_example(capsys):
    assert main(["run", "stage=tokenize", "--help"]) == 0
    plain = capsys.readouterr().out
    assert "one view per seed per image" in plain  # the field's own comment
    assert "out_dir=runs/tokenize" in plain
    assert main(["run", "stage=tokenize", "preset=demo", "--help"]) == 0
    demo = capsys.readouterr().out
    assert "values with preset=demo" in demo and "aug.size=96" in demo
    assert "batch_size=32" in demo and "batch_size=64" in plain
    example = next(ln for ln in demo.splitlines() if ln.startswith("  pipeline run stage="))
    assert "/runs/demo/vqkd/tokenizer.pth" in example and " tokenizer=/" in example


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_has_help_and_a_bare_call_prints_its_own_usage(tool, capsys):
    assert main([tool, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pipeline {tool}:") and "exit codes:" in out
    if TOOLS[tool].paths:
        assert main([tool]) == 2
        assert f"usage: pipeline {tool} " in capsys.readouterr().err


def test_bad_input_is_exit_2_with_a_message_and_no_traceback(capsys, tmp_path):
    assert main(["run", "stage=nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["run", "stage=pack", "shard_sise=3"]) == 2
    assert "Did you mean 'shard_size'" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "Traceback" not in err
    assert main(["validate", str(tmp_path), "colour=red"]) == 2
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_user_error_from_a_stage_is_exit_2_but_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from pipeline import stages

    def refuse(cfg):
        raise UserError("images= is empty; say which images to pack")

    monkeypatch.setattr(stages.Stage, "run_fn", lambda self: refuse)
    assert main(["run", "stage=pack"]) == 2
    assert "images= is empty" in capsys.readouterr().err

    def bug(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(stages.Stage, "run_fn", lambda self: bug)
    with pytest.raises(RuntimeError):
        main(["run", "stage=pack"])


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_stage_config("pack", {"preset": "huge"})


def test_dask_logging_is_quiet_unless_verbose(capsys):
    assert main(["stages"]) == 0
    assert logging.getLogger("distributed").level == logging.WARNING
    assert main(["--verbose", "stages"]) == 0
    assert logging.getLogger("distributed").level == logging.INFO
    assert main(["log_level=loud", "stages"]) == 2
    main(["stages"])


def test_a_run_ends_with_what_it_wrote_and_what_to_run_next(tmp_path, capsys):
    from pipeline.demo_corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "corpus", n_images=4, size=32, classes=("stripes", "disks"))
    out = tmp_path / "run" / "pack"
    assert main(["run", "stage=pack", f"images={tmp_path / 'corpus'}", f"out_dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "\nwrote:\n" in text and f"\n  {out}/index.json\n" in text
    assert f"next:\n  pipeline run stage=vqkd 'images={out}/shard-*.tar'" in text
    assert f"out_dir={tmp_path / 'run' / 'vqkd'}" in text


def test_console_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "pipeline run stage=<name>" in done.stdout and "exit codes:" in done.stdout


def test_a_reader_that_stops_early_gets_no_traceback():
    """``pipeline run stage=pretrain --help | head -1``: the pipe closes before the help is out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "stage=pretrain", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the process has written anything (it is still importing)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in stderr, stderr
