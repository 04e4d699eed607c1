"""The demo corpus: labelled, deterministic, the promised size."""

import hashlib
from pathlib import Path

from PIL import Image

from pipeline.demo_corpus import CLASSES, build_demo_corpus


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.jpg")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_corpus_is_labelled_and_deterministic(tmp_path):
    summary = build_demo_corpus(tmp_path / "a", n_images=len(CLASSES) * 2, size=48, seed=3)
    assert sorted(summary["counts"]) == sorted(CLASSES)
    assert all(n == 2 for n in summary["counts"].values())
    classes = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert classes == sorted(CLASSES)  # ImageFolder: one folder per class, nothing else
    files = sorted((tmp_path / "a").rglob("*.jpg"))
    assert len(files) == len(CLASSES) * 2
    with Image.open(files[0]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"
    build_demo_corpus(tmp_path / "b", n_images=len(CLASSES) * 2, size=48, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    build_demo_corpus(tmp_path / "c", n_images=len(CLASSES) * 2, size=48, seed=4)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
