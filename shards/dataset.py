"""One token-dataset directory, and the one object that reads and writes it: :class:`TokenDatasetDir`.

Everything about a dataset's directory goes through this object (the layout is docs/design.md
§3, the names ``shards.schema``): the filesystem is resolved once from the URL, and every file it
holds has a method: a shard's token files and receipt (:meth:`~TokenDatasetDir.write_shard`,
:meth:`~TokenDatasetDir.receipts`, :meth:`~TokenDatasetDir.damaged_files`), the manifest and the
card, the run's config and the names of its token sets. It pickles as its URL, so a Dask task can
carry it. ``shards.reader.TokenDataset`` reads the rows of a finished dataset through it; the
run that writes one holds its folder with ``engine.lock.hold``.

**Receipts.** A receipt is written last for its shard and marks it done. A receipt that is
missing or cannot be parsed means the same thing everywhere: the shard is **not done**.
:meth:`~TokenDatasetDir.receipt` returns None for it, :meth:`~TokenDatasetDir.receipts` leaves
it out (logging the unreadable ones), the stage-2 driver redoes the shard, and a reader of the
finished dataset (whose manifest holds a copy of every receipt) refuses a shard without one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from engine.atomic import is_temporary, publish
from shards import card, schema
from shards.manifest import build_manifest
from shards.storage import dataset_fs, dumps, file_sha256, is_local, join, read_json
from shards.writer import TokenRow, shard_files

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
# Folders holding token files; anything in them that no receipt lists is an orphan.
DATA_DIRS = (schema.PARQUET_DIR, schema.WDS_DIR)


class TokenDatasetDir:
    """A token-dataset directory (local path or fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.url = str(url)
        self.fs, self.root = dataset_fs(self.url)

    def __reduce__(self) -> tuple:
        return (TokenDatasetDir, (self.url,))

    def __repr__(self) -> str:
        return f"TokenDatasetDir({self.url!r})"

    # ---- paths and plain files -----------------------------------------------------------------

    @property
    def local(self) -> bool:
        """Whether this is a local disk (atomic renames, flock) rather than an object store."""
        return is_local(self.fs)

    def path(self, relative: str) -> str:
        """The filesystem path of member ``relative``."""
        return join(self.root, relative)

    def url_of(self, relative: str) -> str:
        """A member as the user would spell it (``out_dir/relative``)."""
        return f"{self.url.rstrip('/')}/{relative}"

    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self.path(relative) if relative else self.root)

    def read_json(self, relative: str) -> Any:
        return read_json(self.fs, self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Publish ``data`` at ``relative`` atomically (``engine.atomic.publish``)."""
        self.fs.makedirs(self.root, exist_ok=True)
        publish(self.fs, self.path(relative), data)

    def remove(self, relative: str) -> bool:
        """Delete a member; False when it was not there."""
        try:
            self.fs.rm_file(self.path(relative))
        except FileNotFoundError:
            return False
        return True

    def sha256(self, relative: str) -> str:
        """Hex sha256 of a member's bytes."""
        return file_sha256(self.fs, self.path(relative))

    # ---- shards: token files and receipts ------------------------------------------------------

    def receipt(self, shard_index: int) -> dict | None:
        """The receipt of image shard ``shard_index``; None when the shard is not done (no
        receipt, or one that cannot be parsed: see the module docstring)."""
        path = self.path(schema.receipt_path(shard_index))
        receipt = self._read_receipt(path)
        if receipt is not None and receipt["shard_index"] != shard_index:
            log.warning("ignoring receipt %s: it names shard %s", path, receipt["shard_index"])
            return None
        return receipt

    def receipts(self) -> dict[int, dict]:
        """Every readable receipt, by shard index (unreadable ones are logged and left out)."""
        folder = self.path(schema.RECEIPTS_DIR)
        if not self.fs.exists(folder):
            return {}
        found: dict[int, dict] = {}
        for path in sorted(self.fs.ls(folder, detail=False)):
            name = str(path).rsplit("/", 1)[-1]
            if name.startswith("shard-") and name.endswith(".json"):
                receipt = self._read_receipt(str(path))
                if receipt is not None:
                    found[receipt["shard_index"]] = receipt
        return found

    def _read_receipt(self, path: str) -> dict | None:
        try:
            receipt = read_json(self.fs, path)
            receipt["shard_index"] = int(receipt["shard_index"])
            return receipt
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring unreadable receipt %s: its shard counts as not done", path)
            return None

    def write_shard(
        self,
        shard_index: int,
        num_shards: int,
        image_shard_url: str,
        seeds: Sequence[int],
        rows: Sequence[TokenRow],
        skipped: Sequence[tuple[str, str]],
        formats: Sequence[str] = schema.FORMATS,
        *,
        tokenizer: dict | None = None,
        num_tokens: int | None = None,
        image_shard_info: dict | None = None,
        job: dict | None = None,
    ) -> dict:
        """Publish every token file of image shard ``shard_index``, then its receipt; return it.

        rows: in image-shard order; skipped: (key, reason) of each image that produced no row.
        tokenizer, num_tokens: see ``shards.writer.shard_files``.
        image_shard_info: facts about the image shard for the receipt (kind, size, sha256, ...).
        job: the identity of the job that made the shard (tokenizer fingerprint, aug, seeds,
            precision, ...; ``tokenize_corpus.identity.job_identity``), stored in the receipt.
        """
        num_tokens, files = shard_files(
            shard_index, num_shards, seeds, rows, formats, tokenizer, num_tokens
        )
        # A redo first withdraws the old receipt: until the new one lands the shard is not done.
        self.remove(schema.receipt_path(shard_index))
        for entry, data in files:
            self.write_bytes(entry["path"], data)
        receipt = {
            "schema_version": schema.SCHEMA_VERSION,
            "shard_index": int(shard_index),
            "num_shards": int(num_shards),
            "image_shard": {
                "url": str(image_shard_url),
                "index": int(shard_index),
                **(image_shard_info or {}),
            },
            "seeds": [int(s) for s in seeds],
            "num_tokens": num_tokens,
            "rows": len(rows),
            "skipped": [[str(k), str(r)] for k, r in skipped],
            "files": [entry for entry, _ in files],
        }
        if job is not None:
            receipt["job"] = job
        self.write_bytes(schema.receipt_path(shard_index), dumps(receipt))
        log.debug("shard %d: %d rows, %d skipped", shard_index, len(rows), len(skipped))
        return receipt

    def damaged_files(self, receipt: dict, checksum: bool = True) -> dict[str, str]:
        """The files of ``receipt`` that are not as it records them: path -> what it is (missing, ...

        The one intact-check of a shard: every file must exist with its recorded size and, with
        ``checksum`` (the default), its recorded sha256. The size is compared first: it is
        cheap, and a short file needs no hashing to be found.
        """
        damaged = {}
        for entry in receipt.get("files", []):
            relative = entry["path"]
            try:
                size = self.fs.size(self.path(relative))
                if size != entry["size"]:
                    damaged[relative] = f"{size} bytes, its receipt says {entry['size']}"
                elif checksum and self.sha256(relative) != entry["sha256"]:
                    damaged[relative] = "damaged (its sha256 differs from its receipt)"
            except FileNotFoundError:
                damaged[relative] = "missing"
        return damaged

    def renumber(self, receipt: dict, num_shards: int) -> dict:
        """Rename a shard's Parquet files to a new shard count and rewrite its receipt.

        File names carry the count (``train-<i>-of-<n>``), their bytes do not, so after image
        shards are appended a finished shard keeps its files byte for byte. The receipt is
        withdrawn first: a run killed halfway leaves the shard undone, never half renamed.
        """
        index = int(receipt["shard_index"])
        self.remove(schema.receipt_path(index))
        files = []
        for entry in receipt["files"]:
            if entry["format"] == schema.FORMAT_PARQUET:
                path = schema.parquet_path(int(entry["seed"]), index, num_shards)
                if path != entry["path"]:
                    self.fs.mv(self.path(entry["path"]), self.path(path))
                entry = {**entry, "path": path}
            files.append(entry)
        renamed = {**receipt, "num_shards": int(num_shards), "files": files}
        self.write_bytes(schema.receipt_path(index), dumps(renamed))
        return renamed

    def remove_orphans(self, receipts: Iterable[dict], num_shards: int) -> list[str]:
        """Delete receipts of shards >= ``num_shards`` and token files no kept receipt lists.

        After a run whose source changed shape (fewer shards, another shard count in the file
        names), files of the old layout would otherwise sit beside the new ones, and a reader
        globbing ``parquet/`` would mix them.
        """
        keep = {entry["path"] for r in receipts for entry in r.get("files", [])}
        removed = []
        for index in self.receipts():
            if index >= num_shards:
                self.remove(schema.receipt_path(index))
                removed.append(schema.receipt_path(index))
        for folder in DATA_DIRS:
            if not self.exists(folder):
                continue
            for path in self.fs.find(self.path(folder)):
                relative = str(path)[len(self.root) + 1 :]
                if relative not in keep:
                    self.remove(relative)
                    removed.append(relative)
        if removed:
            log.info("removed %d files no receipt lists (an earlier layout)", len(removed))
        return removed

    def remove_partial_files(self) -> int:
        """Delete temporary files left by a killed run (``engine.atomic``'s ``.<name>.<random>.tmp``).

        Only local disks have them (object stores publish whole objects); their random names
        would otherwise make a resumed dataset differ from an uninterrupted one.
        """
        if not self.local or not self.exists():
            return 0
        stale = [p for p in self.fs.find(self.root) if is_temporary(p.rsplit("/", 1)[-1])]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
        if stale:
            log.info("removed %d partial files left by an interrupted run", len(stale))
        return len(stale)

    # ---- manifest, card, config ----------------------------------------------------------------

    def manifest(self) -> dict | None:
        """manifest.json, or None when the dataset is not complete (or not a folder at all:
        :meth:`not_a_dataset` says which)."""
        try:
            return self.read_json(schema.MANIFEST_NAME)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def not_a_dataset(self) -> str | None:
        """Why this URL is no token dataset, finished or not (no such folder, a file, a folder
        with neither a manifest, receipts nor a run's config); None when it is one."""
        if not self.fs.exists(self.root):
            return f"{self.url}: no such folder; pass the out_dir of a stage=tokenize run"
        if not self.fs.isdir(self.root):
            return f"{self.url} is a file; pass the folder stage=tokenize wrote (its out_dir)"
        marks = (schema.MANIFEST_NAME, schema.RECEIPTS_DIR, CONFIG_NAME)
        if not any(self.exists(name) for name in marks):
            return (
                f"{self.url} is not a token dataset (no {schema.MANIFEST_NAME}, no shard "
                "receipts); pass the out_dir of a stage=tokenize run"
            )
        return None

    def withdraw_manifest(self) -> None:
        """Remove manifest.json: the dataset is incomplete until a run finishes it again."""
        self.remove(schema.MANIFEST_NAME)

    def manifest_is(self, receipts: list[dict], info: dict) -> bool:
        """Whether manifest.json holds exactly what ``receipts`` and ``info`` give (False when
        it is missing, damaged or was edited: a rerun of stage 2 then rewrites it)."""
        try:
            return self.read_bytes(schema.MANIFEST_NAME) == dumps(build_manifest(receipts, info))
        except FileNotFoundError:
            return False

    def write_manifest(self, receipts: list[dict], info: dict) -> dict:
        """Assemble manifest.json from ``receipts`` and the job's ``info``
        (``shards.manifest.build_manifest``), publish it with the dataset card; return it."""
        manifest = build_manifest(receipts, info)
        self.write_bytes(schema.CARD_NAME, self._card(manifest))
        self.write_bytes(schema.MANIFEST_NAME, dumps(manifest))
        return manifest

    def refresh_card(self) -> None:
        """Rewrite the card of a finished dataset (after a token set was added to it)."""
        self.write_bytes(schema.CARD_NAME, self._card(self.read_json(schema.MANIFEST_NAME)))

    def _card(self, manifest: dict) -> bytes:
        return card.render_card(manifest, self.named_sets()).encode("utf-8")

    def write_config(self, text: str) -> None:
        """Save the run's resolved config as ``config.yaml``."""
        self.write_bytes(CONFIG_NAME, text.encode("utf-8"))

    # ---- token sets ----------------------------------------------------------------------------

    def named_sets(self) -> list[str]:
        """Names of the finished named token sets (``token_sets/<name>/manifest.json``), sorted.

        Each is a token dataset of its own (``shards.token_sets``).
        """
        folder = self.path(schema.TOKEN_SETS_DIR)
        if not self.fs.isdir(folder):
            return []
        names = []
        for entry in self.fs.ls(folder, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if schema.TOKEN_SET_NAME.fullmatch(name) and self.exists(
                f"{schema.TOKEN_SETS_DIR}/{name}/{schema.MANIFEST_NAME}"
            ):
                names.append(name)
        return sorted(names)
