"""Frozen VQ-KD tokenizer: load (ours or the official release), save, encode, fingerprint.

One file format serves both worlds: ``{"model": <state dict in the official key layout>,
"config": <VQKDModelConfig as a dict>, ...extra}``. The official code loads our files (it reads
``model`` and drops ``loss*``/``teacher*``/``scaling*`` keys), and we load theirs: without a
``config`` entry the shape of the model is read from the tensor shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from typing import Any

import torch
from torch import nn

from engine.checkpoint import load_file, save_atomic
from engine.errors import CheckpointError, CheckpointNotFound
from engine.precision import autocast, autocast_dtype, resolve_precision
from tokenize_corpus.errors import TokenizerError
from tokenize_corpus.vqkd import PIXEL_MEAN, PIXEL_STD, VQKD, VQKDModelConfig

# Keys of official training checkpoints that are not part of the tokenizer (teacher, its scaling).
IGNORED_PREFIXES = ("loss", "teacher", "scaling")
# Our training-only bookkeeping; absent from released files, not needed to encode.
TRAINING_ONLY_KEYS = ("quantize.unused_steps",)
# Largest [rows, codebook] fp32 distance matrix of one codebook lookup call on CPU. glibc gives
# blocks of 32 MiB and more back to the OS when they are freed, so the matrices of a whole batch
# (205 MB each for 32 views of 196 patches and 8192 codes, three alive at once) were fresh zeroed
# pages every batch: ~9% of a ViT-B encode at bf16 (BENCHMARKS.md). Smaller blocks are reused.
LOOKUP_BYTES = 8 * 2**20


def released_state_dict(model: VQKD) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout (training-only buffers left out)."""
    return {k: v for k, v in model.state_dict().items() if k not in TRAINING_ONLY_KEYS}


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 hex over (key, dtype, shape, bytes) of every tensor, keys in sorted order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def half_encoder_copy(model: VQKD, dtype: torch.dtype) -> VQKD:
    """``model`` with its encoder's linear and convolution weights stored in ``dtype``.

    These are exactly the tensors autocast casts to ``dtype`` again in every forward (it keeps
    no cast between forwards), so the copy gives the same values, hence the same tokens, without
    the cast; for a frozen tokenizer's inference only. Everything else is shared with ``model``,
    not copied: the encoder's other tensors (norms, embeddings, q/v biases) and the other
    modules (task layers, quantizer, decoder).
    """
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo.update((id(m), m) for m in model.children() if m is not model.encoder)
    for module in model.encoder.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            for weight in module.parameters(recurse=False):
                memo[id(weight)] = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo)


class Tokenizer(nn.Module):
    """A trained VQ-KD turned into a frozen image -> tokens function (eval mode, no grads)."""

    def __init__(self, model: VQKD, teacher: str | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        config = model.config
        self.config = config
        self.codebook_size: int = config.codebook_size
        self.code_dim: int = config.code_dim
        self.patch_size: int = config.patch_size
        self.image_size: int = config.image_size
        self.grid: tuple[int, int] = config.grid
        self.teacher = teacher
        self.fingerprint: str = weights_fingerprint(released_state_dict(model))
        # At most one half_encoder_copy, keyed by (dtype, device); a plain dict, so it is not a
        # submodule: not in state_dict(), parameters() or .to(), and rebuilt after a move.
        self._half: dict[tuple[torch.dtype, torch.device], VQKD] = {}

    def train(self, mode: bool = True) -> Tokenizer:
        """Stays in eval mode: a tokenizer never updates its codebook."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the weights (tokens come back on it)."""
        return self.model.quantize.codebook.device

    @torch.no_grad()
    def encode(self, images_unit: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Tokens ``[B, N]`` int64 (row-major grid) for ``[B, 3, H, W]`` float pixels in [0, 1].

        Images are moved to the tokenizer's device; H and W must equal ``image_size``.
        ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``, see :mod:`engine.precision`)
        sets the autocast of the encoder only; the task layer and the codebook lookup always
        run in fp32, as the reference's ``encode`` runs its task layer (docs/method.md §1).
        Same precision and same device type give the same tokens, whatever the batch split;
        another precision moves only near-tied patches (see BENCHMARKS.md).
        """
        z = self.code_vectors(images_unit, precision)  # [B, N, D]
        if z.device.type != "cpu":  # the CUDA caching allocator reuses the matrices' memory
            return self.model.tokens(z)
        rows = max(1, LOOKUP_BYTES // (4 * self.codebook_size))
        flat = z.reshape(1, -1, z.shape[-1])  # [1, B*N, D]; each row's code depends on it alone
        parts = [self.model.tokens(part) for part in flat.split(rows, dim=1)]
        return torch.cat(parts, dim=1).view(z.shape[:2])

    @torch.no_grad()
    def code_vectors(self, images_unit: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """The fp32 vectors the codebook lookup sees, ``[B, N, code_dim]`` (before l2-norm).

        The encoder runs under autocast at ``precision``, with its weights held in that
        precision (:func:`half_encoder_copy`, made on first use); the task layer in fp32.
        """
        if images_unit.ndim != 4 or images_unit.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images_unit.shape)}")
        device = self.device
        images = images_unit.to(device, torch.float32)
        dtype = autocast_dtype(resolve_precision(precision, device))
        model = self.model if dtype is None else self._half_model(dtype, device)
        with autocast(precision, device):
            return model.embed(images)  # task layer runs with autocast off

    def _half_model(self, dtype: torch.dtype, device: torch.device) -> VQKD:
        """The cached :func:`half_encoder_copy` for ``dtype`` on ``device`` (one kept)."""
        key = (dtype, device)
        if key not in self._half:
            self._half.clear()  # free the old copy before making the new one
            self._half[key] = half_encoder_copy(self.model, dtype)
        return self._half[key]

    def forward(self, images_unit: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(images_unit)

    def describe(self) -> dict[str, Any]:
        """The manifest block that identifies this tokenizer (JSON-able)."""
        return _describe(self.fingerprint, self.config, self.teacher)


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def infer_config(state: dict[str, torch.Tensor]) -> VQKDModelConfig:
    """Model shape from an official-layout state dict (heads cannot be seen: width // 64)."""
    try:
        width = state["encoder.cls_token"].shape[-1]
        patch = state["encoder.patch_embed.proj.weight"].shape[-1]
        side = round((state["encoder.pos_embed"].shape[1] - 1) ** 0.5)
        code_dim, codebook_size = (
            state["encode_task_layer.2.weight"].shape[0],
            state["quantize.embedding.weight"].shape[0],
        )
        teacher_dim = state["decode_task_layer.2.weight"].shape[0]
    except KeyError as err:
        raise TokenizerError(
            f"not a VQ-KD tokenizer state dict: key {err} is missing (expected the official "
            "layout: encoder.*, encode_task_layer.*, quantize.embedding.weight, decoder.*, "
            "decode_task_layer.*)"
        ) from None
    return VQKDModelConfig(
        image_size=side * patch,
        patch_size=patch,
        width=width,
        depth=_count_blocks(state, "encoder.blocks."),
        heads=max(1, width // 64),
        code_dim=code_dim,
        codebook_size=codebook_size,
        decoder_depth=_count_blocks(state, "decoder.blocks."),
        teacher_dim=teacher_dim,
    )


def _config_from_dict(raw: dict[str, Any]) -> VQKDModelConfig:
    names = {f.name for f in dataclasses.fields(VQKDModelConfig)}
    return VQKDModelConfig(**{k: v for k, v in raw.items() if k in names})


_WHAT = "a VQ-KD checkpoint written by stage vqkd or an official BEiT v2 tokenizer .pth"


def _read_state(path: str) -> tuple[dict[str, torch.Tensor], VQKDModelConfig, str | None]:
    """(filtered official-layout state dict, model config, teacher name) of a tokenizer file."""
    try:
        ckpt = load_file(path)
    except CheckpointNotFound:
        raise CheckpointNotFound(
            f"tokenizer checkpoint not found at {path}; pass {_WHAT}"
        ) from None
    except CheckpointError as err:
        raise TokenizerError(f"{err}; pass {_WHAT}") from None
    if not isinstance(ckpt, dict):
        raise TokenizerError(f"{path} holds a {type(ckpt).__name__}, not a VQ-KD checkpoint dict")
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, dict):
        raise TokenizerError(f"{path}: 'model' is a {type(state).__name__}, expected a state dict")
    state = {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not k.startswith(IGNORED_PREFIXES)
    }
    raw_config = ckpt.get("config")
    config = _config_from_dict(raw_config) if isinstance(raw_config, dict) else infer_config(state)
    teacher = ckpt.get("teacher")
    return state, config, teacher if isinstance(teacher, str) else None


def tokenizer_info(path: str | os.PathLike) -> dict[str, Any]:
    """:meth:`Tokenizer.describe` of the file at ``path``, read without building the model.

    The fingerprint equals the loaded tokenizer's: the model holds fp32 weights, so floating
    tensors are hashed as fp32 whatever dtype the file stores.
    """
    state, config, teacher = _read_state(str(path))
    released = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state.items()
        if k not in TRAINING_ONLY_KEYS
    }
    return _describe(weights_fingerprint(released), config, teacher)


def _describe(fingerprint: str, config: VQKDModelConfig, teacher: str | None) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "codebook_size": config.codebook_size,
        "code_dim": config.code_dim,
        "patch_size": config.patch_size,
        "image_size": config.image_size,
        "grid": list(config.grid),
        "normalisation": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
        "teacher": teacher,
    }


def load_tokenizer(path: str, device: str = "cpu") -> Tokenizer:
    """Load a frozen tokenizer from our checkpoints or an official BEiT v2 VQ-KD release.

    ``path`` is a local path or an fsspec URL, read by :func:`engine.checkpoint.load_file`
    (``weights_only=True``; no code is unpickled).
    """
    state, config, teacher = _read_state(str(path))
    model = VQKD(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes disagree with the config
        raise TokenizerError(f"{path}: weights do not match its config {config}: {err}") from None
    missing = [k for k in result.missing_keys if k not in TRAINING_ONLY_KEYS]
    unexpected = result.unexpected_keys
    if missing or unexpected:
        raise TokenizerError(
            f"{path} does not match a VQ-KD with config {config}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]} (of {len(missing)} and {len(unexpected)})"
        )
    return Tokenizer(model, teacher=teacher).to(device)


def save_tokenizer(model: VQKD, path: str | os.PathLike, extra: dict | None = None) -> str:
    """Write ``{"model": official-layout weights, "config": ..., **extra}`` atomically.

    Written by :func:`engine.checkpoint.save_atomic` (temp file + rename, mode per umask; fsspec
    URLs in one put). Returns the path.
    ``extra`` must hold plain Python values (they are loaded back with ``weights_only=True``);
    a ``"teacher"`` string is shown by :meth:`Tokenizer.describe`.
    """
    payload = {
        **(extra or {}),
        "model": {k: v.detach().cpu().clone() for k, v in released_state_dict(model).items()},
        "config": dataclasses.asdict(model.config),
    }
    return save_atomic(payload, path)
