"""Where a run's stages write: one layout for presets, ``stage=all`` and the report.

A run directory holds one folder per stage, named after the stage::

    <root>/corpus/      the demo corpus (ImageFolder), when stage=all builds it
    <root>/pack/        WebDataset image shards (shard-*.tar) + index.json
    <root>/vqkd/        stage 1: tokenizer.pth, checkpoint.pth, metrics.jsonl, config.yaml
    <root>/tokenize/    stage 2: the token dataset (manifest.json, parquet/, wds/, README.md)
    <root>/pretrain/    stage 3: checkpoint.pth, backbone_timm.pth, metrics.jsonl, config.yaml
    <root>/linprobe/    linear probes (stage=all: one sub-folder per backbone)
    <root>/finetune/    fine-tuning runs
    <root>/report/      ``pipeline report`` output (index.html + PNGs)
    <root>/summary.json what ``stage=all`` ran, how long each stage took, the command to rerun it

Paths are strings joined with "/" so a root may also be an fsspec URL (``s3://bucket/run``).
The ImageNet sample used by the ``imagenet-sample`` preset, the benchmarks and the tests is found
through one setting, :func:`imagenet_sample_dir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The repository root (engine/ sits right below it).
REPO_ROOT = Path(__file__).resolve().parents[1]
# Environment variable naming the folder of ImageNet JPEGs (one per class) used as a sample.
IMAGENET_SAMPLE_ENV = "IMAGENET_SAMPLE"
# Its default: beside the repository, where the project's shared data lives.
DEFAULT_IMAGENET_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"


def imagenet_sample_dir() -> Path:
    """The ImageNet sample folder: ``$IMAGENET_SAMPLE`` or ``<repo>/../shared/data/imagenet-sample``.

    The folder may be absent; callers that need it check and say how to set the variable.
    """
    value = os.environ.get(IMAGENET_SAMPLE_ENV)
    return Path(value).expanduser() if value else DEFAULT_IMAGENET_SAMPLE


@dataclass(frozen=True)
class RunLayout:
    """The default folder of every stage under one run root (see the module docstring)."""

    root: str = "runs"

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def corpus(self) -> str:
        return self._join("corpus")

    @property
    def pack(self) -> str:
        return self._join("pack")

    @property
    def pack_shards(self) -> str:
        """A glob of the packed tars (the folder also holds index.json, so not the folder)."""
        return self._join("pack", "shard-*.tar")

    @property
    def vqkd(self) -> str:
        return self._join("vqkd")

    @property
    def tokenizer(self) -> str:
        return self._join("vqkd", "tokenizer.pth")

    @property
    def tokenize(self) -> str:
        return self._join("tokenize")

    @property
    def pretrain(self) -> str:
        return self._join("pretrain")

    @property
    def pretrain_checkpoint(self) -> str:
        return self._join("pretrain", "checkpoint.pth")

    @property
    def linprobe(self) -> str:
        return self._join("linprobe")

    def linprobe_run(self, name: str) -> str:
        """One probe of ``stage=all`` (``pretrained``, ``random``, ``teacher``)."""
        return self._join("linprobe", name)

    @property
    def finetune(self) -> str:
        return self._join("finetune")

    @property
    def report(self) -> str:
        return self._join("report")

    @property
    def summary(self) -> str:
        return self._join("summary.json")


# Defaults of single-stage runs (``runs/<stage>``) and of the demo (``runs/demo/<stage>``).
RUNS = RunLayout("runs")
DEMO = RunLayout("runs/demo")
