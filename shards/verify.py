"""Stage 3's checks of a token dataset (docs/design.md §5, "Verify first").

:func:`preflight` runs before any step (fingerprints of the manifest, receipts and Parquet
footers; every listed file at its recorded size); :func:`check_image_digest` runs before each
view is rendered. The token files' sha256 is checked where they are read
(``TokenDataset.read_shard``). The errors are ``shards.errors`` user errors: the CLI prints them
without a traceback, also when a DataLoader worker raised them.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow.parquet as pq

from shards import schema
from shards.errors import CorruptTokenShard, ImageDigestMismatch, TokenDatasetMismatch, rerun_stage2
from shards.reader import TokenDataset


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
    return (receipt.get("job") or {}).get("tokenizer_fingerprint")


def preflight(ds: TokenDataset, shards: Iterable[int] | None = None) -> None:
    """Refuse a token dataset whose parts disagree, before any step (see the module docstring).

    shards: the shard indices to check (default: all).
    Raises CorruptTokenShard (a file missing or of the wrong size) or TokenDatasetMismatch
    (fingerprints disagree), naming the file.
    """
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
        damaged = ds.dir.damaged_files(receipt, checksum=False)  # sizes now, sha256 while reading
        if damaged:
            path, why = next(iter(damaged.items()))
            raise CorruptTokenShard(
                rerun_stage2(ds.path, f"token file {path} (shard {i}) is {why}")
            )
        for entry in receipt["files"]:
            if entry["format"] != schema.FORMAT_PARQUET:
                continue
            try:
                with ds.dir.fs.open(ds.dir.path(entry["path"]), "rb") as f:
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
            codebook = meta.get(schema.META_CODEBOOK_SIZE)
            if codebook is not None and int(codebook) != ds.codebook_size:
                raise TokenDatasetMismatch(
                    f"{entry['path']} was written for codebook_size={int(codebook)}, the manifest "
                    f"of {ds.path} says {ds.codebook_size}; {fix}"
                )
