"""``pipeline run stage=pack``: write WebDataset image shards from any image source.

Output (``out_dir``): ``config.yaml``, ``shard-000000.tar`` ... and ``index.json``. Each tar holds,
per image in source order, ``<key>.<ext>`` (the original bytes; ``ext`` from the bytes' format:
jpg, png, webp, ...) and ``<key>.cls`` (the label as text) when the label is known, so any
WebDataset reader gets ``(jpg, cls)`` pairs the ImageNet way. The tars are byte-identical across
runs: sorted keys (the source order), mtime 0, uid/gid 0, empty user/group names, mode 0644, PAX
format. Each tar is written to a temporary name and renamed, and ``index.json`` (per shard: file,
count, sha256 of the keys, sha256 and size of the tar) is written last, so a reader that finds
``index.json`` finds complete shards.

Records the source reports as errors (no image member, a duplicate key, a hidden file, ...) are
skipped and listed in ``index.json``; image bytes are not decoded here (stage 2 decodes and lists
bad images). Keys follow the one key rule of ``shards.images`` (the same for a folder given to
``stage=tokenize``), so every member name is a safe relative path: ``/abs/y.jpg`` is packed as
``abs/y.jpg``, ``../x.jpg`` as ``x.jpg``, a dot in a name becomes ``_`` (``img.001.png`` ->
``img_001``); each name the rule changed is listed in ``index.json`` (``renamed``: key -> the
name in the source), and a key that an earlier source shard has is skipped (one key, one image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
from tqdm import tqdm

from engine.atomic import publish
from engine.config import Count, StageConfig, save_config
from engine.errors import ConfigError
from engine.layout import DEMO, RUNS
from engine.lock import check_output, hold
from shards.records import PACK_INDEX_FORMAT, BadShard, ImageShard
from shards.tarfiles import add_member

log = logging.getLogger(__name__)

INDEX_FORMAT = PACK_INDEX_FORMAT
INDEX_VERSION = 1


@dataclass(frozen=True)
class PackConfig(StageConfig):
    """Pack an image source into WebDataset tars of ``shard_size`` images."""

    images: str = ""  # folder, tars or parquet files (local or fsspec URL)
    out_dir: str = RUNS.pack
    shard_size: Count = 256  # images per tar

    presets: ClassVar[dict[str, dict]] = {"demo": {"images": DEMO.corpus, "out_dir": DEMO.pack}}


def pack(cfg: PackConfig) -> dict[str, Any]:
    """Write ``out_dir/shard-{i:06d}.tar`` and ``out_dir/index.json``; return a summary.

    Returns:
        ``{"out_dir", "index", "shards", "images", "skipped", "skipped_examples", "renamed",
        "bad_shards", "exit_code"}``; ``exit_code`` is 1 when a source shard could not be read
        to the end (its readable records are still packed).
    """
    from shards.images import list_shards  # pyarrow: not for --help

    if not cfg.images:
        raise ConfigError(
            "images= is required: pass a folder of images, tar shards or parquet files"
        )
    # every check before anything is written: a refused run leaves out_dir as it was
    check_output(cfg.out_dir, "the image shards")
    sources = list_shards(cfg.images, shard_size=cfg.shard_size)
    with hold(cfg.out_dir):
        return _pack(cfg, sources)


def _pack(cfg: PackConfig, sources: list[ImageShard]) -> dict[str, Any]:
    """Write the shards and ``index.json`` of ``sources`` (the run holds ``out_dir``)."""
    from shards.images import iter_shard, list_classes, source_keys  # pyarrow: not for --help

    listing = source_keys(sources)  # one key, one image across the source's shards
    fs, out = fsspec.core.url_to_fs(cfg.out_dir)
    fs.makedirs(out, exist_ok=True)
    save_config(cfg, posixpath.join(cfg.out_dir.rstrip("/"), "config.yaml"))

    total = sum(len(s.keys) for s in sources) if sources[0].kind == "folder" else None
    writer = _ShardWriter(fs, out, cfg.shard_size)
    skipped: list[dict[str, str]] = []
    renamed = {key: name for name, key in listing.renamed}
    bad_shards: list[dict[str, str]] = []
    with tqdm(total=total, unit="img", desc="pack", dynamic_ncols=True) as bar:
        for source in listing.shards:
            records = iter_shard(source)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except BadShard as err:
                    log.warning("%s: %s", source.url, err)
                    bad_shards.append({"url": source.url, "reason": str(err)})
                    break
                bar.update(1)
                if record.error is not None:
                    skipped.append({"key": record.key, "reason": record.error})
                    continue
                writer.add(record.key, record.data, record.label)
    shards = writer.close()
    _remove_stale(fs, out, len(shards))

    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "source": cfg.images,
        "shard_size": cfg.shard_size,
        "images": sum(s["count"] for s in shards),
        "classes": list(list_classes(cfg.images)) if sources[0].kind == "folder" else [],
        "shards": shards,
        "skipped": skipped,
        "renamed": renamed,
        "bad_shards": bad_shards,
    }
    index_path = posixpath.join(out, "index.json")
    publish(fs, index_path, (json.dumps(index, indent=1) + "\n").encode())
    if skipped:
        log.warning("skipped %d records; see %s", len(skipped), index_path)
    return {
        "out_dir": cfg.out_dir,
        "index": posixpath.join(cfg.out_dir, "index.json"),
        "shards": len(shards),
        "images": index["images"],
        "skipped": len(skipped),
        "skipped_examples": [f"{s['key']}: {s['reason']}" for s in skipped[:10]],
        "renamed": len(renamed),
        "bad_shards": bad_shards,
        "exit_code": 1 if bad_shards else 0,
    }


def image_extension(data: bytes) -> str:
    """The extension for encoded bytes, from their magic number ("jpg" when unknown, so the
    member still reaches stage 2, which lists it as not an image rather than losing it)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "jpg"


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


class _ShardWriter:
    """Streams records into deterministic tars of ``shard_size`` images, one tar at a time."""

    def __init__(self, fs: Any, out: str, shard_size: int) -> None:
        self.fs, self.out, self.shard_size = fs, out, shard_size
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None
        self._hashing: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._keys: list[str] = []
        self._labeled = 0

    @property
    def _name(self) -> str:
        return f"shard-{len(self.shards):06d}.tar"

    def add(self, key: str, data: bytes, label: int) -> None:
        if self._tar is None:
            self._file = self.fs.open(_tmp_path(posixpath.join(self.out, self._name)), "wb")
            self._hashing = _HashingFile(self._file)
            # "w|" (stream mode) only needs write(): works on object-store files too
            self._tar = tarfile.open(  # noqa: SIM115 (closed in _flush)
                fileobj=self._hashing, mode="w|", format=tarfile.PAX_FORMAT
            )
            self._keys, self._labeled = [], 0
        self._member(f"{key}.{image_extension(data)}", data)
        if label >= 0:
            self._member(f"{key}.cls", str(label).encode())
            self._labeled += 1
        self._keys.append(key)
        if len(self._keys) == self.shard_size:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._flush()
        return self.shards

    def _member(self, name: str, data: bytes) -> None:
        add_member(self._tar, name, data)

    def _flush(self) -> None:
        self._tar.close()
        self._file.close()
        path = posixpath.join(self.out, self._name)
        self.fs.mv(_tmp_path(path), path)
        self.shards.append(
            {
                "file": self._name,
                "count": len(self._keys),
                "labeled": self._labeled,
                "first_key": self._keys[0],
                "last_key": self._keys[-1],
                "keys_sha256": hashlib.sha256("\n".join(self._keys).encode()).hexdigest(),
                "sha256": self._hashing.sha.hexdigest(),
                "bytes": self._hashing.bytes,
            }
        )
        self._tar = self._file = self._hashing = None


def _tmp_path(path: str) -> str:
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")


def _remove_stale(fs: Any, out: str, count: int) -> None:
    """Delete shard-NNNNNN.tar files a previous, larger pack left beyond this run's count."""
    for path in fs.glob(posixpath.join(out, "shard-*.tar")):
        stem = posixpath.basename(path)[len("shard-") : -len(".tar")]
        if stem.isdigit() and len(stem) == 6 and int(stem) >= count:
            log.info("removing stale %s from an earlier pack", path)
            fs.rm(path)
