"""The dataset card's recipe rebuilds every view bit for bit without importing the project.

The code is taken from a rendered README.md and run in a subprocess in which the project's
packages cannot be imported; its pixels must equal ``render_view(decode_image(bytes), params)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shards import schema
from shards.card import RECIPE, RECIPE_MARKER
from shards.dataset import TokenDatasetDir
from shards.decode import decode_image
from shards.images import iter_shard, list_shards
from shards.views import AugConfig, render_view, sample_view
from shards.writer import TokenRow

SEEDS = (0, 1, 2, 3, 4, 5)
PROJECT = ("shards", "pretrain", "tokenize_corpus", "pipeline", "engine")


def images(folder: Path) -> Path:
    """Images that exercise every decode rule: EXIF rotation, alpha, palette, 16-bit, grey."""
    folder.mkdir()
    rng = np.random.default_rng(0)

    def pixels(w: int, h: int, channels: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)

    Image.fromarray(pixels(47, 31)).save(folder / "plain.jpg", quality=90)
    rotated = Image.fromarray(pixels(40, 26))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(pixels(33, 29, 4), "RGBA").save(folder / "alpha.png")
    Image.fromarray(pixels(30, 38)).quantize(colors=8).save(folder / "palette.png", transparency=2)
    deep = (rng.integers(0, 65536, (25, 36))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    Image.fromarray(pixels(28, 28)[..., 0]).save(folder / "grey.webp", lossless=True)
    return folder


def card_code(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    (recipe,) = [b for b in blocks if RECIPE_MARKER in b]
    return recipe.split("\nimport pyarrow.parquet as pq\n")[0]  # the functions, not the example


def test_card_recipe_rebuilds_render_view_without_the_project(tmp_path: Path) -> None:
    folder = images(tmp_path / "images")
    aug = AugConfig(size=24, scale=(0.1, 1.0), jitter=(0.4, 0.4, 0.4))
    (shard,) = list_shards(str(folder))
    rows, expected = [], {}
    for record in iter_shard(shard):
        image = decode_image(record.data)
        views = [sample_view(aug, record.key, s, image.width, image.height) for s in SEEDS]
        for view in views:
            expected[(record.key, view.seed)] = render_view(image, view).numpy()
        tokens = np.zeros((len(SEEDS), 4), dtype=np.uint16)
        rows.append(TokenRow(record.key, record.label, views, tokens, record.sha256))
    out = tmp_path / "tokens"
    tok = {"fingerprint": "a" * 64, "codebook_size": 16, "grid": [2, 2], "image_size": 24}
    receipt = TokenDatasetDir(str(out)).write_shard(0, 1, shard.url, SEEDS, rows, [], tokenizer=tok)
    TokenDatasetDir(str(out)).write_manifest([receipt], {"tokenizer": tok, "seeds": list(SEEDS)})
    flips = {bool(v.flip) for r in rows for v in r.views}
    orders = {v.jitter_order for r in rows for v in r.views}
    assert flips == {True, False} and len(orders) > 3  # the recipe meets flips and op orders

    script = tmp_path / "consumer.py"
    script.write_text(
        "import sys\n"
        f"for name in {PROJECT!r}:\n"
        "    sys.modules[name] = None  # importing the project now fails\n"
        + card_code((out / schema.CARD_NAME).read_text())
        + "\n"
        "import glob, json, os\n"
        "import numpy as np\n"
        "import pyarrow.parquet as pq\n"
        "folder, tokens, result = sys.argv[1:4]\n"
        "files = {os.path.splitext(n)[0]: os.path.join(folder, n) for n in os.listdir(folder)}\n"
        "pixels, digests = {}, {}\n"
        "for path in sorted(glob.glob(os.path.join(tokens, 'parquet', 'seed=*', '*.parquet'))):\n"
        "    for row in pq.read_table(path).to_pylist():\n"
        "        data = open(files[row['key']], 'rb').read()\n"
        "        digests[row['key']] = image_digest_ok(data, row)\n"
        "        pixels[f\"{row['key']}|{row['seed']}\"] = rebuild_view(data, row).numpy()\n"
        "np.savez(result, **pixels)\n"
        "print(json.dumps(digests))\n"
    )
    result = tmp_path / "pixels.npz"
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(out), str(result)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {r.key: True for r in rows}
    got = np.load(result)
    assert len(got.files) == len(expected) == 6 * len(SEEDS)
    for (key, seed), pixels in expected.items():
        assert np.array_equal(got[f"{key}|{seed}"], pixels), (key, seed)


def test_recipe_refuses_other_bytes(tmp_path: Path) -> None:
    """image_digest_ok, run as the card prints it, says no to a re-encoded image."""
    namespace: dict = {}
    code = card_code(f"```python\n{RECIPE}\n```")
    exec(compile(code, "card", "exec"), namespace)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    data = buf.getvalue()

    row = {schema.IMAGE_SHA256: hashlib.sha256(data).digest()}
    assert namespace["image_digest_ok"](data, row)
    assert not namespace["image_digest_ok"](data + b"\0", row)
    assert namespace["image_digest_ok"](
        data, {schema.IMAGE_SHA256: hashlib.sha256(data).hexdigest()}
    )
