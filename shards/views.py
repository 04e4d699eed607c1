"""The view contract (docs/design.md §2): sample a view's parameters from (aug, key, seed), then render it.

Stage 2 samples :class:`ViewParams` once per (image, seed), stores them beside the tokens, and
renders the view for the tokenizer; stage 3 re-applies the stored parameters with the same
:func:`render_view` and never re-samples. The augmentation follows the BEiT v2 reference
(docs/method.md §2): ColorJitter on the whole image -> horizontal flip -> one RandomResizedCrop box
resized bicubic. Sampling copies torchvision's algorithms (RandomResizedCrop.get_params and
ColorJitter.get_params) but draws from a numpy Generator seeded by a sha256 of (key, seed, aug),
never from global RNG, so any worker gets the same view.

Rendering matches torchvision's PIL path bit for bit given the same parameters: ColorJitter's
PIL ops are ``ImageEnhance.Brightness/Contrast/Color``, ``hflip`` is a transpose, and
``resized_crop`` is ``img.crop(box)`` followed by ``resize`` (cropping first matters: PIL's
``resize(box=...)`` lets the filter read pixels just outside the box, torchvision's does not).
Internally the crop is taken first and only the crop is jittered (see :func:`render_view`).

Bumping anything here that changes sampled parameters or rendered pixels invalidates every token
dataset already written; ``tests/shards/test_views.py`` pins both.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageStat

from engine.config import Count, NonNegativeFloat, Positive

if TYPE_CHECKING:  # torch stays out of the import path of config modules (CLI --help)
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm's default eval crop fraction: resize the shorter side to size / 0.875, centre crop size.
EVAL_CROP_PCT = 0.875

_JITTER_NAMES = ("brightness", "contrast", "saturation")


@dataclass(frozen=True)
class AugConfig:
    """How views are sampled (nested inside stage configs as ``aug``)."""

    size: Count = 224
    scale: tuple[Positive, Positive] = (0.2, 1.0)
    ratio: tuple[Positive, Positive] = (3 / 4, 4 / 3)
    flip: bool = True  # horizontal, p = 0.5
    # brightness, contrast, saturation; () or 0 = off
    jitter: tuple[NonNegativeFloat, ...] = (0.4, 0.4, 0.4)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    eval_seed0: bool = False  # seed 0 renders the centre-crop evaluation view


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to rebuild one view from the decoded image (stored in the token dataset).

    The crop box is in pixels of the full-resolution image as it is when the crop is applied, i.e.
    after the whole-image jitter and the flip (exactly torchvision's order), so ``left`` counts
    from the left edge of the flipped image when ``flip`` is true.
    """

    seed: int
    width: int  # original size after EXIF transpose
    height: int
    top: int
    left: int
    crop_height: int
    crop_width: int
    flip: bool
    brightness: float  # 1.0 = unchanged
    contrast: float
    saturation: float
    jitter_order: tuple[int, ...]  # (0 brightness, 1 contrast, 2 saturation) in applied order
    size: int
    interpolation: str


def _aug_fingerprint(aug: AugConfig) -> str:
    """A canonical text of every AugConfig field (numbers as floats so 1 and 1.0 hash alike)."""
    try:
        return _cached_fingerprint(aug)
    except TypeError:  # a list where a tuple belongs makes the config unhashable: no cache
        return _fingerprint(aug)


def _fingerprint(aug: AugConfig) -> str:
    """A canonical text of every AugConfig field (numbers as floats so 1 and 1.0 hash alike)."""

    def canon(value: object) -> str:
        if isinstance(value, bool):
            return repr(value)
        if isinstance(value, (int, float)):
            return repr(float(value))
        if isinstance(value, (tuple, list)):
            return "(" + ",".join(canon(v) for v in value) + ")"
        return repr(value)

    return ";".join(f"{f.name}={canon(getattr(aug, f.name))}" for f in dataclasses.fields(aug))


_cached_fingerprint = functools.lru_cache(maxsize=64)(_fingerprint)


def view_rng(aug: AugConfig, key: str, seed: int) -> np.random.Generator:
    """The Generator for one (aug, key, seed): sha256 -> SeedSequence, independent of any state."""
    digest = hashlib.sha256(f"{key}|{seed}|{_aug_fingerprint(aug)}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return np.random.default_rng(np.random.SeedSequence(words))


def _check_aug(aug: AugConfig) -> None:
    if aug.size < 1:
        raise ValueError(f"aug.size must be >= 1, got {aug.size}")
    if len(aug.scale) != 2 or not 0 < aug.scale[0] <= aug.scale[1]:
        raise ValueError(f"aug.scale must be (min, max) with 0 < min <= max, got {aug.scale}")
    if len(aug.ratio) != 2 or not 0 < aug.ratio[0] <= aug.ratio[1]:
        raise ValueError(f"aug.ratio must be (min, max) with 0 < min <= max, got {aug.ratio}")
    if len(aug.jitter) not in (0, 3) or any(j < 0 for j in aug.jitter):
        raise ValueError(
            "aug.jitter must be () or three non-negative numbers (brightness, contrast, "
            f"saturation), got {aug.jitter}"
        )


def crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, ...],
    ratio: tuple[float, ...],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on a numpy Generator: (top, left, h, w).

    Ten tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first box that fits
    wins, otherwise the centre crop with the aspect clamped to the ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    # Tiny images can round to 0 (e.g. 1x1 with a wide ratio range); a box is at least 1 pixel.
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def eval_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The centre-crop evaluation view as a box in original pixels: (top, left, h, w).

    Equivalent to resizing the shorter side to ``floor(size / 0.875)`` and centre-cropping
    ``size`` (timm's eval transform), mapped back to the original resolution.
    """
    resized_short = math.floor(size / EVAL_CROP_PCT)
    side = max(1, min(width, height, int(round(min(width, height) * size / resized_short))))
    top = int(round((height - side) / 2.0))
    left = int(round((width - side) / 2.0))
    return top, left, side, side


def sample_view(aug: AugConfig, key: str, seed: int, width: int, height: int) -> ViewParams:
    """The view parameters of (image ``key``, ``seed``): a pure function of its arguments.

    Draw order (fixed; changing it changes every dataset): jitter op order (a permutation of the
    enabled ops), then brightness, contrast, saturation factors (enabled ones, each
    ``U(max(0, 1 - j), 1 + j)``), then flip (``U(0,1) < 0.5`` when ``aug.flip``), then the crop box.
    With ``aug.eval_seed0`` seed 0 is the centre-crop eval view: no jitter, no flip.
    """
    _check_aug(aug)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height} for {key!r}")
    common = dict(
        seed=seed, width=width, height=height, size=aug.size, interpolation=aug.interpolation
    )
    if aug.eval_seed0 and seed == 0:
        top, left, h, w = eval_box(width, height, aug.size)
        return ViewParams(
            top=top,
            left=left,
            crop_height=h,
            crop_width=w,
            flip=False,
            brightness=1.0,
            contrast=1.0,
            saturation=1.0,
            jitter_order=(),
            **common,
        )
    rng = view_rng(aug, key, seed)
    factors = [1.0, 1.0, 1.0]
    enabled = [i for i, j in enumerate(aug.jitter) if j > 0]
    order: tuple[int, ...] = ()
    if enabled:
        order = tuple(int(enabled[i]) for i in rng.permutation(len(enabled)))
        for i in enabled:
            j = aug.jitter[i]
            # rounded to float32, which is what PIL's blend uses anyway: the stored factor is
            # then exact in any float column and re-renders bit-identically
            factors[i] = float(np.float32(rng.uniform(max(0.0, 1.0 - j), 1.0 + j)))
    flip = bool(aug.flip and rng.random() < 0.5)
    top, left, h, w = crop_box(rng, width, height, aug.scale, aug.ratio)
    return ViewParams(
        top=top,
        left=left,
        crop_height=h,
        crop_width=w,
        flip=flip,
        brightness=factors[0],
        contrast=factors[1],
        saturation=factors[2],
        jitter_order=order,
        **common,
    )


def render_view(image: Image.Image, params: ViewParams) -> torch.Tensor:
    """Render the view ``params`` of a decoded RGB image as uint8 ``[3, size, size]``.

    Order as the reference: jitter on the whole image (contrast uses the whole-image mean) ->
    horizontal flip -> crop box -> resize to ``size x size``. Deterministic: the same inputs give
    bit-identical pixels on any machine with the same Pillow.

    Raises:
        ValueError: the image is not the size the parameters were sampled for (a different decode
            or a mismatched image set), or the parameters are inconsistent.
    """
    import torch  # torch (1.5 s): the stage configs import AugConfig from here for --help

    if image.size != (params.width, params.height):
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} but the view was sampled for "
            f"{params.width}x{params.height} (seed {params.seed}); the images do not match the "
            "ones the token dataset was made from"
        )
    if image.mode != "RGB":
        raise ValueError(f"render_view needs an RGB image (use decode_image), got {image.mode}")
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}.get(
        params.interpolation
    )
    if resample is None:
        raise ValueError(f"unknown interpolation {params.interpolation!r}; use bicubic or bilinear")
    box = (
        params.left,
        params.top,
        params.left + params.crop_width,
        params.top + params.crop_height,
    )
    if not (0 <= box[0] < box[2] <= params.width and 0 <= box[1] < box[3] <= params.height):
        raise ValueError(f"crop box {box} is outside the {params.width}x{params.height} image")

    if len(set(params.jitter_order)) != len(params.jitter_order) or not set(
        params.jitter_order
    ) <= {0, 1, 2}:
        raise ValueError(
            f"jitter_order {params.jitter_order} must list distinct ops among 0 brightness, "
            "1 contrast, 2 saturation"
        )

    # Crop first, then jitter only the crop: brightness and saturation are per pixel, so they
    # commute with crop and flip; contrast pulls towards the mean grey of the WHOLE image as it is
    # when contrast runs, so that one number is computed on the whole image. The pixels are
    # bit-identical to jitter(whole) -> flip -> crop -> resize (tested against torchvision) and
    # far cheaper, since most crops are a fraction of the image.
    left = params.width - box[2] if params.flip else box[0]  # the box in unflipped pixels
    img = image.crop((left, box[1], left + params.crop_width, box[3]))
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factors = (params.brightness, params.contrast, params.saturation)
    for op in params.jitter_order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(factors[0])
        elif op == 1:
            mean = _contrast_mean(image, params.jitter_order, factors)
            grey = Image.new("L", img.size, mean).convert(img.mode)
            img = Image.blend(grey, img, factors[1])  # = ImageEnhance.Contrast with that mean
        else:
            img = ImageEnhance.Color(img).enhance(factors[2])
    img = img.resize((params.size, params.size), resample)
    arr = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # [3, size, size]
    return torch.from_numpy(arr)


def _contrast_mean(
    image: Image.Image, order: tuple[int, ...], factors: tuple[float, float, float]
) -> int:
    """The mean grey that ImageEnhance.Contrast uses, on the whole image after the ops that
    precede contrast in ``order`` (flip does not change a mean)."""
    enhancers = {0: ImageEnhance.Brightness, 2: ImageEnhance.Color}
    for op in order[: order.index(1)]:
        image = enhancers[op](image).enhance(factors[op])
    return int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)


def to_unit(views: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 in [0, 1] (the tokenizer's input)."""
    return views.float().div_(255.0)


def normalize(
    views_unit: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """``(x - mean) / std`` per channel on ``[..., 3, H, W]`` (the student's input)."""
    import torch  # see render_view

    m = torch.as_tensor(mean, dtype=views_unit.dtype, device=views_unit.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=views_unit.dtype, device=views_unit.device).view(-1, 1, 1)
    return (views_unit - m) / s
