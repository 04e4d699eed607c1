"""VQ-KD visual tokenizer model (BEiT v2, docs/method.md §1): ViT encoder, unit-norm codebook, decoder.

The model is pure: pixels and teacher features in, losses and tokens out. Module names follow the
official checkpoint layout (``encoder.*``, ``encode_task_layer.*``, ``quantize.*``, ``decoder.*``,
``decode_task_layer.*``) so the released tokenizers load without renaming:

- the ViT (``ViT`` below) has ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
  ``blocks.N.{norm1, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}``
  and ``fc_norm``: the official VQ-KD ViTs are built with mean pooling, so the final norm is an
  identity and the LayerNorm on the patch tokens is called ``fc_norm``;
- the decoder is the same ViT with a 1x1 "patch" embedding over the token grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenize_corpus.quantizer import AllReduce, NormEMAQuantizer

# The encoder maps [0,1] pixels to [-1,1] itself (mean 0.5, std 0.5 per channel).
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VQKDModelConfig:
    """Shape of a VQ-KD tokenizer; defaults are the official base model with a CLIP teacher."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768  # encoder and decoder width
    depth: int = 12  # encoder blocks
    heads: int = 12
    code_dim: int = 32
    codebook_size: int = 8192
    decoder_depth: int = 3
    teacher_dim: int = 512
    ema_decay: float = 0.99
    kmeans_iters: int = 10  # 0 = random unit-norm codebook, no k-means
    dead_code_steps: int = 0  # 0 = no restarts

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, columns)."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        """Tokens per image."""
        return self.grid[0] * self.grid[1]


# Model-size presets: overrides of VQKDModelConfig fields, e.g. VQKDModelConfig(**VQKD_SIZES["tiny"]).
VQKD_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 192, "depth": 4, "heads": 3, "decoder_depth": 1},
    "small": {"width": 384, "depth": 12, "heads": 6, "decoder_depth": 3},
    "base": {"width": 768, "depth": 12, "heads": 12, "decoder_depth": 3},
}


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases only (k has none), as in BEiT."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # [B, T, C]
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, C/H]
        # Explicit softmax attention in the reference's operation order, so tokens match the
        # released tokenizers exactly rather than to fused-kernel rounding.
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, T, T]
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer GELU MLP (ratio 4)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, no layer scale, no drop path (docs/method.md §1)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> vectors (a strided convolution)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C]


class ViT(nn.Module):
    """ViT returning LayerNormed patch tokens (CLS dropped), official VQ-KD key layout."""

    def __init__(
        self, grid_side: int, patch_size: int, in_chans: int, width: int, depth: int, heads: int
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_side * grid_side + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        # Deeper residual branches start smaller (official fix_init_weight).
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, N, C]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)  # [B, 1+N, C]
        return self.fc_norm(x[:, 1:])  # [B, N, C]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _task_layer(dim_in: int, dim_out: int) -> nn.Sequential:
    """Linear -> Tanh -> Linear (keys ``.0`` and ``.2`` as in the official checkpoint)."""
    layer = nn.Sequential(nn.Linear(dim_in, dim_in), nn.Tanh(), nn.Linear(dim_in, dim_out))
    layer.apply(_init_weights)
    return layer


class VQKD(nn.Module):
    """Vector-quantised knowledge distillation tokenizer.

    ``forward(images_unit, features)`` returns a dict with ``loss`` (commitment + reconstruction),
    ``rec_loss`` (mean 1 - cosine), ``commit_loss``, ``rec_cosine`` (mean cosine, detached) and
    ``tokens`` ``[B, N]`` int64. In training mode the quantiser also updates its codebook.
    """

    def __init__(
        self, config: VQKDModelConfig, all_reduce: AllReduce | None = None, rank: int = 0
    ) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}"
            )
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
        self.config = config
        side = config.grid[0]
        self.encoder = ViT(side, config.patch_size, 3, config.width, config.depth, config.heads)
        self.encode_task_layer = _task_layer(config.width, config.code_dim)
        self.quantize = NormEMAQuantizer(
            config.codebook_size,
            config.code_dim,
            decay=config.ema_decay,
            kmeans_iters=config.kmeans_iters,
            dead_code_steps=config.dead_code_steps,
            all_reduce=all_reduce,
            rank=rank,
        )
        self.decoder = ViT(
            side, 1, config.code_dim, config.width, config.decoder_depth, config.heads
        )
        self.decode_task_layer = _task_layer(config.width, config.teacher_dim)

    def embed(self, images_unit: torch.Tensor) -> torch.Tensor:
        """Code-space vectors before quantisation ``[B, N, code_dim]`` (fp32, not normalised)."""
        if images_unit.shape[-2:] != (self.config.image_size,) * 2:
            raise ValueError(
                f"expected images of {self.config.image_size}x{self.config.image_size} pixels, got "
                f"{tuple(images_unit.shape[-2:])}; resize/crop views to the tokenizer's image_size"
            )
        # [0,1] -> [-1,1] in the reference's exact arithmetic (x*255/127.5 - 1).
        x = images_unit * 255.0 / 127.5 - 1.0
        features = self.encoder(x)  # [B, N, C]
        # The projection to code space runs in fp32 even under autocast (official encode()).
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.encode_task_layer(features.float())  # [B, N, code_dim]

    def encode(self, images_unit: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N]`` int64 (row-major grid) for images ``[B, 3, H, W]`` in [0, 1].

        Uses the codebook as it is (no update, no k-means) whatever the module's mode.
        """
        return self.tokens(self.embed(images_unit))

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codes ``[B, N]`` int64 of code-space vectors ``z`` ``[B, N, D]``, in fp32.

        Autocast is switched off: the lookup decides near ties, so it runs at full precision
        whatever the encoder ran at.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), p=2, dim=-1)  # [B, N, D]
            tokens = self.quantize.lookup(z.reshape(-1, z.shape[-1]))  # [B*N]
        return tokens.view(z.shape[:2])

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Reconstructed teacher features ``[B, N, teacher_dim]`` from quantised ``[B, N, D]``."""
        b, n, d = quantized.shape
        h, w = self.config.grid
        grid = quantized.transpose(1, 2).reshape(b, d, h, w)  # [B, D, h, w]
        return self.decode_task_layer(self.decoder(grid))

    def forward(self, images_unit: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses and tokens; ``features`` are the teacher's ``[B, N, teacher_dim]`` targets."""
        expected = (images_unit.shape[0], self.config.num_patches, self.config.teacher_dim)
        if tuple(features.shape) != expected:
            raise ValueError(
                f"teacher features have shape {tuple(features.shape)}, expected {expected} "
                "(batch, tokenizer grid, teacher_dim)"
            )
        z = self.embed(images_unit)  # [B, N, D]
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, tokens, commit_loss = self.quantize(z)
        rec = self.decode(quantized)  # [B, N, Dt]
        cosine = F.cosine_similarity(rec.float(), features.float(), dim=-1)  # [B, N]
        rec_loss = (1 - cosine).mean()
        return {
            "loss": commit_loss + rec_loss,
            "rec_loss": rec_loss,
            "commit_loss": commit_loss,
            "rec_cosine": cosine.mean().detach(),
            "tokens": tokens,
        }
