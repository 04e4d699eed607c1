"""Stage 1 config: ``pipeline run stage=vqkd`` (train a VQ-KD tokenizer, docs/method.md §1).

No torch import here: the CLI imports this module for ``--help``.

Presets:

- ``base``: the paper's recipe — ViT-B/16 at 224 px, 8192 × 32 codebook, 3-block decoder, CLIP
  ViT-B/16 teacher, batch 512, 100 epochs, ``train.blr`` 5e-5 per 128 images (lr = blr × batch /
  128) with 10 warmup epochs then cosine to 1e-5, AdamW (0.9, 0.99), weight decay 1e-4. No dead-code restarts (as the reference).
- ``demo``: minutes on 2 CPU cores — 96 px / patch 16 (a 6 × 6 grid), the tiny encoder with a
  1-block decoder, the offline EfficientNet-Lite0 teacher (at 96 px), a 512 × 32 codebook with dead-code
  restarts, batch 64 for 8 epochs at a higher learning rate (a short run needs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from engine.config import (
    Count,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    Range,
    Seed,
    StageConfig,
)
from engine.layout import DEMO, RUNS
from engine.metrics import LogSpec
from engine.schedule import scaled_lr
from shards.views import AugConfig

# Encoder size names; the numbers live beside the model (tokenize_corpus.vqkd.VQKD_SIZES).
ModelSize = Literal["tiny", "small", "base"]
# token ids are stored as uint16: at most 65536 codes
CodebookSize = Annotated[int, Range(2, 2**16)]


@dataclass(frozen=True)
class ModelSection:
    """Tokenizer shape: a named size plus explicit overrides (null = the size's value)."""

    size: ModelSize = "base"
    image_size: Count = 224
    patch_size: Count = 16
    width: Count | None = None
    depth: Count | None = None
    heads: Count | None = None
    decoder_depth: Count | None = None
    code_dim: Count = 32
    codebook_size: CodebookSize = 8192
    ema_decay: Fraction = 0.99
    kmeans_iters: NonNegative = 10  # k-means init on the first batch (synchronised across ranks)
    dead_code_steps: NonNegative = 0  # restart codes unused for this many steps; 0 = never


@dataclass(frozen=True)
class TeacherSection:
    """Which frozen teacher to distil (see tokenize_corpus.teachers)."""

    name: str = "clip:ViT-B-16/openai"
    weights: str = ""  # a local weight file; "" = the library's own loader
    # pixels the teacher sees (CNN teachers only); 0 = its native resolution
    input_size: NonNegative = 0


@dataclass(frozen=True)
class TrainSection:
    """Optimisation and loop settings (docs/method.md §1, "Training").

    The learning rate is ``blr`` per ``REFERENCE_BATCH`` = 128 images, scaled linearly to the
    global batch: lr = blr * batch_size / 128. This is the reference's own rule for the tokenizer
    (its ``--lr`` is multiplied by batch / 128), so ``train.blr`` equals the reference's ``--lr``.
    """

    REFERENCE_BATCH: ClassVar[int] = 128

    epochs: Count = 100
    batch_size: Count = 512  # global, over all DDP ranks
    blr: Positive = 5e-5  # learning rate per 128 images: lr = blr * batch_size / 128
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast of the teacher and the encoder (weights, optimiser, task layer and codebook stay
    # fp32); auto: bf16 where the hardware is fast at it, else fp32. config.yaml records the result
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # linear warmup; the peak is reached at the last warmup step
    warmup_epochs: NonNegativeFloat = 10.0
    min_lr: NonNegativeFloat = 1e-5
    betas: tuple[Fraction, Fraction] = (0.9, 0.99)
    eps: Positive = 1e-8
    weight_decay: NonNegativeFloat = 1e-4  # not on biases, norms and other 1-D parameters
    crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0)  # RandomResizedCrop area range
    num_workers: NonNegative = 4  # DataLoader workers per rank
    resume: bool = False  # continue from out_dir/checkpoint.pth
    eval_every: Count = 1  # epochs between evaluation passes (the last epoch always evaluates)
    log_every: Count = 10  # steps between metrics.jsonl step records


@dataclass(frozen=True)
class EvalSection:
    """The evaluation pass: centre-crop views of the first images of a source."""

    images: str = ""  # "" = the training images
    max_images: Count = 10000


@dataclass(frozen=True)
class VQKDConfig(StageConfig):
    """Stage 1: train a VQ-KD visual tokenizer by distilling a frozen teacher."""

    images: str = ""  # image source: folder, WebDataset tars or Parquet files
    out_dir: str = RUNS.vqkd
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSpec = field(default_factory=LogSpec)

    presets: ClassVar[dict[str, dict]] = {
        "base": {},
        "demo": {
            "images": DEMO.pack_shards,
            "out_dir": DEMO.vqkd,
            "model": {
                "size": "tiny",
                "image_size": 96,
                "patch_size": 16,
                "codebook_size": 512,
                "code_dim": 32,
                "dead_code_steps": 20,
            },
            # the CNN teacher at the tokenizer's 96 px: ~5x cheaper than its native 224 px, and
            # its stride-16 map is then exactly the 6 x 6 token grid
            "teacher": {"name": "efficientnet_lite0", "input_size": 96},
            "train": {
                "batch_size": 64,
                "epochs": 8,
                "blr": 1e-3,
                "warmup_epochs": 1.0,
                "min_lr": 1e-5,
                "num_workers": 2,
                "log_every": 5,
            },
            "eval": {"max_images": 1000},
        },
    }

    @property
    def lr(self) -> float:
        """Peak learning rate: ``train.blr`` per 128 images, scaled to ``train.batch_size``."""
        return scaled_lr(self.train.blr, self.train.batch_size, TrainSection.REFERENCE_BATCH)


# ---- stage 2: ``pipeline run stage=tokenize`` (docs/design.md §4) -------------------------------


# Where stage 2 runs (docs/design.md §4): a LocalCluster here, an existing Dask scheduler, worker
# jobs submitted to SLURM or PBS through dask-jobqueue, or the tasks of `srun -n N` (SLURMRunner).
ClusterKind = Literal["local", "address", "slurm", "pbs", "slurm-runner"]


@dataclass(frozen=True)
class ClusterConfig:
    """Where the shard tasks run, and how the workers are started there."""

    # local: a LocalCluster on this machine; address: the scheduler at cluster.address; slurm,
    # pbs: worker jobs submitted from this (login) node; slurm-runner: inside `srun -n N` (rank 0
    # the scheduler, rank 1 this run, the other ranks workers)
    kind: ClusterKind = "local"
    address: str | None = None  # kind=address: "tcp://host:8786" (setting it implies kind=address)
    n_workers: Count = 2  # kind=local: worker processes (one task at a time each)
    memory_limit: str = "auto"  # kind=local: per worker, e.g. "4GiB"; "0" = no limit
    # torch intra-op threads per worker; 0 = 1 for kind=local, else the cores of a worker
    threads_per_worker: NonNegative = 0
    retries: NonNegative = 2  # Dask retries of a failed shard task (BadShard is never retried)
    dashboard: bool = True  # serve the Dask dashboard (needs bokeh) and log its link
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per worker when there are GPUs
    jobs: Count = 2  # kind=slurm|pbs: worker jobs kept running while shards remain
    job_cores: Count = 4  # kind=slurm|pbs: CPU cores each worker job asks for
    job_memory: str = "16GiB"  # kind=slurm|pbs: memory each worker job asks for, e.g. 32GB
    # kind=slurm|pbs: time limit of each worker job ([D-]HH:MM:SS); workers leave a little before
    # it (staggered) and are replaced while shards remain
    walltime: str = "04:00:00"
    queue: str = ""  # kind=slurm|pbs: the partition (SLURM) or queue (PBS); "" = the default
    account: str = ""  # kind=slurm|pbs: the account (project) to charge; "" = your default
    # kind=slurm|pbs: extra scheduler lines, without the #SBATCH/#PBS prefix, e.g. [--qos=low]
    job_extra: tuple[str, ...] = ()
    # kind=slurm|pbs: shell lines run before the worker starts, e.g. [module load cuda,source
    # /path/venv/bin/activate]
    prologue: tuple[str, ...] = ()
    python: str = ""  # kind=slurm|pbs: the Python on the compute nodes; "" = this one
    # worker job logs, the job script and the scheduler file; "" = <out_dir>/logs (must be a
    # folder the compute nodes share)
    log_dir: str = ""
    gpus_per_job: NonNegative = 0  # kind=slurm|pbs: GPUs per worker job; one Dask worker per GPU
    # kind=slurm|pbs: the network interface the scheduler and workers talk over (e.g. ib0);
    # "" = the host's main address
    interface: str = ""
    # a worker that cannot reach its scheduler this long exits, and its job ends (e.g. when
    # the run was killed)
    death_timeout: str = "60s"
    # kind=local|address|slurm-runner: a run that has had no working worker this long ends
    # (exit 1; a rerun resumes). Above a cold worker start (torch, CUDA and the tokenizer read
    # from a shared disk: a minute or two at worst), short enough that a dead cluster does not
    # hold the run and its allocation for long. slurm|pbs jobs may wait in a queue: not used
    no_worker_timeout: str = "5m"

    @property
    def effective_kind(self) -> ClusterKind:
        """``kind``, with ``address=`` implying ``address`` over the default ``local``."""
        return "address" if self.address and self.kind == "local" else self.kind

    @property
    def batch(self) -> bool:
        """Whether worker jobs are submitted to a batch scheduler (slurm or pbs)."""
        return self.effective_kind in ("slurm", "pbs")

    @property
    def workers_per_job(self) -> int:
        """Dask workers each batch job runs: one per GPU, else one."""
        return max(1, self.gpus_per_job)

    @property
    def planned_workers(self) -> int:
        """Dask workers the run expects: ``n_workers`` for a LocalCluster (and as the guess for
        an existing scheduler or srun), ``jobs`` x workers per job for batch jobs."""
        return self.jobs * self.workers_per_job if self.batch else self.n_workers

    @property
    def torch_threads(self) -> int:
        """torch intra-op threads per worker (``threads_per_worker``, or its default)."""
        if self.threads_per_worker:
            return self.threads_per_worker
        if self.batch:
            return max(1, self.job_cores // self.workers_per_job)
        return 1


@dataclass(frozen=True)
class TokenizeConfig(StageConfig):
    """Stage 2: tokenize image shards at K view seeds into a token dataset."""

    images: str = ""  # folder, tar shards (brace pattern / glob / comma list), parquet; fsspec ok
    tokenizer: str = ""  # VQ-KD checkpoint (ours or official); local path or fsspec URL
    out_dir: str = RUNS.tokenize  # the token dataset root; local path or fsspec URL
    # "" = the dataset's own tokens; a name (e.g. dino) adds this tokenizer's targets for the same
    # views as the named token set out_dir/token_sets/<name> (out_dir must hold a finished dataset)
    token_set: str = ""
    seeds: tuple[Seed, ...] = (0, 1, 2, 3)  # one view per seed per image
    aug: AugConfig = field(default_factory=AugConfig)  # aug.size must equal the tokenizer's
    formats: tuple[str, ...] = ("parquet", "webdataset")  # token files to write
    batch_size: Count = 64  # views per tokenizer forward
    # images per shard, for folder sources (tar/parquet: one shard per file)
    shard_size: Count = 256
    # encoder autocast (task layer + codebook lookup stay fp32); auto: bf16 where the workers'
    # hardware is fast at it (CUDA, AVX512-BF16/AMX CPUs), else fp32; part of the dataset identity
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    log_level: Literal["warning", "info", "debug"] = "warning"  # Dask's own logging (info: verbose)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    presets: ClassVar[dict[str, dict]] = {
        "demo": {
            "images": DEMO.pack_shards,
            "tokenizer": DEMO.tokenizer,
            "out_dir": DEMO.tokenize,
            "aug": {"size": 96},  # the demo tokenizer's image size
            "batch_size": 32,
            "cluster": {"n_workers": 2},
        },
        "base": {
            "seeds": [0, 1, 2, 3],
            "aug": {"size": 224},
            "batch_size": 64,
            "shard_size": 1000,
        },
    }
