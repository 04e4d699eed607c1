"""Block-wise masking of the patch grid, as the BEiT ``MaskingGenerator`` (docs/method.md §3).

Rectangular blocks of at least ``min_patches`` patches with a log-uniform aspect ratio are
dropped onto the grid until the budget is spent (at most 10 tries per block); the remainder is
topped up with random unmasked patches, so exactly ``num_masked`` patches are masked. All
randomness comes from the ``numpy.random.Generator`` passed in, so a mask is a pure function of
its seed (the data loader seeds it from run seed, epoch and key).
"""

from __future__ import annotations

import math

import numpy as np

# The reference masks 75 of the 196 patches of a 14x14 grid (about 40%).
REFERENCE_MASKED, REFERENCE_PATCHES = 75, 196


def num_masked_for(grid: tuple[int, int]) -> int:
    """Masked-patch count for a grid: 75/196 of the patches, rounded (75 for 14x14, 6 for 4x4)."""
    return round(grid[0] * grid[1] * REFERENCE_MASKED / REFERENCE_PATCHES)


def _place_block(
    mask: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    min_patches: int,
    log_aspect: tuple[float, float],
) -> int:
    """Mask one random block adding 1..budget new patches; returns how many were added (0 = gave up)."""
    height, width = mask.shape
    for _ in range(10):
        # The block area is drawn between the minimum and what is left of the budget.
        low, high = sorted((float(min_patches), float(budget)))
        area = rng.uniform(low, high)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        # Strict inequalities as the reference: a block never spans the whole grid side.
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            region = mask[top : top + h, left : left + w]
            added = h * w - int(region.sum())
            # Only blocks that add something without overshooting the budget are accepted.
            if 0 < added <= budget:
                region[...] = True
                return added
    return 0


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    rng: np.random.Generator,
    min_patches: int = 16,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """Block-wise mask over a ``grid`` (rows, cols): bool [rows*cols], exactly ``num_masked`` True.

    Blocks have at least ``min_patches`` patches (up to the remaining budget) and an aspect ratio
    log-uniform in ``aspect``; when blocks no longer fit, random unmasked patches fill the rest.
    Deterministic given the state of ``rng``. Row-major, as the patch order of the model.
    """
    height, width = grid
    total = height * width
    if not 0 <= num_masked <= total:
        raise ValueError(f"num_masked={num_masked} must be between 0 and {total} for grid {grid}")
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        added = _place_block(mask, num_masked - count, rng, min_patches, log_aspect)
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < num_masked:
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, size=num_masked - count, replace=False)] = True
    return flat
