"""The one key rule: safe names for every source, one image per key, hidden files listed.

Hostile member names (absolute, ``..``, ``./``, ``a//b``, backslashes) must come out of every
source as the same safe keys, and every tar pack writes must extract with Python's ``data``
filter; a key in two tars belongs to the first; hidden files are skip records, not lost.
"""

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards.archives import tar_names
from shards.folders import image_key
from shards.images import iter_shard, list_shards, source_keys
from shards.pack import PackConfig, pack
from shards.tarfiles import member_names

HOSTILE = {  # name in the source -> key
    "/abs/y": "abs/y",
    "../../etc/x": "etc/x",
    "./dot/a": "dot/a",
    "a//b": "a/b",
    "c\\d": "c/d",
    "e/./f/../g": "e/f/g",
    "n01.v2/img": "n01_v2/img",
}


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (shade, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> str:
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def records(shards) -> list[tuple[str, bytes, str | None]]:
    return [(r.key, r.data, r.error) for s in shards for r in iter_shard(s)]


def assert_extracts_safely(tar_path: Path, dest: Path) -> list[str]:
    """Extract with the ``data`` filter (it refuses a member that would land outside ``dest``);
    every member name is already a plain relative path, so nothing is rewritten either."""
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    for name in names:
        parts = name.split("/")
        assert not name.startswith("/") and "\\" not in name, name
        assert all(p not in ("", ".", "..") for p in parts), name
        assert (dest / name).is_file() and (dest / name).resolve().is_relative_to(dest.resolve())
    return names


def test_the_rule_gives_safe_keys_and_is_idempotent():
    for name, key in HOSTILE.items():
        assert image_key(name) == key, name
    assert image_key("c\\..\\..\\d") == "c/d" and image_key("a.b/c.d") == "a_b/c_d"
    assert image_key("..") == image_key("/") == image_key("./") == ""
    rng = random.Random(0)
    alphabet = ["/", "\\", ".", "..", "a", "b.c", ""]
    for _ in range(2000):
        key = image_key("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))))
        assert image_key(key) == key
        assert "." not in key and "\\" not in key
        assert key == "" or all(part for part in key.split("/"))


def test_hostile_names_in_a_tar_are_packed_as_safe_keys(tmp_path):
    members = []
    for i, name in enumerate(HOSTILE):
        members += [(f"{name}.png", png(i)), (f"{name}.cls", str(i).encode())]
    members.append(("\\\\.png", png(99)))  # nothing left of the name: skipped, not packed
    src = write_tar(tmp_path / "hostile.tar", members)
    assert records(list_shards(src)) == [
        *((key, png(i), None) for i, key in enumerate(HOSTILE.values())),
        ("", b"", "no key: the key rule leaves nothing of the name '\\\\\\\\'"),
    ]

    out = tmp_path / "packed"
    summary = pack(PackConfig(images=src, out_dir=str(out)))
    assert (summary["images"], summary["skipped"], summary["renamed"]) == (7, 1, 7)
    index = json.loads((out / "index.json").read_text())
    assert index["renamed"] == {key: name for name, key in HOSTILE.items()}
    names = assert_extracts_safely(out / "shard-000000.tar", tmp_path / "x")
    assert names == [f"{key}.{ext}" for key in HOSTILE.values() for ext in ("png", "cls")]
    assert [k for k, *_ in records(list_shards(str(out)))] == list(HOSTILE.values())


def test_hostile_names_in_parquet_and_a_folder_follow_the_same_rule(tmp_path):
    image = pa.array(
        [{"bytes": png(i), "path": f"{name}.JPEG"} for i, name in enumerate(HOSTILE)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": image}), tmp_path / "train-00000-of-00001.parquet")
    listed = source_keys(list_shards(str(tmp_path / "train-00000-of-00001.parquet")))
    assert listed.keys == [list(HOSTILE.values())]
    assert listed.renamed == [(name, key) for name, key in HOSTILE.items() if name != key]

    folder = tmp_path / "folder"  # a file can hold a backslash and dots, not a '..' component
    for i, name in enumerate(["a\\b.png", "c.d.e.png", "plain.png"]):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(i))
    out = tmp_path / "packed"
    summary = pack(PackConfig(images=str(folder), out_dir=str(out)))
    assert summary["renamed"] == 2
    assert assert_extracts_safely(out / "shard-000000.tar", tmp_path / "x") == [
        "a/b.png",
        "c_d_e.png",
        "plain.png",
    ]


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_a_key_in_two_tars_belongs_to_the_first(tmp_path, order):
    """Both orders: the first tar's pixels win, the second is a skip naming the first."""
    tars = {
        "a": write_tar(tmp_path / "a.tar", [("k/a.png", png(1)), ("k/only_a.png", png(2))]),
        "b": write_tar(tmp_path / "b.tar", [("k/a.png", png(3)), ("k/only_b.png", png(4))]),
    }
    first, second = order
    listed = source_keys(list_shards([tars[first], tars[second]]))
    assert listed.keys == [["k/a", f"k/only_{first}"], [f"k/only_{second}"]]
    assert listed.shards[1].duplicates == (("k/a", f"shard-000000, {first}.tar"),)
    assert records(listed.shards)[2] == (
        "k/a",
        b"",
        f"duplicate key (first in shard-000000, {first}.tar)",
    )

    out = tmp_path / f"packed-{order}"
    pack(PackConfig(images=f"{tars[first]},{tars[second]}", out_dir=str(out)))
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == [
        {"key": "k/a", "reason": f"duplicate key (first in shard-000000, {first}.tar)"}
    ]
    packed = {k: data for k, data, _ in records(list_shards(str(out)))}
    assert packed["k/a"] == png(1 if first == "a" else 3)


def test_a_sample_repeating_a_type_starts_a_new_one(tmp_path):
    """``a.jpg`` twice in a row (a tar appended to) is two samples of one key, as WebDataset
    groups them: the first keeps the key; the listing agrees with the reader."""
    src = write_tar(
        tmp_path / "t.tar",
        [
            ("a.png", png(1)),
            ("a.cls", b"1"),
            ("a.png", png(2)),
            ("/a.png", png(3)),
            ("b.png", png(4)),
        ],
    )
    got = records(list_shards(src))
    assert [(k, e is None) for k, _, e in got] == [
        ("a", True),
        ("a", False),
        ("a", False),
        ("b", True),
    ]
    assert got[0][1] == png(1)
    assert tar_names(src) == [("a", "a"), ("b", "b")]


def test_hidden_files_are_skip_records_in_pack(tmp_path):
    root = tmp_path / "imgs"
    for rel in ["cat/a.png", "cat/.b.png", ".thumbs/cat/c.png", ".hidden.png", "dog/d.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png(len(rel)))
    (root / ".DS_Store").write_bytes(b"not an image: not listed at all")
    out = tmp_path / "packed"
    summary = pack(PackConfig(images=str(root), out_dir=str(out)))
    assert (summary["images"], summary["skipped"]) == (2, 3)
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"]  # a hidden folder is no class
    assert sorted(s["key"] for s in index["skipped"]) == ["_hidden", "_thumbs/cat/c", "cat/_b"]
    assert {s["reason"] for s in index["skipped"]} == {"hidden file"}


def test_header_listing_equals_tarfile(tmp_path):
    long = "d" * 120 + "/" + "n" * 120  # a pax path record
    members = [(f"{long}.png", b"1"), ("x/y.cls", b"2"), ("z.png", b"3" * 700)]
    for gz in (False, True):
        path = tmp_path / f"t{int(gz)}.tar"
        write_tar(path, members, gz=gz)
        if not gz:
            with tarfile.open(path, "a") as tar:
                folder = tarfile.TarInfo("folder")
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)  # not a file: not listed
        with open(path, "rb") as f:
            assert member_names(f) == [name for name, _ in members]
    data = (tmp_path / "t0.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1500])  # cut inside a member: tarfile says so
    with open(tmp_path / "cut.tar", "rb") as f, pytest.raises(tarfile.TarError):
        member_names(f)
