"""Block-wise masking: exact counts, determinism, contiguity."""

import numpy as np
import pytest

from pretrain.masking import block_mask, num_masked_for


def masked_neighbour_fraction(mask: np.ndarray, grid: tuple[int, int]) -> float:
    """Share of masked patches with at least one masked 4-neighbour."""
    m = mask.reshape(grid)
    padded = np.pad(m, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return float((m & neighbours).sum() / max(m.sum(), 1))


def test_num_masked_scales_the_reference_ratio():
    assert num_masked_for((14, 14)) == 75
    assert num_masked_for((4, 4)) == 6
    assert num_masked_for((7, 7)) == round(49 * 75 / 196)


@pytest.mark.parametrize(
    ("grid", "num_masked", "min_patches"),
    [
        ((14, 14), 75, 16),
        ((14, 14), 118, 16),
        ((7, 7), 19, 16),
        ((4, 4), 6, 4),
        ((4, 4), 6, 16),
        ((2, 8), 5, 4),
        ((14, 14), 0, 16),
        ((4, 4), 16, 4),
    ],
)
def test_exactly_num_masked_for_many_seeds(grid, num_masked, min_patches):
    for seed in range(200):
        mask = block_mask(grid, num_masked, np.random.default_rng(seed), min_patches=min_patches)
        assert mask.dtype == bool and mask.shape == (grid[0] * grid[1],)
        assert mask.sum() == num_masked, (seed, mask.reshape(grid))


def test_deterministic_given_the_rng_seed():
    a = block_mask((14, 14), 75, np.random.default_rng(123))
    b = block_mask((14, 14), 75, np.random.default_rng(123))
    c = block_mask((14, 14), 75, np.random.default_rng(124))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_masks_are_blocks_not_scattered_patches():
    rng = np.random.default_rng(0)
    block = np.mean(
        [masked_neighbour_fraction(block_mask((14, 14), 75, rng), (14, 14)) for _ in range(100)]
    )
    scattered = np.mean(
        [masked_neighbour_fraction(rng.permutation(196) < 75, (14, 14)) for _ in range(100)]
    )
    assert block > 0.95 and block > scattered + 0.05
    # Blocks fill most of the budget; random top-up patches are the exception.
    masks = [block_mask((14, 14), 75, np.random.default_rng(s)) for s in range(50)]
    assert len({m.tobytes() for m in masks}) == 50


def test_refuses_impossible_counts():
    with pytest.raises(ValueError, match="num_masked"):
        block_mask((4, 4), 17, np.random.default_rng(0))
