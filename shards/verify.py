"""Check a token dataset before and while it is read (docs/design.md §3, §5).

Stage 3 trains hundreds of epochs on what it reads, and a wrong target is invisible in the loss,
so it trusts nothing it has not checked:

- before any step, :func:`preflight`: the tokenizer fingerprint is the same in the manifest,
  in every receipt's job identity and in every Parquet footer; every file a receipt lists exists
  with its recorded size (codebook and grid against the model: ``TokenDataset.check``);
- while reading, ``TokenDataset.read_shard`` compares each file's sha256 with its receipt (the
  bytes are in memory anyway: hashing 400 KB costs a fraction of a millisecond) and turns any
  damage into :class:`CorruptTokenShard`, naming the file and the remedy;
- while rendering, the image's sha256 must equal the row's ``image_sha256``
  (:func:`check_image_digest`), or the run stops with :class:`ImageDigestMismatch`.

These errors are :class:`engine.errors.UserError` s, so the CLI prints them without a traceback.
Raised inside a DataLoader worker, torch re-raises them in the main process as
``type(err)("Caught ... Original Traceback ...")``; :class:`DataIntegrityError` strips that
wrapping again so the user reads the message, not a worker traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from engine.errors import UserError
from shards import schema
from shards.manifest import dataset_fs, join

# How torch's ExceptionWrapper formats the original error's last line: "pkg.Class: message".
_LAST_LINE = re.compile(r"^[A-Za-z_][\w.]*: (.*)$")


def _unwrap_worker_message(message: str) -> str:
    """The original message of an error torch re-raised from a DataLoader worker."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    for line in reversed(message.rstrip().splitlines()):
        match = _LAST_LINE.match(line)
        if match:
            return match.group(1)
    return message


class DataIntegrityError(UserError):
    """A token dataset (or the images read with it) is not what it claims; the message says what
    to do. Keeps its plain message when re-raised from a DataLoader worker."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_unwrap_worker_message(str(message)))


class CorruptTokenShard(DataIntegrityError):
    """A token file is missing, truncated or damaged."""


class ImageDigestMismatch(DataIntegrityError):
    """An image's bytes are not the ones its tokens were computed from."""


def rerun_stage2(path: str, what: str) -> str:
    """The remedy for damaged token files, spelled once."""
    return (
        f"{what}: rerun stage 2 on it (`pipeline run stage=tokenize` with the same images=, "
        f"tokenizer= and out_dir={path}; it redoes only damaged or missing shards) and "
        f"`pipeline validate {path}` lists every damaged file"
    )


def check_image_digest(
    key: str, actual: str, expected: str, image_shard: str, token_shard: int, tokens_path: str
) -> None:
    """Stop when an image's sha256 (``actual``) is not the one its row was made from."""
    if actual != expected:
        raise ImageDigestMismatch(
            f"image {key!r} in {image_shard} has sha256 {actual[:16]}..., but token shard "
            f"{token_shard} of {tokens_path} was computed from an image with sha256 "
            f"{expected[:16]}...: these are other pixels (edited, re-encoded or mirrored). Point "
            "images= at the images stage 2 tokenized, or tokenize these images again "
            "(`pipeline run stage=tokenize`) into a fresh out_dir"
        )


def receipt_fingerprint(receipt: dict) -> str | None:
    """The tokenizer fingerprint a receipt records in its job identity (None when it has none)."""
    job = receipt.get("job") or {}
    return job.get("tokenizer_fingerprint") or receipt.get("fingerprint")


def preflight(ds, shards: Iterable[int] | None = None) -> None:
    """Refuse a token dataset whose parts disagree, before any step (see the module docstring).

    ds: a ``shards.reader.TokenDataset``; shards: the shard indices to check (default: all).
    Raises CorruptTokenShard (a file missing or of the wrong size) or
    ``shards.reader.TokenDatasetMismatch`` (fingerprints disagree), naming the file.
    """
    import pyarrow.parquet as pq

    from shards.reader import TokenDatasetMismatch

    fs, root = dataset_fs(ds.path)
    expected = ds.fingerprint
    fix = "the directory mixes runs or was edited: tokenize the images again into a fresh out_dir"
    for i in sorted(ds.receipts) if shards is None else shards:
        receipt = ds.receipt(i)
        found = receipt_fingerprint(receipt)
        if found is not None and expected is not None and found != expected:
            raise TokenDatasetMismatch(
                f"{ds.path}: the manifest says tokenizer {expected}, the receipt of shard {i} "
                f"says {found}; {fix}"
            )
        for entry in receipt["files"]:
            path = join(root, entry["path"])
            try:
                size = fs.size(path)
            except FileNotFoundError:
                raise CorruptTokenShard(
                    rerun_stage2(ds.path, f"token file {entry['path']} (shard {i}) is missing")
                ) from None
            if size != entry["size"]:
                raise CorruptTokenShard(
                    rerun_stage2(
                        ds.path,
                        f"token file {entry['path']} (shard {i}) is {size} bytes, its receipt "
                        f"says {entry['size']} (truncated or replaced)",
                    )
                )
            if entry["format"] != schema.FORMAT_PARQUET:
                continue
            try:
                with fs.open(path, "rb") as f:
                    meta = pq.read_metadata(f).metadata or {}
            except Exception as err:  # a damaged footer: pyarrow raises several types
                raise CorruptTokenShard(
                    rerun_stage2(
                        ds.path, f"token file {entry['path']} has no readable footer ({err})"
                    )
                ) from None
            footer = meta.get(schema.META_FINGERPRINT)
            if footer is not None and expected is not None and footer.decode() != expected:
                raise TokenDatasetMismatch(
                    f"{entry['path']} was written with tokenizer {footer.decode()}, the manifest "
                    f"of {ds.path} says {expected}; {fix}"
                )
