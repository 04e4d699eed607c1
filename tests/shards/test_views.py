"""The view contract: pure, hash-seeded sampling and bit-exact, reference-order rendering."""

import dataclasses
import hashlib
import random

import numpy as np
import pytest
import torch
from PIL import Image

from shards.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugConfig,
    ViewParams,
    normalize,
    render_view,
    sample_view,
    to_unit,
)

AUG = AugConfig(size=32)


def photo(w: int = 80, h: int = 60, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise: contrast/brightness changes are visible in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_sampling_is_a_pure_function():
    a = sample_view(AUG, "n01/img_1", 3, 500, 375)
    assert a == sample_view(AUG, "n01/img_1", 3, 500, 375)
    assert a != sample_view(AUG, "n01/img_2", 3, 500, 375)
    assert a != sample_view(AUG, "n01/img_1", 4, 500, 375)
    assert a != sample_view(dataclasses.replace(AUG, scale=(0.3, 1.0)), "n01/img_1", 3, 500, 375)
    # numbers hash by value: (0.2, 1) and (0.2, 1.0) are the same config
    assert a == sample_view(dataclasses.replace(AUG, scale=(0.2, 1)), "n01/img_1", 3, 500, 375)
    assert a == sample_view(dataclasses.replace(AUG, scale=[0.2, 1.0]), "n01/img_1", 3, 500, 375)
    assert isinstance(a, ViewParams) and a.seed == 3 and (a.width, a.height) == (500, 375)


def test_sampling_ignores_global_rng_state():
    before = sample_view(AUG, "k", 1, 320, 240)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.random(17)
    torch.rand(5)
    assert sample_view(AUG, "k", 1, 320, 240) == before


def test_pinned_parameters():
    """Changing the sampler changes every token dataset: this must only change on purpose."""
    p = sample_view(AugConfig(), "n01440764/n01440764_10026", 1, 500, 375)
    got = (
        p.top, p.left, p.crop_height, p.crop_width, p.flip, p.jitter_order,
        round(p.brightness, 6), round(p.contrast, 6), round(p.saturation, 6),
    )  # fmt: skip
    assert got == (167, 110, 200, 234, True, (1, 2, 0), 0.864111, 0.770507, 1.142944), got


def test_crop_distribution_respects_bounds():
    w, h = 400, 300
    areas, ratios, flips = [], [], 0
    for i in range(400):
        p = sample_view(AUG, f"img{i}", i % 4, w, h)
        assert p.top >= 0 and p.top + p.crop_height <= h
        assert p.left >= 0 and p.left + p.crop_width <= w
        area = p.crop_height * p.crop_width / (w * h)
        ratio = p.crop_width / p.crop_height
        # rounding the box to whole pixels moves area and ratio a little
        assert 0.2 * 0.97 <= area <= 1.0
        assert 0.75 * 0.97 <= ratio <= 4 / 3 * 1.03
        for f, j in zip((p.brightness, p.contrast, p.saturation), AUG.jitter, strict=True):
            assert 1 - j <= f <= 1 + j
        assert sorted(p.jitter_order) == [0, 1, 2]
        areas.append(area)
        ratios.append(ratio)
        flips += p.flip
    # boxes that do not fit are redrawn, so the mean area is below E[U(0.2, 1)] = 0.6, the same
    # way as torchvision's sampler (about 0.50 on a 4:3 image)
    import torchvision.transforms as T

    torch.manual_seed(0)
    ref = [
        h_ * w_ / (w * h)
        for _, _, h_, w_ in (
            T.RandomResizedCrop.get_params(torch.zeros(1, h, w), AUG.scale, AUG.ratio)
            for _ in range(400)
        )
    ]
    assert abs(np.mean(areas) - np.mean(ref)) < 0.04
    assert 150 < flips < 250
    assert len({tuple(sample_view(AUG, f"x{i}", 0, w, h).jitter_order) for i in range(60)}) == 6


def test_extreme_aspect_falls_back_to_the_clamped_centre_crop():
    p = sample_view(AUG, "panorama", 0, 1000, 10)
    assert (p.crop_height, p.crop_width) == (10, 13)  # ratio clamped to 4/3
    assert p.left == (1000 - 13) // 2 and p.top == 0


def test_jitter_and_flip_can_be_off():
    aug = AugConfig(size=32, jitter=(), flip=False)
    for i in range(20):
        p = sample_view(aug, f"k{i}", i, 64, 64)
        assert p.jitter_order == () and not p.flip
        assert (p.brightness, p.contrast, p.saturation) == (1.0, 1.0, 1.0)
    p = sample_view(AugConfig(jitter=(0.0, 0.4, 0.0)), "k", 0, 64, 64)
    assert p.jitter_order == (1,) and p.brightness == 1.0 and p.saturation == 1.0


def test_bad_aug_is_refused():
    with pytest.raises(ValueError, match="jitter"):
        sample_view(AugConfig(jitter=(0.4, 0.4)), "k", 0, 10, 10)
    with pytest.raises(ValueError, match="scale"):
        sample_view(AugConfig(scale=(0.5, 0.2)), "k", 0, 10, 10)


def test_eval_view_is_the_centre_crop():
    aug = AugConfig(size=224, eval_seed0=True)
    p = sample_view(aug, "k", 0, 500, 375)
    # shorter side 375 -> 256, crop 224: 375 * 224 / 256 = 328.125 -> 328 original pixels
    assert (p.crop_height, p.crop_width) == (328, 328)
    assert (p.top, p.left) == (round((375 - 328) / 2), round((500 - 328) / 2))
    assert not p.flip and p.jitter_order == ()
    assert sample_view(aug, "k", 1, 500, 375) != p  # other seeds stay random
    assert sample_view(AugConfig(size=224), "k", 0, 500, 375) != p


def test_render_is_bit_identical_and_uint8():
    img = photo()
    p = sample_view(AUG, "k", 2, *img.size)
    a, b = render_view(img, p), render_view(img.copy(), p)
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and a.is_contiguous()
    assert torch.equal(a, b)


def test_render_matches_torchvision_pil_ops():
    """Same parameters through torchvision's functional PIL path give the same bytes."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    img = photo(81, 57)
    orders = set()
    for seed in range(48):
        p = sample_view(AUG, "k", seed, *img.size)
        orders.add((p.jitter_order, p.flip))
        ref = img
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        factors = (p.brightness, p.contrast, p.saturation)
        for op in p.jitter_order:
            ref = ops[op](ref, factors[op])
        if p.flip:
            ref = F.hflip(ref)
        ref = F.resized_crop(
            ref, p.top, p.left, p.crop_height, p.crop_width, [32, 32], InterpolationMode.BICUBIC
        )
        assert torch.equal(render_view(img, p), F.pil_to_tensor(ref)), p
    assert len(orders) == 12  # every op order, with and without flip


def test_factors_survive_a_float32_column():
    for i in range(50):
        p = sample_view(AUG, f"k{i}", 0, 64, 64)
        for f in (p.brightness, p.contrast, p.saturation):
            assert float(np.float32(f)) == f


def test_inconsistent_params_are_refused():
    img = photo()
    p = sample_view(AUG, "k", 0, *img.size)
    with pytest.raises(ValueError, match="jitter_order"):
        render_view(img, dataclasses.replace(p, jitter_order=(1, 1)))
    with pytest.raises(ValueError, match="outside"):
        render_view(img, dataclasses.replace(p, left=img.width - 1, crop_width=5))
    with pytest.raises(ValueError, match="interpolation"):
        render_view(img, dataclasses.replace(p, interpolation="lanczos"))


def test_jitter_is_applied_to_the_whole_image():
    img = photo(120, 90)
    p = dataclasses.replace(
        sample_view(AugConfig(size=32, jitter=(), flip=False), "k", 0, *img.size),
        top=0, left=0, crop_height=30, crop_width=30,
        contrast=1.8, jitter_order=(1,),
    )  # fmt: skip
    whole = render_view(img, p)
    # contrast after the crop pulls towards the crop's mean instead of the image's
    from PIL import ImageEnhance

    crop = img.crop((0, 0, 30, 30))
    after = ImageEnhance.Contrast(crop).enhance(1.8).resize((32, 32), Image.Resampling.BICUBIC)
    after = torch.from_numpy(np.array(after)).permute(2, 0, 1)
    assert (whole.int() - after.int()).abs().max() > 10


def test_flip_mirrors_the_image_before_the_crop():
    img = photo()
    full = dict(top=0, left=0, crop_height=img.height, crop_width=img.width, jitter_order=())
    base = sample_view(AugConfig(size=32, jitter=()), "k", 0, *img.size)
    plain = render_view(img, dataclasses.replace(base, flip=False, **full))
    flipped = render_view(img, dataclasses.replace(base, flip=True, **full))
    assert torch.equal(plain.flip(-1), flipped)


def test_tiny_image_is_upscaled():
    img = Image.new("RGB", (1, 1), (10, 20, 30))
    for seed in range(4):
        p = sample_view(AUG, "dot", seed, 1, 1)
        assert (p.crop_height, p.crop_width, p.top, p.left) == (1, 1, 0, 0)
        view = render_view(img, p)
        assert view.shape == (3, 32, 32)
    view = render_view(img, dataclasses.replace(p, jitter_order=()))
    assert view[:, 0, 0].tolist() == [10, 20, 30]
    p = sample_view(AugConfig(size=32, eval_seed0=True), "dot", 0, 1, 1)
    assert render_view(img, p).shape == (3, 32, 32)


def test_size_mismatch_names_both_sizes():
    p = sample_view(AUG, "k", 0, 80, 60)
    with pytest.raises(ValueError, match=r"81x60.*80x60"):
        render_view(photo(81, 60), p)


def test_unit_and_normalize():
    views = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    unit = to_unit(views)
    assert unit.dtype == torch.float32 and unit.shape == (2, 3, 4, 4)
    assert torch.allclose(unit[0, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    normed = normalize(unit)
    want = (torch.tensor([0.0, 0.2, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(normed[1, :, 3, 3], want)
    assert torch.equal(normalize(unit, (0.0,) * 3, (1.0,) * 3), unit)


def test_rendered_pixels_are_pinned():
    """A Pillow or code change that moves pixels would silently invalidate stored tokens."""
    img = photo()
    p = sample_view(AUG, "k", 5, *img.size)
    digest = hashlib.sha256(render_view(img, p).numpy().tobytes()).hexdigest()
    assert digest == "854af5cd6e1d6c15828cbf3edfee9d4bc046739606334735e4251d8b16037885", digest
