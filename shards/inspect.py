"""`pipeline inspect DIR [out=<dir>] [images=<source>] [shard_size=<n>] [keys=<n>]`: look at a token dataset.

Prints a summary (images, seeds, skips, codebook usage: distinct tokens used / codebook size, the
most frequent tokens) and writes PNGs into ``out`` (default ``DIR/inspect`` for local datasets):
the token usage histogram and, with ``images=``, for a few keys across seeds the rendered view
(``shards.views.render_view`` with the stored parameters) with its token ids on the patch grid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np

from engine.plots import pyplot
from shards.decode import BadImage, decode_image
from shards.errors import ImageSourceError
from shards.images import iter_shard, list_shards
from shards.reader import TokenDataset, open_token_dataset
from shards.records import BadShard
from shards.validate import parse_args
from shards.views import render_view

log = logging.getLogger(__name__)

TOP_TOKENS = 10
USAGE = (
    "usage: pipeline inspect DIR [out=<dir>] [images=<image source>] [shard_size=<n>] [keys=<n>]"
)
COUNTS = ("shard_size", "keys")  # options that take a whole number >= 1


def token_counts(ds: TokenDataset) -> np.ndarray:
    """How often each token id occurs over every shard and seed: int64 [codebook_size]."""
    counts = np.zeros(ds.codebook_size, dtype=np.int64)
    for i in sorted(ds.receipts):
        tokens = ds.read_columns(i, fmt=ds.column_format).tokens.reshape(-1)  # [R * K * N]
        counts += np.bincount(tokens, minlength=ds.codebook_size)[: ds.codebook_size]
    return counts


def summary(ds: TokenDataset, counts: np.ndarray) -> dict:
    """The figures ``inspect`` prints (JSON-able)."""
    totals = ds.manifest.get("totals", {})
    used = int((counts > 0).sum())
    order = np.argsort(-counts, kind="stable")[:TOP_TOKENS]
    total = int(counts.sum())
    probs = counts[counts > 0] / max(total, 1)
    return {
        "path": ds.path,
        "shards": ds.num_shards,
        "missing_shards": ds.missing_shards,
        "images": totals.get("images"),
        "seeds": list(ds.seeds),
        "skipped": totals.get("skipped"),
        "skip_reasons": sorted(
            {reason for r in ds.receipts.values() for _, reason in r["skipped"]}
        ),
        "tokens_per_view": ds.num_tokens,
        "codebook_size": ds.codebook_size,
        "codebook_used": used,
        "codebook_usage_fraction": used / ds.codebook_size,
        "token_entropy_bits": float(-(probs * np.log2(probs)).sum()) if total else 0.0,
        "top_tokens": [[int(t), int(counts[t])] for t in order if counts[t] > 0],
        "bytes_per_token": totals.get("bytes_per_token"),
        # other tokenizers' targets for these views (shards.token_sets; inspect each by its path)
        "token_sets": ds.dir.named_sets(),
    }


def plot_usage(counts: np.ndarray, path: str) -> None:
    """Token usage histogram: count per token id, and the sorted (rank) curve."""
    plt = pyplot()

    fig, (ax_id, ax_rank) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax_id.bar(np.arange(len(counts)), counts, width=1.0)
    ax_id.set(title="token usage by id", xlabel="token id", ylabel="count")
    ranked = np.sort(counts)[::-1]
    ax_rank.plot(np.arange(1, len(ranked) + 1), np.maximum(ranked, 0.5))
    ax_rank.set(
        title=f"usage by rank ({int((counts > 0).sum())}/{len(counts)} used)",
        xlabel="rank",
        ylabel="count",
        xscale="log",
        yscale="log",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_views(
    ds: TokenDataset, images: str, shard_size: int, num_keys: int, path: str
) -> list[str]:
    """Rendered views of the first ``num_keys`` keys of shard 0, one column per seed, token ids on the grid."""
    plt = pyplot()
    from matplotlib import patheffects  # after pyplot(): matplotlib loads when a figure is drawn

    first = min(ds.receipts)
    rows = ds.read_shard(first)
    wanted = list(rows)[:num_keys]
    sources = list_shards(images, shard_size=shard_size)
    if first >= len(sources):
        raise ImageSourceError(
            f"images={images} has {len(sources)} shard(s), so no image shard {first} for token "
            f"shard {first}; pass the image source stage 2 read"
        )
    pictures = {}
    try:
        for r in iter_shard(sources[first]):
            if r.key in wanted and not r.error:
                with contextlib.suppress(BadImage):  # an undecodable image is not drawn
                    pictures[r.key] = decode_image(r.data)
    except BadShard as err:  # draw the images read before the damage
        log.warning("%s: %s", sources[first].url, err)
    keys = [k for k in wanted if k in pictures]
    if not keys:
        return []
    grid = ds.grid or (int(np.sqrt(ds.num_tokens)),) * 2
    k = len(ds.seeds)
    fig, axes = plt.subplots(len(keys), k, figsize=(3.2 * k, 3.4 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        row = rows[key]
        for c, view in enumerate(row.views):
            ax = axes[r][c]
            pixels = render_view(pictures[key], view).permute(1, 2, 0).numpy()  # [S, S, 3]
            ax.imshow(pixels)
            step_y, step_x = view.size / grid[0], view.size / grid[1]
            tokens = row.tokens[c].reshape(grid)  # [gh, gw]
            for gy in range(grid[0]):
                for gx in range(grid[1]):
                    ax.text(
                        (gx + 0.5) * step_x,
                        (gy + 0.5) * step_y,
                        str(int(tokens[gy, gx])),
                        ha="center",
                        va="center",
                        fontsize=max(3, 60 // max(grid)),
                        color="yellow",
                        path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")],
                    )
            ax.set_xticks(np.arange(0, view.size + 1, step_x))
            ax.set_yticks(np.arange(0, view.size + 1, step_y))
            ax.grid(color="white", linewidth=0.8)
            ax.tick_params(labelbottom=False, labelleft=False, length=0)
            ax.set_title(f"{key} seed {view.seed}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the summary as JSON, write the PNGs, return 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, options = parse_args(argv, ("out", "images", "shard_size", "keys"), COUNTS, USAGE)
    ds = open_token_dataset(path)
    out = options.get("out") or (
        os.path.join(ds.dir.root, "inspect") if ds.dir.local else "inspect"
    )
    os.makedirs(out, exist_ok=True)
    counts = token_counts(ds)
    info = summary(ds, counts)
    usage_png = os.path.join(out, "token_usage.png")
    plot_usage(counts, usage_png)
    info["pngs"] = [usage_png]
    if options.get("images"):
        source = ds.manifest.get("images")
        recorded = source.get("shard_size") if isinstance(source, dict) else None
        shard_size = int(options.get("shard_size") or recorded or 256)
        views_png = os.path.join(out, "views.png")
        shown = plot_views(
            ds, options["images"], shard_size, int(options.get("keys", 3)), views_png
        )
        if shown:
            info["pngs"].append(views_png)
            info["views_of"] = shown
    print(json.dumps(info, indent=1))
    return 0
