"""Image sources: folders, WebDataset tars and Parquet, good and bad, local and fsspec URLs."""

import io
import os
import tarfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards.archives import DUPLICATE_IN_PARQUET, DUPLICATE_IN_TAR
from shards.errors import ImageSourceError
from shards.folders import image_key
from shards.images import iter_shard, list_classes, list_shards
from shards.records import BadShard, ImageRecord, ImageShard


def png(color=(255, 0, 0), size=(4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members, gz: bool = False) -> str:
    """members: [(name, bytes)] in order."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def records(shards):
    return [r for s in shards for r in iter_shard(s)]


# ---------------------------------------------------------------- folders


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    files = {
        "dog/b.png": png((1, 0, 0)),
        "dog/a.jpg": png((2, 0, 0)),
        "cat/z.png": png((3, 0, 0)),
        "cat/deep/y.PNG": png((4, 0, 0)),
        "cat/.hidden.png": b"ignored",
        ".git/x.png": b"ignored",
        "readme.png": b"ignored: outside the class folders",
        "dog/notes.txt": b"not an image",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_image_folder_keys_labels_and_shards(image_folder):
    shards = list_shards(str(image_folder), shard_size=3)
    assert [s.name for s in shards] == ["shard-000000", "shard-000001"]
    assert all(s.kind == "folder" for s in shards)
    recs = records(shards)
    assert [(r.key, r.label, r.error) for r in recs] == [
        ("_git/x", -1, "hidden file"),  # listed as skipped, never read
        ("cat/_hidden", 0, "hidden file"),
        ("cat/deep/y", 0, None),
        ("cat/z", 0, None),
        ("dog/a", 1, None),
        ("dog/b", 1, None),
    ]
    assert recs[2].data == (image_folder / "cat/deep/y.PNG").read_bytes()
    assert list_classes(str(image_folder)) == ("cat", "dog")
    assert list_shards(str(image_folder), shard_size=3) == shards  # deterministic


def test_flat_folder_has_no_labels(tmp_path):
    for name in ["b.JPEG", "a.png", "c.webp"]:
        (tmp_path / name).write_bytes(png())
    (tmp_path / "README.md").write_text("not an image")
    recs = records(list_shards(str(tmp_path)))
    assert [(r.key, r.label) for r in recs] == [("a", -1), ("b", -1), ("c", -1)]
    assert list_classes(str(tmp_path)) == ()


def test_folder_duplicate_key_is_an_error_record(tmp_path):
    (tmp_path / "a.jpg").write_bytes(png((1, 1, 1)))
    (tmp_path / "a.png").write_bytes(png((2, 2, 2)))
    (tmp_path / "empty.png").write_bytes(b"")
    recs = records(list_shards(str(tmp_path)))
    assert [(r.key, r.error) for r in recs] == [
        ("a", None),
        ("a", "duplicate key (also a.jpg)"),
        ("empty", None),  # zero bytes are decode's business: it says "zero bytes"
    ]
    assert recs[0].data == (tmp_path / "a.jpg").read_bytes() and recs[1].data == b""


def test_folder_file_deleted_after_listing(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    shards = list_shards(str(tmp_path))
    (tmp_path / "a.png").unlink()
    (rec,) = records(shards)
    assert rec.error.startswith("file not found")


def test_symlinked_files_are_followed(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.png").write_bytes(png())
    (tmp_path / "links").mkdir()
    os.symlink(tmp_path / "src/a.png", tmp_path / "links/a.png")
    (rec,) = records(list_shards(str(tmp_path / "links")))
    assert rec.key == "a" and rec.data == png()


def test_missing_source_and_bad_arguments(tmp_path):
    with pytest.raises(ImageSourceError, match="nope"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(ImageSourceError, match="no images"):
        list_shards(str(tmp_path))  # empty folder
    with pytest.raises(ImageSourceError, match="no files match"):
        list_shards(str(tmp_path / "shard-*.tar"))
    with pytest.raises(ImageSourceError, match="shard_size"):
        list_shards(str(tmp_path), shard_size=0)
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(ImageSourceError, match="notes.txt is neither a tar"):
        list_shards(str(tmp_path / "notes.txt"))
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(ImageSourceError, match="mixes"):
        list_shards([str(tmp_path / "a.tar"), str(tmp_path / "b.parquet")])


# ---------------------------------------------------------------- tars


@pytest.fixture
def tars(tmp_path):
    paths = []
    for i in range(3):
        members = []
        for j in range(2):
            key = f"s{i}/img{j}"
            members += [(f"{key}.jpg", png((i, j, 0))), (f"{key}.cls", f"{i * 10 + j}\n".encode())]
        paths.append(write_tar(tmp_path / f"shard-{i:06d}.tar", members))
    return tmp_path, paths


def test_tar_patterns_all_list_the_same_shards(tars):
    root, paths = tars
    forms = [
        str(root / "shard-{000000..000002}.tar"),
        str(root / "shard-*.tar"),
        ",".join(paths),
        paths,
        str(root),
    ]
    for form in forms:
        shards = list_shards(form)
        assert [s.url for s in shards] == paths, form
        assert [s.index for s in shards] == [0, 1, 2]
        assert {s.kind for s in shards} == {"webdataset"}
    recs = records(list_shards(paths))
    assert [(r.key, r.label) for r in recs] == [
        ("s0/img0", 0),
        ("s0/img1", 1),
        ("s1/img0", 10),
        ("s1/img1", 11),
        ("s2/img0", 20),
        ("s2/img1", 21),
    ]
    assert recs[3].data == png((1, 1, 0))


def test_brace_list_with_commas_is_not_split(tars):
    root, paths = tars
    shards = list_shards(str(root / "shard-{000000,000002}.tar"))
    assert [s.url for s in shards] == [paths[0], paths[2]]


def test_gzipped_tar_and_other_image_extensions(tmp_path):
    url = write_tar(
        tmp_path / "a.tar.gz",
        [("k1.webp", b"w"), ("k2.PNG", b"p"), ("k2.json", b"{}"), ("k3.jpeg", b"j")],
        gz=True,
    )
    recs = records(list_shards(url))
    assert [(r.key, r.data, r.label) for r in recs] == [
        ("k1", b"w", -1),
        ("k2", b"p", -1),
        ("k3", b"j", -1),
    ]


def test_tar_bad_members_become_error_records(tmp_path):
    url = write_tar(
        tmp_path / "bad.tar",
        [
            ("ok.jpg", b"1"),
            ("ok.cls", b"3"),
            ("text.txt", b"hello"),
            ("dup.jpg", b"2"),
            ("other.jpg", b"3"),
            ("dup.jpg", b"4"),  # same key again, not adjacent
            ("twice.jpg", b"5"),
            ("twice.jpg", b"6"),  # a type the sample has: a new sample of the same key
            ("badlabel.jpg", b"7"),
            ("badlabel.cls", b"seven"),
            ("multi.dot.name.png", b"8"),
        ],
    )
    recs = {(r.key, r.error) for r in records(list_shards(url))}
    assert recs == {
        ("ok", None),
        ("text", "no image member (has: .txt)"),
        ("dup", None),
        ("other", None),
        ("dup", DUPLICATE_IN_TAR),
        ("twice", None),  # the first one keeps the key
        ("twice", DUPLICATE_IN_TAR),
        ("badlabel", "unreadable label in .cls"),
        ("multi", None),  # WebDataset's rule: the key ends at the first dot of the name
    }
    by_key = {r.key: r for r in records(list_shards(url)) if r.error is None}
    assert by_key["ok"].label == 3 and by_key["dup"].data == b"2" and by_key["twice"].data == b"5"


def test_truncated_tar_yields_complete_records_then_raises(tmp_path):
    members = [(f"k{i}.jpg", bytes([i]) * 3000) for i in range(4)]
    full = Path(write_tar(tmp_path / "full.tar", members)).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: 512 * 3 + 3000 + 2000])  # inside the second member
    got = []
    with pytest.raises(BadShard, match=r"truncated tar after 1 members"):
        for rec in iter_shard(ImageShard(0, str(cut), "webdataset")):
            got.append(rec.key)
    assert got == ["k0"]  # k0's sample was complete once k1 started; k1 is lost

    cut.write_bytes(full[: 2 * (512 + 3072)])  # exactly between members: no end marker
    got = []
    with pytest.raises(BadShard, match="truncated tar after 2 members"):
        for rec in iter_shard(ImageShard(0, str(cut), "webdataset")):
            got.append(rec.key)
    assert got == ["k0"]

    cut.write_bytes(b"\x00junk" * 10)
    with pytest.raises(BadShard, match="unreadable tar"):
        list(iter_shard(ImageShard(0, str(cut), "webdataset")))


def test_member_names_are_never_filesystem_paths(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    target = tmp_path / f"escape-{uuid.uuid4().hex}"
    url = write_tar(
        work / "evil.tar",
        [
            ("../../etc/passwd.jpg", b"x"),
            (f"{target}.jpg", b"y"),
            ("../" + target.name + ".png", b"z"),
        ],
    )
    with tarfile.open(url, "a") as tar:  # plus a symlink member pointing outside
        info = tarfile.TarInfo("link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    before = sorted(p for p in tmp_path.rglob("*"))
    recs = records(list_shards(url))
    assert [(r.key, r.data) for r in recs] == [  # the key rule: no "..", no "/" at the start
        ("etc/passwd", b"x"),
        (image_key(str(target)), b"y"),
        (target.name, b"z"),
    ]
    assert image_key(str(target)) == str(target).lstrip("/").replace(".", "_")
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not target.with_suffix(".jpg").exists()


# ---------------------------------------------------------------- parquet


def write_parquet(path, rows, struct: bool = True, row_group_size: int = 2) -> str:
    images = [{"bytes": b, "path": p} for b, p, _ in rows]
    labels = [label for _, _, label in rows]
    if struct:
        image = pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        image = pa.array([b for b, _, _ in rows], pa.binary())
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def test_parquet_hf_layout(tmp_path):
    (tmp_path / "data").mkdir()
    a = write_parquet(
        tmp_path / "data/train-00000-of-00002.parquet",
        [(b"a", "n01_1.JPEG", 0), (b"b", "n01_2.JPEG", 1), (b"c", None, None), (None, "x.jpg", 2)],
    )
    b = write_parquet(
        tmp_path / "data/train-00001-of-00002.parquet",
        [(b"d", "n01_1.JPEG", 5), (b"e", "n01_1.JPEG", 6)],
    )
    for form in [str(tmp_path), str(tmp_path / "data"), str(tmp_path / "data/*.parquet")]:
        shards = list_shards(form)
        assert [(s.url, s.kind) for s in shards] == [(a, "parquet"), (b, "parquet")], form
    recs = records(list_shards(str(tmp_path)))
    assert recs == [
        ImageRecord("n01_1", b"a", 0),
        ImageRecord("n01_2", b"b", 1),
        ImageRecord("train-00000-of-00002/2", b"c", -1),
        ImageRecord("x", b"", 2, "no image bytes"),
        ImageRecord("n01_1", b"d", 5),  # another file: source_keys marks it (test_keys.py)
        ImageRecord("n01_1", b"", 6, DUPLICATE_IN_PARQUET),
    ]


def test_parquet_plain_binary_column_and_corrupt_file(tmp_path):
    url = write_parquet(tmp_path / "p.parquet", [(b"a", None, 3), (b"b", None, 4)], struct=False)
    recs = records(list_shards(url))
    assert [(r.key, r.data, r.label) for r in recs] == [("p/0", b"a", 3), ("p/1", b"b", 4)]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(BadShard, match="unreadable parquet"):
        list(iter_shard(ImageShard(0, str(tmp_path / "bad.parquet"), "parquet")))


# ---------------------------------------------------------------- fsspec URLs


def test_fsspec_urls_for_every_source(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"memory:///src-{uuid.uuid4().hex}"  # the memory filesystem keeps the leading /
    fs.pipe(f"{root}/folder/cls/a.png", png())
    fs.pipe(f"{root}/folder/cls/b.png", png((0, 0, 9)))
    local_tar = write_tar(tmp_path / "t.tar", [("k.jpg", b"j"), ("k.cls", b"7")])
    fs.pipe(f"{root}/tars/shard-000000.tar", Path(local_tar).read_bytes())
    local_pq = write_parquet(tmp_path / "p.parquet", [(b"q", "img.png", 1)])
    fs.pipe(f"{root}/pq/p.parquet", Path(local_pq).read_bytes())

    folder = list_shards(f"{root}/folder")
    assert folder[0].url == f"{root}/folder"
    assert [(r.key, r.label) for r in records(folder)] == [("cls/a", 0), ("cls/b", 0)]
    for form in [f"{root}/tars", f"{root}/tars/shard-{{000000..000000}}.tar", f"{root}/tars/*.tar"]:
        shards = list_shards(form)
        assert [s.url for s in shards] == [f"{root}/tars/shard-000000.tar"], form
        assert records(shards) == [ImageRecord("k", b"j", 7)]
    assert records(list_shards(f"{root}/pq")) == [ImageRecord("img", b"q", 1)]


def test_a_folder_with_several_splits_must_be_narrowed(tmp_path):
    (tmp_path / "data").mkdir()
    for split in ["train", "validation"]:
        write_parquet(tmp_path / f"data/{split}-00000-of-00001.parquet", [(b"a", None, 0)])
    with pytest.raises(ImageSourceError, match=r"several series .*images=.*train-\*"):
        list_shards(str(tmp_path))
    assert len(list_shards(str(tmp_path / "data/train-*.parquet"))) == 1

    wds = tmp_path / "wds"
    wds.mkdir()
    write_tar(wds / "imagenet1k-train-0000.tar", [("a.jpg", b"1")])
    write_tar(wds / "imagenet1k-train-0001.tar", [("b.jpg", b"2")])
    write_tar(wds / "imagenet1k-validation-00.tar", [("c.jpg", b"3")])
    with pytest.raises(ImageSourceError, match="several series"):
        list_shards(wds)
    shards = list_shards(wds / "imagenet1k-train-{0000..0001}.tar")  # a Path is fine too
    assert [r.key for r in records(shards)] == ["a", "b"]


def test_oversized_member_is_not_read(tmp_path, monkeypatch):
    import shards.archives as archives  # the tar reader, where the limit applies

    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 100)
    url = write_tar(tmp_path / "big.tar", [("big.jpg", b"x" * 101), ("ok.jpg", b"y" * 100)])
    recs = records(list_shards(url))
    assert [(r.key, r.error) for r in recs] == [
        ("big", ".jpg member too large (101 bytes)"),
        ("ok", None),
    ]


def test_truncated_gzip_tar_is_a_bad_shard(tmp_path):
    url = write_tar(
        tmp_path / "a.tar.gz", [(f"k{i}.jpg", os.urandom(5000)) for i in range(4)], gz=True
    )
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) * 3 // 4])
    got = []
    with pytest.raises(BadShard, match="truncated tar after"):
        for rec in iter_shard(ImageShard(0, url, "webdataset")):
            got.append(rec.key)
    assert got == ["k0", "k1", "k2"]  # k3 was cut


def test_record_digest_is_sha256_of_the_stored_bytes(tmp_path):
    """ImageRecord.sha256 = sha256 of the bytes as stored (file, tar member, Parquet cell)."""
    import hashlib

    data = png((9, 8, 7), (5, 6))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(data)
    write_tar(tmp_path / "t.tar", [("a.png", data)])
    table = pa.table({"image": [{"bytes": data, "path": "a.png"}], "label": [1]})
    pq.write_table(table, tmp_path / "p.parquet")
    expected = hashlib.sha256(data).hexdigest()
    for source in (tmp_path / "flat", tmp_path / "t.tar", tmp_path / "p.parquet"):
        (record,) = list(iter_shard(list_shards(str(source))[0]))
        assert record.key == "a" and record.sha256 == expected
    assert ImageRecord("k", b"", -1, "broken").sha256 == ""


def test_symlink_loop_lists_each_real_file_once(tmp_path, caplog):
    """Before listings were sound, ``c1/loop -> ..`` made 12 images ~500 rows, c2's labelled c1."""
    root = tmp_path / "imgs"
    for c in ("c1", "c2"):
        (root / c).mkdir(parents=True)
        for j in range(6):
            (root / c / f"{c}_{j}.png").write_bytes(png((j, len(c), 0)))
    os.symlink("..", root / "c1" / "loop")
    os.symlink("../c2/c2_0.png", root / "c1" / "alias.png")  # a file link inside the folder
    outside = tmp_path / "store"
    outside.mkdir()
    (outside / "far.png").write_bytes(png((7, 7, 7)))
    os.symlink(outside, root / "c2" / "shared")  # a folder link to outside: followed, once
    os.symlink(outside, root / "c2" / "shared_again")
    recs = records(list_shards(str(root), shard_size=5))
    keys = [(r.key, r.label) for r in recs]
    assert len(recs) == 13 and all(r.error is None for r in recs)
    assert keys == sorted(keys) and len({k for k, _ in keys}) == 13
    assert ("c2/shared/far", 1) in keys and not any("shared_again" in k for k, _ in keys)
    assert not any("loop" in k or "alias" in k for k, _ in keys)
    assert {label for key, label in keys if key.startswith("c2/")} == {1}
    assert "symlink cycle" in caplog.text and "c1/loop" in caplog.text


def test_key_rule_is_the_same_for_pack_and_a_folder_given_to_tokenize(tmp_path):
    """Dots, extensions and duplicates: pack's keys are the folder listing's keys."""
    from shards.pack import PackConfig, pack

    root = tmp_path / "imgs"
    (root / "a.b").mkdir(parents=True)
    names = ["a.b/x.1.JPG", "a.b/x_1.png", "a.b/y.PNG", "a.b/y.jpg", "a.b/z.tiff", "a.b/n.txt"]
    for j, name in enumerate(names):
        (root / name).write_bytes(png((j, 0, 0)))
    listed = records(list_shards(str(root), shard_size=2))
    assert [(r.key, r.error) for r in listed] == [
        ("a_b/x_1", None),
        ("a_b/x_1", "duplicate key (also a.b/x.1.JPG)"),
        ("a_b/y", None),
        ("a_b/y", "duplicate key (also a.b/y.PNG)"),
        ("a_b/z", None),
    ]
    pack(PackConfig(images=str(root), out_dir=str(tmp_path / "packed"), shard_size=2))
    packed = records(list_shards(str(tmp_path / "packed")))
    good = [(r.key, r.sha256, r.label) for r in listed if r.error is None]
    assert [(r.key, r.sha256, r.label) for r in packed] == good
