"""Everything stage 2 checks before a cluster starts (docs/design.md §4).

A user's mistake (a path that does not exist, an empty folder, a glob that matches nothing, a view
size the tokenizer cannot take, ``aug.scale=[1.0,0.2]``, fp16 on a CPU) is found here, on the
driver, in a second, and raised as a :class:`engine.errors.ConfigError` (the CLI exits 2 with the
message) instead of failing every shard inside the workers. Nothing is written before these
checks pass, so a refused run leaves ``out_dir`` as it was.

The tokenizer is read with ``tokenizer_info`` (its fingerprint and config straight from the
checkpoint); the model itself is only built on the workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from engine.lock import check_output
from engine.precision import resolve_precision
from shards.errors import MissingShards, TokenDatasetMismatch
from shards.images import list_shards, split_source
from shards.reader import open_token_dataset
from shards.records import ImageShard
from shards.schema import FORMATS
from shards.token_sets import check_name, manifest_problems, set_url
from shards.views import sample_view
from tokenize_corpus import cluster
from tokenize_corpus.config import TokenizeConfig
from tokenize_corpus.identity import view_facts
from tokenize_corpus.tokenizer import tokenizer_info

# A token must fit the uint16 columns of the token dataset (docs/design.md §3).
MAX_CODEBOOK = 65536


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the inputs the run will use."""

    images: str  # the image source with local paths made absolute
    tokenizer_path: str  # likewise
    out_dir: str  # likewise (workers may run in another directory)
    shards: list[ImageShard]
    tokenizer: dict  # tokenizer_info(): fingerprint, codebook_size, grid, image_size, ...
    precision: str | None  # resolved here for a LocalCluster; None = resolve on the workers
    # token_set=<name>: the dataset whose views the named set shares (out_dir is then the set's)
    dataset_root: str | None = None


def absolute(source: str) -> str:
    """Local paths of a source made absolute (each comma-separated entry); URLs unchanged."""
    return ",".join(absolute_path(entry) for entry in split_source(source))


def absolute_path(path: str) -> str:
    """One local path made absolute (``~`` expanded, ``file://`` dropped); a URL unchanged."""
    if path.startswith("file://"):
        path = path.removeprefix("file://")
    elif "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def check_values(cfg: TokenizeConfig, submitting: bool = True) -> None:
    """Values that need no file: required keys, seeds, formats, sizes, the augmentation, and
    the cluster settings (``tokenize_corpus.cluster.check_settings``); and an ``out_dir`` that
    can be written (``engine.lock.check_output``)."""
    if not cfg.images:
        raise ConfigError("images is empty; pass images=<folder, tar shards or parquet files>")
    if not cfg.tokenizer:
        raise ConfigError(
            "tokenizer is empty; pass tokenizer=<VQ-KD checkpoint (stage vqkd output)>"
        )
    check_output(cfg.out_dir, "the token dataset")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)} must be a non-empty list of distinct integers")
    if (
        not cfg.formats
        or set(cfg.formats) - set(FORMATS)
        or len(set(cfg.formats)) != len(cfg.formats)
    ):
        raise ConfigError(f"formats={list(cfg.formats)}: choose one or more of {list(FORMATS)}")
    try:  # the workers would call exactly this for every image
        sample_view(cfg.aug, "preflight", cfg.seeds[0], 64, 48)
    except ValueError as err:
        raise ConfigError(f"{err}; fix the aug.* setting (see pipeline run --help)") from None
    cluster.check_settings(cfg.cluster, submitting)


def list_source(images: str, shard_size: int) -> list[ImageShard]:
    """The image shards of ``images``, or a ConfigError that says what was wrong."""
    try:
        shards = list_shards(images, shard_size)
    except (FileNotFoundError, ValueError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(
            f"images={images}: {err}; pass an existing folder of images, tar shards (a brace "
            "pattern, glob or comma list) or parquet files"
        ) from None
    if not shards:
        raise ConfigError(f"images={images}: no images found; check the path")
    return shards


def check_tokenizer(cfg: TokenizeConfig, path: str) -> dict:
    """The tokenizer's describe() block, read from its checkpoint; checked against the config."""
    try:
        info = tokenizer_info(path)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if info["image_size"] != cfg.aug.size:
        raise ConfigError(
            f"aug.size={cfg.aug.size} does not match the tokenizer's image_size="
            f"{info['image_size']} ({cfg.tokenizer}); set aug.size={info['image_size']}"
        )
    if info["codebook_size"] > MAX_CODEBOOK:
        raise ConfigError(
            f"the tokenizer's codebook_size={info['codebook_size']} does not fit uint16 tokens"
        )
    return info


def local_precision(cfg: TokenizeConfig) -> str | None:
    """precision resolved for a LocalCluster on this machine; None when the workers run
    elsewhere (they resolve it themselves)."""
    if cfg.cluster.effective_kind != "local":
        return None
    gpu = cfg.cluster.device != "cpu" and torch.cuda.is_available()
    if cfg.cluster.device == "cuda" and not gpu:
        raise ConfigError("cluster.device=cuda but this machine has no GPU; use device=auto")
    return resolve_precision(cfg.precision, "cuda" if gpu else "cpu")


def preflight(cfg: TokenizeConfig) -> Preflight:
    """Run every check that needs no cluster; raise ConfigError (or another UserError).

    :func:`check_values` is assumed to have passed (``tokenize_corpus.job.tokenize`` runs it
    first, on every srun task of a ``slurm-runner`` run).
    """
    images, tokenizer_path = absolute(cfg.images), absolute_path(cfg.tokenizer)
    tokenizer = check_tokenizer(cfg, tokenizer_path)
    shards = list_source(images, cfg.shard_size)
    out_dir = absolute_path(cfg.out_dir)
    root = None
    if cfg.token_set:
        root, out_dir = out_dir, check_token_set(cfg, out_dir, images, shards)
    precision = local_precision(cfg)
    return Preflight(images, tokenizer_path, out_dir, shards, tokenizer, precision, root)


def check_token_set(cfg: TokenizeConfig, root: str, images: str, shards: list[ImageShard]) -> str:
    """The named set's directory, once the dataset at ``root`` can lend it its views.

    The set's views are sampled from the same augmentation, seeds (a subset of the dataset's) and
    image source, so they are the dataset's own (the driver compares them row by row at the end).
    """
    name = check_name(cfg.token_set)
    try:
        default = open_token_dataset(root)
    except (MissingShards, TokenDatasetMismatch) as err:
        raise ConfigError(
            f"token_set={name} adds targets to the finished token dataset at out_dir={root}, "
            f"which cannot be read: {err}. Run stage=tokenize without token_set first"
        ) from None
    planned = view_facts(cfg.aug, cfg.seeds, images, cfg.shard_size, shards)
    problems = manifest_problems(default.manifest, planned)
    if problems:
        raise ConfigError(
            f"token_set={name} must tokenize the views of the dataset at {root}, but "
            f"{'; '.join(problems)}. Reuse its settings: pipeline run stage=tokenize "
            f"config={root}/config.yaml tokenizer=<the other tokenizer> token_set={name}"
        )
    return set_url(root, name)
