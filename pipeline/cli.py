"""``pipeline``: the one command line of the project.

    pipeline run stage=<name> [preset=<name>] [config=<file.yaml>] [key=value ...]
    pipeline stages
    pipeline validate|inspect|export|report ...    (pipeline/tools.py)
    pipeline <command> --help

Exit codes: 0 the work is done; 1 the work failed (a stage, some shards, a validation);
2 bad usage or input; 128 + n interrupted by signal n (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
A user's mistake is an :class:`engine.errors.UserError` (``ConfigError`` is one): the CLI prints
its message and exits 2, without a traceback. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from engine import config
from engine.config import load_config_file, parse_overrides
from engine.errors import ConfigError, UserError
from engine.lock import check_output
from pipeline import guide
from pipeline.help import main_help, run_help, stage_help, tool_help
from pipeline.logs import pop_logging_options, setup_logging
from pipeline.stages import STAGES, get_stage
from pipeline.tools import TOOLS, Tool

log = logging.getLogger("pipeline")

HELP = ("-h", "--help")
JOB_SCRIPT = "--print-job-script"


def build_stage_config(name: str, overrides: dict[str, Any]) -> Any:
    """The frozen config of stage ``name``: its preset, then ``config=<file>``, then overrides."""
    overrides = dict(overrides)
    file = overrides.pop("config", None)
    layer = load_config_file(file) if file else None
    return config.build_stage_config(
        get_stage(name).config_class(), overrides, stage=name, file=layer
    )


def run(argv: list[str]) -> int:
    """``pipeline run stage=<name> [key=value ...]`` (or its help)."""
    want_help = any(a in HELP for a in argv)
    want_script = JOB_SCRIPT in argv
    args = [a for a in argv if a not in (*HELP, JOB_SCRIPT)]
    if not args:
        print(run_help(), file=sys.stdout if want_help else sys.stderr)
        return 0 if want_help else 2
    overrides = parse_overrides(args)
    name = overrides.pop("stage", None)
    if name is None:
        if want_help:
            print(run_help())
            return 0
        raise ConfigError(f"say which stage to run: stage=<name>; stages: {', '.join(STAGES)}")
    stage = get_stage(str(name))
    if want_help:
        layers = " ".join(a for a in args if not a.startswith("stage="))
        cfg = build_stage_config(stage.name, overrides) if layers else None
        print(stage_help(stage.name, cfg, layers))
        return 0
    cfg = build_stage_config(stage.name, overrides)
    if want_script:
        job_script = stage.job_script_fn()
        if job_script is None:
            raise UserError(
                f"stage={stage.name} submits no batch job; {JOB_SCRIPT} is for stage=tokenize"
            )
        print(job_script(cfg), end="")
        return 0
    out = guide.absolute(getattr(cfg, "out_dir", "") or "")
    log.info("stage=%s: starting; outputs go to %s", stage.name, out or "(no out_dir)")
    start = time.perf_counter()
    try:
        summary = stage.run_fn()(cfg) or {}
    except KeyboardInterrupt as stop:  # every finally below has run: jobs cancelled, locks let go
        return _interrupted(stop, f"stage={stage.name}: " + stage.interrupted.format(out_dir=out))
    summary.setdefault("seconds", round(time.perf_counter() - start, 1))
    print(json.dumps(summary, indent=2, default=str))
    print(guide.closing_lines(stage.name, cfg, summary))
    return int(summary.get("exit_code", 0) or 0)


def _check_paths(tool: Tool, positional: list[str]) -> None:
    checked = positional if tool.paths < 0 else positional[: tool.paths]
    for path in checked:
        if "://" not in path and not os.path.exists(path):
            raise UserError(f"{path}: no such file or directory (see: pipeline {tool.name} --help)")


def _absolute_arg(arg: str) -> str:
    if "=" not in arg:
        return guide.absolute(arg)
    key, value = arg.split("=", 1)
    return f"{key}={guide.absolute(value)}" if key == "out" else arg


def run_tool(tool: Tool, argv: list[str]) -> int:
    """``pipeline <tool> ...``: help, argument checks, then the tool's own function."""
    if any(a in HELP for a in argv):
        print(tool_help(tool))
        return 0
    positional = [a for a in argv if "=" not in a]
    if tool.paths and not positional:
        print(tool_help(tool), file=sys.stderr)
        return 2
    _check_paths(tool, positional)
    # absolute paths, so whatever the tool prints can be pasted from any directory
    args = [_absolute_arg(a) for a in argv]
    for arg in args:
        if tool.out and arg.startswith("out="):
            what = f"what pipeline {tool.name} writes"
            check_output(arg.removeprefix("out="), what, key="out", file=tool.out == "file")
    log.info("%s: %s", tool.name, " ".join(args))
    code = int(tool.function()(args) or 0)  # a usage mistake is a UserError, as everywhere
    follow = guide.after_tool(tool.name, args, code)
    if follow:
        print(follow)
    return code


def dispatch(argv: list[str]) -> int:
    if not argv:
        print(main_help(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in (*HELP, "help"):
        print(main_help())
        return 0
    if command == "run":
        return run(rest)
    if command == "stages":
        if any(a in HELP for a in rest):
            print("usage: pipeline stages\n\nlists the stages of `pipeline run stage=<name>`")
            return 0
        if rest:
            raise UserError(f"pipeline stages takes no arguments, got {' '.join(rest)!r}")
        for stage in STAGES.values():
            print(f"{stage.name:<10} {stage.help}")
        return 0
    if command in TOOLS:
        return run_tool(TOOLS[command], rest)
    near = difflib.get_close_matches(command, ["run", "stages", *TOOLS], n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise UserError(f"unknown command {command!r}.{hint} See: pipeline --help")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (a batch scheduler's scancel, a closed terminal): ends the run
    as a KeyboardInterrupt, so every ``finally`` runs (worker jobs are cancelled, locks let go)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _interrupts() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise :class:`Interrupted` while the command runs (the main
    thread's handlers are put back after it, for a caller that runs several commands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = {signum: signal.signal(signum, _interrupt) for signum in signals}
    hook = sys.unraisablehook

    def raise_again(unraisable: Any) -> None:
        # An interrupt raised where Python can only print it (an after-fork hook, a __del__)
        # would be lost and the run would go on after a traceback: send the signal again, so it
        # is raised a moment later where it ends the run.
        stop = unraisable.exc_value
        if not isinstance(stop, KeyboardInterrupt):
            hook(unraisable)
            return
        signum = getattr(stop, "signum", signal.SIGINT)
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()

    sys.unraisablehook = raise_again
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _interrupted(stop: KeyboardInterrupt, what: str) -> int:
    """Say in one line what an interrupted command kept and how to go on; 128 + the signal."""
    signum = getattr(stop, "signum", signal.SIGINT)
    print(f"interrupted ({signal.Signals(signum).name}) during {what}", file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    """The console entry point; returns the exit code (0 ok, 1 the work failed, 2 bad input,
    128 + the signal number when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _interrupts():
            argv, verbose, level = pop_logging_options(argv)
            setup_logging(verbose, level)
            return dispatch(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return _interrupted(stop, f"pipeline {' '.join(argv[:1])}: rerun the same command")
    except BrokenPipeError:
        # the reader went away (`pipeline ... --help | head`): not an error of ours, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
