"""Read a finished token dataset's shards back as TokenRows, checking it before anything is yielded.

Stage 3 calls ``open_token_dataset(path).check(...)`` with its tokenizer and model facts; a dataset
made for another tokenizer, codebook or patch grid is refused with both values named (docs/design.md §3).
The directory itself is read through ``shards.dataset.TokenDatasetDir``; the receipts a reader
uses are the manifest's copies, and a shard without one is refused (``MissingShards``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards import schema
from shards.dataset import TokenDatasetDir
from shards.errors import CorruptTokenShard, MissingShards, TokenDatasetMismatch, rerun_stage2
from shards.writer import TokenRow


def open_token_dataset(path: str) -> TokenDataset:
    """Open the token dataset at ``path`` (local or fsspec URL) from its manifest.json."""
    manifest = TokenDatasetDir(path).manifest()
    if manifest is None:
        raise MissingShards(
            f"no {schema.MANIFEST_NAME} in token dataset {path}; the tokenize stage writes it at the "
            "end: rerun `pipeline run stage=tokenize` with the same out_dir to finish it"
        )
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

    def read_shard(
        self,
        i: int,
        fmt: str | None = None,
        seeds: Sequence[int] | None = None,
        verify: bool = True,
    ) -> dict[str, TokenRow]:
        """Shard ``i`` as key -> TokenRow, keys in image-shard order.

        fmt: "webdataset" or "parquet"; by default the WebDataset tar (one file for all seeds)
            when the dataset has it, else Parquet; Parquet when ``seeds`` is a strict subset (it
            then reads only those seeds' files).
        seeds: the seeds to return, in the order given (default: all, dataset seed order); each
            row's ``views`` and ``tokens`` hold those seeds only. A seed not stored is refused.
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
        try:
            if fmt == schema.FORMAT_PARQUET:
                return self._read_parquet(entries, blobs, wanted)
            return self._select(self._read_wds(entries[0]["path"], blobs[0]), wanted)
        except TokenDatasetMismatch:
            raise
        except Exception as err:  # pyarrow, numpy, json and tarfile each raise their own types
            names = ", ".join(e["path"] for e in entries)
            raise CorruptTokenShard(
                rerun_stage2(self.path, f"token file {names} (shard {i}) cannot be read ({err})")
            ) from None

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

    def _select(self, rows: dict[str, TokenRow], wanted: tuple[int, ...]) -> dict[str, TokenRow]:
        if wanted == self.seeds:
            return rows
        positions = [self.seeds.index(s) for s in wanted]
        for row in rows.values():
            row.views = [row.views[p] for p in positions]
            row.tokens = np.ascontiguousarray(row.tokens[positions])
        return rows

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

    def _read_parquet(
        self, entries: Sequence[dict], blobs: Sequence[bytes], seeds: tuple[int, ...]
    ) -> dict[str, TokenRow]:
        """One Parquet file per seed of ``seeds`` (``entries``/``blobs`` in that order)."""
        rows: dict[str, TokenRow] = {}
        tokens_by_seed = []
        for position, (entry, blob) in enumerate(zip(entries, blobs, strict=True)):
            path = entry["path"]
            table = pq.read_table(pa.BufferReader(blob))
            self._check_footer(path, table.schema.metadata)
            columns = table.to_pydict()
            keys = columns[schema.KEY]
            if position == 0:
                for j, key in enumerate(keys):
                    rows[key] = TokenRow(
                        key=key,
                        label=int(columns[schema.LABEL][j]),
                        views=[],
                        tokens=np.empty(0),
                        image_sha256=columns[schema.IMAGE_SHA256][j].hex(),
                    )
            elif keys != list(rows):
                raise TokenDatasetMismatch(
                    f"{path} has other keys than seed {seeds[0]}'s file of the same shard"
                )
            elif [d.hex() for d in columns[schema.IMAGE_SHA256]] != [
                r.image_sha256 for r in rows.values()
            ]:
                raise TokenDatasetMismatch(
                    f"{path} has other image digests than seed {seeds[0]}'s file of the same "
                    "shard: the directory mixes two runs; tokenize it again into a fresh out_dir"
                )
            names = [n for n in columns if n in (schema.SEED, *schema.VIEW_COLUMNS)]
            for j, key in enumerate(keys):
                rows[key].views.append(schema.row_to_view({n: columns[n][j] for n in names}))
            flat = table.column(schema.TOKENS).combine_chunks().flatten().to_numpy()
            tokens_by_seed.append(flat.reshape(len(keys), self.num_tokens))  # [R, N]
        stacked = np.stack(tokens_by_seed, axis=1) if tokens_by_seed else None  # [R, K, N]
        for j, row in enumerate(rows.values()):
            row.tokens = np.ascontiguousarray(stacked[j], dtype=np.uint16)
        return rows

    def _read_wds(self, path: str, data: bytes) -> dict[str, TokenRow]:
        # The tar is read here with tarfile (member names are only split, never used as paths).
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)
                stem = base[-1]
                key_tail, _, ext = stem.partition(".")
                key = f"{base[0]}/{key_tail}" if len(base) == 2 else key_tail
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        rows: dict[str, TokenRow] = {}
        for key, members in samples.items():
            tokens = read_npy_uint16(members[schema.WDS_TOKENS])  # [K, N]
            views = schema.views_from_json(json.loads(members[schema.WDS_VIEWS]))
            if tuple(v.seed for v in views) != self.seeds or tokens.shape != (
                len(self.seeds),
                self.num_tokens,
            ):
                raise TokenDatasetMismatch(
                    f"{path}: sample {key!r} has seeds {[v.seed for v in views]} and tokens {tokens.shape}, "
                    f"the manifest says seeds {list(self.seeds)} x {self.num_tokens} tokens"
                )
            label = int(members[schema.WDS_LABEL].decode())
            digest = members.get(schema.WDS_IMAGE_SHA256, b"").decode("ascii", "replace")
            if not schema.is_digest(digest):
                raise TokenDatasetMismatch(
                    f"{path}: sample {key!r} has no valid .{schema.WDS_IMAGE_SHA256} member; "
                    f"{schema.REGENERATE}"
                )
            rows[key] = TokenRow(
                key=key,
                label=label,
                views=views,
                tokens=tokens.astype(np.uint16),
                image_sha256=digest,
            )
        return rows


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
