"""``pipeline``: the one command line of the project.

pipeline run stage=<name> [preset=<name>] [key=value ...]
pipeline stages
pipeline validate <token dataset> [images=<image source>]
pipeline inspect <token dataset> [out=<dir>]
pipeline export <pretrain checkpoint> [out=<file>]
pipeline report <run dir>
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from engine import config
from engine.config import ConfigError, describe, load_config_file, parse_overrides
from pipeline.stages import STAGES, get_stage

# Tool commands: name -> ("module:function", help). Each function takes the argv after the name
# and returns a process exit code.
TOOLS: dict[str, tuple[str, str]] = {
    "validate": (
        "shards.validate:main",
        "check a token dataset: checksums, counts, ranges, alignment",
    ),
    "inspect": ("shards.inspect:main", "summarise a token dataset and draw token maps"),
    "export": ("pretrain.export:main", "export a pretrain checkpoint as a timm-loadable backbone"),
    "report": ("pipeline.report:main", "write an HTML report of a run directory"),
}

USAGE = """usage: pipeline run stage=<name> [preset=<name>] [key=value ...]
       pipeline stages
       pipeline run --help            (every stage's keys and defaults)
       pipeline run stage=<name> --help
""" + "".join(f"       pipeline {name:<9} ...   {text}\n" for name, (_, text) in TOOLS.items())


def stage_help(name: str) -> str:
    stage = get_stage(name)
    cls = stage.config_class()
    presets = ", ".join(getattr(cls, "presets", {}) or {}) or "none"
    lines = [f"stage={name}: {stage.help}", f"  presets: {presets}", "  keys (default):"]
    for key, type_name, default, _doc in describe(cls):
        lines.append(f"    {key}={json.dumps(default)}  [{type_name}]")
    return "\n".join(lines)


def build_stage_config(name: str, overrides: dict[str, Any]) -> Any:
    """The frozen config of stage ``name``: its preset, then ``config=<file>``, then overrides."""
    overrides = dict(overrides)
    file = overrides.pop("config", None)
    layer = load_config_file(file) if file else None
    return config.build_stage_config(
        get_stage(name).config_class(), overrides, stage=name, file=layer
    )


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(USAGE)
        print("stages:")
        for name in STAGES:
            print(stage_help(name), end="\n\n")
        return 0
    want_help = any(a in ("-h", "--help") for a in argv)
    overrides = parse_overrides([a for a in argv if a not in ("-h", "--help")])
    name = overrides.pop("stage", None)
    if name is None:
        raise ConfigError(f"say which stage to run: stage=<name>; stages: {', '.join(STAGES)}")
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if want_help:
        print(stage_help(name))
        return 0
    cfg = build_stage_config(name, overrides)
    start = time.perf_counter()
    summary = get_stage(name).run_fn()(cfg) or {}
    summary.setdefault("seconds", round(time.perf_counter() - start, 1))
    print(json.dumps(summary, indent=2, default=str))
    return int(summary.get("exit_code", 0))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        print("stages: " + ", ".join(STAGES))
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            return run(rest)
        if command == "stages":
            for stage in STAGES.values():
                print(f"{stage.name:<10} {stage.help}")
            return 0
        if command in TOOLS:
            module, attr = TOOLS[command][0].split(":")
            import importlib

            return int(getattr(importlib.import_module(module), attr)(rest) or 0)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
