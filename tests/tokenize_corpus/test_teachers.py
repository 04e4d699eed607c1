"""Teachers: real offline EfficientNet-Lite0 weights, local-file timm/open_clip teachers, refusals."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenize_corpus.errors import TeacherError
from tokenize_corpus.teachers import load_efficientnet_lite0, load_teacher


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def test_efficientnet_lite0_real_weights_classify_tench(imagenet_sample: Path) -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    model = load_efficientnet_lite0()
    image = Image.open(imagenet_sample / "n01440764_tench.JPEG").convert("RGB")
    image = TF.center_crop(TF.resize(image, 256, interpolation=TF.InterpolationMode.BICUBIC), 224)
    x = TF.normalize(TF.to_tensor(image)[None], (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert 0 in top5  # ImageNet class 0 = tench: the real weights are loaded


def test_efficientnet_lite0_teacher_features() -> None:
    teacher = load_teacher("efficientnet_lite0", None, grid=(7, 7))
    assert teacher.dim == 112 and teacher.input_size == (224, 224)
    teacher.train()  # must stay in eval mode: BatchNorm statistics are part of the teacher
    assert not teacher.training and not teacher.model.training
    images = torch.rand(2, 3, 112, 112, requires_grad=True)
    features = teacher(images)
    assert features.shape == (2, 49, 112)
    assert not features.requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())
    assert torch.isfinite(features).all() and features.std() > 0


def test_timm_vit_from_local_file(tiny_vit_file: Path) -> None:
    import timm

    teacher = load_teacher("timm:vit_tiny_patch16_224", str(tiny_vit_file), grid=(4, 4))
    assert teacher.dim == 192 and teacher.input_size == (32, 32)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    ref.load_state_dict(torch.load(tiny_vit_file, weights_only=True))
    ref.eval()
    images = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(ref.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ref.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref.forward_features((images - mean) / std)[:, 1:]  # final-norm patch tokens
    torch.testing.assert_close(teacher(images), expected)


def test_grid_and_input_resize(tiny_vit_file: Path) -> None:
    native = load_teacher("timm:vit_tiny_patch16_224", str(tiny_vit_file), grid=(4, 4))
    coarse = load_teacher("timm:vit_tiny_patch16_224", str(tiny_vit_file), grid=(2, 2))
    images = torch.rand(2, 3, 32, 32)
    fmap = native(images).transpose(1, 2).reshape(2, 192, 4, 4)
    expected = F.interpolate(fmap, size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(coarse(images), expected.flatten(2).transpose(1, 2))
    # a larger tokenizer input is resized to the teacher's native 32 px first
    assert native(torch.rand(2, 3, 64, 64)).shape == (2, 16, 192)


def test_open_clip_tiny_from_local_file(tmp_path: Path) -> None:
    import open_clip

    cfg = {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    cfg_path = tmp_path / "vqkd-test-tiny-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("vqkd-test-tiny-clip")
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)

    teacher = load_teacher("clip:vqkd-test-tiny-clip", str(weights), grid=(4, 4))
    assert teacher.dim == 24
    images = torch.rand(2, 3, 32, 32)
    visual = model.visual.eval()
    mean, std = teacher.mean, teacher.std
    torch.testing.assert_close(mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    with torch.no_grad():
        out = visual.forward_intermediates(
            (images - mean) / std, indices=1, normalize_intermediates=True, output_fmt="NLC"
        )
        expected = out["image_intermediates"][-1] @ visual.proj  # ln_post tokens, projected
    torch.testing.assert_close(teacher(images), expected)


def test_unknown_teacher_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="unknown teacher"):
        load_teacher("resnet", None, grid=(4, 4))
    with pytest.raises(TeacherError, match="unknown timm model"):
        load_teacher("timm:no_such_model", None, grid=(4, 4))
    with pytest.raises(TeacherError, match="teacher.weights=<local file>"):
        load_teacher("efficientnet_lite0", str(tmp_path / "missing.pt"), grid=(4, 4))


def test_uncached_hub_weights_fail_fast(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.monotonic()
    with pytest.raises(TeacherError, match="teacher.weights=<local file>"):
        load_teacher("timm:vit_tiny_patch16_224.augreg_in21k", None, grid=(14, 14))
    assert time.monotonic() - start < 10


def test_cnn_teacher_input_size_and_vit_refusal(tiny_vit_file: Path) -> None:
    teacher = load_teacher("efficientnet_lite0", None, grid=(6, 6), input_size=96)
    images = torch.rand(2, 3, 96, 96)
    features = teacher(images)
    assert teacher.input_size == (96, 96) and features.shape == (2, 36, 112)
    with torch.no_grad():  # at 96 px the stride-16 map is the 6 x 6 grid itself: no resize
        x = (images - teacher.mean) / teacher.std
        direct = teacher.model.forward_intermediates(
            x, indices=[3], intermediates_only=True, stop_early=True
        )[-1]
    torch.testing.assert_close(features, direct.flatten(2).transpose(1, 2))
    with pytest.raises(TeacherError, match="native resolution"):
        load_teacher("timm:vit_tiny_patch16_224", str(tiny_vit_file), grid=(4, 4), input_size=64)
