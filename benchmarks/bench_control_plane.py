"""The driver at ImageNet scale: time and peak memory of the control plane at 10 k to 1.28 M images.

For each scale N (images, 1,000 a shard: 1,282 shards at 1,281,167), built once under --work:

- the images: N tiny JPEGs as WebDataset tars (ImageNet-shaped keys ``n<wnid>/<wnid>_<i>``,
  1000 classes, a ``.cls`` label each) and the same files as an ImageFolder;
- a finished token dataset of them, written the way stage 2 writes it
  (``TokenDatasetDir.write_shard`` per shard, receipts with the real image-shard identity and the
  job identity of the rerun below, then the manifest), with fabricated tokens of a 4x4-grid,
  16-code tokenizer and views from ``sample_view``: a rerun of stage 2 finds every shard done.

Each operation then runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own:

  list        ``shards.images.list_shards`` of the tars, and of the folder (``list_folder``)
  resume      ``pipeline run stage=tokenize`` on the finished dataset, 2 local workers: the
              driver's wall time and memory; the receipts are checked by tasks on the workers
              (hashing every image and token byte there), and nothing is tokenized
  manifest    ``TokenDatasetDir.write_manifest`` (manifest.json + the card) from every receipt
  validate    ``pipeline validate DIR images=none`` (checksums, footers, both formats read and
              compared; no image read)
  inspect     ``pipeline inspect DIR`` (codebook usage over every token, plots)
  pretrain    stage 3's start: ``open_token_dataset`` + ``MIMDataset`` (checks before the first
              step) with the tars (aligned) and with the folder (``pretrain_by_key``: the key
              index, because the packing differs)

    .venv/bin/python benchmarks/bench_control_plane.py --scales 10000 100000 1281167 --repeats 3

Writes benchmarks/results/control_plane.json and control_plane.png (time and memory against N on
log-log axes, with each operation's growth exponent).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import smoke
import synthetic
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
PER_SHARD = 1000
CLASSES = 1000
SEEDS = (0, 1)
OPERATIONS = ("list", "list_folder", "resume", "manifest", "validate", "inspect", "pretrain",
              "pretrain_by_key")  # fmt: skip
SMOKE = ["--scales", "1500", "--repeats", "1", "--work={tmp}/work",
         "--out={tmp}/control_plane.json"]  # fmt: skip


# ---- building the inputs (once per scale, cached) ----------------------------------------------


def _jpegs(count: int = 16) -> list[bytes]:
    """A few distinct 16x16 JPEGs (the images' bytes repeat; their keys do not)."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


def keys_of(images: int) -> list[tuple[str, int]]:
    """(key, label) of ``images`` ImageNet-shaped images, class by class."""
    per, extra = divmod(images, CLASSES)
    keys = []
    for c in range(CLASSES):
        wnid = f"n{1440764 + 7919 * c:08d}"
        keys.extend((f"{wnid}/{wnid}_{i}", c) for i in range(per + (c < extra)))
    return keys


def _write_tar(path: Path, members: list[tuple[str, int]], jpegs: list[bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for j, (key, label) in enumerate(members):
            for name, data in (
                (f"{key}.jpg", jpegs[j % len(jpegs)]),
                (f"{key}.cls", b"%d" % label),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def _token_shard(job: tuple) -> None:
    """Write one shard of the fabricated token dataset (a worker of the build's pool)."""
    # The build's and the operations' imports are local: a measured process imports only what
    # its operation needs, so its peak RSS is that operation's (torch alone is ~480 MiB).
    from shards.dataset import TokenDatasetDir
    from shards.images import iter_shard, list_shards
    from shards.views import AugConfig, sample_view
    from shards.writer import TokenRow
    from tokenize_corpus.identity import image_shard_identity

    tars, tokens, index, identity, tokenizer = job
    shard = list_shards(tars)[index]
    aug, rng = AugConfig(size=32), np.random.default_rng(index)
    rows = []
    for record in iter_shard(shard):
        views = [sample_view(aug, record.key, s, 16, 16) for s in SEEDS]
        tokens_ = rng.integers(0, 16, (len(SEEDS), 16), dtype=np.uint16)
        rows.append(TokenRow(record.key, record.label, views, tokens_, record.sha256))
    TokenDatasetDir(tokens).write_shard(
        index, len(list_shards(tars)), shard.url, SEEDS, rows, [],
        tokenizer=tokenizer, image_shard_info=image_shard_identity(shard), job=identity,
    )  # fmt: skip


def build(work: Path, images: int, processes: int) -> dict[str, str]:
    """The inputs of one scale (see the module docstring); reused when already there."""
    from shards.dataset import TokenDatasetDir
    from shards.images import list_shards
    from shards.views import AugConfig
    from tokenize_corpus.identity import job_identity, view_facts
    from tokenize_corpus.tokenizer import tokenizer_info

    root = work / f"n{images}"
    paths = {"tars": str(root / "tars"), "folder": str(root / "folder"),
             "tokens": str(root / "tokens"), "tokenizer": str(work / "tokenizer.pth")}  # fmt: skip
    if (root / "done").exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    if not Path(paths["tokenizer"]).exists():
        synthetic.tokenizer(paths["tokenizer"])
    tick = time.perf_counter()
    keys, jpegs = keys_of(images), _jpegs()
    (root / "tars").mkdir(parents=True)
    shards = [keys[i : i + PER_SHARD] for i in range(0, len(keys), PER_SHARD)]
    for i, members in enumerate(shards):
        _write_tar(root / "tars" / f"train-{i:06d}.tar", members, jpegs)
    for j, (key, _) in enumerate(keys):
        path = root / "folder" / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpegs[j % len(jpegs)])
    print(f"n={images}: images written in {time.perf_counter() - tick:.0f} s", flush=True)
    tars = f"{root / 'tars'}/train-{{{0:06d}..{len(shards) - 1:06d}}}.tar"
    paths["tars"] = tars
    info = tokenizer_info(paths["tokenizer"])
    aug = AugConfig(size=32)
    identity = job_identity(info["fingerprint"], aug, SEEDS, "fp32", ("parquet", "webdataset"))
    jobs = [(tars, paths["tokens"], i, identity, info) for i in range(len(shards))]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for done, _ in enumerate(pool.imap_unordered(_token_shard, jobs, chunksize=4), 1):
            if done % 100 == 0:
                print(f"n={images}: {done}/{len(jobs)} token shards", flush=True)
    dataset = TokenDatasetDir(paths["tokens"])
    receipts = [dataset.receipts()[i] for i in range(len(shards))]
    facts = view_facts(aug, SEEDS, tars, PER_SHARD, list_shards(tars))
    dataset.write_manifest(receipts, {**facts, "tokenizer": info, "precision": "fp32",
                                      "identity": identity})  # fmt: skip
    (root / "paths.json").write_text(json.dumps(paths))
    (root / "done").write_text("")
    print(f"n={images}: built in {time.perf_counter() - tick:.0f} s", flush=True)
    return paths


def paths_of(work: Path, images: int) -> dict[str, str]:
    return json.loads((work / f"n{images}" / "paths.json").read_text())


# ---- the operations, each in its own process ---------------------------------------------------


def tokenize_args(paths: dict[str, str]) -> list[str]:
    return ["run", "stage=tokenize", f"images={paths['tars']}", f"tokenizer={paths['tokenizer']}",
            f"out_dir={paths['tokens']}", "aug.size=32", "seeds=[0,1]", "precision=fp32",
            "cluster.n_workers=2", "cluster.dashboard=false"]  # fmt: skip


def operation(name: str, paths: dict[str, str]) -> dict:
    """Run one operation in this process; returns what it found (checked by the caller).

    Each branch imports what its operation needs (see ``_token_shard``)."""
    if name in ("list", "list_folder"):
        from shards.images import list_shards

        shards = list_shards(paths["tars" if name == "list" else "folder"], shard_size=PER_SHARD)
        return {"shards": len(shards)}
    if name == "resume":
        from pipeline.cli import main

        out = io.StringIO()
        real, sys.stdout = sys.stdout, out
        try:
            code = main(tokenize_args(paths))
        finally:
            sys.stdout = real
        summary = json.loads(out.getvalue().split("\nwrote:")[0])
        assert code == 0 and summary["shards_tokenized"] == 0, summary
        return {"shards_kept": summary["shards_already_done"]}
    if name == "manifest":
        from shards.dataset import TokenDatasetDir

        dataset = TokenDatasetDir(paths["tokens"])
        manifest = dataset.manifest()
        receipts = list(dataset.receipts().values())
        info = {k: v for k, v in manifest.items() if k not in ("shards", "totals", "software")}
        dataset.write_manifest(receipts, info)
        return {"receipts": len(receipts)}
    if name in ("validate", "inspect"):
        from pipeline.cli import main

        # validate: the token files only (images=none; reading every image is another figure)
        extra = [f"out={paths['tokens']}-inspect"] if name == "inspect" else ["images=none"]
        real, sys.stdout = sys.stdout, io.StringIO()
        try:
            code = main([name, paths["tokens"], *extra])
        finally:
            sys.stdout = real
        assert code == 0, f"{name} exited {code}"
        return {}
    if name in ("pretrain", "pretrain_by_key"):
        from pretrain.data import MIMDataset
        from shards.reader import open_token_dataset

        images = paths["tars"] if name == "pretrain" else paths["folder"]
        tokens = open_token_dataset(paths["tokens"])
        ds = MIMDataset(images, tokens, vocab_size=16, grid=(4, 4), image_size=32,
                        num_masked=6, min_patches=2, shard_size=PER_SHARD)  # fmt: skip
        return {"mode": ds.plan.mode, "rows": sum(s.rows for s in ds.shards)}
    raise ValueError(name)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that over
    from the parent through fork and exec, so a child started by a big parent reports its size."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def child(name: str, work: Path, images: int) -> None:
    """``--child``: one operation, then its seconds and this process's peak RSS as JSON."""
    paths = paths_of(work, images)
    baseline = peak_rss_mib()
    tick = time.perf_counter()
    found = operation(name, paths)
    seconds = time.perf_counter() - tick
    # the processes it started and waited for (validate's check processes, Dask's workers)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib(),
                      "import_rss_mib": baseline, "children_peak_rss_mib": children,
                      **found}))  # fmt: skip


def measure(name: str, work: Path, images: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--work", str(work), "--scales",
             str(images)],
            capture_output=True, text=True, cwd=ROOT, timeout=3600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{name} at n={images} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {k: v for k, v in runs[0].items() if k not in ("seconds", "peak_rss_mib")}
    result["seconds"] = [round(r["seconds"], 3) for r in runs]
    result["peak_rss_mib"] = [round(r["peak_rss_mib"], 1) for r in runs]
    result["median_seconds"] = round(statistics.median(result["seconds"]), 3)
    result["median_peak_rss_mib"] = round(statistics.median(result["peak_rss_mib"]), 1)
    result["children_peak_rss_mib"] = round(max(r["children_peak_rss_mib"] for r in runs), 1)
    print(f"n={images:>8} {name:<16} {result['median_seconds']:8.2f} s "
          f"{result['median_peak_rss_mib']:8.0f} MiB (its processes: "
          f"{result['children_peak_rss_mib']:.0f} MiB)", flush=True)  # fmt: skip
    return result


def growth(scales: list[int], values: list[float]) -> float:
    """The exponent b of values ~ scale^b, fitted over the two largest scales."""
    (n0, n1), (v0, v1) = scales[-2:], values[-2:]
    return round(float(np.log(max(v1, 1e-9) / max(v0, 1e-9)) / np.log(n1 / n0)), 2)


def plot(results: dict, path: Path) -> None:
    from engine.plots import pyplot  # matplotlib: only the parent draws

    plt = pyplot()
    scales = results["scales"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in OPERATIONS:
        rows = [results["by_scale"][str(n)][name] for n in scales]
        ax_t.plot(scales, [r["median_seconds"] for r in rows], marker="o", label=name)
        ax_m.plot(scales, [r["median_peak_rss_mib"] for r in rows], marker="o", label=name)
    ax_t.axhline(60, color="grey", linestyle="--", linewidth=1)
    ax_m.axhline(2048, color="grey", linestyle="--", linewidth=1)
    ax_t.set(xscale="log", yscale="log", xlabel="images", ylabel="driver seconds (median)",
             title="time (goal: < 60 s at 1.28 M)")  # fmt: skip
    ax_m.set(xscale="log", yscale="log", xlabel="images", ylabel="driver peak RSS (MiB)",
             title="memory (goal: < 2 GiB at 1.28 M)")  # fmt: skip
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[10_000, 100_000, IMAGENET_TRAIN])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_control_plane"))
    parser.add_argument("--processes", type=int, default=2, help="for building the inputs")
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/control_plane.json")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = smoke.parse_args(parser, SMOKE)
    if args.child:
        child(args.child, args.work, args.scales[0])
        return
    results: dict = {"scales": args.scales, "per_shard": PER_SHARD, "seeds": list(SEEDS),
                     "machine": f"{os.cpu_count()} CPUs", "by_scale": {}}  # fmt: skip
    for images in args.scales:
        build(args.work, images, args.processes)
        results["by_scale"][str(images)] = {
            name: measure(name, args.work, images, args.repeats) for name in args.operations
        }
    if len(args.scales) > 1:
        results["growth_exponent"] = {
            name: {
                "seconds": growth(args.scales, [results["by_scale"][str(n)][name]["median_seconds"]
                                                for n in args.scales]),
                "peak_rss": growth(args.scales, [
                    results["by_scale"][str(n)][name]["median_peak_rss_mib"] for n in args.scales]),
            }
            for name in args.operations
        }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if set(args.operations) == set(OPERATIONS):
        plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results.get("growth_exponent", {}), indent=1))


if __name__ == "__main__":
    main()
