"""``pipeline report <run dir>``: one self-contained HTML page about a run, plus its PNGs.

The page (``<run dir>/report/index.html``, figures beside it, referenced relatively) shows, for
whatever stages the run has:

* **Curves** of every stage that wrote a ``metrics.jsonl`` (losses, accuracies, codebook usage
  and perplexity over training for the tokenizer).
* **Codebook usage** of the token dataset: a histogram of token frequencies over every view.
* **Token maps**: a few images, each seed's view beside its tokens (colour = token id, the same
  colour for the same id everywhere), rebuilt from the image shards and the stored view params.
* **MIM predictions**: the pretrained model on a few stored views with a block mask; masked
  patches the model predicted right are green, wrong ones red.
* **Linear-probe results** (every ``results.json`` under the run), **timings** (the demo's
  ``summary.json``) and **where the files are**.

Each section is built on its own: a stage that is missing or fails to load is named on the page
with the reason, and the rest of the page is still written.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STAGE_DIRS = ("pack", "vqkd", "tokenize", "pretrain", "linprobe", "finetune")
MAX_EXAMPLES = 3  # images in the token-map and MIM sections


# ---------------------------------------------------------------------------------------------
# Finding things in a run directory


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file (blank or broken lines skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict)]


def find_token_dataset(run_dir: Path) -> Path | None:
    """The token dataset of the run: ``tokenize/`` or the first folder with a manifest.json."""
    for candidate in [run_dir / "tokenize", run_dir / "tokens"]:
        if (candidate / "manifest.json").is_file():
            return candidate
    found = sorted(run_dir.rglob("manifest.json"))
    return found[0].parent if found else None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The pretraining checkpoint (``pretrain/checkpoint.pth``) if there is one."""
    candidate = run_dir / "pretrain" / "checkpoint.pth"
    if candidate.is_file():
        return candidate
    found = sorted(p for p in run_dir.rglob("checkpoint.pth") if "pretrain" in str(p))
    return found[0] if found else None


def _image_source(manifest: dict) -> tuple[str, int] | None:
    """(images, shard_size) of the image source the token dataset was made from."""

    def walk(node: Any) -> tuple[str, int] | None:
        if isinstance(node, dict):
            if isinstance(node.get("source"), str) and "shard_size" in node:
                return node["source"], int(node["shard_size"])
            for value in node.values():
                hit = walk(value)
                if hit:
                    return hit
        return None

    return walk(manifest)


def token_colours(codebook_size: int) -> Any:
    """A fixed colour per token id (hashed hue), so a token looks the same in every map."""
    import numpy as np

    colours = np.zeros((codebook_size, 3), dtype=np.float32)
    for i in range(codebook_size):
        h = int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:4], "little")
        hue, light = (h % 360) / 360, 0.35 + 0.3 * ((h >> 9) % 100) / 100
        colours[i] = colorsys.hls_to_rgb(hue, light, 0.75)
    return colours  # [V, 3] in [0, 1]


# ---------------------------------------------------------------------------------------------
# Sections: each returns HTML and writes its figures into the report folder


class Report:
    """Collects sections of HTML; figures go to ``self.dir``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.dir = run_dir / "report"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sections: list[tuple[str, str, str]] = []  # (id, title, html)
        self.problems: list[str] = []

    def figure(self, fig: Any, name: str, alt: str) -> str:
        """Save a matplotlib figure as ``name`` and return its <img> tag."""
        import matplotlib.pyplot as plt

        path = self.dir / name
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'

    def section(self, sid: str, title: str, build: Callable[[], str]) -> None:
        """Run ``build``; on error, show the reason in place of the section."""
        try:
            body = build()
        except Exception as err:  # noqa: BLE001 - a report shows what it can
            log.warning("report section %s failed: %s", sid, err)
            log.debug("%s", traceback.format_exc())
            reason = f"{type(err).__name__}: {err}"
            self.problems.append(f"{title}: {reason}")
            body = f'<p class="missing">Not available: {html.escape(reason)}</p>'
        self.sections.append((sid, title, body))


def _plot_curves(rep: Report, stage: str, records: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return f"<p class='missing'>{stage}: metrics.jsonl is empty.</p>"
    # Stages log step records and epoch records (kind=step|epoch); a key is drawn from the step
    # records when they have it, else from the epoch records (e.g. eval-pass codebook usage).
    steps = [r for r in records if r.get("kind", "step") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    skip = {"epoch", "step", "iter", "seconds", "lr", "samples_per_s", "images_per_s"}
    numeric = sorted(
        {k for r in records for k, v in r.items() if isinstance(v, (int, float))} - skip
    )
    groups = {
        "loss": [k for k in numeric if "loss" in k],
        "accuracy / cosine": [k for k in numeric if "acc" in k or "cos" in k or "top" in k],
        "codebook usage": [k for k in numeric if "usage" in k or "used" in k],
        "perplexity": [k for k in numeric if "perplex" in k],
    }
    groups = {name: keys for name, keys in groups.items() if keys}
    if not groups:
        return f"<p class='missing'>{stage}: no plottable metrics in metrics.jsonl.</p>"

    def points(key: str) -> list[tuple[float, float]]:
        source = steps if any(key in r for r in steps) else epochs or records
        return [
            (r.get("step", r.get("epoch", i)), r[key])
            for i, r in enumerate(source)
            if isinstance(r.get(key), (int, float))
        ]

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.0), squeeze=False)
    for ax, (name, keys) in zip(axes[0], groups.items(), strict=True):
        for key in keys:
            pts = points(key)
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key, marker="." if len(pts) < 30 else None)
        ax.set_title(f"{stage}: {name}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    img = rep.figure(fig, f"curves-{stage}.png", f"{stage} training curves")
    last = {k: points(k)[-1][1] for k in numeric if points(k)}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    return f"<h3>{html.escape(stage)}</h3>{img}<p class='small'>last: {html.escape(summary)}</p>"


def section_curves(rep: Report) -> str:
    parts = []
    stage_dirs = [rep.run_dir / s for s in STAGE_DIRS]
    others = sorted(p.parent for p in rep.run_dir.rglob("metrics.jsonl"))
    seen: set[Path] = set()
    for d in stage_dirs + others:
        path = d / "metrics.jsonl"
        if d in seen or not path.is_file():
            continue
        seen.add(d)
        name = str(d.relative_to(rep.run_dir)).replace("/", "-")
        parts.append(_plot_curves(rep, name, read_jsonl(path)))
    missing = [s for s in ("vqkd", "pretrain") if not (rep.run_dir / s / "metrics.jsonl").is_file()]
    if missing:
        parts.append(f"<p class='missing'>No metrics for: {', '.join(missing)}.</p>")
    return "".join(parts) or "<p class='missing'>No stage wrote metrics.jsonl.</p>"


def _token_counts(tokens_dir: Path) -> tuple[Any, Any]:
    import numpy as np

    from shards.reader import open_token_dataset

    ds = open_token_dataset(str(tokens_dir))
    counts = np.zeros(ds.codebook_size, dtype=np.int64)
    for i in range(ds.num_shards):
        if i in ds.missing_shards:
            continue
        for row in ds.read_shard(i).values():
            counts += np.bincount(row.tokens.reshape(-1).astype(np.int64), minlength=len(counts))
    return ds, counts


def section_codebook(rep: Report) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tokens_dir = find_token_dataset(rep.run_dir)
    if tokens_dir is None:
        raise FileNotFoundError("no token dataset (tokenize stage) in this run")
    ds, counts = _token_counts(tokens_dir)
    total = int(counts.sum())
    used = int((counts > 0).sum())
    p = counts[counts > 0] / max(total, 1)
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if total else 0.0
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].bar(np.arange(len(counts)), counts, width=1.0, color="#4477aa")
    axes[0].set_title("token frequency by id")
    axes[0].set_xlabel("token id")
    axes[1].plot(np.sort(counts)[::-1], color="#aa3377")
    axes[1].set_yscale("symlog")
    axes[1].set_title("frequency, sorted (rank plot)")
    axes[1].set_xlabel("rank")
    img = rep.figure(fig, "codebook-histogram.png", "codebook usage histogram")
    return (
        f"{img}<p>{used} of {ds.codebook_size} tokens used ({100 * used / ds.codebook_size:.1f}%) "
        f"over {total} tokens ({len(ds.seeds)} seeds); perplexity {perplexity:.1f}. "
        f"Dataset: <code>{html.escape(str(tokens_dir))}</code></p>"
    )


def _example_rows(tokens_dir: Path, n: int) -> tuple[Any, list, dict]:
    """(dataset, first n token rows of shard 0, key -> decoded image)."""
    from shards.decode import decode_image
    from shards.images import iter_shard, list_shards
    from shards.reader import open_token_dataset

    ds = open_token_dataset(str(tokens_dir))
    source = _image_source(ds.manifest)
    if source is None:
        raise ValueError("the token dataset's manifest does not name its image source")
    first = next(i for i in range(ds.num_shards) if i not in ds.missing_shards)
    rows = list(ds.read_shard(first).values())[:n]
    wanted = {r.key for r in rows}
    images = {}
    shard = list_shards(source[0], source[1])[first]
    for rec in iter_shard(shard):
        if rec.key in wanted and not rec.error:
            images[rec.key] = decode_image(rec.data)
        if len(images) == len(wanted):
            break
    return ds, [r for r in rows if r.key in images], images


def _token_map(tokens: Any, grid: tuple[int, int], colours: Any) -> Any:
    return colours[tokens.astype("int64").reshape(grid)]  # [h, w, 3]


def section_token_maps(rep: Report) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shards.views import render_view

    tokens_dir = find_token_dataset(rep.run_dir)
    if tokens_dir is None:
        raise FileNotFoundError("no token dataset (tokenize stage) in this run")
    ds, rows, images = _example_rows(tokens_dir, MAX_EXAMPLES)
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
            ax_t.imshow(_token_map(row.tokens[s], grid, colours), interpolation="nearest")
            if grid[0] <= 8:
                for (y, x), t in zip(
                    [(y, x) for y in range(grid[0]) for x in range(grid[1])],
                    row.tokens[s].tolist(),
                    strict=True,
                ):
                    ax_t.text(x, y, str(t), ha="center", va="center", fontsize=5, color="white")
            ax_t.set_title("tokens", fontsize=8)
            for ax in (ax_v, ax_t):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r][0].set_ylabel(row.key[-18:], fontsize=7)
    img = rep.figure(fig, "token-maps.png", "views and their token maps across seeds")
    return (
        f"{img}<p>Each pair: the view rendered from the stored view parameters, then its "
        f"{grid[0]}x{grid[1]} tokens (colour = token id, the same id has the same colour "
        "everywhere).</p>"
    )


def section_mim(rep: Report) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from pretrain.export import split_checkpoint
    from pretrain.masking import block_mask
    from pretrain.model import BEiTv2
    from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, render_view, to_unit

    ckpt_path = find_checkpoint(rep.run_dir)
    if ckpt_path is None:
        raise FileNotFoundError("no pretrain checkpoint (pretrain/checkpoint.pth) in this run")
    tokens_dir = find_token_dataset(rep.run_dir)
    if tokens_dir is None:
        raise FileNotFoundError("no token dataset to take targets from")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state, mcfg = split_checkpoint(ckpt)
    model = BEiTv2(mcfg)
    model.load_state_dict(state)
    model.eval()
    ds, rows, images = _example_rows(tokens_dir, MAX_EXAMPLES)
    grid = mcfg.grid
    num_masked = max(1, round(mcfg.num_patches * 75 / 196))  # the reference's 75 of 196
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(rows), 2, figsize=(5, 2.5 * len(rows)), squeeze=False)
    right_all, masked_all = 0, 0
    for r, row in enumerate(rows):
        view = render_view(images[row.key], row.views[0])  # uint8 [3, H, W]
        x = normalize(to_unit(view[None]), IMAGENET_MEAN, IMAGENET_STD)  # [1, 3, H, W]
        mask_np = block_mask(grid, num_masked, rng, min_patches=min(16, num_masked))
        mask = torch.from_numpy(np.asarray(mask_np, dtype=bool))[None]  # [1, N]
        targets = torch.from_numpy(row.tokens[0].astype(np.int64))[None]  # [1, N]
        with torch.no_grad():
            pred = model(x, mask)["logits"].argmax(-1)  # [M]
        right = (pred == targets[mask]).numpy()
        right_all += int(right.sum())
        masked_all += int(right.size)
        overlay = np.zeros((*grid, 4), dtype=np.float32)  # RGBA per patch
        flat = overlay.reshape(-1, 4)
        idx = np.flatnonzero(mask_np)
        flat[idx[right]] = (0.1, 0.8, 0.2, 0.65)
        flat[idx[~right]] = (0.9, 0.1, 0.1, 0.55)
        img = view.permute(1, 2, 0).numpy()
        axes[r][0].imshow(img)
        axes[r][0].set_title("view (seed 0)", fontsize=8)
        axes[r][1].imshow(img)
        h, w = img.shape[:2]
        axes[r][1].imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
        axes[r][1].set_title(f"{int(right.sum())}/{right.size} masked right", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig_html = rep.figure(fig, "mim-predictions.png", "MIM predictions on masked patches")
    acc = 100 * right_all / max(masked_all, 1)
    return (
        f"{fig_html}<p>Green: masked patch whose token the final layer predicted right; red: "
        f"wrong; clear: visible. {right_all}/{masked_all} right ({acc:.1f}%; chance "
        f"{100 / mcfg.vocab_size:.2f}%). Checkpoint <code>{html.escape(str(ckpt_path))}</code>.</p>"
    )


def section_linprobe(rep: Report) -> str:
    results = []
    for path in sorted(rep.run_dir.rglob("results.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(res, dict) and "top1" in res:
            results.append((path, res))
    if not results:
        raise FileNotFoundError("no linear-probe results.json in this run")
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(str(path.parent.relative_to(rep.run_dir)))}</td>"
        f"<td>{html.escape(str(res.get('backbone', '')))}</td>"
        f"<td>{html.escape(str(res.get('pool', '')))}</td>"
        f"<td>{res['top1']:.2f}</td><td>{res.get('top5', float('nan')):.2f}</td>"
        f"<td>{res.get('num_classes', '')}</td><td>{res.get('num_train', '')}</td>"
        f"<td>{res.get('num_val', '')}</td></tr>"
        for path, res in results
    )
    return (
        "<table><tr><th>run</th><th>backbone</th><th>features</th><th>top-1 %</th>"
        "<th>top-5 %</th><th>classes</th><th>train</th><th>val</th></tr>"
        f"{rows}</table>"
    )


def section_timings(rep: Report) -> str:
    summary_path = rep.run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError("no summary.json (written by `pipeline run stage=all`)")
    summary = json.loads(summary_path.read_text())
    stages = summary.get("stages", {})
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{info.get('seconds', '')}</td>"
        f"<td>{html.escape(str(info.get('status', '')))}</td>"
        f"<td><code>{html.escape(str(info.get('command', '')))}</code></td></tr>"
        for name, info in stages.items()
    )
    total = summary.get("seconds", "")
    return (
        "<table><tr><th>stage</th><th>seconds</th><th>status</th><th>rerun alone with</th></tr>"
        f"{rows}</table><p>Total: {total} s.</p>"
    )


def section_files(rep: Report) -> str:
    items = []
    for d in sorted(p for p in rep.run_dir.iterdir() if p.is_dir() and p.name != "report"):
        files = [p for p in d.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        notable = [
            p
            for p in files
            if p.name
            in (
                "config.yaml",
                "metrics.jsonl",
                "manifest.json",
                "results.json",
                "checkpoint.pth",
                "tokenizer.pth",
                "backbone_timm.pth",
                "index.json",
            )
        ][:8]
        links = ", ".join(
            f'<a href="../{html.escape(str(p.relative_to(rep.run_dir)))}">'
            f"{html.escape(str(p.relative_to(d)))}</a>"
            for p in sorted(notable)
        )
        items.append(
            f"<li><code>{html.escape(str(d))}</code>: {len(files)} files, "
            f"{size / 1e6:.1f} MB. {links}</li>"
        )
    return f"<ul>{''.join(items)}</ul>" if items else "<p class='missing'>No stage folders.</p>"


STYLE = """
body { font-family: sans-serif; max-width: 1150px; margin: 1em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
img { max-width: 100%; } table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
.missing { color: #a33; } .small { font-size: 0.8em; color: #555; } code { font-size: 0.85em; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report/index.html`` (+ PNGs beside it) and return its path."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass a run's out_dir")
    rep = Report(run_dir)
    present = [s for s in STAGE_DIRS if (run_dir / s).is_dir()]
    absent = [s for s in STAGE_DIRS if s not in present]
    rep.section("timings", "Timings", lambda: section_timings(rep))
    rep.section("curves", "Training curves", lambda: section_curves(rep))
    rep.section("codebook", "Codebook usage", lambda: section_codebook(rep))
    rep.section("token-maps", "Views and token maps", lambda: section_token_maps(rep))
    rep.section("mim", "MIM predictions", lambda: section_mim(rep))
    rep.section("linprobe", "Linear probe", lambda: section_linprobe(rep))
    rep.section("files", "Where the files are", lambda: section_files(rep))
    nav = " · ".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in rep.sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>'
        for sid, title, content in rep.sections
    )
    stages_line = f"Stages present: {', '.join(present) or 'none'}."
    if absent:
        stages_line += f" Missing: {', '.join(absent)}."
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>BEiT v2 run report: {html.escape(run_dir.name)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>BEiT v2 from precomputed tokens: run report</h1>"
        f"<p>Run directory <code>{html.escape(str(run_dir))}</code>. {stages_line}</p>"
        f"<p>{nav}</p>{body}</body></html>"
    )
    out = rep.dir / "index.html"
    out.write_text(page)
    log.info("report written to %s (%d sections unavailable)", out, len(rep.problems))
    return out


def main(argv: list[str]) -> int:
    """``pipeline report <run dir>``: write the report and print its path."""
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: pipeline report <run dir>")
        return 0
    if len(argv) != 1:
        print(f"usage: pipeline report <run dir>; got {argv}", file=sys.stderr)
        return 2
    try:
        path = write_report(argv[0])
    except FileNotFoundError as err:
        print(f"report failed: {err}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0
