"""The stage registry: every ``pipeline run stage=<name>`` lives here, and nowhere else.

Entries name their config class and run function by import path, so ``pipeline --help`` does not
import torch. A config class carries its presets as ``presets: ClassVar[dict[str, dict]]``.
A run function takes the frozen config and returns a small dict summary the CLI prints.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "module:Class"
    run: str  # "module:function"
    help: str

    def config_class(self) -> type:
        return _load(self.config)

    def run_fn(self) -> Callable[[Any], dict]:
        return _load(self.run)


def _load(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "pack",
            "shards.pack:PackConfig",
            "shards.pack:pack",
            "write WebDataset image shards from a folder of images",
        ),
        Stage(
            "vqkd",
            "tokenize_corpus.config:VQKDConfig",
            "tokenize_corpus.train:vqkd",
            "stage 1: train a VQ-KD visual tokenizer by distilling a teacher",
        ),
        Stage(
            "tokenize",
            "tokenize_corpus.config:TokenizeConfig",
            "tokenize_corpus.job:tokenize",
            "stage 2: tokenize image shards at K view seeds on Dask into a token dataset",
        ),
        Stage(
            "pretrain",
            "pretrain.config:PretrainConfig",
            "pretrain.train:pretrain",
            "stage 3: pretrain BEiT v2 from precomputed tokens (or targets=online)",
        ),
        Stage(
            "linprobe",
            "pretrain.linprobe:LinprobeConfig",
            "pretrain.linprobe:linprobe",
            "evaluate a backbone with a linear classifier on frozen features",
        ),
        Stage(
            "finetune",
            "pretrain.finetune:FinetuneConfig",
            "pretrain.finetune:finetune",
            "fine-tune a backbone end to end with layer-wise lr decay",
        ),
        Stage(
            "all",
            "pipeline.demo:AllConfig",
            "pipeline.demo:run_all",
            "every stage in order on one corpus (preset=demo: the README's demo)",
        ),
    ]
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]
