"""Decode encoded image bytes into an RGB PIL image, or say in a few words why not.

Policy (stage 2 skips and lists a bad image; it never dies on one):

- EXIF orientation is applied, so sizes are "after EXIF transpose" as the view contract requires.
- Every mode becomes RGB. Modes with alpha (RGBA, LA, PA, P with a transparency entry, ...) are
  composited on white rather than dropping alpha, because the colour under fully transparent
  pixels is arbitrary (often black) and would otherwise leak into the view. 16-bit and 32-bit
  integer / float greyscale is scaled to 8 bits (see :func:`_high_depth_to_l`).
- A decompression-bomb limit (:data:`MAX_PIXELS`) is checked from the header, before any pixel is
  decoded, and raises :class:`BadImage` instead of PIL's warning.
- The image is fully decoded (``load()``) so a truncated file fails here, not later in a worker
  (unless the process sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``; we leave that global alone).
- Tiny images (even 1x1) are valid: the view's resize upscales them.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 2**26 = 67M pixels (e.g. 8192 x 8192): far above any ImageNet image (the largest is ~ 10M px)
# and small enough that the RGBA path stays well under 1 GiB per decode.
MAX_PIXELS = 2**26

_WHITE = (255, 255, 255, 255)


class BadImage(Exception):
    """An image that cannot be decoded; ``str(err)`` is a short reason ("truncated JPEG", ...)."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a fully loaded, EXIF-transposed RGB image.

    Args:
        data: the encoded image (any format PIL reads: JPEG, PNG, WebP, GIF, BMP, TIFF, ...).
        max_pixels: refuse images with more pixels than this (decompression-bomb limit).

    Returns:
        A PIL image in mode ``"RGB"`` with at least 1x1 pixels.

    Raises:
        BadImage: zero bytes, not an image, corrupt, truncated, too many pixels, unsupported mode.
    """
    if not data:
        raise BadImage("zero bytes")
    try:
        # PIL warns between MAX_IMAGE_PIXELS and twice that and raises beyond; turn the warning
        # into an error too so the caller gets one exception and no stray warnings.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too many pixels (decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as err:  # PIL raises many types for corrupt headers
        if "truncated" in str(err).lower():
            raise BadImage("truncated image header") from None
        raise BadImage(_short(f"corrupt image header: {err}")) from None

    fmt = img.format or "image"
    width, height = img.size
    if width < 1 or height < 1:
        raise BadImage(f"empty {fmt} ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"too many pixels ({width}x{height} > {max_pixels}, decompression-bomb limit)"
        )
    try:
        img.load()
    except Exception as err:
        text = str(err)
        if "truncated" in text.lower() or isinstance(err, EOFError):
            raise BadImage(f"truncated {fmt}") from None
        raise BadImage(_short(f"corrupt {fmt}: {text or type(err).__name__}")) from None

    # A broken EXIF block must not cost the image: keep the stored orientation then.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to do
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to RGB (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        img = _high_depth_to_l(img)
        return img.convert("RGB")
    has_alpha = "A" in img.getbands() or "a" in mode or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise BadImage(_short(f"unsupported mode {mode}: {err}")) from None


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8-bit ``L``.

    ``I;16*`` uses the full 16-bit range (divide by 257). ``I`` is treated as 8-bit when every value
    fits in 0..255 and as 16-bit otherwise (clipped to 0..65535): that is how PNG/TIFF greyscale
    lands in ``I``. ``F`` is taken as [0, 1] when it fits there, else clipped to 0..255. NaN -> 0.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64) / 257.0
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
    else:  # "I" (int32)
        arr = np.asarray(img.convert("I")).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            arr = np.clip(arr, 0, 65535) / 257.0
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # 2-D uint8 -> mode "L"


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
