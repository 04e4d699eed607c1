"""Frozen VQ-KD tokenizer: load (ours or the official release), save, encode, fingerprint.

One file format serves both worlds: ``{"model": <state dict in the official key layout>,
"config": <VQKDModelConfig as a dict>, ...extra}``. The official code loads our files (it reads
``model`` and drops ``loss*``/``teacher*``/``scaling*`` keys), and we load theirs: without a
``config`` entry the shape of the model is read from the tensor shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
from typing import Any

import fsspec
import torch
from torch import nn

from tokenize_corpus.vqkd import PIXEL_MEAN, PIXEL_STD, VQKD, VQKDModelConfig

# Keys of official training checkpoints that are not part of the tokenizer (teacher, its scaling).
IGNORED_PREFIXES = ("loss", "teacher", "scaling")
# Our training-only bookkeeping; absent from released files, not needed to encode.
TRAINING_ONLY_KEYS = ("quantize.unused_steps",)


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

    def train(self, mode: bool = True) -> Tokenizer:
        """Stays in eval mode: a tokenizer never updates its codebook."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the weights (tokens come back on it)."""
        return self.model.quantize.codebook.device

    @torch.no_grad()
    def encode(self, images_unit: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N]`` int64 (row-major grid) for ``[B, 3, H, W]`` float pixels in [0, 1].

        Images are moved to the tokenizer's device; H and W must equal ``image_size``.
        """
        if images_unit.ndim != 4 or images_unit.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images_unit.shape)}")
        return self.model.encode(images_unit.to(self.device, torch.float32))

    def forward(self, images_unit: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(images_unit)

    def describe(self) -> dict[str, Any]:
        """The manifest block that identifies this tokenizer (JSON-able)."""
        return {
            "fingerprint": self.fingerprint,
            "codebook_size": self.codebook_size,
            "code_dim": self.code_dim,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "grid": list(self.grid),
            "normalisation": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)},
            "teacher": self.teacher,
        }


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
        raise ValueError(
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


def _read_checkpoint(path: str) -> Any:
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        raise FileNotFoundError(
            f"tokenizer checkpoint not found at {path}; pass the path of a VQ-KD checkpoint "
            "(one written by stage vqkd, or an official BEiT v2 tokenizer .pth)"
        )
    with fs.open(local, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}); pass a "
            "VQ-KD checkpoint written by stage vqkd or an official BEiT v2 tokenizer"
        ) from err


def load_tokenizer(path: str, device: str = "cpu") -> Tokenizer:
    """Load a frozen tokenizer from our checkpoints or an official BEiT v2 VQ-KD release.

    ``path`` is a local path or an fsspec URL. Weights are read with ``weights_only=True``.
    """
    ckpt = _read_checkpoint(str(path))
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a VQ-KD checkpoint dict")
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'model' is a {type(state).__name__}, expected a state dict")
    state = {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not k.startswith(IGNORED_PREFIXES)
    }
    raw_config = ckpt.get("config")
    config = _config_from_dict(raw_config) if isinstance(raw_config, dict) else infer_config(state)
    model = VQKD(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes disagree with the config
        raise ValueError(f"{path}: weights do not match its config {config}: {err}") from None
    missing = [k for k in result.missing_keys if k not in TRAINING_ONLY_KEYS]
    unexpected = result.unexpected_keys
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match a VQ-KD with config {config}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]} (of {len(missing)} and {len(unexpected)})"
        )
    teacher = ckpt.get("teacher")
    return Tokenizer(model, teacher=teacher if isinstance(teacher, str) else None).to(device)


def save_tokenizer(model: VQKD, path: str | os.PathLike, extra: dict | None = None) -> str:
    """Write ``{"model": official-layout weights, "config": ..., **extra}`` atomically.

    Local files go to a temporary file in the same folder and are renamed into place; fsspec
    URLs are written in one put (object stores publish whole objects). Returns the path.
    ``extra`` must hold plain Python values (they are loaded back with ``weights_only=True``);
    a ``"teacher"`` string is shown by :meth:`Tokenizer.describe`.
    """
    payload = {
        **(extra or {}),
        "model": {k: v.detach().cpu().clone() for k, v in released_state_dict(model).items()},
        "config": dataclasses.asdict(model.config),
    }
    path = str(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    if "://" in path and not path.startswith("file://"):
        with fsspec.open(path, "wb") as f:
            f.write(buffer.getvalue())
        return path
    local = path.removeprefix("file://")
    folder = os.path.dirname(os.path.abspath(local))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
