"""The closing lines of a command: what it wrote, and the command to run next.

Paths are printed absolute, so a printed command works from any directory. The next commands
follow the run layout (:class:`engine.layout.RunLayout`): a stage whose ``out_dir`` is
``<root>/vqkd`` is followed by ``stage=tokenize out_dir=<root>/tokenize``, and so on.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from engine.layout import RunLayout

# Files worth naming at the end of a run (others are counted).
NOTABLE = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoint.pth",
    "tokenizer.pth",
    "backbone_timm.pth",
    "manifest.json",
    "README.md",
    "results.json",
    "index.json",
    "summary.json",
    "curves.png",
)


def absolute(path: str) -> str:
    """``path`` made absolute when it is local (fsspec URLs and globs' roots kept as given)."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def command(*args: str) -> str:
    """A shell-quoted ``pipeline ...`` command line."""
    return "pipeline " + " ".join(shlex.quote(a) for a in args)


def written(out_dir: str) -> list[str]:
    """One line per notable file in ``out_dir``, and a count of the rest."""
    root = Path(absolute(out_dir))
    if "://" in out_dir or not root.is_dir():
        return [f"  {out_dir}"] if out_dir else []
    files = sorted(p for p in root.rglob("*") if p.is_file())
    named = [p for p in files if p.name in NOTABLE and p.parent == root]
    lines = [f"  {p}" for p in named]
    rest = len(files) - len(named)
    size = sum(p.stat().st_size for p in files) / 1e6
    lines.append(f"  {root}/ ({len(files)} files, {size:.1f} MB{f'; {rest} more' if rest else ''})")
    return lines


def _preset(cfg: Any) -> list[str]:
    return [f"preset={cfg.preset}"] if getattr(cfg, "preset", None) else []


def next_commands(stage: str, cfg: Any, summary: dict[str, Any]) -> list[str]:
    """The commands that usually follow ``stage`` on these outputs."""
    out = absolute(getattr(cfg, "out_dir", "") or "")
    if not out:
        return []
    layout = RunLayout(os.path.dirname(out))
    images = absolute(getattr(cfg, "images", "") or "")
    if stage == "pack":
        shards = f"{out}/shard-*.tar"
        return [command("run", "stage=vqkd", f"images={shards}", f"out_dir={layout.vqkd}")]
    if stage == "vqkd":
        tokenizer = absolute(str(summary.get("tokenizer") or f"{out}/tokenizer.pth"))
        size = cfg.model.image_size
        return [
            command("run", "stage=tokenize", *_preset(cfg), f"images={images}",
                    f"tokenizer={tokenizer}", f"aug.size={size}", f"out_dir={layout.tokenize}"),
        ]  # fmt: skip
    if stage == "tokenize":
        # token_set=<name>: the set lives in the dataset (out_dir); stage 3 picks it by name
        pick = [f"token_set={cfg.token_set}"] if getattr(cfg, "token_set", "") else []
        written_to = absolute(str(summary.get("out_dir") or out))
        return [
            command("validate", out, f"images={images}"),
            command("inspect", written_to, f"images={images}"),
            command("run", "stage=pretrain", *_preset(cfg), f"tokens={out}", *pick,
                    f"out_dir={layout.pretrain}"),
        ]  # fmt: skip
    if stage == "pretrain":
        checkpoint = absolute(str(summary.get("checkpoint") or f"{out}/checkpoint.pth"))
        probe = [f"images={images}"] if images else []
        return [
            command("export", checkpoint),
            command("run", "stage=linprobe", f"backbone={checkpoint}", *probe,
                    f"out_dir={layout.linprobe}"),
            command("report", out),
        ]  # fmt: skip
    if stage in ("linprobe", "finetune"):
        return [command("report", out)]
    if stage == "all" and summary.get("report"):
        return [f"open {absolute(str(summary['report']))}"]
    return []


def closing_lines(stage: str, cfg: Any, summary: dict[str, Any]) -> str:
    """``wrote:`` and ``next:`` blocks for the end of ``pipeline run stage=<stage>``."""
    lines = []
    out = getattr(cfg, "out_dir", "") or ""
    if stage == "tokenize" and summary.get("out_dir"):
        out = str(summary["out_dir"])  # a token set's own folder inside the dataset
    if out:
        lines += ["wrote:", *written(out)]
    if Path(absolute(out), "tensorboard").is_dir():
        lines.append(f"  curves: tensorboard --logdir {absolute(out)}/tensorboard")
    failed = int(summary.get("exit_code", 0) or 0)
    follow = next_commands(stage, cfg, summary) if not failed else []
    if follow:
        lines += ["next:", *(f"  {c}" for c in follow)]
    if failed:
        lines.append("the run finished with failures (exit code 1): see the summary above")
    return "\n".join(lines)


def after_tool(name: str, args: list[str], code: int) -> str:
    """The ``next:`` lines after a tool succeeded ("" when there is nothing to suggest)."""
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    if code != 0 or not positional:
        return ""
    target = positional[0]
    follow = []
    if name == "validate":
        layout = RunLayout(os.path.dirname(target.rstrip("/")))
        follow = [
            command("run", "stage=pretrain", f"tokens={target}", f"out_dir={layout.pretrain}")
        ]
    elif name == "inspect":
        follow = [command("report", target)]
    elif name == "export":
        out = options.get("out") or str(Path(target).with_suffix(".timm.safetensors"))
        layout = RunLayout(os.path.dirname(os.path.dirname(target)))
        follow = [
            command("run", "stage=linprobe", f"backbone={out}", "images=<labelled images>",
                    f"out_dir={layout.linprobe}"),
        ]  # fmt: skip
    return "next:\n" + "\n".join(f"  {c}" for c in follow) if follow else ""
