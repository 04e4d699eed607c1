"""The text of every ``--help``: the command, each stage (keys, meanings, preset values), each tool.

A key's meaning is the comment beside its config field (``engine.config.describe``), so the help
and the code cannot drift apart. Example commands use the demo's run layout as absolute paths, so
they can be pasted from any directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

from engine.config import describe
from engine.layout import DEMO, RunLayout
from pipeline.stages import STAGES, get_stage
from pipeline.tools import TOOLS, Tool

EXIT_CODES = """exit codes:
  0    the work is done
  1    the work failed (a stage failed, some shards failed, validate found problems)
  2    bad usage or input (unknown key or value, missing file, an out_dir another run holds,
       ...): a message says what to fix
  130  interrupted by Ctrl-C (143 SIGTERM, 129 SIGHUP): a line says what was kept and how to
       go on"""

OPTIONS = """options (any command):
  --verbose, -v      show every library's INFO logging (Dask workers, ...) and our DEBUG lines
  log_level=<level>  our log level (debug|info|warning|error; default info); libraries stay at
                     warning unless --verbose or log_level=debug"""


def example_paths() -> dict[str, str]:
    """``{placeholder: absolute path}`` of the demo's run layout, for example commands."""
    layout = RunLayout(os.path.abspath(DEMO.root))
    names = ["corpus", "pack", "pack_shards", "vqkd", "tokenizer", "tokenize", "pretrain"]
    names += ["pretrain_checkpoint", "linprobe", "finetune", "report"]
    return {"root": layout.root, **{name: getattr(layout, name) for name in names}}


def main_help() -> str:
    """``pipeline --help``."""
    width = max(len(name) for name in TOOLS) + 2
    tools = "".join(
        f"  pipeline {name:<{width}}{tool.usage}\n{' ' * (11 + width)}{tool.summary}\n"
        for name, tool in TOOLS.items()
    )
    return (
        "usage: pipeline <command> [arguments] [--verbose] [log_level=<level>]\n\n"
        "commands:\n"
        "  pipeline run stage=<name> [preset=<name>] [config=<run>/config.yaml] [key=value ...]\n"
        "             run one stage (pipeline run --help: the stages; add stage=<name> --help:\n"
        "             its keys, what they mean, and an example)\n"
        "  pipeline stages\n"
        "             list the stages\n"
        f"{tools}"
        "  pipeline <command> --help\n"
        "             that command's arguments and an example\n\n"
        f"{OPTIONS}\n\n{EXIT_CODES}\n"
    )


def run_help() -> str:
    """``pipeline run --help``: the stages and how to ask about one."""
    width = max(len(name) for name in STAGES) + 2
    stages = "".join(f"  {name:<{width}}{stage.help}\n" for name, stage in STAGES.items())
    return (
        "usage: pipeline run stage=<name> [preset=<name>] [config=<run>/config.yaml] "
        "[key=value ...]\n\n"
        "Layers, later wins: the stage's defaults < preset=<name> < config=<file.yaml> "
        "(a run's saved config.yaml reruns it exactly) < key=value.\n\n"
        f"stages:\n{stages}\n"
        "pipeline run stage=<name> --help            every key, its meaning and default\n"
        "pipeline run stage=<name> preset=demo --help the values with that preset\n\n"
        f"{EXIT_CODES}\n"
    )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return json.dumps(value) if value == "" or " " in value else value
    return json.dumps(value)


def stage_help(name: str, cfg: Any = None, layers: str = "") -> str:
    """``pipeline run stage=<name> --help``: keys with meanings, values of ``cfg`` if given.

    ``layers`` names what ``cfg`` was built from (for example ``preset=demo``).
    """
    stage = get_stage(name)
    cls = stage.config_class()
    presets = ", ".join(getattr(cls, "presets", {}) or {}) or "none"
    rows = describe(cls, values=cfg)
    shown = f"values with {layers}" if layers else "defaults"
    lines = [
        f"pipeline run stage={name}: {stage.help}",
        "",
        f"usage: pipeline run stage={name} [preset=<name>] [config=<run>/config.yaml] "
        "[key=value ...]",
        f"presets: {presets}",
        "",
        f"keys ({shown}; key=value on the command line, nested keys with dots):",
    ]
    for key, type_name, value, doc in rows:
        lines.append(f"  {key}={_show(value)}  ({type_name})")
        if doc:
            lines.append(f"      {doc}")
    if stage.example:
        example = stage.example.format(**example_paths())
        lines += ["", "example:", f"  pipeline run stage={name} {example}"]
    if stage.job_script:
        lines += [
            "",
            "batch jobs: cluster.kind=slurm|pbs submits worker jobs from this node; add",
            "  --print-job-script to see the job script a run would submit, without submitting:",
            f"  pipeline run stage={name} ... cluster.kind=slurm cluster.queue=<partition> "
            "--print-job-script",
            "  inside an allocation: srun -n N pipeline run stage=tokenize ... "
            "cluster.kind=slurm-runner",
        ]
    lines += ["", EXIT_CODES]
    return "\n".join(lines)


def tool_help(tool: Tool) -> str:
    """``pipeline <tool> --help``."""
    width = max((len(arg) for arg, _ in tool.arguments), default=0) + 2
    lines = [
        f"pipeline {tool.name}: {tool.summary}",
        "",
        f"usage: pipeline {tool.name} {tool.usage}",
    ]
    if tool.arguments:
        lines += ["", "arguments:"]
        lines += [f"  {arg:<{width}}{meaning}" for arg, meaning in tool.arguments]
    if tool.example:
        example = tool.example.format(**example_paths())
        lines += ["", "example:", f"  pipeline {tool.name} {example}"]
    codes = EXIT_CODES.replace(
        "1  the work failed (a stage failed, some shards failed, validate found problems)",
        f"1  {tool.failure or 'the work failed'}",
    )
    return "\n".join([*lines, "", codes])
