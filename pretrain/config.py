"""Stage 3 configuration: pretrain BEiT v2 by masked image modelling on precomputed tokens.

Run it with ``pipeline run stage=pretrain images=<image shards> tokens=<token dataset>``.
``preset=demo`` trains a tiny model on the ImageNet sample in minutes on 2 CPU cores;
``preset=base`` is the paper's ViT-B/16 300-epoch recipe (docs/method.md §3).

No torch import here: the CLI imports this module for ``--help``.
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
class ModelSpec:
    """Which BEiT v2 to train: a named size plus optional overrides (null = the size's value)."""

    size: Literal["tiny", "small", "base", "large"] = "base"
    # image and patch size: null = the token dataset's tokenizer's (the views it tokenized)
    image_size: Count | None = None
    patch_size: Count | None = None
    width: Count | None = None
    depth: Count | None = None
    heads: Count | None = None
    # LM head size; null = the token dataset's codebook size. An explicit value is checked
    # against the token dataset and a mismatch is refused.
    vocab_size: Count | None = None
    layer_scale_init: Positive | None = None
    drop_path: Fraction | None = None
    head_layers: Count | None = None
    head_from_layer: Count | None = None


@dataclass(frozen=True)
class MaskSpec:
    """Block-wise masking (docs/method.md §3), drawn online, deterministic in (seed, epoch, key)."""

    # null = the reference's 75 of 196 patches, scaled to the model's grid
    num_masked: Count | None = None
    min_patches: Count = 16


@dataclass(frozen=True)
class ViewsSpec:
    """Which views stage 3 reads (docs/design.md §5): chosen at read time, no rebuild."""

    # stored seeds to use, e.g. [0,1] (a subset of the token dataset's; () = all stored seeds)
    seeds: tuple[Seed, ...] = ()
    # stored: the K stored views; fresh: a new view every epoch (needs targets=online)
    source: Literal["stored", "fresh"] = "stored"


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation and bookkeeping (docs/method.md §3 defaults).

    The learning rate is ``blr`` per ``REFERENCE_BATCH`` = 2048 images, scaled linearly to the
    global batch: lr = blr * batch_size / 2048. The reference's ``--lr`` is *not* scaled by the
    batch (its 1.5e-3 is the rate of its batch 2048), so ``train.blr`` equals the reference's
    ``--lr`` at batch 2048; at another batch the reference would keep ``--lr`` as given.
    """

    REFERENCE_BATCH: ClassVar[int] = 2048

    epochs: Count = 300
    batch_size: Count = 2048  # global batch (split evenly across DDP ranks)
    blr: Positive = 1.5e-3  # learning rate per 2048 images: lr = blr * batch_size / 2048
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # student autocast (weights, optimiser state and losses stay fp32); auto: bf16 where the
    # hardware is fast at it (CUDA, AVX512-BF16/AMX CPUs), else fp32. config.yaml records the result
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile the student: ~7% faster bf16 steps on a CPU after a ~90 s first step, so it
    # pays only in long runs (BENCHMARKS.md, stage 3 step vs the reference)
    compile: bool = False
    # linear warmup over these epochs; the peak is reached at the last warmup step (reference)
    warmup_epochs: NonNegative = 10
    min_lr: NonNegativeFloat = 1e-5
    betas: tuple[Fraction, Fraction] = (0.9, 0.98)  # (0.9, 0.999) for the 1600-epoch recipe
    eps: Positive = 1e-8
    weight_decay: NonNegativeFloat = 0.05  # not on biases, norms and other 1-D parameters
    clip_grad: NonNegativeFloat = 3.0  # 0 = no clipping
    num_workers: NonNegative = 8  # DataLoader workers per rank
    shuffle_buffer: Count = 512  # in-shard shuffle buffer (samples), seeded
    resume: bool = False  # continue from out_dir/checkpoint.pth exactly where it stopped
    save_every: Count = 1  # epochs between checkpoints (the last epoch is always saved)
    log_every: Count = 10  # steps between metric lines in metrics.jsonl


@dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """Stage 3: BEiT v2 masked image modelling with offline (precomputed) or online targets."""

    images: str = ""  # image shards stage 2 tokenized ("" = the source named in the token manifest)
    tokens: str = ""  # token dataset directory written by stage 2
    # which tokenizer's targets: "" = the dataset's own; a token set's name or >= 8 hex digits of
    # its tokenizer fingerprint (stage=tokenize token_set=<name> adds sets for the same views)
    token_set: str = ""
    out_dir: str = RUNS.pretrain
    # offline: read stored tokens (no tokenizer in the loop); online: run `tokenizer` in the loop
    # on the same views (the reference's way), for comparison.
    targets: Literal["offline", "online"] = "offline"
    tokenizer: str | None = None  # tokenizer checkpoint, needed for targets=online
    # folder image sources only: images per shard, as in stage 2 (null = the token manifest's)
    shard_size: Count | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    mask: MaskSpec = field(default_factory=MaskSpec)
    views: ViewsSpec = field(default_factory=ViewsSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    log: LogSpec = field(default_factory=LogSpec)

    presets: ClassVar[dict[str, dict]] = {
        # A tiny ViT on the ImageNet sample tokenized by the demo tokenizer: minutes on 2 cores.
        "demo": {
            "tokens": DEMO.tokenize,  # images: the source named in its manifest
            "out_dir": DEMO.pretrain,
            # image/patch size come from the demo tokenizer (via the token dataset)
            "model": {"size": "tiny", "drop_path": 0.0},
            "train": {
                "batch_size": 32,
                "epochs": 5,
                # lr = 6.4e-2 * 32 / 2048 = 1e-3: a tiny model trained for a few epochs needs a
                # larger step than the paper's rate scaled down to batch 32 (2.3e-5).
                "blr": 6.4e-2,
                "warmup_epochs": 1,
                "num_workers": 2,
                "shuffle_buffer": 64,
                "log_every": 5,
            },
        },
        # The paper: ViT-B/16, 300 epochs, batch 2048, lr 1.5e-3, betas (0.9, 0.98).
        "base": {
            "model": {"size": "base", "image_size": 224, "patch_size": 16, "drop_path": 0.0},
            "train": {"batch_size": 2048, "epochs": 300, "blr": 1.5e-3, "warmup_epochs": 10},
        },
    }

    @property
    def lr(self) -> float:
        """Peak learning rate: ``blr`` (defined at batch 2048) scaled linearly to ``batch_size``."""
        return scaled_lr(self.train.blr, self.train.batch_size, TrainSpec.REFERENCE_BATCH)
