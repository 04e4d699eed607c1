"""``--smoke``: every benchmark's tiny run, in seconds, for CI (``tests/benchmarks/test_smoke.py``).

A benchmark declares its smoke run as command-line words, e.g. ``["--rounds=1", "--files=2",
"--out={tmp}/key_index.json"]``; ``parse_args`` puts them before the words it was given, so the
same code runs on tiny inputs and an option given by hand still wins. Placeholders name the
stand-ins for what CI lacks:

* ``{tmp}``: a new temp folder for this run (outputs never go to ``benchmarks/results``);
* ``{imagenet}``: a synthetic folder named like the ImageNet sample (``synthetic.imagenet_sample``);
* ``{tokenizer}``, ``{tokenizer_b}``: two tiny random tokenizers (``synthetic.tokenizer``);
* ``{dask}``: the address of a 1-worker local Dask cluster kept for the whole run, so the many
  small stage-2 runs of the stage-3 benchmarks do not each start a cluster
  (``cluster.address=``, the path of an external scheduler).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import synthetic

RESULTS = Path(__file__).resolve().parent / "results"

# Stage keys that shrink the demo presets to seconds: the 32 px, 4x4 grid of the tiny tokenizer
# (synthetic.TINY_VQKD), a 1-block student, no loader workers, stage 2 on the shared cluster.
TINY: dict[str, list[str]] = {
    "vqkd": [
        "model.image_size=32", "model.patch_size=8", "model.width=32", "model.depth=1",
        "model.heads=2", "model.decoder_depth=1", "model.codebook_size=16",
        "model.kmeans_iters=2", "train.batch_size=16", "train.num_workers=0",
        "eval.max_images=16",
    ],
    "tokenize": ["cluster.address={dask}", "batch_size=16"],
    "pretrain": [
        "model.image_size=32", "model.patch_size=8", "model.width=32", "model.depth=1",
        "model.heads=2", "model.head_from_layer=1", "model.head_layers=1", "mask.num_masked=6",
        "mask.min_patches=2", "train.batch_size=8", "train.num_workers=0",
    ],
    "linprobe": ["feature_batch_size=16"],
}  # fmt: skip
# the same as bench_learning_signal's --set words
TINY_STAGES = [f"--set={stage}:{kv}" for stage, kvs in TINY.items() for kv in kvs]


class _StandIns:
    """Makes each placeholder's stand-in once, when a word first names it."""

    def __init__(self, name: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{name}-smoke-"))
        self.made: dict[str, str] = {"{tmp}": str(self.tmp)}
        self.cluster = None

    def make(self, placeholder: str) -> str:
        if placeholder == "{imagenet}":
            return str(synthetic.imagenet_sample(self.tmp / "imagenet-sample"))
        if placeholder == "{tokenizer}":
            return synthetic.tokenizer(self.tmp / "tokenizer.pth", seed=0)
        if placeholder == "{tokenizer_b}":
            return synthetic.tokenizer(self.tmp / "tokenizer_b.pth", seed=1)
        if placeholder == "{dask}":
            from distributed import LocalCluster  # heavy, and only the stage-2 benchmarks use it

            self.cluster = LocalCluster(
                n_workers=1, threads_per_worker=1, dashboard_address=None,
                silence_logs=logging.ERROR,
            )  # fmt: skip
            atexit.register(self.cluster.close)
            return self.cluster.scheduler_address
        raise ValueError(f"unknown smoke placeholder {placeholder}")

    def fill(self, word: str) -> str:
        for placeholder in ("{tmp}", "{imagenet}", "{tokenizer}", "{tokenizer_b}", "{dask}"):
            if placeholder in word:
                if placeholder not in self.made:
                    self.made[placeholder] = self.make(placeholder)
                word = word.replace(placeholder, self.made[placeholder])
        return word


def parse_args(
    parser: argparse.ArgumentParser, smoke: Sequence[str], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``parser``'s arguments plus ``--smoke``, which runs as if ``smoke`` came first."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run in seconds, as CI runs it: the script's SMOKE arguments go first "
        "(see benchmarks/smoke.py)",
    )
    words = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in words:
        stand_ins = _StandIns(Path(parser.prog).stem)
        words = [stand_ins.fill(w) for w in smoke] + words
        print(f"smoke run in {stand_ins.tmp}", flush=True)
    args = parser.parse_args(words)
    if args.smoke:
        for name, value in vars(args).items():
            if isinstance(value, str | Path) and str(value):
                path = Path(value).resolve()
                if path == RESULTS or RESULTS in path.parents:
                    parser.error(f"--smoke never writes under {RESULTS}: --{name}={value}")
    return args


def skipped(part: str, why: str) -> dict:
    """Say that ``part`` did not run and why; returns its entry for the results JSON."""
    print(f"skipped {part}: {why}", flush=True)
    return {"skipped": f"skipped: {why}"}
