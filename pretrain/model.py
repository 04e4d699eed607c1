"""BEiT v2 student for masked image modelling (docs/method.md §3), built from timm's BEiT blocks.

The backbone is timm's ``Beit`` in its BEiT v2 pretraining form: no absolute position embedding,
one *shared* relative position bias, q/v biases, layer scale, plus a learned mask token, the
LM head and the CLS aggregation head (``cls_pt_layers``) of the reference
``VisionTransformerForMaskedImageModelingCLS``. Blocks and the bias module are timm's own classes,
so parameter names (docs/method.md §3) and the maths are those of timm: ``pretrain.export`` only has
to copy the shared table into every block to hand timm a backbone.

The model is pure: normalised views and a mask in, logits out; the loss is ``mim_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, PatchEmbed
from timm.models.beit import Block, RelativePositionBias
from torch import nn

# The ViT sizes (width/depth/heads as timm's ViT tiny/small/base/large). Layer scale and the
# CLS-head tap follow the reference: 0.1 and block 9 up to base, 1e-5 and block 21 for large.
BEIT_SIZES: dict[str, dict] = {
    "tiny": {"width": 192, "depth": 12, "heads": 3, "layer_scale_init": 0.1, "head_from_layer": 9},
    "small": {"width": 384, "depth": 12, "heads": 6, "layer_scale_init": 0.1, "head_from_layer": 9},
    "base": {"width": 768, "depth": 12, "heads": 12, "layer_scale_init": 0.1, "head_from_layer": 9},
    "large": {
        "width": 1024,
        "depth": 24,
        "heads": 16,
        "layer_scale_init": 1e-5,
        "head_from_layer": 21,
    },
}

INIT_STD = 0.02


@dataclass(frozen=True)
class BEiTConfig:
    """Shape and regularisation of the BEiT v2 student (defaults: ViT-B/16, 8192-token vocabulary).

    ``head_from_layer`` is the 1-based index of the block whose patch outputs feed the CLS
    aggregation head (9 of 12 for base). When it exceeds ``depth`` (a tiny test model that only
    overrides the depth) the tap scales with the depth: see ``early_layers``.
    ``layer_scale_init`` = 0 disables layer scale (no ``gamma_1``/``gamma_2``).
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 0.1
    drop_path: float = 0.0
    vocab_size: int = 8192
    head_layers: int = 2
    head_from_layer: int = 9
    use_cls_head: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "pick sizes that tile the image exactly (e.g. 224 and 16)"
            )
        if self.width % self.heads:
            raise ValueError(
                f"width={self.width} is not divisible by heads={self.heads}; "
                "pick a head count that divides the width"
            )
        if self.depth < 1 or self.head_from_layer < 1:
            raise ValueError(
                f"depth={self.depth} and head_from_layer={self.head_from_layer} must be >= 1"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        """Number of patches N = rows * cols."""
        return self.grid[0] * self.grid[1]

    @property
    def early_layers(self) -> int:
        """Blocks run before the CLS head taps the patch outputs (1..depth).

        ``head_from_layer`` when it fits the depth, else 3/4 of the depth (9 of 12, as base).
        """
        if self.head_from_layer <= self.depth:
            return self.head_from_layer
        return max(1, round(self.depth * 0.75))


def beit_config(size: str = "base", **overrides: object) -> BEiTConfig:
    """A ``BEiTConfig`` for a named size in ``BEIT_SIZES``, with field overrides."""
    if size not in BEIT_SIZES:
        raise ValueError(f"unknown BEiT size {size!r}; choose one of {sorted(BEIT_SIZES)}")
    return BEiTConfig(**{**BEIT_SIZES[size], **overrides})


def _linspace(end: float, steps: int) -> list[float]:
    """``steps`` rates from 0 to ``end`` (torch.linspace in fp32, as the reference)."""
    return [x.item() for x in torch.linspace(0, end, steps, device="cpu")]


def _trunc_normal(tensor: torch.Tensor) -> None:
    # The reference truncates at +-1 std (a=-std, b=std), not at +-2 absolute as timm does.
    nn.init.trunc_normal_(tensor, mean=0.0, std=INIT_STD, a=-INIT_STD, b=INIT_STD)


class BEiTv2(nn.Module):
    """BEiT v2 ViT with mask token, shared relative position bias, LM head and CLS head."""

    def __init__(self, cfg: BEiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.width
        self.patch_embed = PatchEmbed(
            img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=3, embed_dim=dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # One table for all blocks (and the CLS head blocks): (2*14-1)^2 + 3 rows for 14x14.
        self.rel_pos_bias = RelativePositionBias(window_size=cfg.grid, num_heads=cfg.heads)

        def block(drop_path: float) -> Block:
            return Block(
                dim=dim,
                num_heads=cfg.heads,
                qkv_bias=True,  # q and v biases; timm keeps k's bias a zero buffer
                mlp_ratio=cfg.mlp_ratio,
                drop_path=drop_path,
                init_values=cfg.layer_scale_init or None,
                norm_layer=LayerNorm,  # eps 1e-6 as the reference
                window_size=None,  # no per-block table: the shared one is passed in forward
            )

        # Stochastic depth as the reference: the backbone ramps linearly over its own depth;
        # the CLS head blocks take their rates from a ramp over max(depth, tap + head blocks),
        # continuing from the tap point.
        early = cfg.early_layers
        backbone_rates = _linspace(cfg.drop_path, cfg.depth)
        head_rates = _linspace(cfg.drop_path, max(cfg.depth, early + cfg.head_layers))
        self.blocks = nn.ModuleList([block(rate) for rate in backbone_rates])
        self.norm = LayerNorm(dim)
        self.lm_head = nn.Linear(dim, cfg.vocab_size)
        self.cls_pt_layers: nn.ModuleList | None = None
        self._init_backbone()
        if cfg.use_cls_head:
            # Built after the init pass, as the reference builds them: they keep PyTorch's
            # default init (uniform weights, non-zero biases) before the layer-id rescale.
            self.cls_pt_layers = nn.ModuleList(
                [block(head_rates[i]) for i in range(early, early + cfg.head_layers)]
            )
        self._rescale_by_layer_id()

    def _init_backbone(self) -> None:
        """Reference init of everything but the CLS head: truncated normal (std 0.02, cut at
        +-1 std) weights, zero biases, unit norms, truncated normal cls and mask tokens."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                _trunc_normal(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        _trunc_normal(self.cls_token)
        _trunc_normal(self.mask_token)

    @torch.no_grad()
    def _rescale_by_layer_id(self) -> None:
        """``attn.proj`` and ``mlp.fc2`` of block l (1-based) divided by sqrt(2 l); the head
        blocks count on from the tap point (block tap+1, tap+2, ...)."""
        layers = list(enumerate(self.blocks, start=1))
        if self.cls_pt_layers is not None:
            layers += list(enumerate(self.cls_pt_layers, start=self.cfg.early_layers + 1))
        for layer_id, blk in layers:
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def no_weight_decay(self) -> set[str]:
        """Parameter names the reference exempts from weight decay beyond biases and 1-D params."""
        return {"cls_token"}

    def embed(self, views: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Patch embeddings with the masked ones replaced, the CLS token prepended: [B, 1+N, D]."""
        x = self.patch_embed(views)  # [B, N, D]
        if mask is not None:
            # Masked patches become the mask token before the CLS token is prepended, so their
            # pixels cannot reach any output.
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, D]
        return torch.cat((cls, x), dim=1)  # [B, 1+N, D]

    def forward_features(self, views: torch.Tensor) -> torch.Tensor:
        """Backbone features without masking: [B, 3, H, W] normalised -> [B, 1+N, D] after the
        final norm (what timm's ``forward_features`` returns for the exported backbone)."""
        x = self.embed(views, None)
        bias = self.rel_pos_bias()  # [heads, 1+N, 1+N]
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
        return self.norm(x)

    def forward(self, views: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Masked image modelling logits.

        views: normalised [B, 3, H, W]; mask: bool [B, N], True = masked (row-major patches).
        Returns ``logits`` [M, V] of the final layer and ``head_logits`` [M, V] of the CLS head
        (None without it), M = mask.sum(), rows in the order of ``tokens[mask]``.
        """
        mask = mask.bool()
        x = self.embed(views, mask)  # [B, 1+N, D]
        bias = self.rel_pos_bias()  # [heads, 1+N, 1+N]
        early = self.cfg.early_layers
        early_patches = None
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x, shared_rel_pos_bias=bias)
            if i == early:
                early_patches = x[:, 1:]  # [B, N, D]
        # LayerNorm is per token, so norming only the masked rows equals norming everything.
        logits = self.lm_head(self.norm(x[:, 1:][mask]))  # [M, V]
        head_logits = None
        if self.cls_pt_layers is not None:
            # CLS aggregation head (BEiT v2 §3.2): last-layer CLS (before the final norm) +
            # early patch outputs, through the head blocks, then the *shared* norm and LM head.
            h = torch.cat((x[:, :1], early_patches), dim=1)  # [B, 1+N, D]
            for blk in self.cls_pt_layers:
                h = blk(h, shared_rel_pos_bias=bias)
            head_logits = self.lm_head(self.norm(h[:, 1:][mask]))  # [M, V]
        return {"logits": logits, "head_logits": head_logits}


def mim_loss(out: dict[str, torch.Tensor | None], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of the final layer plus that of the CLS head, at masked positions.

    out: ``BEiTv2.forward`` output; targets: int64 tokens at masked positions [M]
    (``tokens[mask]``). Returns ``loss`` (the sum to optimise), ``mim_loss``, ``head_loss``
    and the top-1 accuracies ``mim_acc`` / ``head_acc`` (detached; head terms 0 without head).
    """
    targets = targets.long()
    logits = out["logits"]
    mim = F.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        mim_acc = (logits.argmax(-1) == targets).float().mean()
    result = {"mim_loss": mim, "mim_acc": mim_acc}
    head_logits = out.get("head_logits")
    if head_logits is not None:
        head = F.cross_entropy(head_logits.float(), targets)
        with torch.no_grad():
            head_acc = (head_logits.argmax(-1) == targets).float().mean()
        result.update(loss=mim + head, head_loss=head, head_acc=head_acc)
    else:
        zero = mim.new_zeros(())
        result.update(loss=mim, head_loss=zero, head_acc=zero)
    return result
