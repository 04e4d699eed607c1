"""The stage registry: every ``pipeline run stage=<name>`` lives here, and nowhere else.

Entries name their config class and run function by import path, so ``pipeline --help`` does not
import torch. A config class carries its presets as ``presets: ClassVar[dict[str, dict]]``.
A run function takes the frozen config and returns a small dict summary the CLI prints.
``example`` is the command ``pipeline run stage=<name> --help`` shows; its ``{placeholders}`` are
folders of the demo's run layout (:class:`engine.layout.RunLayout`), filled in as absolute paths.
``interrupted`` is what the CLI says after Ctrl-C (or SIGTERM): what the run keeps and how to go
on (``{out_dir}`` is filled in).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "module:Class"
    run: str  # "module:function"
    help: str
    example: str = ""  # key=value arguments after `pipeline run stage=<name>`
    # "module:function" giving the batch job script a run would submit (--print-job-script)
    job_script: str = ""
    interrupted: str = "nothing of the run is kept; rerun the same command to start again"

    def config_class(self) -> type:
        return load_target(self.config)

    def run_fn(self) -> Callable[[Any], dict]:
        return load_target(self.run)

    def job_script_fn(self) -> Callable[[Any], str] | None:
        return load_target(self.job_script) if self.job_script else None


def load_target(target: str) -> Any:
    """The object a ``"module:attr"`` string names (the module is imported now, not before)."""
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
            "images={corpus} out_dir={pack} shard_size=128",
            interrupted="index.json is written last, so {out_dir} is no pack yet; rerun the same "
            "command to pack again",
        ),
        Stage(
            "vqkd",
            "tokenize_corpus.config:VQKDConfig",
            "tokenize_corpus.train:vqkd",
            "stage 1: train a VQ-KD visual tokenizer by distilling a teacher",
            "preset=demo 'images={pack_shards}' out_dir={vqkd}",
            interrupted="the finished epochs are in {out_dir}/checkpoint.pth; rerun the same "
            "command with train.resume=true to go on from the last one",
        ),
        Stage(
            "tokenize",
            "tokenize_corpus.config:TokenizeConfig",
            "tokenize_corpus.job:tokenize",
            "stage 2: tokenize image shards at K view seeds on Dask into a token dataset",
            "preset=demo 'images={pack_shards}' tokenizer={tokenizer} out_dir={tokenize}",
            job_script="tokenize_corpus.job:print_job_script",
            interrupted="the finished shards are kept in {out_dir}; rerun the same command to "
            "resume (it tokenizes only the rest)",
        ),
        Stage(
            "pretrain",
            "pretrain.config:PretrainConfig",
            "pretrain.train:pretrain",
            "stage 3: pretrain BEiT v2 from precomputed tokens (or targets=online)",
            "preset=demo tokens={tokenize} out_dir={pretrain}",
            interrupted="the last saved epoch is in {out_dir}/checkpoint.pth (every "
            "train.save_every epochs); rerun the same command with train.resume=true to go on "
            "from it",
        ),
        Stage(
            "linprobe",
            "pretrain.eval_config:LinprobeConfig",
            "pretrain.linprobe:linprobe",
            "evaluate a backbone with a linear classifier on frozen features",
            "preset=demo backbone={pretrain_checkpoint} 'images={pack_shards}' out_dir={linprobe}",
            interrupted="features extracted to the end are cached in {out_dir}; rerun the same "
            "command to reuse them and train the classifier again",
        ),
        Stage(
            "finetune",
            "pretrain.eval_config:FinetuneConfig",
            "pretrain.finetune:finetune",
            "fine-tune a backbone end to end with layer-wise lr decay",
            "preset=demo backbone={pretrain_checkpoint} 'images={pack_shards}' out_dir={finetune}",
        ),
        Stage(
            "all",
            "pipeline.demo:AllConfig",
            "pipeline.demo:run_all",
            "every stage in order on one corpus (preset=demo: the README's demo)",
            "preset=demo out_dir={root}",
            interrupted="the stages that finished are in {out_dir}; rerun the same command to run "
            "the chain again (stage 2 keeps its finished shards)",
        ),
    ]
}


def get_stage(name: str) -> Stage:
    """The registered stage ``name``; a :class:`ConfigError` naming the stages otherwise."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]
