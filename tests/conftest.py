"""Suite-wide settings: no network, few threads, and the ImageNet sample when it is there."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 1000-image ImageNet sample (one per class); tests using it skip when it is absent."""
    path = Path(os.environ.get("IMAGENET_SAMPLE", IMAGENET_SAMPLE))
    if not path.is_dir() or not any(path.glob("*.JPEG")):
        pytest.skip(f"ImageNet sample not found at {path}")
    return path
