"""Suite-wide settings: no network, one intra-op thread, and the ImageNet sample when it is there.

Helpers shared by several test modules live in ``tests/support`` (imported as ``support.<name>``:
pytest puts ``tests/`` on the path, see pyproject.toml).
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.layout import imagenet_sample_dir  # noqa: E402

# One thread per test process: the suite runs on 2 cores, and tiny models gain nothing from more.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 1000-image ImageNet sample (one per class); tests using it skip when it is absent."""
    path = imagenet_sample_dir()  # $IMAGENET_SAMPLE, default beside the repo (engine/layout.py)
    if not path.is_dir() or not any(path.glob("*.JPEG")):
        pytest.skip(
            f"ImageNet sample not found at {path}: set IMAGENET_SAMPLE=<folder of ImageNet JPEGs>"
        )
    return path
