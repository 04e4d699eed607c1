"""Read a finished token dataset's shards back as TokenRows, checking it before anything is yielded.

Stage 3 calls ``open_token_dataset(path).check(...)`` with its tokenizer and model facts; a dataset
made for another tokenizer, codebook or patch grid is refused with both values named (docs/design.md §3).
The directory itself is read through ``shards.dataset.TokenDatasetDir``; the receipts a reader
uses are the manifest's copies, and a shard without one is refused (``MissingShards``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards import schema
from shards.dataset import TokenDatasetDir
from shards.errors import CorruptTokenShard, MissingShards, TokenDatasetMismatch, rerun_stage2
from shards.manifest import seal_problem
from shards.tarfiles import read_members
from shards.views import ViewParams
from shards.writer import TokenRow

GZIP_MAGIC = b"\x1f\x8b"


def open_token_dataset(path: str) -> TokenDataset:
    """Open the token dataset at ``path`` (local or fsspec URL) from its manifest.json."""
    folder = TokenDatasetDir(path)
    name = folder.url_of(schema.MANIFEST_NAME)
    try:
        manifest = folder.manifest()
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise CorruptTokenShard(rerun_stage2(path, f"{name} is not valid JSON ({err})")) from None
    if manifest is None:
        raise MissingShards(
            folder.not_a_dataset()
            or f"no {schema.MANIFEST_NAME} in token dataset {path}; the tokenize stage writes it "
            "at the end: rerun `pipeline run stage=tokenize` with the same out_dir to finish it"
        )
    if not isinstance(manifest, dict):
        raise CorruptTokenShard(rerun_stage2(path, f"{name} is not a JSON object"))
    return TokenDataset(path, manifest)


class TokenDataset:
    """A token dataset: manifest facts plus per-shard reads (Parquet or WebDataset)."""

    def __init__(self, path: str, manifest: dict) -> None:
        version = manifest.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise TokenDatasetMismatch(
                f"token dataset {path} has schema version {version}, this code reads version "
                f"{schema.SCHEMA_VERSION} (rows bound to their images by digest); "
                f"{schema.REGENERATE}, or read it with the matching version of this project"
            )
        self.path = str(path)
        problem = seal_problem(manifest)
        if problem:
            raise CorruptTokenShard(
                rerun_stage2(self.path, f"{self.path}/{schema.MANIFEST_NAME} {problem}")
            )
        self.dir = TokenDatasetDir(self.path)
        self.manifest = manifest
        self.num_shards: int = int(manifest["num_shards"])
        self.seeds: tuple[int, ...] = tuple(int(s) for s in manifest["seeds"])
        self.num_tokens: int = int(manifest["num_tokens"])
        self.codebook_size: int = int(manifest["codebook_size"])
        grid = manifest.get("grid")
        self.grid: tuple[int, int] | None = (int(grid[0]), int(grid[1])) if grid else None
        self.fingerprint: str | None = manifest.get("fingerprint")
        # the tokenizer's precision in stage 2 (datasets written before it was recorded: fp32)
        self.precision: str = str(manifest.get("precision") or "fp32")
        self.image_size: int | None = (manifest.get("tokenizer") or {}).get("image_size")
        self.receipts: dict[int, dict] = {
            int(r["shard_index"]): r for r in manifest.get("shards", [])
        }
        self.missing_shards: list[int] = [
            i for i in range(self.num_shards) if i not in self.receipts
        ]

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.path!r}, shards={self.num_shards}, seeds={self.seeds}, "
            f"tokens={self.num_tokens}, codebook={self.codebook_size})"
        )

    def check(
        self,
        *,
        codebook_size: int,
        grid: tuple[int, int],
        image_size: int,
        fingerprint: str | None = None,
    ) -> None:
        """Refuse a dataset made for another codebook, patch grid, image size or tokenizer.

        Raises TokenDatasetMismatch naming both values and what to do.
        """
        fix = (
            "tokenize the images again with the matching tokenizer, or configure the model to match"
        )
        if int(codebook_size) != self.codebook_size:
            raise TokenDatasetMismatch(
                f"codebook size mismatch: token dataset {self.path} has codebook_size={self.codebook_size}, "
                f"the model head expects codebook_size={codebook_size}; set the model's vocab_size to "
                f"{self.codebook_size} or {fix}"
            )
        if self.grid is not None and tuple(int(g) for g in grid) != self.grid:
            raise TokenDatasetMismatch(
                f"patch grid mismatch: token dataset {self.path} has grid={list(self.grid)} "
                f"({self.num_tokens} tokens), the model has grid={list(grid)}; {fix}"
            )
        if self.grid is None and int(grid[0]) * int(grid[1]) != self.num_tokens:
            raise TokenDatasetMismatch(
                f"token count mismatch: token dataset {self.path} has {self.num_tokens} tokens per view, "
                f"the model's grid {list(grid)} has {int(grid[0]) * int(grid[1])}; {fix}"
            )
        if self.image_size is not None and int(image_size) != int(self.image_size):
            raise TokenDatasetMismatch(
                f"image size mismatch: token dataset {self.path} has image_size={self.image_size}, "
                f"the model has image_size={image_size}; {fix}"
            )
        if (
            fingerprint is not None
            and self.fingerprint is not None
            and fingerprint != self.fingerprint
        ):
            raise TokenDatasetMismatch(
                f"tokenizer mismatch: token dataset {self.path} was made with tokenizer fingerprint "
                f"{self.fingerprint}, this run's tokenizer has fingerprint {fingerprint}; {fix}"
            )

    def receipt(self, i: int) -> dict:
        """The receipt of shard ``i``; MissingShards when the shard was never finished."""
        if not 0 <= i < self.num_shards:
            raise IndexError(
                f"shard {i} out of range: token dataset {self.path} has {self.num_shards} shards"
            )
        if i in self.receipts:
            return self.receipts[i]
        raise MissingShards(
            f"token dataset {self.path} is missing shards {self.missing_shards} (of {self.num_shards}); "
            "rerun `pipeline run stage=tokenize` with the same out_dir to finish them"
        )

    def files(self, i: int, fmt: str) -> list[dict]:
        """The receipt entries of shard ``i`` in format ``fmt``."""
        return [e for e in self.receipt(i)["files"] if e["format"] == fmt]

    @property
    def column_format(self) -> str | None:
        """The format whole columns read fastest from: Parquet when the dataset has it (else
        None: the default, WebDataset)."""
        return (
            schema.FORMAT_PARQUET
            if schema.FORMAT_PARQUET in self.manifest.get("formats", [])
            else None
        )

    def read_shard(
        self,
        i: int,
        fmt: str | None = None,
        seeds: Sequence[int] | None = None,
        verify: bool = True,
    ) -> dict[str, TokenRow]:
        """Shard ``i`` as key -> TokenRow, keys in image-shard order (:meth:`read_columns`, as
        rows: each row's ``views`` and ``tokens`` hold the requested seeds)."""
        return self.read_columns(i, fmt, seeds, verify).rows()

    def read_columns(
        self,
        i: int,
        fmt: str | None = None,
        seeds: Sequence[int] | None = None,
        verify: bool = True,
    ) -> ShardColumns:
        """Shard ``i`` column-wise (:class:`ShardColumns`), rows in image-shard order.

        fmt: "webdataset" or "parquet"; by default the WebDataset tar (one file for all seeds)
            when the dataset has it, else Parquet; Parquet when ``seeds`` is a strict subset (it
            then reads only those seeds' files).
        seeds: the seeds to return, in the order given (default: all, dataset seed order). A
            seed not stored is refused.
        verify: compare each file's sha256 with its receipt (the bytes are read anyway).

        Raises:
            MissingShards: no receipt, or a file is gone.
            CorruptTokenShard: a file is damaged (checksum, truncation, unparsable), naming it.
        """
        wanted = self.select_seeds(seeds)
        receipt = self.receipt(i)
        formats = {e["format"] for e in receipt["files"]}
        if fmt is None:
            subset = len(wanted) < len(self.seeds) and schema.FORMAT_PARQUET in formats
            fmt = (
                schema.FORMAT_WEBDATASET
                if schema.FORMAT_WEBDATASET in formats and not subset
                else schema.FORMAT_PARQUET
            )
        if fmt not in formats:
            raise ValueError(
                f"token dataset {self.path} has no {fmt} files (it has {sorted(formats)})"
            )
        entries = self.files(i, fmt)
        if fmt == schema.FORMAT_PARQUET:
            by_seed = {int(e["seed"]): e for e in entries}
            entries = [by_seed[s] for s in wanted]
        blobs = [self._read_file(i, entry, verify) for entry in entries]
        names = ", ".join(e["path"] for e in entries)
        try:
            if fmt == schema.FORMAT_PARQUET:
                columns = self._parquet_columns(entries, blobs, wanted)
            else:
                columns = self._wds_columns(entries[0]["path"], blobs[0])
                columns = columns.select([self.seeds.index(s) for s in wanted])
        except TokenDatasetMismatch:
            raise
        except Exception as err:  # pyarrow, numpy, json and tar parsing raise their own types
            raise CorruptTokenShard(
                rerun_stage2(self.path, f"token file {names} (shard {i}) cannot be read ({err})")
            ) from None
        if columns.tokens.size and int(columns.tokens.max()) >= self.codebook_size:
            top = columns.tokens.reshape(len(columns.keys), -1).max(axis=1)  # [R]
            r = int(np.argmax(top >= self.codebook_size))
            raise CorruptTokenShard(
                rerun_stage2(
                    self.path,
                    f"token file {names} (shard {i}): key {columns.keys[r]!r} has token "
                    f"{int(top[r])} >= codebook size {self.codebook_size} (the manifest's)",
                )
            )
        return columns

    def select_seeds(self, seeds: Sequence[int] | None) -> tuple[int, ...]:
        """``seeds`` checked against the stored ones (None or () = all stored seeds)."""
        if not seeds:
            return self.seeds
        wanted = tuple(int(s) for s in seeds)
        unknown = [s for s in wanted if s not in self.seeds]
        if unknown or len(set(wanted)) != len(wanted):
            raise TokenDatasetMismatch(
                f"views.seeds={list(wanted)}: token dataset {self.path} stores seeds "
                f"{list(self.seeds)}; pick distinct seeds among those (or add seeds with "
                "`pipeline run stage=tokenize seeds=[...]`)"
            )
        return wanted

    def _read_file(self, i: int, entry: dict, verify: bool) -> bytes:
        try:
            data = self.dir.read_bytes(entry["path"])
        except FileNotFoundError:
            raise MissingShards(
                rerun_stage2(
                    self.path,
                    f"token file {entry['path']} of shard {i} is missing (it has a receipt)",
                )
            ) from None
        if verify and (
            len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]
        ):
            what = "truncated" if len(data) < entry["size"] else "damaged"
            raise CorruptTokenShard(
                rerun_stage2(
                    self.path,
                    f"token file {entry['path']} of shard {i} is {what} (its sha256 or size "
                    "differs from its receipt)",
                )
            )
        return data

    def _check_footer(self, path: str, metadata: dict[bytes, bytes] | None) -> None:
        metadata = metadata or {}
        version = metadata.get(schema.META_SCHEMA_VERSION, b"?").decode()
        if version != str(schema.SCHEMA_VERSION):
            raise TokenDatasetMismatch(
                f"{path} has schema version {version}, this code reads version "
                f"{schema.SCHEMA_VERSION}; {schema.REGENERATE}"
            )
        fingerprint = metadata.get(schema.META_FINGERPRINT)
        if (
            fingerprint is not None
            and self.fingerprint
            and fingerprint.decode() != self.fingerprint
        ):
            raise TokenDatasetMismatch(
                f"{path} was made with tokenizer {fingerprint.decode()}, the manifest says "
                f"{self.fingerprint}; the directory mixes two runs: tokenize it again into a fresh out_dir"
            )

    def _parquet_columns(
        self, entries: Sequence[dict], blobs: Sequence[bytes], seeds: tuple[int, ...]
    ) -> ShardColumns:
        """One Parquet file per seed of ``seeds`` (``entries``/``blobs`` in that order)."""
        first: tuple | None = None
        tokens, views = [], {name: [] for name in VIEW_FIELDS}
        for entry, blob in zip(entries, blobs, strict=True):
            table = pq.read_table(pa.BufferReader(blob))
            self._check_footer(entry["path"], table.schema.metadata)
            keys = table.column(schema.KEY).to_pylist()
            labels = table.column(schema.LABEL).to_numpy().astype(np.int64)
            digests = _digest_array(table.column(schema.IMAGE_SHA256).to_pylist())
            if first is None:
                first = (keys, labels, digests)
            elif keys != first[0] or not np.array_equal(labels, first[1]):
                raise TokenDatasetMismatch(
                    f"{entry['path']} has other keys or labels than seed {seeds[0]}'s file of the "
                    "same shard"
                )
            elif not np.array_equal(digests, first[2]):
                raise TokenDatasetMismatch(
                    f"{entry['path']} has other image digests than seed {seeds[0]}'s file of the "
                    "same shard: the directory mixes two runs; tokenize it again into a fresh "
                    "out_dir"
                )
            for name in VIEW_FIELDS:
                column = table.column(name)
                values = column.to_pylist() if name in TEXT_FIELDS else column.to_numpy()
                views[name].append(
                    np.asarray(values, dtype=object if name in TEXT_FIELDS else None)
                )
            flat = table.column(schema.TOKENS).combine_chunks().flatten().to_numpy()
            tokens.append(flat.reshape(len(keys), self.num_tokens))  # [R, N]
        keys, labels, digests = first
        return ShardColumns(
            keys=keys,
            labels=labels,
            digests=digests,
            tokens=np.ascontiguousarray(np.stack(tokens, axis=1), dtype=np.uint16),  # [R, K, N]
            views={name: np.stack(v, axis=1) for name, v in views.items()},  # [R, K]
        )

    def _wds_columns(self, path: str, data: bytes) -> ShardColumns:
        """The gzip'd WebDataset tar of a shard (every seed) column-wise."""
        shape = (len(self.seeds), self.num_tokens)
        keys, parts = _samples(
            path, read_members(gzip.decompress(data) if data[:2] == GZIP_MAGIC else data)
        )
        # Whole columns at once: one JSON parse, one hex decode, one array of every token.
        tokens = _npy_column(parts[schema.WDS_TOKENS], shape)  # [R, K, N]
        parsed = json.loads(b"[" + b",".join(parts[schema.WDS_VIEWS]) + b"]")
        for key, sample in zip(keys, parsed, strict=True):
            if tuple(sample[schema.SEED]) != self.seeds:
                raise TokenDatasetMismatch(
                    f"{path}: sample {key!r} has seeds {sample[schema.SEED]}, the manifest says "
                    f"seeds {list(self.seeds)}"
                )
        hex_digests = b"".join(parts[schema.WDS_IMAGE_SHA256]).decode("ascii", "replace")
        if len(hex_digests) != 2 * schema.DIGEST_BYTES * len(keys) or not _HEX.fullmatch(
            hex_digests
        ):
            bad = next(k for k, d in zip(keys, parts[schema.WDS_IMAGE_SHA256], strict=True)
                       if not schema.is_digest(d.decode("ascii", "replace")))  # fmt: skip
            raise TokenDatasetMismatch(
                f"{path}: sample {bad!r} has no valid .{schema.WDS_IMAGE_SHA256} member; "
                f"{schema.REGENERATE}"
            )
        count = len(keys)
        return ShardColumns(
            keys=keys,
            labels=np.asarray([int(label) for label in parts[schema.WDS_LABEL]], dtype=np.int64),
            digests=np.frombuffer(bytes.fromhex(hex_digests), dtype=np.uint8).reshape(count, -1),
            tokens=tokens,
            views={
                name: np.asarray(
                    [sample[name] for sample in parsed],
                    dtype=object if name in TEXT_FIELDS else None,
                ).reshape(count, len(self.seeds))
                for name in VIEW_FIELDS
            },
        )


def _samples(path: str, members: Iterable[tuple[str, bytes]]) -> tuple[list[str], dict]:
    """The keys of a WebDataset tar's samples, in order, and each extension's members in that
    order. Member names are only split into (key, extension), never used as paths; every
    sample must have exactly the token dataset's members (``schema.WDS_EXTENSIONS``)."""
    keys: list[str] = []
    parts: dict[str, list[bytes]] = {ext: [] for ext in schema.WDS_EXTENSIONS}
    seen: dict[str, dict[str, bytes]] = {}
    for name, body in members:
        folder, _, stem = name.rpartition("/")
        tail, _, ext = stem.partition(".")
        key = f"{folder}/{tail}" if folder else tail
        if key not in seen:
            seen[key] = {}
            keys.append(key)
        seen[key][ext] = body
    for key in keys:
        sample = seen[key]
        for ext in schema.WDS_EXTENSIONS:
            if ext not in sample:
                raise TokenDatasetMismatch(
                    f"{path}: sample {key!r} has no .{ext} member; {schema.REGENERATE}"
                )
            parts[ext].append(sample[ext])
    return keys, parts


def _npy_column(members: Sequence[bytes], shape: tuple[int, int]) -> np.ndarray:
    """uint16 [R, K, N] from R ``tokens.npy`` members of ``shape`` [K, N] (one array, one copy).

    Our writer gives every member the same header: when they all have the first one's, their
    bodies are joined as they are; otherwise each is read (and refused) by :func:`read_npy_uint16`.
    """
    if not members:
        return np.zeros((0, *shape), dtype=np.uint16)
    first = read_npy_uint16(members[0])
    if first.shape != shape:
        raise TokenDatasetMismatch(f"tokens of shape {first.shape}, the manifest says {shape}")
    start = len(members[0]) - first.nbytes
    header = members[0][:start]
    if all(len(m) == len(members[0]) and m[:start] == header for m in members):
        body = b"".join(m[start:] for m in members)
        return np.frombuffer(body, dtype=first.dtype).reshape(len(members), *shape)
    arrays = [read_npy_uint16(m) for m in members]
    if any(a.shape != shape for a in arrays):
        raise TokenDatasetMismatch(f"a tokens.npy member is not of shape {shape}")
    return np.stack(arrays).astype(np.uint16, copy=False)


_HEX = re.compile(r"[0-9a-f]*")


def _digest_array(digests: Sequence[bytes]) -> np.ndarray:
    """uint8 [R, 32] of R raw sha256 digests."""
    joined = b"".join(digests)
    if len(joined) != schema.DIGEST_BYTES * len(digests):
        raise ValueError("an image digest is not 32 bytes")
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(digests), schema.DIGEST_BYTES)


# The view columns of a shard, as ShardColumns holds them: the seed, then ViewParams order.
VIEW_FIELDS: tuple[str, ...] = (schema.SEED, *schema.VIEW_COLUMNS)
TEXT_FIELDS = frozenset({schema.JITTER_ORDER, schema.INTERPOLATION})


@dataclass
class ShardColumns:
    """One token shard, column-wise: R rows (images, in image-shard order) x K seeds.

    What :meth:`TokenDataset.read_columns` returns: validation and token counts compare and count
    whole columns; :meth:`rows` turns them into TokenRows for the stage-3 data path.
    """

    keys: list[str]  # [R]
    labels: np.ndarray  # int64 [R]
    digests: np.ndarray  # uint8 [R, 32]: the raw sha256 of each image's stored bytes
    tokens: np.ndarray  # uint16 [R, K, N]
    views: dict[str, np.ndarray]  # VIEW_FIELDS -> [R, K] (jitter_order and interpolation: str)

    def select(self, positions: Sequence[int]) -> ShardColumns:
        """The same rows with the seeds at ``positions`` (of the K axis), in that order."""
        if list(positions) == list(range(self.tokens.shape[1])):
            return self
        pick = list(positions)
        return dataclasses.replace(
            self,
            tokens=np.ascontiguousarray(self.tokens[:, pick]),
            views={name: values[:, pick] for name, values in self.views.items()},
        )

    def differences(self, other: ShardColumns, tokens: bool = True) -> tuple[str | None, str]:
        """Where ``other`` first holds other rows: ``(None, "")`` when it holds the same ones
        (and, with ``tokens``, the same tokens); ``(None, "keys ...")`` when its keys differ;
        else ``(key, what)``, e.g. ``("n01/x", "views (top)")``."""
        if self.keys != other.keys:
            return None, "keys (or their order)"
        pairs = [
            ("labels", self.labels, other.labels),
            ("image digests", self.digests, other.digests),
        ]
        pairs += [(f"views ({n})", self.views[n], other.views[n]) for n in VIEW_FIELDS]
        if tokens:
            pairs.append(("tokens", self.tokens, other.tokens))
        for what, ours, theirs in pairs:
            if ours.shape != theirs.shape:
                return None, f"{what} (of another shape)"
            differs = (ours != theirs).reshape(len(self.keys), -1).any(axis=1)  # [R]
            if differs.any():
                return self.keys[int(np.argmax(differs))], what
        return None, ""

    def rows(self) -> dict[str, TokenRow]:
        """key -> TokenRow, in row order."""
        columns = [self.views[name].tolist() for name in VIEW_FIELDS]  # each [R][K]
        order = columns[VIEW_FIELDS.index(schema.JITTER_ORDER)]
        columns[VIEW_FIELDS.index(schema.JITTER_ORDER)] = [
            [_jitter_order(text) for text in seeds] for seeds in order
        ]
        digests = self.digests.tobytes().hex()
        width = 2 * schema.DIGEST_BYTES
        rows = {}
        for r, key in enumerate(self.keys):
            rows[key] = TokenRow(
                key=key,
                label=int(self.labels[r]),
                views=[
                    ViewParams(*values) for values in zip(*(c[r] for c in columns), strict=True)
                ],
                tokens=self.tokens[r],
                image_sha256=digests[r * width : (r + 1) * width],
            )
        return rows


@functools.lru_cache(maxsize=64)
def _jitter_order(text: str) -> tuple[int, ...]:
    return schema.jitter_order_from_str(text)


_NPY_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<|>]u2)', 'fortran_order': False, 'shape': \((?P<k>\d+), (?P<n>\d+)\), \}"
)


def read_npy_uint16(data: bytes) -> np.ndarray:
    """The uint16 [K, N] array of a WebDataset ``tokens.npy`` member.

    The header is matched with a regular expression instead of ``np.load``'s ``ast.literal_eval``:
    the layout is the one our writer emits, anything else is refused, and CPython 3.11's AST
    recursion-depth check (a ``SystemError`` in forked DataLoader workers after a failed parse)
    never comes into play.
    """
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        raise ValueError("not a .npy member")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes
    header_len = int.from_bytes(data[8:start], "little")
    header = data[start : start + header_len].decode("latin1").strip()
    match = _NPY_HEADER.fullmatch(header)
    if match is None:
        raise ValueError(f"unexpected .npy header {header[:80]!r}")
    shape = (int(match["k"]), int(match["n"]))
    body = data[start + header_len :]
    if len(body) != 2 * shape[0] * shape[1]:
        raise ValueError(
            f".npy body holds {len(body)} bytes; shape {shape} needs {2 * shape[0] * shape[1]}"
        )
    dtype = np.dtype(match["descr"].replace("|", "<"))
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(np.uint16, copy=False)
