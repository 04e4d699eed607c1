"""What finite K costs: K stored view seeds against a fresh view every epoch.

Same images, same tiny student, same steps; only the views differ:

* ``K=1, 2, 4, 8``: stage 3 reads ``views.seeds=[0..K-1]`` of one token dataset (tokenized once
  with seeds 0-7), so each image cycles through its K stored views;
* ``fresh``: ``targets=online views.source=fresh``: a new view of every image each epoch with the
  tokenizer in the loop, as the reference trains.

Measured per run seed (3 by default): MIM top-1 accuracy on **held-out views** (seed 100, never
trained on, fixed masks, stored tokens as targets), the linear probe (coarse ImageNet groups,
mean-pooled features of the exported backbone) and the pretraining wall time. Results: a table on
stdout and ``benchmarks/results/seeds_k.json`` (+ ``seeds_k.png``; the JSON records the command
that made it). ``pipeline report benchmarks/results`` shows the study on the report page; its plot
lives in ``pipeline/report/views_study.py``.

    .venv/bin/python benchmarks/bench_seeds.py --tokenizer <demo tokenizer.pth> \
        [--images 250] [--epochs 8] [--seeds 0 1 2] [--work-dir /tmp/bench_seeds]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402
from bench_learning_signal import add_set_argument, coarse_label, run_stage, use_set  # noqa: E402

from engine.layout import imagenet_sample_dir  # noqa: E402
from pipeline.report.views_study import mean_spread, plot  # noqa: E402
from pretrain.checkpoints import split_checkpoint
from pretrain.data import MIMDataset
from pretrain.masking import num_masked_for
from pretrain.model import BEiTv2
from shards.reader import open_token_dataset
from tokenize_corpus.tokenizer import tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_SEED = 100
SMOKE = [
    "--tokenizer={tokenizer}", "--sample={imagenet}", "--images=16", "--epochs=1", "--seeds=0",
    "--ks", "1", "2", "--probe-steps=5", "--work-dir={tmp}/work", "--out={tmp}/seeds_k.json",
    *smoke.TINY_STAGES,
]  # fmt: skip
log = logging.getLogger("bench_seeds")


def subset_folder(work: Path, sample: Path, count: int) -> Path:
    """Every n-th ImageNet-sample image (class-spread) as a coarse-label ImageFolder of links."""
    files = sorted(sample.glob("*.JPEG"))
    wnids = sorted({f.name.split("_")[0] for f in files})
    index = {w: i for i, w in enumerate(wnids)}
    step = max(1, len(files) // count)
    folder = work / "images"
    for f in files[::step][:count]:
        link = folder / coarse_label(index[f.name.split("_")[0]]) / f.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), link)
    return folder


def study_start(args: argparse.Namespace) -> tuple[Path, str]:
    """How every views study starts (this script, bench_precision_training, bench_token_sets):
    the training set of ``--set``, logging, ``--work-dir`` and the subset of ``--sample`` packed
    into shards. Returns (work folder, shard glob)."""
    use_set(args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    folder = subset_folder(work, args.sample, args.images)
    shards = f"{work}/pack/shard-*.tar"
    run_stage("pack", {"images": str(folder), "out_dir": str(work / "pack"), "shard_size": 64})
    return work, shards


def tokenize_study(
    shards: str, tokenizer: str, seeds: list[int], tokens: Path, heldout: Path, **settings: object
) -> float:
    """Stage 2 of a study (demo preset, the tokenizer's image size, ``settings`` on top): ``seeds``
    into ``tokens``, then the held-out seed into ``heldout``; the first run's seconds."""
    size = int(tokenizer_info(tokenizer)["image_size"])
    common = {"preset": "demo", "images": shards, "tokenizer": tokenizer, "aug": {"size": size}}
    common |= settings
    start = time.perf_counter()
    run_stage("tokenize", {**common, "out_dir": str(tokens), "seeds": list(seeds)})
    seconds = time.perf_counter() - start
    run_stage("tokenize", {**common, "out_dir": str(heldout), "seeds": [HELD_OUT_SEED]})
    return seconds


@torch.no_grad()
def held_out_mim_accuracy(checkpoint: Path, images: str, heldout: str) -> float:
    """Final-layer MIM top-1 (%) on the held-out views, masks fixed by a run seed of 999."""
    state, mcfg = split_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model = BEiTv2(mcfg)
    model.load_state_dict(state)
    model.eval()
    tokens = open_token_dataset(heldout)
    grid = (mcfg.image_size // mcfg.patch_size,) * 2
    data = MIMDataset(
        images, tokens, vocab_size=mcfg.vocab_size, grid=grid, image_size=mcfg.image_size,
        num_masked=num_masked_for(grid), run_seed=999,
    )  # fmt: skip
    right = total = 0
    for batch in torch.utils.data.DataLoader(data, batch_size=64):
        mask = batch["mask"]
        logits = model(batch["view"], mask)["logits"]
        right += int((logits.argmax(-1) == batch["tokens"][mask]).sum())
        total += int(mask.sum())
    return 100.0 * right / max(1, total)


METRICS = ("heldout_mim_acc", "probe_top1", "pretrain_seconds")


def score_student(
    work: Path, tag: str, seed: int, shards: str, heldout: str, pretrain: dict, args, probe=None
) -> dict[str, float]:
    """Pretrain one student (demo preset + ``pretrain`` overrides, ``args.epochs``), then its
    held-out MIM top-1 on ``heldout`` and its linear probe (``args.probe_steps``; ``probe``: more
    probe ``train.*`` keys). Shared by the benchmarks that compare students."""
    out = work / f"pretrain-{tag}-{seed}"
    pretrain = dict(pretrain)
    train = {"epochs": args.epochs, "seed": seed, **pretrain.pop("train", {})}
    start = time.perf_counter()
    run_stage("pretrain", {"preset": "demo", "images": shards, "out_dir": str(out), **pretrain,
                           "train": train})  # fmt: skip
    seconds = time.perf_counter() - start
    acc = held_out_mim_accuracy(out / "checkpoint.pth", shards, heldout)
    result = run_stage("linprobe", {
        "preset": "demo", "images": shards, "backbone": str(out / "backbone_timm.pth"),
        "pool": "mean", "out_dir": str(work / f"probe-{tag}-{seed}"),
        "train": {"steps": args.probe_steps, "seed": seed, **(probe or {})},
    })  # fmt: skip
    scores = {
        "heldout_mim_acc": acc,
        "probe_top1": float(result["top1"]),
        "pretrain_seconds": seconds,
    }
    log.info("%s seed %d: %s", tag, seed, scores)
    return scores


def print_table(label: str, results: dict[str, dict[str, list[float]]]) -> None:
    """Mean ± stdev over run seeds of each configuration's three figures."""
    print(f"{label:<10}{'held-out MIM top-1 %':>24}{'probe top-1 %':>20}{'pretrain s':>14}")
    for name, res in results.items():
        row = [mean_spread(res[m]) for m in METRICS]
        print(f"{name:<10}" + "".join(f"{m:>14.2f} ± {sp:5.2f}" for m, sp in row))


def own_command(argv: list[str] | None, script: str = __file__) -> str:
    """This run's command line (interpreter and ``script`` relative to the repo when inside it)."""
    words = [os.path.abspath(sys.executable), str(Path(script).resolve())]
    for i, word in enumerate(words):
        if Path(word).is_relative_to(ROOT):
            words[i] = str(Path(word).relative_to(ROOT))
    return shlex.join([*words, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--sample", type=Path, default=imagenet_sample_dir())
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_seeds"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/seeds_k.json")
    add_set_argument(parser)
    args = smoke.parse_args(parser, SMOKE, argv)
    work, shards = study_start(args)
    tokenizer = str(args.tokenizer.resolve())
    seeds = list(range(max(args.ks)))
    tokenize_seconds = tokenize_study(shards, tokenizer, seeds, work / "tokens", work / "heldout")

    configs = {f"K={k}": {"views": {"seeds": list(range(k))}} for k in args.ks}
    configs["fresh"] = {"targets": "online", "tokenizer": tokenizer, "views": {"source": "fresh"}}
    results = {name: {m: [] for m in METRICS} for name in configs}
    for seed in args.seeds:
        for name, extra in configs.items():  # interleaved: every config once per run seed
            pretrain = {"tokens": str(work / "tokens"), **extra}
            scores = score_student(
                work, name.replace("=", ""), seed, shards, str(work / "heldout"), pretrain, args
            )
            for metric, value in scores.items():
                results[name][metric].append(value)

    print(f"\n{len(args.seeds)} run seeds, {args.images} images, {args.epochs} epochs each")
    print_table("views", results)
    report = {
        "command": own_command(argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "tokenize_seconds_8_seeds": round(tokenize_seconds, 1),
        "results": results,
        "load_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
