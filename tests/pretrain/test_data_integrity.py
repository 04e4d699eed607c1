"""Stage 3 trusts nothing it reads and reads any copy of the images.

The failures reproduced: mirrored images with the same names and sizes; an edited manifest
fingerprint, a deleted, truncated or corrupted token shard. Each was accepted, or surfaced as
a DataLoader worker traceback, before rows carried image digests and stage 3 checked them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from support.pretrain_data import GRID, SHARD_SIZE, make_images, make_tokenizer, make_tokens
from torch.utils.data import DataLoader

from engine.errors import UserError
from pretrain.data import MIMDataset
from pretrain.errors import PretrainDataError
from shards import schema
from shards.errors import CorruptTokenShard, ImageDigestMismatch, TokenDatasetMismatch
from shards.manifest import SEAL, seal
from shards.pack import PackConfig, pack
from shards.reader import open_token_dataset
from shards.validate import main as validate_main
from shards.validate import validate


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("integrity")
    images = make_images(root / "images")
    tokenizer = make_tokenizer(root / "tokenizer.pth")
    tokens = make_tokens(images, tokenizer, root / "tokens")
    return {"images": str(images), "tokenizer": tokenizer, "tokens": str(tokens), "root": root}


def dataset(images: str, tokens: str, **kwargs) -> MIMDataset:
    args = dict(vocab_size=16, grid=GRID, image_size=32, num_masked=6, min_patches=4)
    args.update(shard_size=SHARD_SIZE)
    args.update(kwargs)
    return MIMDataset(images, open_token_dataset(tokens), **args)


def epoch_samples(ds: MIMDataset, workers: int = 0) -> dict[str, tuple]:
    """key -> (view, mask, tokens) of one epoch."""
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return {s["key"]: (s["view"], s["mask"], s["tokens"]) for s in loader}


def copy_tokens(corpus: dict, tmp_path: Path) -> Path:
    out = tmp_path / "tokens"
    shutil.copytree(corpus["tokens"], out)
    return out


def test_mirrored_images_are_refused_by_validate_and_stage3(corpus: dict, tmp_path: Path) -> None:
    """Reproduction 2: mirror every image, keep names and sizes, repack."""
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for path in sorted(Path(corpus["images"]).iterdir()):
        try:
            image = Image.open(path)
            ImageOps.mirror(image).save(mirrored / path.name, quality=90)
        except OSError:
            shutil.copy(path, mirrored / path.name)  # the undecodable one stays as it is
    packed = tmp_path / "packed"
    pack(PackConfig(images=str(mirrored), out_dir=str(packed), shard_size=SHARD_SIZE))

    assert validate(corpus["tokens"], images=corpus["images"]) == []
    for source in (mirrored, packed):
        problems = validate(corpus["tokens"], images=str(source))
        assert problems and all("differ from the ones tokenized" in p for p in problems)
        ds = dataset(str(source), corpus["tokens"])
        with pytest.raises(ImageDigestMismatch) as err:
            epoch_samples(ds, workers=1)
        text = str(err.value)
        assert "Traceback" not in text and "DataLoader worker" not in text  # the plain message
        assert "img_0" in text and "shard-00000" in text and "tokenize" in text


def test_a_truncated_image_shard_is_refused_by_name(corpus: dict, tmp_path: Path) -> None:
    """A tar that breaks off is not the shard stage 2 read: a plain message, no worker trace."""
    packed = tmp_path / "packed"
    pack(PackConfig(images=corpus["images"], out_dir=str(packed), shard_size=SHARD_SIZE))
    tar = packed / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    ds = dataset(str(packed / "shard-*.tar"), corpus["tokens"], match="aligned")
    with pytest.raises(PretrainDataError, match="shard-000001.tar cannot be read") as err:
        epoch_samples(ds, workers=1)
    assert "Traceback" not in str(err.value) and isinstance(err.value, UserError)


def forge_manifest(tokens: Path, manifest: dict) -> None:
    """Write an edited manifest with a valid seal, as someone who knows the format could: the
    checks behind the seal (footers, receipts, token ranges) must still refuse it."""
    (tokens / schema.MANIFEST_NAME).write_text(json.dumps(seal(manifest)))


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m["totals"].update(images=m["totals"]["images"] + 1), id="rows"),
        pytest.param(lambda m: m["shards"].pop(), id="shard-list"),
        pytest.param(lambda m: m.update(codebook_size=m["codebook_size"] + 1), id="codebook"),
        pytest.param(lambda m: m.pop(SEAL), id="seal-removed"),
    ],
)
def test_hand_edited_manifest_is_refused_by_every_reader(corpus, tmp_path, edit, capsys) -> None:
    """Rows, the shard list or codebook_size edited (even to a value above every code): every
    reader refuses it (stage 3 before any step) and validate reports it (exit 1)."""
    tokens = copy_tokens(corpus, tmp_path)
    original = (tokens / schema.MANIFEST_NAME).read_bytes()
    manifest = json.loads(original)
    edit(manifest)
    (tokens / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptTokenShard, match="manifest.json (was edited|has no)"):
        open_token_dataset(str(tokens))
    assert validate_main([str(tokens), f"images={corpus['images']}"]) == 1
    assert "manifest.json" in capsys.readouterr().out


def test_forged_codebook_size_is_refused_by_the_footers_and_the_token_range(corpus, tmp_path):
    """codebook_size lowered below the real codes with the seal recomputed: stage 3 names the
    footers' codebook before any step, and reading a shard names the first token out of range
    (never an IndexError from the loss)."""
    tokens = copy_tokens(corpus, tmp_path)
    manifest = json.loads((tokens / schema.MANIFEST_NAME).read_text())
    manifest["codebook_size"] = manifest["tokenizer"]["codebook_size"] = 2
    forge_manifest(tokens, manifest)
    with pytest.raises(TokenDatasetMismatch, match="written for codebook_size=16.*says 2"):
        dataset(corpus["images"], str(tokens), vocab_size=2)
    with pytest.raises(CorruptTokenShard, match=r"has token \d+ >= codebook size 2"):
        open_token_dataset(str(tokens)).read_columns(0)
    assert any(">= codebook size 2" in p for p in validate(str(tokens)))


def test_edited_manifest_fingerprint_is_refused(corpus: dict, tmp_path: Path) -> None:
    """Reproduction 6: manifest, footers and receipts must agree before any step."""
    tokens = copy_tokens(corpus, tmp_path)
    manifest = json.loads((tokens / schema.MANIFEST_NAME).read_text())
    manifest["fingerprint"] = "0" * 64
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    forge_manifest(tokens, manifest)
    with pytest.raises(TokenDatasetMismatch, match=r"0{64}") as err:
        dataset(corpus["images"], str(tokens))
    assert "parquet" in str(err.value) and isinstance(err.value, UserError)


def test_receipt_fingerprint_must_match(corpus: dict, tmp_path: Path) -> None:
    tokens = copy_tokens(corpus, tmp_path)
    manifest = json.loads((tokens / schema.MANIFEST_NAME).read_text())
    manifest["shards"][1]["job"] = {"tokenizer_fingerprint": "1" * 64}
    forge_manifest(tokens, manifest)
    with pytest.raises(TokenDatasetMismatch, match="receipt of shard 1"):
        dataset(corpus["images"], str(tokens))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_truncated_token_shard_is_refused_before_any_step(
    corpus: dict, tmp_path: Path, damage: str
) -> None:
    tokens = copy_tokens(corpus, tmp_path)
    victim = tokens / schema.wds_path(2)
    if damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CorruptTokenShard) as err:
        dataset(corpus["images"], str(tokens))
    text = str(err.value)
    assert schema.wds_path(2) in text and "rerun stage 2" in text and "validate" in text


def test_corrupt_or_vanished_token_shard_mid_run_is_a_clear_error(
    corpus: dict, tmp_path: Path
) -> None:
    """A flipped byte (same size, so the preflight passes) is found by the read's checksum; a
    file deleted after the start by the read itself: both plain errors, not worker tracebacks."""
    tokens = copy_tokens(corpus, tmp_path)
    victim = tokens / schema.wds_path(1)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    ds = dataset(corpus["images"], str(tokens))
    with pytest.raises(CorruptTokenShard) as err:
        epoch_samples(ds, workers=1)
    text = str(err.value)
    assert "Traceback" not in text and schema.wds_path(1) in text and "rerun stage 2" in text

    tokens = copy_tokens(corpus, tmp_path / "again")
    ds = dataset(corpus["images"], str(tokens))
    (tokens / schema.wds_path(3)).unlink()
    with pytest.raises(UserError) as err:
        epoch_samples(ds, workers=1)
    text = str(err.value)
    assert "Traceback" not in text and schema.wds_path(3) in text and "rerun stage 2" in text


# ---------------------------------------------------------------- same images, any packing


def hf_parquet(folder: Path, out: Path, per_file: int) -> str:
    """The images of a flat folder as Hugging Face-layout Parquet (image struct + label)."""
    (out / "data").mkdir(parents=True)
    files = sorted(folder.iterdir())
    chunks = [files[i : i + per_file] for i in range(0, len(files), per_file)]
    for n, chunk in enumerate(chunks):
        image = pa.array(
            [{"bytes": p.read_bytes(), "path": p.name} for p in chunk],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        table = pa.table({"image": image, "label": pa.array([0] * len(chunk), pa.int64())})
        pq.write_table(table, out / "data" / f"train-{n:05d}-of-{len(chunks):05d}.parquet")
    return str(out)


def test_same_images_any_packing_gives_the_same_samples(corpus: dict, tmp_path: Path) -> None:
    reference = dataset(corpus["images"], corpus["tokens"])
    assert reference.plan.mode == "aligned"
    expected = epoch_samples(reference)
    assert len(expected) == 13  # 14 images, one undecodable

    packed = tmp_path / "tars"
    pack(PackConfig(images=corpus["images"], out_dir=str(packed), shard_size=5))
    for tar in sorted(packed.glob("shard-*.tar")):  # other tar names
        tar.rename(packed / tar.name.replace("shard-", "theirs-"))
    (packed / "index.json").unlink()
    copies = {
        "other shard size": (corpus["images"], {"shard_size": 3}),
        "other tar names": (str(packed), {}),
        "HF parquet": (hf_parquet(Path(corpus["images"]), tmp_path / "hf", 6), {}),
    }
    for name, (images, extra) in copies.items():
        ds = dataset(images, corpus["tokens"], **extra)
        assert ds.plan.mode == "key", name
        assert ds.plan.report["matched"] == 13 and ds.plan.report["missing_from_images"] == 0
        got = epoch_samples(ds, workers=2 if name == "HF parquet" else 0)
        assert sorted(got) == sorted(expected), name
        for key, (view, mask, tokens) in expected.items():
            assert torch.equal(got[key][0], view) and torch.equal(got[key][1], mask), (name, key)
            assert torch.equal(got[key][2], tokens), (name, key)


def test_images_missing_from_the_copy_are_counted_and_reported(
    corpus: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(corpus["images"], partial)
    (partial / "img_002.jpg").unlink()
    (partial / "img_009.jpg").unlink()
    ds = dataset(str(partial), corpus["tokens"], shard_size=5)
    report = ds.plan.report
    assert report["missing_from_images"] == 2 and report["matched"] == 11
    assert sorted(report["missing_examples"]) == ["img_002", "img_009"]
    assert "2 images of the token dataset are not in this copy" in caplog.text
    assert len(epoch_samples(ds)) == 11


def test_an_image_folder_copy_of_tokenized_tars(corpus: dict, tmp_path: Path) -> None:
    """Tokens made from tars; the team holds the same images as an ImageFolder."""
    folder = tmp_path / "folder"
    for j, path in enumerate(sorted(Path(corpus["images"]).iterdir())):
        (folder / f"c{j % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"c{j % 2}" / path.name)
    tars = tmp_path / "tars"
    pack(PackConfig(images=str(folder), out_dir=str(tars), shard_size=4))
    tokens = make_tokens(tars, corpus["tokenizer"], tmp_path / "tokens")
    expected = epoch_samples(dataset(str(tars), str(tokens)))
    ds = dataset(str(folder), str(tokens), shard_size=6)
    assert ds.plan.mode == "key" and ds.plan.report["matched"] == 13
    got = epoch_samples(ds)
    assert sorted(got) == sorted(expected) and sorted(got)[0] == "c0/img_000"
    assert all(torch.equal(got[k][0], expected[k][0]) for k in expected)


def test_validate_a_copy_packed_otherwise_by_key(corpus: dict, tmp_path: Path) -> None:
    assert validate(corpus["tokens"], images=corpus["images"], shard_size=5) == []
    mirrored = tmp_path / "mirrored"
    shutil.copytree(corpus["images"], mirrored)
    victim = mirrored / "img_003.jpg"
    ImageOps.mirror(Image.open(victim)).save(victim, quality=90)
    (problem,) = validate(corpus["tokens"], images=str(mirrored), shard_size=5)
    assert "1 image(s) differ" in problem and "img_003" in problem
