"""`pipeline inspect` (summary + PNGs) and validate's image alignment, on a tiny real image folder."""

import json

import numpy as np
import pytest
from support import token_datasets as helpers

from shards.inspect import main as inspect_main
from shards.validate import main as validate_main


def test_summary_and_usage_png(tmp_path, capsys):
    helpers.make_dataset(tmp_path / "tokens")
    out = tmp_path / "pngs"
    assert inspect_main([str(tmp_path / "tokens"), f"out={out}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 15 and info["seeds"] == [0, 1] and info["skipped"] == 1
    assert info["skip_reasons"] == ["truncated JPEG"]
    assert info["codebook_size"] == 16 and 0 < info["codebook_used"] <= 16
    assert sum(count for _, count in info["top_tokens"]) <= 15 * 2 * 16
    assert (out / "token_usage.png").stat().st_size > 1000


@pytest.fixture
def image_dataset(tmp_path):
    """6 small images in a flat folder (2 image shards of 3), tokenized with sample_view views."""
    from PIL import Image

    from shards.dataset import TokenDatasetDir
    from shards.decode import decode_image
    from shards.images import iter_shard, list_shards
    from shards.views import AugConfig, sample_view
    from shards.writer import TokenRow

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for j in range(6):
        pixels = rng.integers(0, 255, size=(40 + j, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{j}.png")
    aug = AugConfig(size=32)
    shards = list_shards(str(folder), shard_size=3)
    receipts = []
    for shard in shards:
        rows, skipped = [], []
        for record in iter_shard(shard):
            if record.key.endswith("_4"):  # pretend this one failed to decode
                skipped.append((record.key, "truncated JPEG"))
                continue
            image = decode_image(record.data)
            views = [sample_view(aug, record.key, s, *image.size) for s in helpers.SEEDS]
            tokens = rng.integers(0, 16, size=(2, 16)).astype(np.uint16)
            rows.append(TokenRow(record.key, record.label, views, tokens, record.sha256))
        receipts.append(
            TokenDatasetDir(str(tmp_path / "tokens")).write_shard(
                shard.index,
                len(shards),
                shard.url,
                helpers.SEEDS,
                rows,
                skipped,
                tokenizer=helpers.TOKENIZER,
            )
        )
    info = {
        "tokenizer": helpers.TOKENIZER,
        "seeds": list(helpers.SEEDS),
        "images": {"source": str(folder), "shard_size": 3},
    }
    TokenDatasetDir(str(tmp_path / "tokens")).write_manifest(receipts, info)
    return tmp_path / "tokens", folder


def test_inspect_draws_views(image_dataset, tmp_path, capsys):
    tokens, folder = image_dataset
    assert inspect_main([str(tokens), f"out={tmp_path / 'out'}", f"images={folder}", "keys=2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["views_of"]) == 2
    assert (tmp_path / "out" / "views.png").stat().st_size > 1000


def test_validate_checks_image_alignment(image_dataset, tmp_path, capsys):
    tokens, folder = image_dataset
    assert validate_main([str(tokens), f"images={folder}"]) == 0
    capsys.readouterr()
    (folder / "img_5.png").rename(folder / "img_0a.png")  # a new image the tokens do not know
    assert validate_main([str(tokens), f"images={folder}"]) == 1
    assert "has no tokens and is not listed as skipped" in capsys.readouterr().out
