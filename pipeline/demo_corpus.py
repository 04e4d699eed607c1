"""A small labelled image corpus made offline, for the one-command demo.

No download is possible on a fresh offline machine, so the demo corpus is built from two sources
that are always there:

* **Photos bundled with scikit-image** (``skimage.data``). Each photo is one class and contributes
  many random crops (scale 10-60% of the area, any aspect 3/4-4/3), flips, small colour and
  brightness shifts and 90-degree turns. Classes: ``astronaut``, ``coffee``, ``chelsea`` (a cat),
  ``rocket``, ``camera`` (a grey cameraman), ``coins``, ``brick``, ``grass``, ``gravel``, ``moon``,
  ``hubble`` (deep field), ``ihc`` (an immunohistochemistry slide). A probe has to recognise which
  scene/texture a crop comes from: colour statistics alone do not separate the grey ones
  (camera, coins, brick, grass, gravel, moon), so the features must carry texture/structure.
* **Procedural images**, four classes a linear probe can only tell apart by spatial structure,
  because colours are drawn at random for every image: ``stripes`` (sinusoidal gratings at a
  random angle and frequency), ``checker`` (rotated checkerboards), ``disks`` (random circles on
  a plain background) and ``gradient`` (smooth linear or radial colour ramps).

16 classes in all, the same number of images per class (round robin), written as an ImageFolder
(``<out_dir>/<class>/<class>_<i:04d>.jpg``, JPEG quality 90, ``size`` x ``size`` px). Everything is
drawn from one seeded ``numpy`` generator per image, so the same arguments give the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# class name -> skimage.data loader name. Kept to photos that ship inside the scikit-image wheel
# (others need the optional pooch download).
PHOTO_CLASSES: dict[str, str] = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "chelsea": "chelsea",
    "rocket": "rocket",
    "camera": "camera",
    "coins": "coins",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "hubble": "hubble_deep_field",
    "ihc": "immunohistochemistry",
}
PROCEDURAL_CLASSES: tuple[str, ...] = ("stripes", "checker", "disks", "gradient")
CLASSES: tuple[str, ...] = tuple(PHOTO_CLASSES) + PROCEDURAL_CLASSES


def _load_photo(loader: str) -> np.ndarray:
    import skimage.data  # optional: the demo extra (scikit-image)

    photo = np.asarray(getattr(skimage.data, loader)())
    if photo.dtype == bool:
        photo = photo.astype(np.uint8) * 255
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3].astype(np.uint8))  # [H, W, 3]


def _photo_variant(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = photo.shape[:2]
    area = h * w * rng.uniform(0.1, 0.6)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[top : top + ch, left : left + cw])
    crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(crop).astype(np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.rot90(out, k=int(rng.integers(0, 4)))
    # mild photometric change so that no two crops share exact pixel statistics
    out = out * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20, size=3)
    return np.clip(out, 0, 255).astype(np.uint8)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 8)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    a, b = _random_colour(rng), _random_colour(rng)
    return wave[..., None] * a + (1 - wave[..., None]) * b


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi / 2)
    cells = rng.uniform(3, 9)
    u = xx * np.cos(angle) - yy * np.sin(angle)
    v = xx * np.sin(angle) + yy * np.cos(angle)
    board = ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(np.float32)
    a, b = _random_colour(rng), _random_colour(rng)
    return board[..., None] * a + (1 - board[..., None]) * b


def _disks(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.broadcast_to(_random_colour(rng), (size, size, 3)).copy()
    for _ in range(int(rng.integers(2, 7))):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(0.08, 0.25) * size
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        out[inside] = _random_colour(rng)
    return out


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, 1, size=2)
        ramp = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    a, b = _random_colour(rng), _random_colour(rng)
    return ramp[..., None] * a + (1 - ramp[..., None]) * b


_PROCEDURAL: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "stripes": _stripes,
    "checker": _checker,
    "disks": _disks,
    "gradient": _gradient,
}


def _procedural(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    image = _PROCEDURAL[name](rng, size)
    noise = rng.normal(0, 6, size=image.shape)  # a little sensor-like noise, as in photos
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _image_rng(seed: int, name: str, i: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{i}".encode()).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "little")))


def build_demo_corpus(
    out_dir: str | Path,
    n_images: int = 512,
    size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> dict:
    """Write ``n_images`` labelled images (ImageFolder layout) to ``out_dir``; returns a summary.

    Deterministic in (n_images, size, seed, classes): a rerun rewrites the same bytes. Only image
    files are written into ``out_dir`` (no side files), so any image-folder reader can take it.
    """
    out = Path(out_dir)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown demo classes {unknown}; choose from {', '.join(CLASSES)}")
    photos = {c: _load_photo(PHOTO_CLASSES[c]) for c in classes if c in PHOTO_CLASSES}
    counts = dict.fromkeys(classes, 0)
    for i in range(n_images):
        name = classes[i % len(classes)]
        index = counts[name]
        rng = _image_rng(seed, name, index)
        if name in photos:
            pixels = _photo_variant(photos[name], rng, size)
        else:
            pixels = _procedural(name, rng, size)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{name}_{index:04d}.jpg", quality=90)
        counts[name] += 1
    log.info("demo corpus: %d images in %d classes at %s", n_images, len(classes), out)
    return {"out_dir": str(out), "classes": list(classes), "counts": counts, "size": size}
