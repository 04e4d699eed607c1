"""One image shard's tokens encoded as Parquet + WebDataset files (docs/design.md §3).

Every file is built in memory (a shard is small: 256 images x 4 seeds x 196 tokens is 400 KB of
uint16) so its sha256 and size are known before ``shards.dataset.TokenDatasetDir.write_shard``
publishes it (atomically, receipt last).

Bytes are deterministic (no timestamps, fixed tar/gzip headers, sorted JSON, rows in image-shard
order), so two runs of the same job give byte-identical files.

Encodings, measured with ``benchmarks/bench_token_bytes.py`` (N=196, K=4, codebook 8192, bytes
on disk per token including keys, labels, view parameters and file overhead):

    tokens              images/shard   Parquet   WebDataset (.tar.gz)
    Zipf (1.41 B/token entropy)  256    1.69      1.96
    uniform (1.625 floor)        256    1.88      2.12
    uniform                     1024    1.79      2.12

- Parquet tokens and the small integer columns use BYTE_STREAM_SPLIT + zstd rather than a
  dictionary: a dictionary of up to 8192 tokens costs 32 KB per file, ~0.65 byte/token on a
  256-image shard, which alone breaks the 1.8 target; split byte planes compress to near the
  entropy. Low-cardinality columns (label, seed, size, interpolation, jitter order, flip) are
  dictionary encoded; everything is zstd. Each file also carries ~10 KB of footer + Arrow schema
  (needed to read tokens back as fixed_size_list<uint16>), which small shards pay most for.
- The image digest (schema version 2) costs what random bytes cost: 32 bytes per row in each
  seed's Parquet file (binary, ~0.17 byte/token at N=196, K=4, 256 images) and 64 hex characters
  per image in the tar (gzip halves them: ~0.08 byte/token), measured against constant digests
  with the same rows; the table above predates it.
- WebDataset shards are gzip'd tars (``tokens-<i>.tar.gz``, which ``webdataset`` reads natively):
  a plain tar spends a 512-byte header per member plus padding to 512 bytes, ~4.6 bytes/token for
  the 3 members holding 784 tokens, far above the 2.3 target; gzip removes headers and padding.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards import schema
from shards.tarfiles import add_member

if TYPE_CHECKING:
    from shards.views import ViewParams

ZSTD_LEVEL = 19  # 22 measured no smaller; a 50K-token file takes milliseconds at 19
GZIP_LEVEL = 9


@dataclass
class TokenRow:
    """One image's tokens at every seed, with the views they were computed from."""

    key: str
    label: int
    views: list[ViewParams]  # one per seed, in the dataset's seed order
    tokens: np.ndarray  # uint16 [K, N], row-major over the patch grid
    # sha256 hex of the image's stored bytes as read from the source, before decode
    # (shards.records.ImageRecord.sha256): binds the row to the pixels it was rendered from
    image_sha256: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_rows(
    rows: Sequence[TokenRow], seeds: Sequence[int], num_tokens: int, codebook_size: int | None
) -> None:
    """Refuse rows that would make an inconsistent shard, naming the row and what is wrong."""
    seen: set[str] = set()
    for row in rows:
        if not row.key or "." in row.key:
            # WebDataset splits a member name at the key's first dot: a dotted key would break it.
            raise ValueError(f"token row key {row.key!r} is empty or contains '.'; keys must not")
        if row.key in seen:
            raise ValueError(
                f"duplicate key {row.key!r} in one shard; record duplicates as skipped"
            )
        seen.add(row.key)
        if not schema.is_digest(row.image_sha256):
            raise ValueError(
                f"token row {row.key!r} has image_sha256={row.image_sha256!r}; every row needs the "
                "sha256 hex of its image bytes (shards.records.ImageRecord.sha256)"
            )
        tokens = np.asarray(row.tokens)
        if tokens.shape != (len(seeds), num_tokens):
            raise ValueError(
                f"tokens of {row.key!r} have shape {tokens.shape}, expected "
                f"[seeds={len(seeds)}, tokens={num_tokens}]"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= (codebook_size or 65536)):
            raise ValueError(
                f"tokens of {row.key!r} span [{tokens.min()}, {tokens.max()}], outside "
                f"[0, {codebook_size or 65536})"
            )
        view_seeds = [int(v.seed) for v in row.views]
        if view_seeds != [int(s) for s in seeds]:
            raise ValueError(
                f"views of {row.key!r} have seeds {view_seeds}, expected {list(seeds)}"
            )


def parquet_bytes(
    rows: Sequence[TokenRow], seed_position: int, num_tokens: int, metadata: dict[bytes, bytes]
) -> bytes:
    """The Parquet file of one seed (``seed_position`` indexes the row's views/tokens)."""
    table_schema = schema.arrow_schema(num_tokens, metadata)
    columns: dict[str, list] = {name: [] for name in schema.COLUMNS if name != schema.TOKENS}
    for row in rows:
        columns[schema.KEY].append(row.key)
        columns[schema.LABEL].append(int(row.label))
        columns[schema.IMAGE_SHA256].append(bytes.fromhex(row.image_sha256))
        for name, value in schema.view_to_row(row.views[seed_position]).items():
            columns[name].append(value)
    tokens = (
        np.stack([np.asarray(r.tokens[seed_position]) for r in rows])
        if rows
        else np.zeros((0, num_tokens))
    )
    flat = pa.array(tokens.astype(np.uint16).reshape(-1), type=pa.uint16())  # [R * N]
    arrays = []
    for field in table_schema:
        if field.name == schema.TOKENS:
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, num_tokens))
        else:
            arrays.append(pa.array(columns[field.name], type=field.type))
    table = pa.Table.from_arrays(arrays, schema=table_schema)
    options = dict(
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        write_statistics=[schema.KEY, schema.LABEL, schema.SEED],
    )
    sink = pa.BufferOutputStream()
    try:
        pq.write_table(
            table,
            sink,
            use_dictionary=list(schema.DICTIONARY_COLUMNS),
            use_byte_stream_split=list(schema.BYTE_STREAM_SPLIT_COLUMNS),
            **options,
        )
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        # pyarrow < 17 has no BYTE_STREAM_SPLIT for integers: fall back to dictionaries (bigger).
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, use_dictionary=True, **options)
    return sink.getvalue().to_pybytes()


def wds_bytes(rows: Sequence[TokenRow]) -> bytes:
    """The gzip'd WebDataset tar of one shard: per image ``.tokens.npy`` [K, N], ``.views.json``,
    ``.sha256`` and ``.cls``."""
    raw = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of run-specific bytes.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for row in rows:
            npy = io.BytesIO()
            np.save(npy, np.ascontiguousarray(row.tokens, dtype="<u2"), allow_pickle=False)
            views = json.dumps(schema.views_to_json(row.views), separators=(",", ":"))
            add_member(tar, f"{row.key}.{schema.WDS_TOKENS}", npy.getvalue())
            add_member(tar, f"{row.key}.{schema.WDS_VIEWS}", views.encode())
            add_member(tar, f"{row.key}.{schema.WDS_IMAGE_SHA256}", row.image_sha256.encode())
            add_member(tar, f"{row.key}.{schema.WDS_LABEL}", str(int(row.label)).encode())
    return raw.getvalue()


def shard_files(
    shard_index: int,
    num_shards: int,
    seeds: Sequence[int],
    rows: Sequence[TokenRow],
    formats: Sequence[str] = schema.FORMATS,
    tokenizer: dict | None = None,
    num_tokens: int | None = None,
) -> tuple[int, list[tuple[dict, bytes]]]:
    """The token files of image shard ``shard_index``: (tokens per view, [(receipt entry, bytes)]).

    rows: in image-shard order (never sorted: token shard i aligns with image shard i).
    tokenizer: Tokenizer.describe() (fingerprint, codebook_size, grid); stored in every file's
        footer and used to range-check tokens.
    num_tokens: tokens per view, needed only when ``rows`` is empty and ``tokenizer`` has no grid.
    Each entry has the file's ``path``, ``format``, ``seed``, ``rows``, ``size`` and ``sha256``.
    """
    unknown = set(formats) - set(schema.FORMATS)
    if unknown:
        raise ValueError(
            f"unknown token formats {sorted(unknown)}; choose from {list(schema.FORMATS)}"
        )
    tokenizer = tokenizer or {}
    grid = tokenizer.get("grid")
    if rows:
        num_tokens = int(np.asarray(rows[0].tokens).shape[-1])
    elif num_tokens is None and grid:
        num_tokens = int(grid[0]) * int(grid[1])
    if num_tokens is None:
        raise ValueError("a shard without rows needs num_tokens= or tokenizer= with a grid")
    codebook_size = tokenizer.get("codebook_size")
    _check_rows(rows, seeds, num_tokens, codebook_size)
    metadata = schema.schema_metadata(num_tokens, codebook_size, grid, tokenizer.get("fingerprint"))
    outputs: list[tuple[dict, bytes]] = []
    if schema.FORMAT_PARQUET in formats:
        for position, seed in enumerate(seeds):
            entry = {
                "path": schema.parquet_path(seed, shard_index, num_shards),
                "format": schema.FORMAT_PARQUET,
                "seed": int(seed),
                "rows": len(rows),
            }
            outputs.append((entry, parquet_bytes(rows, position, num_tokens, metadata)))
    if schema.FORMAT_WEBDATASET in formats:
        entry = {
            "path": schema.wds_path(shard_index),
            "format": schema.FORMAT_WEBDATASET,
            "seed": None,
            "rows": len(rows),
        }
        outputs.append((entry, wds_bytes(rows)))
    files = [({**e, "size": len(data), "sha256": _sha256(data)}, data) for e, data in outputs]
    return num_tokens, files
