"""Several tokenizers over one set of views: the token sets of a token dataset (docs/design.md §3).

A token dataset's root holds its views and the tokens of the tokenizer that made it: the
**default** token set. Another tokenizer's targets for the same views are a **named token set**,
a complete token dataset of its own (manifest, receipts, Parquet, WebDataset, card) at
``<root>/token_sets/<name>/``::

    <root>/manifest.json, parquet/, wds/, receipts/    the default set (tokenizer A)
    <root>/token_sets/dino/manifest.json, parquet/, ...  tokenizer B, same images, seeds, views

Stage 2 writes a named set with ``token_set=<name>`` (the views are sampled from the same
augmentation, seeds and images, so they are the root's; :func:`compare_views` proves it row by
row before the set's manifest is written); stage 3 reads one with ``token_set=<name or
fingerprint prefix>`` (:func:`resolve`). Every set is read, verified and validated exactly like a
standalone dataset, so the readers' checks (fingerprint, codebook, grid, receipts, footers) apply
to each on its own, and a reader that knows nothing of token sets still reads the default one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

from engine.errors import UserError
from shards import schema
from shards.dataset import TokenDatasetDir
from shards.errors import TokenDatasetMismatch, TokenSetNotFound
from shards.reader import ShardColumns, TokenDataset, open_token_dataset

DEFAULT = "default"
NAME = schema.TOKEN_SET_NAME
# A fingerprint prefix must be this long to pick a set (shorter ones collide too easily).
MIN_PREFIX = 8


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """One token set of a dataset: its name, where it is, and its manifest's facts."""

    name: str
    url: str
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("fingerprint") or "")

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.manifest.get("seeds", [])]

    def open(self) -> TokenDataset:
        return TokenDataset(self.url, self.manifest)

    def describe(self) -> str:
        return f"{self.name} (tokenizer {self.fingerprint[:12]}, seeds {self.seeds})"


def check_name(name: str) -> str:
    """``name`` if it can name a token set (a folder name, lower case), else a UserError."""
    if name == DEFAULT or not NAME.fullmatch(name):
        raise UserError(
            f"token_set={name!r}: a token set's name is 1-64 lower-case letters, digits, '-' or "
            f"'_' (not {DEFAULT!r}, the dataset's own tokens), e.g. token_set=dino"
        )
    return name


def set_url(root: str, name: str) -> str:
    """Where the token set ``name`` of the dataset at ``root`` lives."""
    return f"{str(root).rstrip('/')}/{schema.TOKEN_SETS_DIR}/{name}"


def views_record(name: str, default: TokenDataset, named: TokenDataset) -> dict:
    """The ``token_set`` block of a named set's manifest, once :func:`compare_views` passed."""
    return {
        "name": name,
        "views_of": "../..",  # the dataset root, relative to the set
        "default_fingerprint": default.fingerprint,
        "shards_compared": len(named.receipts),
    }


def token_sets(root: str) -> list[TokenSet]:
    """Every finished token set of the dataset at ``root``: the default one first."""
    default = open_token_dataset(root)
    sets = [TokenSet(DEFAULT, default.path, default.manifest)]
    for name in default.dir.named_sets():
        url = set_url(root, name)
        sets.append(TokenSet(name, url, TokenDatasetDir(url).manifest()))
    return sets


def resolve(root: str, selector: str = "") -> TokenSet:
    """The token set ``selector`` picks: "" or "default", a set's name, or a fingerprint prefix.

    A named set is also checked to share the default set's views (:func:`manifest_problems`);
    one that does not is refused rather than read as if it did.
    """
    sets = token_sets(root)
    available = "; ".join(s.describe() for s in sets)
    if selector in ("", DEFAULT):
        return sets[0]
    chosen = [s for s in sets if s.name == selector]
    if not chosen and len(selector) >= MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", selector):
        chosen = [s for s in sets if s.fingerprint.startswith(selector)]
    if len(chosen) != 1:
        what = "names no" if not chosen else f"matches {len(chosen)}"
        raise TokenSetNotFound(
            f"token_set={selector} {what} token set of {root}; it has: {available}. Pick one by "
            f"name or by at least {MIN_PREFIX} hex digits of its tokenizer fingerprint"
        )
    picked = chosen[0]
    if picked.name != DEFAULT:
        problems = manifest_problems(sets[0].manifest, picked.manifest)
        if problems:
            raise TokenDatasetMismatch(
                f"token set {picked.name} of {root} does not share the dataset's views: "
                f"{'; '.join(problems)}. Write it again with `pipeline run stage=tokenize "
                f"config={root}/config.yaml tokenizer=<its tokenizer> token_set={picked.name}`"
            )
    return picked


def manifest_problems(default: dict, named: dict) -> list[str]:
    """Why the named set's manifest cannot describe the default set's views ([] = it can)."""
    problems = []
    if _plain(named.get("aug")) != _plain(default.get("aug")):
        problems.append(f"augmentation {named.get('aug')} differs from {default.get('aug')}")
    extra = [s for s in named.get("seeds", []) if s not in default.get("seeds", [])]
    if extra:
        problems.append(f"seeds {extra} are not views of the dataset (it has {default['seeds']})")
    images, theirs = named.get("images") or {}, default.get("images") or {}
    if images.get("source") != theirs.get("source"):
        problems.append(
            f"images={images.get('source')} is not the dataset's image source {theirs.get('source')}"
        )
    elif theirs.get("kind") == "folder" and images.get("shard_size") != theirs.get("shard_size"):
        # a folder is cut into shards of shard_size images (tar and parquet files are shards)
        problems.append(
            f"shard_size={images.get('shard_size')} cuts the folder into other shards than the "
            f"dataset's {theirs.get('shard_size')}"
        )
    if int(named.get("num_shards", -1)) > int(default.get("num_shards", 0)):
        problems.append(
            f"{named['num_shards']} image shards, the dataset has {default['num_shards']} (add "
            "the new images to the dataset first)"
        )
    return problems


def _views(ds: TokenDataset, i: int, seeds: Sequence[int]) -> ShardColumns:
    """Shard ``i`` at ``seeds``, from the Parquet files when there are (the WebDataset copy is
    compared with them by ``pipeline validate``)."""
    return ds.read_columns(i, fmt=ds.column_format, seeds=seeds)


def _plain(value: object) -> object:
    """``value`` as JSON would store it (tuples as lists), so written and planned facts compare."""
    return json.loads(json.dumps(value))


def compare_views(default: TokenDataset, named: TokenDataset) -> list[str]:
    """Every way the named set's rows are not the default set's views ([] = the same views).

    For each shard and seed of the named set: the same images (key, order, label, image digest),
    the same skips, and the same view parameters. Tokens are not compared: they are the point.
    """
    problems = manifest_problems(default.manifest, named.manifest)
    if problems:
        return problems
    seeds = named.seeds
    for i, receipt in sorted(named.receipts.items()):
        base = default.receipts.get(i)
        if base is None:
            problems.append(f"shard {i}: the dataset has no such shard")
            continue
        if receipt.get("image_shard") != base.get("image_shard"):
            problems.append(f"shard {i}: made from other image bytes than the dataset's")
        if receipt.get("skipped") != base.get("skipped"):
            problems.append(f"shard {i}: other images were skipped")
        key, what = _views(named, i, seeds).differences(_views(default, i, seeds), tokens=False)
        if what:
            at = f"key {key!r}: " if key is not None else ""
            problems.append(f"shard {i}: {at}other {what} than the dataset's")
    return problems
