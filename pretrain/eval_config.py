"""Configs of the evaluations (docs/method.md §5): ``stage=linprobe`` and ``stage=finetune``.

No torch import here: the CLI imports this module for ``--help``. The shared keys are spelled as
in every training stage: ``train.epochs`` (the probe counts ``train.steps``), ``train.batch_size``,
``train.blr`` (the rate per the stage's ``REFERENCE_BATCH``, scaled linearly: lr = blr *
batch_size / REFERENCE_BATCH), ``train.seed``, ``train.device`` and ``train.precision``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from engine.config import (
    Count,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    Seed,
    StageConfig,
)
from engine.layout import DEMO, RUNS
from engine.metrics import LogSpec
from engine.schedule import scaled_lr


@dataclass(frozen=True)
class RandomInit:
    """Shape of the ``backbone=random`` baseline (null = the size's value)."""

    size: Literal["tiny", "small", "base", "large"] = "tiny"
    image_size: Count = 224
    patch_size: Count = 16
    width: Count | None = None
    depth: Count | None = None
    heads: Count | None = None
    seed: Seed = 0


@dataclass(frozen=True)
class ProbeTrain:
    """The linear classifier's optimisation over the cached features.

    lr = blr * batch_size / 1024 (``REFERENCE_BATCH``), AdamW with a cosine schedule.
    """

    REFERENCE_BATCH: ClassVar[int] = 1024

    steps: Count = 400  # optimisation steps over the cached features
    batch_size: Count = 1024  # features per classifier step
    blr: Positive = 1e-2  # learning rate per 1024 features: lr = blr * batch_size / 1024
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast of the frozen backbone while extracting features (the classifier trains in
    # fp32); auto: bf16 where the hardware is fast at it. Part of the feature cache's key.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    weight_decay: NonNegativeFloat = 1e-4


@dataclass(frozen=True)
class LinprobeConfig(StageConfig):
    """Evaluate a frozen backbone by a linear classifier on its features."""

    # a pretrain checkpoint, a timm-exported backbone file, "random", or "teacher:<name>"
    backbone: str = "random"
    images: str = ""  # labelled images: ImageFolder, WebDataset (.cls) or Parquet (label)
    images_val: str | None = None  # held-out labelled images; null = split `images` by key hash
    val_fraction: Fraction = 0.2  # share of `images` held out when images_val is null
    out_dir: str = RUNS.linprobe
    pool: Literal["auto", "cls", "mean"] = "auto"
    # teachers only: evaluation view size (null = 224); other backbones use their own size
    image_size: Count | None = None
    teacher_weights: str | None = None  # local weights for backbone=teacher:<name>
    shard_size: Count = 256  # folder image sources: images per shard (only affects reading)
    feature_batch_size: Count = 64  # images per backbone forward while extracting features
    random_init: RandomInit = field(default_factory=RandomInit)
    train: ProbeTrain = field(default_factory=ProbeTrain)
    log: LogSpec = field(default_factory=LogSpec)

    presets: ClassVar[dict[str, dict]] = {
        # The demo's probe: the tiny backbones of the demo run, a few hundred images.
        "demo": {
            "out_dir": DEMO.linprobe,
            "feature_batch_size": 32,
            "random_init": {"size": "tiny", "image_size": 64, "patch_size": 8},
            "train": {"steps": 300, "batch_size": 256, "blr": 4e-2},  # lr 1e-2
        },
        # Paper-sized backbones on ImageNet-scale data.
        "base": {
            "random_init": {"size": "base", "image_size": 224, "patch_size": 16},
            "feature_batch_size": 128,
            "train": {"steps": 20000, "batch_size": 1024, "blr": 1e-3},
        },
    }

    @property
    def lr(self) -> float:
        """The classifier's peak rate: ``train.blr`` per 1024 features, scaled to the batch."""
        return scaled_lr(self.train.blr, self.train.batch_size, ProbeTrain.REFERENCE_BATCH)


@dataclass(frozen=True)
class FinetuneTrain:
    """Optimisation of the end-to-end fine-tuning (the BEiT v2 recipe, docs/method.md §5).

    lr = blr * batch_size / 1024 (``REFERENCE_BATCH``, the paper's fine-tuning batch). The
    reference's ``--lr`` is not scaled by the batch: it is our ``blr`` at batch 1024.
    """

    REFERENCE_BATCH: ClassVar[int] = 1024

    epochs: Count = 100
    batch_size: Count = 1024
    blr: Positive = 5e-4  # learning rate per 1024 images: lr = blr * batch_size / 1024
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast of the model (weights and AdamW state stay fp32); auto: bf16 where fast
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # linear warmup; the peak is reached at the last warmup step (the reference's rule)
    warmup_epochs: NonNegative = 5
    min_lr: NonNegativeFloat = 1e-6  # the cosine's floor
    layer_decay: Positive = 0.65  # block l of L gets lr * layer_decay^(L - l)
    weight_decay: NonNegativeFloat = 0.05  # not on biases, norms and position tables
    # cross-entropy label smoothing (mixup/cutmix: in the soft labels)
    label_smoothing: Fraction = 0.1
    num_workers: NonNegative = 0  # DataLoader workers


@dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """Fine-tune a backbone end to end with layer-wise lr decay."""

    backbone: str = "random"  # pretrain checkpoint, timm-exported backbone file, or "random"
    images: str = ""  # labelled images: ImageFolder, WebDataset (.cls) or Parquet (label)
    images_val: str | None = None  # null = hold out val_fraction of `images` by key hash
    val_fraction: Fraction = 0.2  # share of `images` held out when images_val is null
    out_dir: str = RUNS.finetune
    shard_size: Count = 256  # folder image sources: images per shard (only affects reading)
    drop_path: Fraction = 0.1  # stochastic depth rate of the last block (linear ramp over depth)
    mixup: NonNegativeFloat = 0.0  # reference: 0.8
    cutmix: NonNegativeFloat = 0.0  # reference: 1.0
    randaugment: bool = False  # reference: rand-m9-mstd0.5 (torchvision RandAugment(2, 9) here)
    # RandomResizedCrop area range of training views
    crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0)
    random_init: RandomInit = field(default_factory=RandomInit)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    log: LogSpec = field(default_factory=LogSpec)

    presets: ClassVar[dict[str, dict]] = {
        "demo": {
            "out_dir": DEMO.finetune,
            "drop_path": 0.0,
            "random_init": {"size": "tiny", "image_size": 64, "patch_size": 8},
            # lr 1e-3 at batch 32: a tiny model, a few epochs
            "train": {"epochs": 3, "batch_size": 32, "blr": 3.2e-2, "warmup_epochs": 1},
        },
        # The paper's ViT-B/16 recipe (300-epoch pretraining row of docs/method.md §5).
        "base": {
            "drop_path": 0.1,
            "mixup": 0.8,
            "cutmix": 1.0,
            "randaugment": True,
            "random_init": {"size": "base", "image_size": 224, "patch_size": 16},
            "train": {"epochs": 100, "batch_size": 1024, "blr": 5e-4, "warmup_epochs": 5},
        },
    }

    @property
    def lr(self) -> float:
        """Peak lr: ``train.blr`` (defined at batch 1024) scaled linearly to the batch."""
        return scaled_lr(self.train.blr, self.train.batch_size, FinetuneTrain.REFERENCE_BATCH)
