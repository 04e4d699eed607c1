"""stage=pack: deterministic WebDataset image shards that every reader reads back."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import ConfigError
from shards.archives import DUPLICATE_IN_TAR
from shards.decode import decode_image
from shards.errors import ImageSourceError
from shards.images import iter_shard, list_shards
from shards.pack import PackConfig, image_extension, pack


def png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(color=(0, 255, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            path = root / cls / f"{cls}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg((c * 100, i * 50, 0)) if i != 1 else png((c, i, 9)))
    return root


def records(url):
    return [(r.key, r.data, r.label, r.error) for s in list_shards(url) for r in iter_shard(s)]


def test_pack_is_deterministic_and_round_trips(folder, tmp_path):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    s1 = pack(PackConfig(images=str(folder), out_dir=str(out1), shard_size=4))
    s2 = pack(PackConfig(images=str(folder), out_dir=str(out2), shard_size=4))
    assert (s1["shards"], s1["images"], s1["skipped"], s1["exit_code"]) == (2, 6, 0, 0)
    names = sorted(p.name for p in out1.iterdir())
    assert names == ["config.yaml", "index.json", "shard-000000.tar", "shard-000001.tar"]
    assert {k: v for k, v in s2.items() if k not in ("out_dir", "index")} == {
        k: v for k, v in s1.items() if k not in ("out_dir", "index")
    }
    for name in ["shard-000000.tar", "shard-000001.tar", "index.json"]:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
    index = json.loads((out1 / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"]
    assert [s["count"] for s in index["shards"]] == [4, 2]
    for entry in index["shards"]:
        data = (out1 / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)

    # our reader gives back exactly the source records
    assert records(str(out1)) == records(str(folder))
    # members are reproducible: fixed mtime/owner, extension from the bytes
    with tarfile.open(out1 / "shard-000000.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos][:4] == [
        "cat/cat_0.jpg",
        "cat/cat_0.cls",
        "cat/cat_1.png",
        "cat/cat_1.cls",
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {
        (0, 0, 0, "", "", 0o644)
    }


def test_webdataset_reads_the_shards(folder, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    pack(PackConfig(images=str(folder), out_dir=str(out), shard_size=4))
    urls = str(out / "shard-{000000..000001}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [k for k, *_ in records(str(folder))]
    assert [int(s["cls"]) for s in samples] == [0, 0, 0, 1, 1, 1]
    image = samples[1]["png"]
    assert image.size == (5, 4)


def test_pack_from_tars_lists_skips_and_renames(tmp_path):
    src = tmp_path / "src.tar"
    with tarfile.open(src, "w") as tar:
        for name, data in [
            ("a.jpg", jpeg()),
            ("a.cls", b"1"),
            ("notes.txt", b"hello"),
            ("b.jpg", jpeg()),
            ("a.jpg", jpeg()),  # duplicate key, not adjacent
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    summary = pack(PackConfig(images=str(src), out_dir=str(out), shard_size=10))
    assert (summary["images"], summary["skipped"], summary["exit_code"]) == (2, 2, 0)
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == [
        {"key": "notes", "reason": "no image member (has: .txt)"},
        {"key": "a", "reason": DUPLICATE_IN_TAR},
    ]
    assert [(k, lab) for k, _, lab, _ in records(str(out))] == [("a", 1), ("b", -1)]


def test_keys_with_dots_are_renamed(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "img.001.png").write_bytes(png())
    (root / "img_001.png").write_bytes(png((1, 2, 3)))  # collides with the renamed key
    (root / "plain.png").write_bytes(png())
    out = tmp_path / "out"
    summary = pack(PackConfig(images=str(root), out_dir=str(out)))
    assert summary["images"] == 2 and summary["skipped"] == 1
    index = json.loads((out / "index.json").read_text())
    assert index["renamed"] == {"img_001": "img.001"}
    assert index["skipped"] == [{"key": "img_001", "reason": "duplicate key (also img.001.png)"}]
    assert [k for k, *_ in records(str(out))] == ["img_001", "plain"]
    assert summary["renamed"] == 1


def test_bad_source_shard_sets_exit_code(tmp_path):
    good = tmp_path / "in" / "shard-000000.tar"
    good.parent.mkdir()
    with tarfile.open(good, "w") as tar:
        for i in range(3):
            data = jpeg((i, 0, 0))
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    full = good.read_bytes()
    (tmp_path / "in" / "shard-000001.tar").write_bytes(full[:1500])  # cut inside k1
    summary = pack(PackConfig(images=str(tmp_path / "in"), out_dir=str(tmp_path / "out")))
    assert summary["exit_code"] == 1
    assert summary["bad_shards"][0]["reason"].startswith("truncated tar")
    assert summary["images"] == 3  # the good shard; nothing complete before the cut
    # the output is still a valid, complete set of shards
    assert len(records(str(tmp_path / "out"))) == 3


def test_stale_shards_from_a_bigger_pack_are_removed(folder, tmp_path):
    out = tmp_path / "out"
    assert pack(PackConfig(images=str(folder), out_dir=str(out), shard_size=1))["shards"] == 6
    assert pack(PackConfig(images=str(folder), out_dir=str(out), shard_size=4))["shards"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(out.glob(".*.tmp"))


def test_missing_images_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="images= is required"):
        pack(PackConfig(out_dir=str(tmp_path)))
    with pytest.raises(ImageSourceError, match="missing"):
        pack(PackConfig(images=str(tmp_path / "missing"), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_pack_honours_the_umask(folder, tmp_path, umask):
    """Shards, index and config get ``0o666 & ~umask`` (folders ``0o777 & ~umask``)."""
    old = os.umask(umask)
    try:
        pack(PackConfig(images=str(folder), out_dir=str(tmp_path / "out"), shard_size=2))
    finally:
        os.umask(old)
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in paths}
    expected = {p.name: oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in paths}
    assert modes == expected and len(modes) >= 4


def test_image_extension_sniffing():
    assert image_extension(jpeg()) == "jpg"
    assert image_extension(png()) == "png"
    assert image_extension(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert image_extension(b"garbage") == "jpg"


def test_pack_cli(folder, tmp_path):
    from pipeline.cli import main

    out = tmp_path / "cli"
    rc = main(["run", "stage=pack", f"images={folder}", f"out_dir={out}", "shard_size=5"])
    assert rc == 0
    assert (out / "config.yaml").exists() and (out / "shard-000001.tar").exists()


def test_pack_imagenet_sample(imagenet_sample, tmp_path):
    """Pack the first 64 images of the real sample (through symlinks; the sample is not copied)."""
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted(imagenet_sample.glob("*.JPEG"))[:64]:
        os.symlink(path, subset / path.name)
    out = tmp_path / "out"
    summary = pack(PackConfig(images=str(subset), out_dir=str(out), shard_size=32))
    assert (summary["shards"], summary["images"], summary["skipped"]) == (2, 64, 0)
    got = records(str(out))
    assert got == records(str(subset))
    assert got[0][0] == sorted(imagenet_sample.glob("*.JPEG"))[0].stem
    assert got[0][2] == -1  # flat folder: no labels
    assert decode_image(got[0][1]).mode == "RGB"
    assert Path(out / "shard-000000.tar").stat().st_size > 32 * 1000


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 API (moto's server) on loopback, reached through s3fs by plain s3:// URLs."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("packbucket")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_pack_from_and_to_s3(folder, tmp_path, s3_endpoint):
    fs = s3_endpoint
    fs.put(str(folder), "packbucket/images", recursive=True)
    summary = pack(
        PackConfig(images="s3://packbucket/images", out_dir="s3://packbucket/out", shard_size=4)
    )
    assert (summary["shards"], summary["images"], summary["exit_code"]) == (2, 6, 0)
    assert sorted(fs.ls("packbucket/out", detail=False)) == [
        "packbucket/out/config.yaml",
        "packbucket/out/index.json",
        "packbucket/out/shard-000000.tar",
        "packbucket/out/shard-000001.tar",
    ]
    local = pack(PackConfig(images=str(folder), out_dir=str(tmp_path / "local"), shard_size=4))
    assert local["images"] == 6
    for name in ["shard-000000.tar", "shard-000001.tar"]:
        assert fs.cat_file(f"packbucket/out/{name}") == (tmp_path / "local" / name).read_bytes()
    shards = list_shards("s3://packbucket/out")
    assert [s.url for s in shards] == [
        "s3://packbucket/out/shard-000000.tar",
        "s3://packbucket/out/shard-000001.tar",
    ]
    assert records("s3://packbucket/out") == records(str(folder))
    assert records("s3://packbucket/out/shard-{000000..000001}.tar") == records(str(folder))


def test_long_and_unicode_keys_round_trip(tmp_path):
    import webdataset as wds

    root = tmp_path / "imgs"
    long_dir = root / ("d" * 120)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 150 + ".png")).write_bytes(png())
    (root / "café").mkdir()
    (root / "café" / "ñandú.jpg").write_bytes(jpeg())
    out = tmp_path / "out"
    pack(PackConfig(images=str(root), out_dir=str(out)))
    want = records(str(root))
    assert records(str(out)) == want
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [k for k, *_ in want]
