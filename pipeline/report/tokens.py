"""A token dataset's codebook usage and a few images' views beside their token maps.

The views are rebuilt from the image source the manifest names and the stored view parameters
with ``shards.views.render_view`` (the view contract, docs/design.md §2), so the picture shows
the exact pixels the tokens belong to.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
from pathlib import Path
from typing import Any

import numpy as np

from engine.plots import pyplot
from pipeline.report.base import Report, per_part
from pipeline.report.discover import Part, image_source
from shards import inspect
from shards.dataset import TokenDatasetDir
from shards.decode import decode_image
from shards.images import iter_shard, list_shards
from shards.reader import open_token_dataset
from shards.token_sets import token_sets
from shards.views import render_view

MAX_EXAMPLES = 3  # images in the token-map and MIM sections


def token_colours(codebook_size: int) -> Any:
    """A fixed colour per token id (hashed hue), so a token looks the same in every map."""
    colours = np.zeros((codebook_size, 3), dtype=np.float32)
    for i in range(codebook_size):
        h = int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:4], "little")
        hue, light = (h % 360) / 360, 0.35 + 0.3 * ((h >> 9) % 100) / 100
        colours[i] = colorsys.hls_to_rgb(hue, light, 0.75)
    return colours  # [V, 3] in [0, 1]


def token_counts(tokens_dir: Path) -> tuple[Any, Any]:
    """(dataset, int64 [V] count of each token id over every shard and seed)."""
    ds = open_token_dataset(str(tokens_dir))
    return ds, inspect.token_counts(ds)


def perplexity(facts: dict) -> float:
    """2^entropy of the token distribution (``shards.inspect.summary``): the number of equally
    used codes it is worth."""
    return 2.0 ** facts["token_entropy_bits"] if facts["codebook_used"] else 0.0


def example_rows(tokens_dir: Path, n: int) -> tuple[Any, list, dict]:
    """(dataset, first n token rows of the first shard, key -> decoded image)."""
    ds = open_token_dataset(str(tokens_dir))
    source = image_source(ds.manifest, tokens_dir)
    if source is None:
        raise FileNotFoundError(
            "the image source named in manifest.json is not on this disk; the views cannot be "
            "rebuilt without the images"
        )
    first = next(i for i in range(ds.num_shards) if i not in ds.missing_shards)
    rows = list(ds.read_shard(first).values())[:n]
    wanted = {r.key for r in rows}
    images = {}
    shards = list_shards(source[0], source[1] or 256)
    for rec in iter_shard(shards[first]):
        if rec.key in wanted and not rec.error:
            images[rec.key] = decode_image(rec.data)
        if len(images) == len(wanted):
            break
    return ds, [r for r in rows if r.key in images], images


def codebook(rep: Report, part: Part) -> str:
    plt = pyplot()

    ds, counts = token_counts(part.path)
    facts = inspect.summary(ds, counts)
    used, total = facts["codebook_used"], int(counts.sum())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].bar(np.arange(len(counts)), counts, width=1.0, color="#4477aa")
    axes[0].set_title("token frequency by id")
    axes[0].set_xlabel("token id")
    axes[1].plot(np.sort(counts)[::-1], color="#aa3377")
    axes[1].set_yscale("symlog")
    axes[1].set_title("frequency, sorted (rank plot)")
    axes[1].set_xlabel("rank")
    img = rep.figure(fig, f"codebook-{part.slug}", "codebook usage histogram")
    return (
        f"{img}<p>{used} of {ds.codebook_size} token ids used "
        f"(codebook usage {100 * used / ds.codebook_size:.1f}%) over {total} tokens "
        f"({len(ds.seeds)} seeds); perplexity {perplexity(facts):.1f}.</p>"
    )


def token_maps(rep: Report, part: Part) -> str:
    plt = pyplot()

    ds, rows, images = example_rows(part.path, MAX_EXAMPLES)
    if not rows:
        raise ValueError("no example rows could be matched with their images")
    grid = ds.grid or (int(ds.num_tokens**0.5),) * 2
    colours = token_colours(ds.codebook_size)
    k = len(ds.seeds)
    fig, axes = plt.subplots(
        len(rows), 2 * k, figsize=(2.0 * 2 * k, 2.1 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        for s in range(k):
            view = render_view(images[row.key], row.views[s]).permute(1, 2, 0).numpy()
            ax_v, ax_t = axes[r][2 * s], axes[r][2 * s + 1]
            ax_v.imshow(view)
            ax_v.set_title(f"seed {ds.seeds[s]}", fontsize=8)
            _map_axes(ax_t, row.tokens[s], grid, colours, "tokens")
            for ax in (ax_v, ax_t):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r][0].set_ylabel(row.key[-18:], fontsize=7)
    img = rep.figure(fig, f"token-maps-{part.slug}", "views and their token maps across seeds")
    return (
        f"{img}<p>Each pair: the view rendered from the stored view parameters, then its "
        f"{grid[0]}x{grid[1]} tokens (colour = token id, the same id has the same colour "
        "everywhere).</p>"
    )


def _map_axes(ax: Any, tokens: Any, grid: tuple[int, int], colours: Any, title: str) -> None:
    """One token map: a cell per patch, coloured by token id (ids written on small grids)."""
    ax.imshow(colours[tokens.astype("int64").reshape(grid)], interpolation="nearest")
    if grid[0] <= 8:
        cells = [(y, x) for y in range(grid[0]) for x in range(grid[1])]
        for (y, x), t in zip(cells, tokens.tolist(), strict=True):
            ax.text(x, y, str(t), ha="center", va="center", fontsize=5, color="white")
    ax.set_title(title, fontsize=8)


def _token_sets_table(sets: list, opened: list) -> str:
    """One row per token set: tokenizer, seeds, codes used, perplexity, Parquet bytes/token."""
    lines = []
    for s, ds in zip(sets, opened, strict=True):
        facts = inspect.summary(ds, inspect.token_counts(ds))
        bpt = (facts["bytes_per_token"] or {}).get("parquet")
        lines.append(
            f"<tr><td>{html.escape(s.name)}</td><td><code>{s.fingerprint[:12]}</code></td>"
            f"<td>{s.seeds}</td><td>{facts['codebook_used']} / {ds.codebook_size} "
            f"({100 * facts['codebook_usage_fraction']:.1f}%)</td>"
            f"<td>{perplexity(facts):.1f}</td><td>{f'{bpt:.2f}' if bpt else ''}</td></tr>"
        )
    return (
        "<table><tr><th>token set</th><th>tokenizer</th><th>seeds</th><th>codes used</th>"
        f"<th>perplexity</th><th>Parquet B/token</th></tr>{''.join(lines)}</table>"
    )


def token_sets_comparison(rep: Report, part: Part) -> str:
    """The dataset's token sets side by side: codebook figures, then the same views' token maps.

    Every set holds the same views (shards.token_sets), so the maps of one view differ only by
    the tokenizer; token ids of different tokenizers are unrelated (colours compare within a map).
    """
    plt = pyplot()

    sets = token_sets(str(part.path))
    opened = [s.open() for s in sets]
    table = _token_sets_table(sets, opened)
    _, rows, images = example_rows(part.path, MAX_EXAMPLES)
    seed = min(set.intersection(*(set(s.seeds) for s in sets)))
    first = next(i for i in range(opened[0].num_shards) if i not in opened[0].missing_shards)
    by_set = [ds.read_shard(first, seeds=[seed]) for ds in opened]
    rows = [r for r in rows if all(r.key in b for b in by_set)]
    if not rows:
        raise ValueError("no example image is in every token set")
    fig, axes = plt.subplots(
        len(rows), 1 + len(sets), figsize=(2.0 * (1 + len(sets)), 2.1 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        view = by_set[0][row.key].views[0]
        axes[r][0].imshow(render_view(images[row.key], view).permute(1, 2, 0).numpy())
        axes[r][0].set_title(f"seed {seed}", fontsize=8)
        axes[r][0].set_ylabel(row.key[-18:], fontsize=7)
        for c, (s, ds, shard) in enumerate(zip(sets, opened, by_set, strict=True), start=1):
            grid = ds.grid or (int(ds.num_tokens**0.5),) * 2
            colours = token_colours(ds.codebook_size)
            _map_axes(axes[r][c], shard[row.key].tokens[0], grid, colours, s.name)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    img = rep.figure(fig, f"token-sets-{part.slug}", "one view, tokenized by each token set")
    return (
        f"{table}{img}<p>Each row: one stored view, then its tokens from each tokenizer (same "
        "pixels, other targets). Ids of different tokenizers are unrelated: compare the structure "
        "of the maps (which patches share a token), not their colours.</p>"
    )


def section_token_sets(rep: Report) -> str:
    parts = [p for p in rep.of_kind("tokenize") if TokenDatasetDir(str(p.path)).named_sets()]
    return per_part(rep, parts, lambda part: token_sets_comparison(rep, part))


def section_codebook(rep: Report) -> str:
    return per_part(rep, rep.of_kind("tokenize"), lambda part: codebook(rep, part))


def section_token_maps(rep: Report) -> str:
    return per_part(rep, rep.of_kind("tokenize"), lambda part: token_maps(rep, part))
