"""Learning-signal check: does BEiT v2 pretrained from *precomputed* tokens learn?

Linear-probe top-1 on two labelled sets, for four feature sources, over several seeds:

* ``random``: a randomly initialised backbone of the same shape (the floor);
* ``offline``: BEiT v2 pretrained from the stored tokens (this project's way);
* ``online``: the same pretraining with ``targets=online`` (tokenizer in the loop, the reference's
  way); offline should match it within the seed spread;
* ``teacher``: the VQ-KD teacher's own features (EfficientNet-Lite0, mean-pooled), the ceiling the
  tokenizer distils.

Data sets:

* **Fashion-MNIST** from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
  the standard train/test split; skipped with a message when the package is absent). The 28 px
  greyscale images are written as PNG ImageFolders (subsets, sizes configurable).
* **The ImageNet sample** (1000 images, one per class) with a **coarse labelling** by ImageNet
  class-index ranges, which follow the WordNet hierarchy (e.g. 151-268 are all dog breeds):
  fish, birds, reptiles & amphibians, invertebrates, dogs, other mammals, food/plants/fungi,
  landscapes, and man-made objects (see ``COARSE_IMAGENET``). With one image per class, the
  1000 fine classes cannot be probed; nine coarse groups give 11-530 images each (the three
  people classes 981-983 count as objects), and the
  majority-class rate (objects) is printed as the trivial baseline. The images are
  symlinked into an ImageFolder (never copied).

Per data set the tokenizer (``vqkd`` demo preset, EfficientNet-Lite0 teacher) is trained and the
corpus tokenized once; pretraining (offline and online) and probes repeat per seed. Results:
a table on stdout and ``benchmarks/results/learning_signal.json``.

    .venv/bin/python benchmarks/bench_learning_signal.py [--seeds 0 1 2] [--fashion-train 6000]
        [--fashion-test 2000] [--pretrain-epochs 10] [--vqkd-epochs 8] [--skip-imagenet]
        [--set vqkd:model.depth=4 ...]   (any stage key; sizes are the stages' demo presets)
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import smoke
import torch
from PIL import Image

from engine.config import merge, parse_overrides
from engine.layout import imagenet_sample_dir
from pipeline.cli import build_stage_config
from pipeline.stages import get_stage
from tokenize_corpus.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip
IMAGENET_SAMPLE = imagenet_sample_dir()  # $IMAGENET_SAMPLE, see engine/layout.py

# ImageNet-1k class index ranges (sorted-wnid order) -> coarse group. The index order follows
# WordNet, so contiguous ranges are semantic groups; anything not listed is "objects".
COARSE_IMAGENET: dict[str, list[tuple[int, int]]] = {
    "fish": [(0, 6), (389, 397)],
    "birds": [(7, 24), (127, 146)],
    "reptiles_amphibians": [(25, 68)],
    "invertebrates": [(69, 126), (300, 329)],
    "dogs": [(151, 268)],
    "other_mammals": [(147, 150), (269, 299), (330, 388)],
    "food_plants_fungi": [(924, 969), (984, 998)],
    "landscapes": [(970, 980)],
}

SMOKE = [
    "--seeds=0", "--view-seeds", "0", "1", "--vqkd-epochs=1", "--pretrain-epochs=1",
    "--probe-steps=5", "--skip-fashion", "--imagenet={imagenet}", "--work-dir={tmp}/work",
    "--out={tmp}/learning_signal.json", *smoke.TINY_STAGES,
]  # fmt: skip

log = logging.getLogger("bench_learning_signal")


def coarse_label(index: int) -> str:
    """The coarse group of ImageNet class ``index``."""
    for name, ranges in COARSE_IMAGENET.items():
        if any(lo <= index <= hi for lo, hi in ranges):
            return name
    return "objects"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_folders(work: Path, n_train: int, n_test: int) -> tuple[str, str] | None:
    """Fashion-MNIST subsets as PNG ImageFolders (train, test); None when not installed."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        print(
            f"Fashion-MNIST not found in {FASHION_DIR}: `apt-get install dataset-fashion-mnist` "
            "(Debian) to include it; skipping"
        )
        return None
    out = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        folder = work / "fashion" / split
        images = _read_idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz")
        rng = np.random.default_rng(0)  # a fixed, class-mixed subset
        pick = np.sort(rng.permutation(len(labels))[:n])
        for i in pick:
            cls = FASHION_CLASSES[labels[i]]
            path = folder / cls / f"{split}_{i:05d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).convert("RGB").save(path)
        out.append(str(folder))
    return out[0], out[1]


def imagenet_folder(work: Path, sample: Path) -> str | None:
    """The ImageNet sample as a coarse-label ImageFolder of symlinks; None when absent."""
    files = sorted(sample.glob("*.JPEG"))
    if not files:
        print(f"ImageNet sample not found at {sample}; skipping")
        return None
    wnids = sorted({f.name.split("_")[0] for f in files})
    index = {w: i for i, w in enumerate(wnids)}
    folder = work / "imagenet-coarse-images"  # not the stage outputs' folder: it lists classes
    for f in files:
        link = folder / coarse_label(index[f.name.split("_")[0]]) / f.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), link)
    return str(folder)


EXTRA: dict[str, list[str]] = {}  # stage -> key=value overrides from --set


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set STAGE:KEY=VALUE``, repeatable: a key for every ``run_stage`` of that stage."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="extra stage override, e.g. --set vqkd:model.depth=4 --set pretrain:train.batch_size=64",
    )


def use_set(items: list[str]) -> None:
    """Keep the ``--set`` items for ``run_stage``."""
    for item in items:
        stage, _, kv = item.partition(":")
        EXTRA.setdefault(stage, []).append(kv)


REUSE = False  # --reuse: keep stage outputs that already exist (to add probes to a finished run)
DONE_MARKERS = {
    "pack": "index.json",
    "vqkd": "tokenizer.pth",
    "tokenize": "manifest.json",
    "pretrain": "backbone_timm.pth",
}


def run_stage(name: str, overrides: dict[str, Any]) -> dict:
    """One stage through the registry, exactly as ``pipeline run`` would run it."""
    marker = DONE_MARKERS.get(name)
    if REUSE and marker and (Path(overrides["out_dir"]) / marker).exists():
        log.info("%s: reusing %s", name, overrides["out_dir"])
        return {}
    start = time.perf_counter()
    overrides = merge(overrides, parse_overrides(EXTRA.get(name, [])))
    summary = get_stage(name).run_fn()(build_stage_config(name, overrides)) or {}
    log.info("%s done in %.1f s", name, time.perf_counter() - start)
    if summary.get("exit_code"):
        raise RuntimeError(f"stage {name} failed: {summary}")
    return summary


def bench_dataset(name: str, train: str, test: str | None, work: Path, args: Any) -> dict:
    """Tokenizer + tokens once, then per seed: pretrain offline/online and four probes."""
    d = work / name
    shards = f"{d}/pack/shard-*.tar"
    run_stage("pack", {"images": train, "out_dir": str(d / "pack"), "shard_size": 512})
    vqkd = run_stage(
        "vqkd",
        {
            "preset": "demo",
            "images": shards,
            "out_dir": str(d / "vqkd"),
            "train": {"epochs": args.vqkd_epochs},
        },
    )
    tokenizer = str(vqkd.get("tokenizer") or d / "vqkd" / "tokenizer.pth")
    tok = load_tokenizer(tokenizer)
    size, patch = int(tok.image_size), int(tok.patch_size)
    run_stage(
        "tokenize",
        {
            "preset": "demo",
            "images": shards,
            "tokenizer": tokenizer,
            "out_dir": str(d / "tokens"),
            "seeds": list(args.view_seeds),
            "aug": {"size": size},
        },
    )
    probe_common = {"preset": "demo", "images": shards, "train": {"steps": args.probe_steps}}
    if test:
        probe_common["images_val"] = test
    kinds = ["random", "offline", "online", "teacher"]
    # Pooling variants of the pretrained backbones: "auto" is the paper's choice (the CLS token
    # when the CLS head was trained); "mean" pools patches like the random and teacher rows.
    kinds += [f"{k}/{pool}" for pool in args.pools if pool != "auto" for k in ("offline", "online")]
    results: dict[str, list[float]] = {k: [] for k in kinds}
    classes = None
    counts = [sum(1 for _ in c.iterdir()) for c in Path(test or train).iterdir() if c.is_dir()]
    majority = 100 * max(counts) / max(1, sum(counts))
    for seed in args.seeds:
        backbones: dict[str, str] = {}
        for targets in ("offline", "online"):
            if targets == "online" and seed not in args.online_seeds:
                continue
            out = d / f"pretrain-{targets}-{seed}"
            run_stage(
                "pretrain",
                {
                    "preset": "demo",
                    "images": shards,
                    "tokens": str(d / "tokens"),
                    "out_dir": str(out),
                    "targets": targets,
                    "tokenizer": tokenizer if targets == "online" else None,
                    "model": {"image_size": size, "patch_size": patch},
                    "train": {"epochs": args.pretrain_epochs, "seed": seed},
                },
            )
            backbones[targets] = str(out / "backbone_timm.pth")
        model_cfg = torch.load(
            d / f"pretrain-offline-{seed}" / "checkpoint.pth", map_location="cpu", weights_only=True
        )["config"]["model"]
        shape = {k: model_cfg[k] for k in ("image_size", "patch_size", "width", "depth", "heads")}
        probes = {
            "random": {"backbone": "random", "random_init": {**shape, "seed": seed}},
            "offline": {"backbone": backbones["offline"]},
            "online": {"backbone": backbones.get("online")},
            "teacher": {"backbone": "teacher:efficientnet_lite0", "image_size": size},
        }
        for pool in args.pools:
            if pool != "auto":
                for k in ("offline", "online"):
                    probes[f"{k}/{pool}"] = {"backbone": backbones.get(k), "pool": pool}
        for kind, extra in probes.items():
            if extra.get("backbone") is None:  # no online run for this seed
                continue
            res = run_stage(
                "linprobe",
                {
                    **probe_common,
                    **extra,
                    "out_dir": str(d / f"probe-{kind.replace('/', '-')}-{seed}"),
                    "train": {"steps": args.probe_steps, "seed": seed},
                },
            )
            results[kind].append(float(res["top1"]))
            if kind == "random":
                classes = res["num_classes"]
    return {
        "top1": results,
        "num_classes": classes,
        "majority_class_top1": round(majority, 2),  # the trivial baseline (of the whole set)
        "image_size": size,
        "patch_size": patch,
    }


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {spread:4.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--view-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--fashion-train", type=int, default=6000)
    parser.add_argument("--fashion-test", type=int, default=2000)
    parser.add_argument("--vqkd-epochs", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--probe-steps", type=int, default=500)
    parser.add_argument("--imagenet", type=Path, default=IMAGENET_SAMPLE)
    parser.add_argument("--skip-imagenet", action="store_true")
    parser.add_argument("--skip-fashion", action="store_true")
    add_set_argument(parser)
    parser.add_argument(
        "--pools",
        nargs="+",
        default=["auto", "mean"],
        help="pooling variants for pretrained probes",
    )
    parser.add_argument(
        "--online-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds that also pretrain with targets=online (default: all of --seeds)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep existing stage outputs in --work-dir"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_learning_signal"))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/learning_signal.json"
    )
    args = smoke.parse_args(parser, SMOKE, argv)
    global REUSE
    REUSE = args.reuse
    if args.online_seeds is None:
        args.online_seeds = list(args.seeds)
    use_set(args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "datasets": {}}
    if args.skip_fashion:
        smoke.skipped("Fashion-MNIST", "--skip-fashion")
    else:
        folders = fashion_folders(args.work_dir, args.fashion_train, args.fashion_test)
        if folders:
            report["datasets"]["fashion-mnist"] = bench_dataset(
                "fashion-mnist", folders[0], folders[1], args.work_dir, args
            )
    if args.skip_imagenet:
        smoke.skipped("the ImageNet sample", "--skip-imagenet")
    else:
        folder = imagenet_folder(args.work_dir, args.imagenet)
        if folder:
            report["datasets"]["imagenet-coarse"] = bench_dataset(
                "imagenet-coarse", folder, None, args.work_dir, args
            )
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["cpu_count"] = os.cpu_count()

    print(f"\nlinear-probe top-1 (%), mean ± stdev over seeds {args.seeds}")
    for name, res in report["datasets"].items():
        print(f"{'dataset':<18}" + "".join(f"{k:>16}" for k in res["top1"]))
        row = "".join(f"{_fmt(v):>16}" for v in res["top1"].values())
        print(f"{name:<18}{row}   (majority class {res['majority_class_top1']:.1f})")
        rnd = res["top1"]["random"]
        for kind in [k for k in res["top1"] if k.startswith("offline")]:
            off = res["top1"][kind]
            if off and rnd:
                margins = [o - r for o, r in zip(off, rnd, strict=True)]
                res[f"{kind}_minus_random"] = margins
                print(f"{'':<18}{kind} - random: {_fmt(margins)} points")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
