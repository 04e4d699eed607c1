"""What a pretrained model predicts: a few stored views with a block mask, right and wrong patches.

The targets are the stored tokens of the token dataset the run trained on (its ``tokens=``, or the
one token dataset in the report); the mask is the reference's block masking at its 75 of 196
patches (docs/method.md §3), scaled to the model's grid.
"""

from __future__ import annotations

import html

import numpy as np
import torch

from engine.checkpoint import load_file
from engine.plots import pyplot
from pipeline.report.base import Report, per_part
from pipeline.report.discover import Part, token_dataset_of
from pipeline.report.tokens import MAX_EXAMPLES, example_rows
from pretrain.checkpoints import split_checkpoint
from pretrain.masking import block_mask
from pretrain.model import BEiTv2
from shards.views import IMAGENET_MEAN, IMAGENET_STD, normalize, render_view, to_unit


def predictions(rep: Report, part: Part) -> str:
    plt = pyplot()

    ckpt_path = part.path / "checkpoint.pth"
    tokens_dir = token_dataset_of(part, rep.parts)
    if tokens_dir is None:
        named = part.config.get("tokens") or "(none in config.yaml)"
        raise FileNotFoundError(
            f"the token dataset this run trained on ({named}) is not on this disk; "
            "pass its folder to `pipeline report` beside the run"
        )
    state, mcfg = split_checkpoint(load_file(ckpt_path))
    model = BEiTv2(mcfg)
    model.load_state_dict(state)
    model.eval()
    ds, rows, images = example_rows(tokens_dir, MAX_EXAMPLES)
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
        axes[r][0].set_title(f"view (seed {ds.seeds[0]})", fontsize=8)
        axes[r][1].imshow(img)
        h, w = img.shape[:2]
        axes[r][1].imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
        axes[r][1].set_title(f"{int(right.sum())}/{right.size} masked right", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig_html = rep.figure(fig, f"mim-{part.slug}", "MIM predictions on masked patches")
    acc = 100 * right_all / max(masked_all, 1)
    return (
        f"{fig_html}<p>Green: masked patch whose token the final layer predicted right; red: "
        f"wrong; clear: visible. {right_all}/{masked_all} right ({acc:.1f}%; chance "
        f"{100 / mcfg.vocab_size:.2f}%). Targets from <code>{html.escape(str(tokens_dir))}</code>."
        "</p>"
    )


def section_mim(rep: Report) -> str:
    parts = [p for p in rep.of_kind("pretrain") if p.file("checkpoint.pth")]
    return per_part(rep, parts, lambda part: predictions(rep, part))
