"""The records of an image source: shards, images, and the error of an unreadable shard."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Literal

# Extensions recognised as images in folders and tars (lower case; torchvision's list + gif).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# A single tar member larger than this is not read into memory (reported as an error record).
MAX_MEMBER_BYTES = 256 * 2**20
# index.json written by ``stage=pack`` (shards.pack.INDEX_FORMAT): lists its shards in order.
PACK_INDEX_FORMAT = "beitv2-image-shards"

Kind = Literal["folder", "webdataset", "parquet"]


class BadShard(Exception):
    """A whole shard cannot be read (truncated or unreadable tar/parquet); str(err) says why."""


@dataclass(frozen=True)
class ImageShard:
    """One unit of work: a tar, a parquet file, or a slice of a folder's sorted files."""

    index: int  # position in the source's shard list (0..n-1), stable
    url: str  # the tar/parquet file, or the folder for folder sources
    kind: Kind
    keys: tuple[str, ...] = ()  # folder sources only: the keys of this shard, in order
    files: tuple[str, ...] = ()  # folder sources only: relative file path of each key
    labels: tuple[int, ...] = ()  # folder sources only: label of each key (-1 = none)
    # folder sources only: "" or why the key is skipped (a duplicate, a hidden file), one per
    # key; () = none
    errors: tuple[str, ...] = ()
    # (key, the earlier shard that has it) for each key of this shard that an earlier shard of
    # the source already has: skipped (shards.images.source_keys, the duplicate rule)
    duplicates: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """``shard-000003`` for index 3."""
        return f"shard-{self.index:06d}"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a shard: its key, encoded bytes and label (or why it is not an image)."""

    key: str
    data: bytes  # b"" when error is set
    label: int  # -1 when unknown
    error: str | None = None

    @functools.cached_property
    def sha256(self) -> str:
        """The image digest every row of a token dataset carries (docs/design.md §3).

        Lower-case hex sha256 of :attr:`data`: the stored bytes of the image exactly as read from
        the source, before any decode: the tar member's payload, the file's contents, or the
        Parquet cell (``image.bytes``). A consumer recomputes it with
        ``hashlib.sha256(open(file, "rb").read()).hexdigest()``. "" for an error record.
        """
        return hashlib.sha256(self.data).hexdigest() if self.error is None else ""
