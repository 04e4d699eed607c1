"""`pipeline validate DIR [images=<source>] [shard_size=<n>]`: check a token dataset end to end.

Checks: manifest and schema version; every shard has a receipt; every file's size and sha256
against its receipt; Parquet footers (schema version, fingerprint) and row counts; token range
< codebook size; every seed present for every key (same keys, same order in each seed's file);
each key in one row only (``shards.key_index.KeyIndex``);
Parquet and WebDataset agree (keys, labels, tokens, views, image digests); with ``images=`` the
token keys follow the image shard's keys in order, minus the images the receipt lists as skipped,
and every image's sha256 equals its rows' ``image_sha256`` (docs/design.md §3). Without
``images=`` the images are checked at the source the manifest records when it is reachable, and
the output says plainly when they were not checked (``images=none`` checks the token files
only, which is much faster at ImageNet scale: no image is read).
Prints every problem found and returns 1 when there is any (damaged data, whatever the format),
0 otherwise; 2 is for usage mistakes (no such folder, an unknown option).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from engine.errors import UserError
from shards import schema
from shards.dataset import TokenDatasetDir
from shards.errors import DuplicateKeys, MissingShards, TokenDatasetMismatch
from shards.images import iter_shard, list_shards, source_keys
from shards.key_index import KeyIndex
from shards.reader import TokenDataset, open_token_dataset
from shards.records import BadShard
from shards.token_sets import compare_views, token_sets

log = logging.getLogger(__name__)

# More shards than this are checked by several processes (check_shards), in chunks of this size.
PARALLEL_SHARDS = 32
CHUNK_SHARDS = 16
MAX_PROCESSES = 16
USAGE = "usage: pipeline validate DIR [images=<image source>] [shard_size=<n>] [checksum=false]"
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_args(
    argv: Sequence[str],
    allowed: Sequence[str],
    counts: Sequence[str] = ("shard_size",),
    usage: str = USAGE,
) -> tuple[str, dict[str, str]]:
    """``DIR key=value ...`` -> (DIR, options). A :class:`UserError` with the usage for an
    unknown key, not exactly one DIR, or a key of ``counts`` that is not a positive integer."""
    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(options) - set(allowed))
    if len(positional) != 1 or unknown:
        what = f"unknown option(s) {unknown}; " if unknown else f"one DIR, got {positional}; "
        raise UserError(f"{what}choose from {list(allowed)}\n{usage}")
    for key in counts:
        if key in options and not (options[key].isdigit() and int(options[key]) > 0):
            raise UserError(f"{key}={options[key]!r}: pass a whole number >= 1\n{usage}")
    return positional[0], options


def image_alignment(
    token_keys: Sequence[str], image_keys: Sequence[str], skipped: set[str]
) -> list[str]:
    """Problems when ``token_keys`` is not ``image_keys`` in order minus skipped images."""
    problems = []
    j = 0
    for key in image_keys:
        if j < len(token_keys) and token_keys[j] == key:
            j += 1
        elif key not in skipped:
            problems.append(f"image {key!r} has no tokens and is not listed as skipped")
    if j < len(token_keys):
        problems.append(
            f"token key {token_keys[j]!r} (row {j}) does not follow the image shard's key order"
        )
    return problems


def check_shard(ds: TokenDataset, receipt: dict, checksum: bool) -> list[str]:
    """Every problem of one shard's files (sizes, checksums, footers, counts, ranges, agreement)."""
    i = receipt["shard_index"]
    damaged = ds.dir.damaged_files(receipt, checksum)
    if damaged:
        return [f"shard {i}: {path} is {why}" for path, why in damaged.items()]
    problems = []
    formats = sorted({e["format"] for e in receipt["files"]})
    if sorted(
        {e["seed"] for e in receipt["files"] if e["format"] == schema.FORMAT_PARQUET}
    ) not in (
        [],
        sorted(ds.seeds),
    ):
        problems.append(f"shard {i}: Parquet files do not cover seeds {list(ds.seeds)}")
        return problems
    read = {}
    for fmt in formats:
        try:
            read[fmt] = ds.read_columns(i, fmt)
        except (TokenDatasetMismatch, KeyError, ValueError, OSError) as err:
            problems.append(f"shard {i}: cannot read {fmt}: {err}")
    for fmt, columns in read.items():
        if len(columns.keys) != receipt["rows"]:
            problems.append(
                f"shard {i}: {fmt} has {len(columns.keys)} rows, its receipt says {receipt['rows']}"
            )
    if len(read) == 2:
        key, what = read[schema.FORMAT_PARQUET].differences(read[schema.FORMAT_WEBDATASET])
        if what:
            at = f" at key {key!r}" if key is not None else ""
            problems.append(f"shard {i}: Parquet and WebDataset differ{at}: {what}")
    return problems


def check_shards(ds: TokenDataset, shards: Sequence[int], checksum: bool) -> list[str]:
    """:func:`check_shard` of every shard of ``shards``, problems in shard order.

    Reading a shard is mostly parsing (Python, one core); a dataset of more than
    ``PARALLEL_SHARDS`` shards is checked by one process per core (at most
    ``MAX_PROCESSES``), each opening the dataset itself and taking chunks of shards.
    """
    processes = min(os.cpu_count() or 1, MAX_PROCESSES)
    if len(shards) <= PARALLEL_SHARDS or processes < 2:
        return [p for i in shards for p in check_shard(ds, ds.receipt(i), checksum)]
    chunks = [list(shards[i : i + CHUNK_SHARDS]) for i in range(0, len(shards), CHUNK_SHARDS)]
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        found = pool.map(_check_chunk, [ds.path] * len(chunks), chunks, [checksum] * len(chunks))
        return [p for problems in found for p in problems]


def _check_chunk(path: str, shards: list[int], checksum: bool) -> list[str]:
    """One process's part of :func:`check_shards` (the dataset opened once per process)."""
    if _OPENED.get("path") != path:
        _OPENED.update(path=path, ds=open_token_dataset(path))
    ds = _OPENED["ds"]
    return [p for i in shards for p in check_shard(ds, ds.receipt(i), checksum)]


_OPENED: dict = {}  # the dataset a check process has open


def check_images(
    ds: TokenDataset, images: str, shard_size: int, index: KeyIndex | None
) -> list[str]:
    """Token shard i against image shard i: same keys in the same order (minus skips), and the
    same image bytes (sha256 of each image == its rows' ``image_sha256``). ``index``: the
    dataset's key index, None when it could not be built (the problems found before say why)."""
    image_shards = list_shards(images, shard_size=shard_size)
    problems = []
    if len(image_shards) != ds.num_shards:
        # another packing of the images (a team's own copy): match rows by key instead
        if index is None:
            return [
                "images packed otherwise are matched by key, which needs every token shard "
                "readable and each key once: fix the problems above, then validate again"
            ]
        return check_images_by_key(ds, image_shards, index)
    for shard in image_shards:
        if shard.index not in ds.receipts:
            continue
        receipt = ds.receipts[shard.index]
        try:
            rows = ds.read_shard(shard.index)
        except (TokenDatasetMismatch, OSError) as err:
            problems.append(f"shard {shard.index}: cannot read its tokens: {err}")
            continue
        image_keys, changed = [], []
        try:
            for record in iter_shard(shard):
                image_keys.append(record.key)
                row = rows.get(record.key)
                if row is not None and record.error is None and record.sha256 != row.image_sha256:
                    changed.append(record.key)
        except BadShard as err:
            problems.append(f"image shard {shard.index} ({shard.url}) is unreadable: {err}")
            continue
        if changed:
            problems.append(
                f"shard {shard.index}: {len(changed)} image(s) differ from the ones tokenized "
                f"(sha256 of their bytes != the rows' image_sha256), e.g. {changed[0]!r} in "
                f"{shard.url}: these are other pixels; tokenize them again"
            )
        skipped = {key for key, _ in receipt["skipped"]}
        problems += [
            f"shard {shard.index}: {p}" for p in image_alignment(list(rows), image_keys, skipped)
        ]
    return problems


def check_images_by_key(ds: TokenDataset, image_shards: Sequence, index: KeyIndex) -> list[str]:
    """A copy of the images packed otherwise: every image that has a row must have its bytes
    (digest); images missing from the copy, or without a row, are reported, not problems. A key
    the copy has in two shards binds the first one's image (the duplicate rule of stage 3)."""
    rows: dict[int, dict] = {}
    problems, changed, matched, extra = [], [], 0, 0
    for shard in source_keys(image_shards).shards:
        try:
            records = list(iter_shard(shard))
        except BadShard as err:
            problems.append(f"image shard {shard.index} ({shard.url}) is unreadable: {err}")
            continue
        good = [r for r in records if r.error is None]
        token_shard, _ = index.lookup([r.key for r in good])
        for record, t in zip(good, token_shard.tolist(), strict=True):
            if t < 0:
                extra += 1
                continue
            if t not in rows:
                rows[t] = ds.read_shard(t, seeds=ds.seeds[:1])
            row = rows[t].get(record.key)
            if row is None:
                extra += 1
            elif record.sha256 != row.image_sha256:
                changed.append(f"{record.key!r} ({shard.url})")
            else:
                matched += 1
    if changed:
        problems.append(
            f"{len(changed)} image(s) differ from the ones tokenized (sha256 of their bytes != "
            f"the rows' image_sha256), e.g. {changed[0]}: these are other pixels"
        )
    log.warning(
        "images packed otherwise (%d shards, the token dataset %d): matched by key, %d of %d "
        "rows verified by digest, %d not in this copy, %d images without a row",
        len(image_shards),
        ds.num_shards,
        matched,
        index.rows,
        index.rows - matched - len(changed),
        extra,
    )
    return problems


def validate(
    path: str, images: str | None = None, shard_size: int | None = None, checksum: bool = True
) -> list[str]:
    """Every problem of the token dataset at ``path``; an empty list means it is valid."""
    dataset = TokenDatasetDir(path)
    wrong = dataset.not_a_dataset()
    if wrong:  # a usage mistake (exit 2), not a problem of a dataset
        raise MissingShards(f"{wrong} (see: pipeline validate --help)")
    try:
        manifest = dataset.manifest()
        if manifest is None:
            return [f"no {schema.MANIFEST_NAME} in {path}: the tokenize run did not finish"]
        ds = TokenDataset(path, manifest)
    except (TokenDatasetMismatch, KeyError, TypeError, ValueError) as err:
        return [f"manifest: {err}"]
    problems = []
    on_disk = dataset.receipts()
    for i in ds.missing_shards:
        problems.append(f"shard {i}: no receipt in the manifest (the shard failed or never ran)")
    readable = []
    for i, receipt in sorted(ds.receipts.items()):
        if i not in on_disk:
            problems.append(
                f"shard {i}: receipt file {schema.receipt_path(i)} is missing or unreadable"
            )
        elif on_disk[i] != receipt:
            problems.append(f"shard {i}: receipt file differs from the manifest's copy")
        if receipt.get("schema_version") != schema.SCHEMA_VERSION:
            problems.append(
                f"shard {i}: receipt has schema version {receipt.get('schema_version')}"
            )
            continue
        readable.append(i)
    problems += check_shards(ds, readable, checksum)
    index = None
    if not problems:  # every shard reads whole: its keys can be indexed, and each must be once
        try:
            index = KeyIndex.from_dataset(ds)
        except DuplicateKeys as err:
            problems.append(str(err))
    if images:
        source = ds.manifest.get("images")
        recorded = source.get("shard_size") if isinstance(source, dict) else None
        size = shard_size or int(recorded or 256)
        problems += check_images(ds, images, size, index)
    return problems + check_token_sets(ds, images, shard_size, checksum)


def check_token_sets(
    ds: TokenDataset, images: str | None, shard_size: int | None, checksum: bool
) -> list[str]:
    """Each named token set validated as a dataset of its own, and its views compared with ours."""
    problems = []
    for named in token_sets(ds.path)[1:]:
        found = validate(named.url, images, shard_size, checksum)
        if not found:
            found = compare_views(ds, named.open())
        problems += [f"token set {named.name}: {problem}" for problem in found]
    return problems


def recorded_images(path: str) -> tuple[str | None, str]:
    """The image source the manifest at ``path`` records, when it can be listed here, and a line
    saying whether the images will be checked: ``(source or None, note)``."""
    try:
        manifest = TokenDatasetDir(path).manifest()
    except (OSError, ValueError):
        return None, ""  # validate reports the manifest itself
    info = manifest.get("images") if isinstance(manifest, dict) else None
    source = info.get("source") if isinstance(info, dict) else None
    if not isinstance(source, str) or not source:
        return None, "images: NOT checked (the manifest records no image source); pass images="
    try:
        list_shards(source, shard_size=int(info.get("shard_size") or 256))
    except (UserError, OSError, ValueError) as err:
        return None, (
            f"images: NOT checked: the recorded source {source} cannot be listed here ({err}); "
            "pass images=<your copy> to check the rows against the images"
        )
    return source, f"images: checked at {source} (the source the manifest records)"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the problems (or a one-line OK) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, options = parse_args(argv, ("images", "shard_size", "checksum"))
    checksum = options.get("checksum", "true").lower()
    if checksum not in (*TRUE, *FALSE):
        raise UserError(f"checksum={checksum!r}: pass checksum=true or checksum=false\n{USAGE}")
    images = options.get("images")
    if images is None:
        images, note = recorded_images(path)
        if note:
            print(note)
    elif images.lower() == "none":
        images = None
        print("images: NOT checked (images=none): only the token files were checked")
    problems = validate(
        path,
        images=images,
        shard_size=int(options["shard_size"]) if "shard_size" in options else None,
        checksum=checksum in TRUE,
    )
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        print(f"{path}: {len(problems)} problem(s)")
        return 1
    print(f"{path}: OK")
    return 0
