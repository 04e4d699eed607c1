"""Recognising run folders by their own files, whatever their names.

A folder is a *part* of the report when its files say what made it:

=============  =====================================================================
``all``        ``summary.json`` (+ ``config.yaml`` of ``stage=all``): children are parts too
``tokenize``   ``manifest.json``: a token dataset (docs/design.md §3)
``vqkd``       ``tokenizer.pth`` (+ ``config.yaml``, ``metrics.jsonl``)
``pack``       ``index.json`` beside ``shard-*.tar``
``pretrain``   ``linprobe``  ``finetune``: ``config.yaml`` whose keys are that stage's config
``views``      ``seeds_k.json`` of ``benchmarks/bench_seeds.py`` (K stored views vs fresh)
``run``        only ``metrics.jsonl``: curves of an unknown stage
=============  =====================================================================

A views study is recognised by its JSON's shape (``args`` and per-configuration ``results`` lists
of the script's three metrics), never by its name alone; the JSON file itself may also be given.

A stage's ``config.yaml`` is matched to the stage whose config class has the same top-level keys
(the registry in ``pipeline/stages.py``), so a renamed folder (``runs/pt``) is still a pretrain.
Paths a part names in its config or manifest (the token dataset of a pretrain run, the image
source of a token dataset) are looked up as written, then relative to the part's parent folders.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError
from pipeline.stages import STAGES
from shards.images import list_shards

# Folders never searched for parts (outputs of tools, logs, the report itself).
SKIP = {"report", "inspect", "tensorboard", "wandb", "parquet", "wds", "__pycache__"}
MAX_DEPTH = 3
# Files worth listing for a part, in this order.
NOTABLE = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "manifest.json",
    "README.md",
    "index.json",
    "tokenizer.pth",
    "checkpoint.pth",
    "backbone_timm.pth",
    "results.json",
    "curves.png",
    "seeds_k.json",
    "seeds_k.png",
)
# The views study of benchmarks/bench_seeds.py: its file name, configurations and metrics.
STUDY = "seeds_k.json"
STUDY_CONFIG = re.compile(r"K=\d+|fresh")
STUDY_METRICS = ("heldout_mim_acc", "probe_top1", "pretrain_seconds")


@dataclass
class Part:
    """One recognised run folder."""

    kind: str  # all | pack | vqkd | tokenize | pretrain | linprobe | finetune | views | run
    path: Path  # absolute
    label: str  # heading: the given folder's name, then the path below it
    config: dict[str, Any] = field(default_factory=dict)  # its config.yaml ({} when none)
    source: Path | None = None  # the study JSON of a ``views`` part (absolute)

    def file(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    @property
    def notable(self) -> list[Path]:
        files = [self.path / n for n in NOTABLE if (self.path / n).is_file()]
        if self.source is not None:
            own = [self.source, self.source.with_suffix(".png")]
            files += [p for p in own if p.is_file() and p not in files]
        return files

    @property
    def slug(self) -> str:
        """The label as a file-name piece (``demo/linprobe/random`` -> ``demo-linprobe-random``)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label).strip("-.") or "run"


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _numbers(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def is_views_study(data: Any) -> bool:
    """Whether ``data`` has the shape ``bench_seeds.py`` writes: ``args`` and ``results`` of
    ``K=<k>``/``fresh`` configurations, each with non-empty number lists of the three metrics."""
    if not isinstance(data, dict) or not isinstance(data.get("args"), dict):
        return False
    results = data.get("results")
    if not isinstance(results, dict) or not results:
        return False
    return all(
        isinstance(name, str)
        and STUDY_CONFIG.fullmatch(name) is not None
        and isinstance(res, dict)
        and all(_numbers(res.get(m)) for m in STUDY_METRICS)
        for name, res in results.items()
    )


@functools.cache
def _stage_keys() -> dict[str, frozenset[str]]:
    return {
        name: frozenset(f.name for f in dataclasses.fields(stage.config_class()))
        for name, stage in STAGES.items()
    }


def stage_of_config(config: dict[str, Any]) -> str | None:
    """The stage whose config has (nearly) the keys of ``config``; None when none fits."""
    keys = set(config)
    if not keys:
        return None
    scores = {
        name: len(keys & fields) / len(keys | fields) for name, fields in _stage_keys().items()
    }
    best = max(scores, key=scores.get)
    return best if scores[best] >= 0.6 else None


def classify(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """(kind, config) of ``folder`` from its files, or None when nothing in it is a run's."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    config = read_yaml(folder / "config.yaml") if "config.yaml" in names else {}
    stage = stage_of_config(config)
    if "manifest.json" in names:
        return "tokenize", config
    if "summary.json" in names and (stage == "all" or not config):
        return "all", config
    if "tokenizer.pth" in names:
        return "vqkd", config
    if "index.json" in names and any(n.startswith("shard-") and n.endswith(".tar") for n in names):
        return "pack", config
    if stage is not None:
        return stage, config
    if "results.json" in names and isinstance(read_json(folder / "results.json"), dict):
        return "linprobe", config
    if "checkpoint.pth" in names:
        return "pretrain", config  # vqkd folders hold tokenizer.pth beside theirs
    if STUDY in names and is_views_study(read_json(folder / STUDY)):
        return "views", config
    if "metrics.jsonl" in names:
        return "run", config
    return None


def _walk(root: Path, label: str, depth: int, out: list[Part]) -> None:
    found = classify(root)
    if found:
        source = root / STUDY if found[0] == "views" else None
        out.append(Part(found[0], root, label, found[1], source))
        if found[0] in ("tokenize", "pack"):
            return  # their sub-folders are data, not runs
    if depth >= MAX_DEPTH:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for child in children:
        if child.name in SKIP or child.name.startswith("."):
            continue
        _walk(child, f"{label}/{child.name}", depth + 1, out)


def study_part(path: Path, given: str | Path) -> Part:
    """The ``views`` part of a study JSON given as a file (any name, the script's shape)."""
    if not is_views_study(read_json(path)):
        raise UserError(
            f"{given}: not a views study; a file given to report must be the JSON that "
            "benchmarks/bench_seeds.py writes (args + results of K=<k> and fresh runs); "
            "pass a run directory otherwise"
        )
    return Part("views", path.parent, path.name, source=path)


def discover(dirs: list[str | Path]) -> list[Part]:
    """Every recognised part under ``dirs`` (each searched a few levels down); a views-study
    JSON may be given as a file."""
    parts: list[Part] = []
    for given in dirs:
        root = Path(given).expanduser().resolve()
        if root.is_file():
            parts.append(study_part(root, given))
            continue
        if not root.is_dir():
            raise UserError(f"{given}: no such run directory; pass a stage's out_dir")
        before = len(parts)
        _walk(root, root.name or str(root), 0, parts)
        if len(parts) == before:
            raise UserError(
                f"{given}: nothing to report; a run folder holds config.yaml + metrics.jsonl "
                "(vqkd, pretrain, linprobe, finetune), manifest.json (a token dataset), "
                "tokenizer.pth, index.json + shard-*.tar (pack), summary.json (stage=all) "
                f"or {STUDY} (benchmarks/bench_seeds.py)"
            )
    unique: dict[Path, Part] = {}
    for part in parts:
        unique.setdefault(part.source or part.path, part)
    return list(unique.values())


def _exists(candidate: str) -> bool:
    """Whether a path, or an image source pattern (glob, brace pattern, comma list), is here."""
    if any(c in candidate for c in "*?[{,"):
        try:
            return bool(list_shards(candidate, 256))
        except (OSError, ValueError):
            return False
    return os.path.exists(candidate)


def locate(path: str, near: Path) -> str | None:
    """``path`` as written when it exists, else relative to ``near`` or one of its parents."""
    if not path:
        return None
    if "://" in path:
        return path
    if os.path.isabs(path):
        return path if _exists(path) else None
    for base in [Path.cwd(), near, *near.parents]:
        candidate = str(base / path)
        if _exists(candidate):
            return candidate
    return None


def token_dataset_of(part: Part, parts: list[Part]) -> Path | None:
    """The token dataset a pretrain run read: its ``tokens=``, else the one in the report."""
    found = locate(str(part.config.get("tokens") or ""), part.path)
    if found and (Path(found) / "manifest.json").is_file():
        return Path(found)
    datasets = [p.path for p in parts if p.kind == "tokenize"]
    return datasets[0] if len(datasets) == 1 else None


def image_source(manifest: dict[str, Any], near: Path) -> tuple[str, int | None] | None:
    """(images, shard_size) of the image source a token dataset names, located on this disk."""

    def walk(node: Any) -> tuple[str, int | None] | None:
        if isinstance(node, dict):
            if isinstance(node.get("source"), str):
                size = node.get("shard_size")
                return node["source"], int(size) if isinstance(size, int) else None
            for value in node.values():
                hit = walk(value)
                if hit:
                    return hit
        return None

    hit = walk(manifest.get("images", manifest))
    if hit is None:
        return None
    located = locate(hit[0], near)
    return (located, hit[1]) if located else None
