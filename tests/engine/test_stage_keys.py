"""Every training stage spells the shared keys the same way and states its reference batch once."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import build_config
from pretrain.config import PretrainConfig
from pretrain.eval_config import FinetuneConfig, LinprobeConfig
from tokenize_corpus.config import VQKDConfig

SHARED = {"batch_size", "blr", "seed", "device", "precision"}


@pytest.mark.parametrize(
    ("cls", "reference_batch"),
    [(VQKDConfig, 128), (PretrainConfig, 2048), (FinetuneConfig, 1024), (LinprobeConfig, 1024)],
)
def test_shared_train_keys_and_the_linear_scaling_rule(cls: type, reference_batch: int) -> None:
    cfg = build_config(cls, {"train": {"batch_size": 256, "blr": 1e-3}})
    names = {f.name for f in dataclasses.fields(cfg.train)}
    assert names >= SHARED | ({"steps"} if cls is LinprobeConfig else {"epochs"})
    assert reference_batch == type(cfg.train).REFERENCE_BATCH
    assert cfg.lr == pytest.approx(1e-3 * 256 / reference_batch)
    assert cfg.train.precision == "auto" and cfg.train.device == "auto"
    top = {f.name for f in dataclasses.fields(cfg)}
    assert not top & (SHARED | {"epochs", "steps"}), "shared keys live in the train section"
    assert cfg.log.tensorboard is True and cfg.log.wandb is None
