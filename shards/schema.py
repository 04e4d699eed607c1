"""The token dataset schema: columns, dtypes, metadata keys and on-disk names (docs/design.md §3).

This is the only module that spells a column name, a metadata key or a file name of the token
dataset; writers, readers, the validator and the dataset card all import it. Bump
``SCHEMA_VERSION`` whenever a column, dtype or layout changes: readers refuse other versions.

One Parquet row = one (image, seed): key, label, seed, the image digest, the token ids of that view
(row-major over the tokenizer's patch grid) and the resolved view parameters (docs/design.md §2), so
stage 3 re-applies the exact view instead of re-sampling it. The WebDataset form keeps all seeds of
an image in one sample: ``<key>.tokens.npy`` (uint16 [K, N]), ``<key>.views.json`` (the view
parameters as columns over the seeds), ``<key>.sha256`` (the image digest, 64 hex ASCII
characters) and ``<key>.cls`` (the label).

The image digest binds a row to the pixels it was rendered from: sha256 over the stored bytes of
the image exactly as read from the source, before decode (the tar member's payload, the file's
contents, the Parquet ``image.bytes`` cell; ``shards.records.ImageRecord.sha256``). Parquet stores
the 32 raw digest bytes (``fixed_size_binary(32)``: half the size of hex, and random bytes do not
compress); readers hand it out as lower-case hex.

Version history: 1 = no image digest; 2 = ``image_sha256`` column / ``.sha256`` member. A version-1
dataset cannot be verified against its images: tokenize the images again (stage 2) to read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from shards.views import ViewParams

SCHEMA_VERSION = 2
# What a reader of another version is told (a version-1 dataset has no image digests).
REGENERATE = (
    "rerun stage 2 with this version (`pipeline run stage=tokenize images=... tokenizer=... "
    "out_dir=<a fresh folder>`) and point stage 3 at the new token dataset"
)

# Columns. The ViewParams columns carry the same names as the dataclass fields.
KEY = "key"
LABEL = "label"  # -1 when unknown
SEED = "seed"
IMAGE_SHA256 = "image_sha256"  # sha256 of the image's stored bytes (fixed_size_binary(32))
TOKENS = "tokens"  # fixed_size_list<uint16>[N], row-major over the patch grid
WIDTH = "width"  # original size after EXIF transpose
HEIGHT = "height"
TOP = "top"  # crop box in original pixels
LEFT = "left"
CROP_HEIGHT = "crop_height"
CROP_WIDTH = "crop_width"
FLIP = "flip"
BRIGHTNESS = "brightness"  # colour-jitter factors, 1.0 = unchanged
CONTRAST = "contrast"
SATURATION = "saturation"
JITTER_ORDER = "jitter_order"  # "0,2,1" = brightness, saturation, contrast; "" = no jitter
SIZE = "size"  # output side in pixels
INTERPOLATION = "interpolation"  # "bicubic" | "bilinear"

# The ViewParams fields stored as columns, in ViewParams order (seed is its own column above).
VIEW_COLUMNS: tuple[str, ...] = (
    WIDTH,
    HEIGHT,
    TOP,
    LEFT,
    CROP_HEIGHT,
    CROP_WIDTH,
    FLIP,
    BRIGHTNESS,
    CONTRAST,
    SATURATION,
    JITTER_ORDER,
    SIZE,
    INTERPOLATION,
)
COLUMNS: tuple[str, ...] = (KEY, LABEL, SEED, IMAGE_SHA256, TOKENS, *VIEW_COLUMNS)

# Columns whose values repeat a lot within a shard: Parquet dictionary-encodes these.
DICTIONARY_COLUMNS: tuple[str, ...] = (LABEL, SEED, SIZE, INTERPOLATION, JITTER_ORDER, FLIP)
# The leaf column of the token lists, as Parquet names it (for per-column encodings).
TOKENS_LEAF = f"{TOKENS}.list.element"
# Integer columns Parquet stores BYTE_STREAM_SPLIT (byte planes compress better than a dictionary
# of up to 8192 values per small file; see shards/writer.py for the measurements).
BYTE_STREAM_SPLIT_COLUMNS: tuple[str, ...] = (
    TOKENS_LEAF,
    WIDTH,
    HEIGHT,
    TOP,
    LEFT,
    CROP_HEIGHT,
    CROP_WIDTH,
)

# Schema-level metadata (bytes keys in the Parquet footer; also the manifest's top-level keys).
META_SCHEMA_VERSION = b"beitv2.schema_version"
META_FINGERPRINT = b"beitv2.tokenizer_fingerprint"
META_CODEBOOK_SIZE = b"beitv2.codebook_size"
META_GRID = b"beitv2.grid"  # JSON [rows, cols]
META_NUM_TOKENS = b"beitv2.num_tokens"

# On-disk layout, relative to the dataset root.
MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
PARQUET_DIR = "parquet"
WDS_DIR = "wds"
RECEIPTS_DIR = "receipts"
PARQUET_GLOB = f"{PARQUET_DIR}/{SEED}=*/*.parquet"
# Named token sets (other tokenizers' targets for the same views): token_sets/<name>/ is a whole
# token dataset of this layout (shards.token_sets).
TOKEN_SETS_DIR = "token_sets"
TOKEN_SET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# WebDataset member extensions (the part after the key's first dot).
WDS_TOKENS = "tokens.npy"  # uint16 [K, N]: all seeds of one image in one member
WDS_VIEWS = "views.json"  # {"seed": [...], "width": [...], ...}: one list per column over seeds
WDS_LABEL = "cls"  # ASCII integer
WDS_IMAGE_SHA256 = "sha256"  # the image digest as 64 lower-case hex ASCII characters
WDS_EXTENSIONS: tuple[str, ...] = (WDS_TOKENS, WDS_VIEWS, WDS_IMAGE_SHA256, WDS_LABEL)
DIGEST_BYTES = 32

# Manifest / receipt format names.
FORMAT_PARQUET = "parquet"
FORMAT_WEBDATASET = "webdataset"
FORMATS: tuple[str, ...] = (FORMAT_PARQUET, FORMAT_WEBDATASET)


def arrow_schema(num_tokens: int, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """The Parquet/Arrow schema of one token file with ``num_tokens`` tokens per view.

    The crop box and sizes are int32 and the jitter factors float64: float64 keeps the sampled
    factors exact, so stage 3 rebuilds bit-identical pixels (float32 would round them).
    """
    fields = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(LABEL, pa.int32(), nullable=False),
        pa.field(SEED, pa.int32(), nullable=False),
        pa.field(IMAGE_SHA256, pa.binary(DIGEST_BYTES), nullable=False),
        pa.field(TOKENS, pa.list_(pa.uint16(), num_tokens), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(TOP, pa.int32(), nullable=False),
        pa.field(LEFT, pa.int32(), nullable=False),
        pa.field(CROP_HEIGHT, pa.int32(), nullable=False),
        pa.field(CROP_WIDTH, pa.int32(), nullable=False),
        pa.field(FLIP, pa.bool_(), nullable=False),
        pa.field(BRIGHTNESS, pa.float64(), nullable=False),
        pa.field(CONTRAST, pa.float64(), nullable=False),
        pa.field(SATURATION, pa.float64(), nullable=False),
        pa.field(JITTER_ORDER, pa.string(), nullable=False),
        pa.field(SIZE, pa.int32(), nullable=False),
        pa.field(INTERPOLATION, pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)


def schema_metadata(
    num_tokens: int,
    codebook_size: int | None = None,
    grid: Sequence[int] | None = None,
    fingerprint: str | None = None,
) -> dict[bytes, bytes]:
    """The footer metadata every token file carries (unknown values are left out)."""
    meta = {
        META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(),
        META_NUM_TOKENS: str(num_tokens).encode(),
    }
    if codebook_size is not None:
        meta[META_CODEBOOK_SIZE] = str(int(codebook_size)).encode()
    if grid is not None:
        meta[META_GRID] = json.dumps([int(g) for g in grid]).encode()
    if fingerprint:
        meta[META_FINGERPRINT] = fingerprint.encode()
    return meta


def is_digest(text: object) -> bool:
    """Whether ``text`` is a sha256 digest as this schema spells it: 64 lower-case hex characters."""
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


_DIGEST = re.compile(r"[0-9a-f]{64}")


def jitter_order_to_str(order: Sequence[int]) -> str:
    """(0, 2, 1) -> "0,2,1"; () -> ""."""
    return ",".join(str(int(i)) for i in order)


def jitter_order_from_str(text: str) -> tuple[int, ...]:
    """ "0,2,1" -> (0, 2, 1); "" -> ()."""
    return tuple(int(i) for i in text.split(",")) if text else ()


def view_to_row(view: ViewParams) -> dict[str, Any]:
    """ViewParams -> the column values of one Parquet row (seed included, key/label/tokens not)."""
    return {
        SEED: int(view.seed),
        WIDTH: int(view.width),
        HEIGHT: int(view.height),
        TOP: int(view.top),
        LEFT: int(view.left),
        CROP_HEIGHT: int(view.crop_height),
        CROP_WIDTH: int(view.crop_width),
        FLIP: bool(view.flip),
        BRIGHTNESS: float(view.brightness),
        CONTRAST: float(view.contrast),
        SATURATION: float(view.saturation),
        JITTER_ORDER: jitter_order_to_str(view.jitter_order),
        SIZE: int(view.size),
        INTERPOLATION: str(view.interpolation),
    }


def views_to_json(views: Sequence[ViewParams]) -> dict[str, list]:
    """All seeds' views of one image -> the ``views.json`` member: one list per column, seed order."""
    rows = [view_to_row(v) for v in views]
    return {name: [r[name] for r in rows] for name in (SEED, *VIEW_COLUMNS)}


def parquet_path(seed: int, shard_index: int, num_shards: int) -> str:
    """Relative path of the Parquet file of one (seed, image shard): Hive-partitioned by seed."""
    return f"{PARQUET_DIR}/{SEED}={seed}/train-{shard_index:05d}-of-{num_shards:05d}.parquet"


def wds_path(shard_index: int) -> str:
    """Relative path of the WebDataset tar aligned with image shard ``shard_index`` (gzip'd tar)."""
    return f"{WDS_DIR}/tokens-{shard_index:06d}.tar.gz"


def receipt_path(shard_index: int) -> str:
    """Relative path of the receipt that marks image shard ``shard_index`` done."""
    return f"{RECEIPTS_DIR}/shard-{shard_index:06d}.json"
