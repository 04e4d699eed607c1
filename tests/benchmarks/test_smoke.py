"""Every benchmark still runs: ``benchmarks/<script>.py --smoke`` exits 0 and writes its results.

The scripts are found by glob (any ``benchmarks/*.py`` with a ``__main__`` block), so a new
benchmark is covered without editing this file; one without ``--smoke`` fails here. Each run is a
subprocess as a user starts it, with its own TMPDIR (its stand-ins and outputs land there) and the
results written to ``--out``. Besides the exit code, every number in the results must be finite,
and the benchmarks below get one check of what they measured.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    path
    for path in (ROOT / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


def _numbers(value: object) -> Iterator[float]:
    """Every number in a JSON tree."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield float(value)


def _key_index(r: dict, out: Path) -> None:
    build = r["build"]
    assert build["keys"] == 5000 and build["token_shards"] == 20  # shards of 256 keys
    assert build["lookup_keys_per_s"] > 0 and build["index_bytes"] > 0
    assert r["read_keys_from_token_shards"]["files_read"] == 2


def _learning_signal(r: dict, out: Path) -> None:
    top1 = r["datasets"]["imagenet-coarse"]["top1"]
    assert {"random", "offline", "online", "teacher"} <= set(top1)
    assert all(len(v) == 1 and 0 <= v[0] <= 100 for v in top1.values())
    # stored tokens are the online tokenizer's, bit for bit: the same probe to the last digit
    assert top1["offline"] == top1["online"] and top1["offline/mean"] == top1["online/mean"]


def _plan(r: dict, out: Path) -> None:
    for dist in ("uniform", "zipf"):
        assert r["bytes"][dist]["parquet"]["max_rel_error"] < 0.25
    errors = r["check"]["cases"]["tiny"]["errors"]["median"]
    assert errors["bytes_actual"] > 0 and abs(errors["bytes_error_upper"]) < 0.5


def _precision_tokens(r: dict, out: Path) -> None:
    for part in ("demo", "official_layout"):
        bf16 = r[part]["bf16"]
        assert 0 <= bf16["agree"] <= 1 and bf16["flips_within_noise_bound"]
        assert r[part]["speed"]["views_per_s"]["fp32"] > 0
    assert r["official_layout"]["layout"] == "tiny"


def _precision_training(r: dict, out: Path) -> None:
    assert set(r["results"]) == {"fp32", "bf16"}
    for res in r["results"].values():
        assert len(res["probe_top1"]) == 1 and 0 <= res["probe_top1"][0] <= 100


def _pretrain(r: dict, out: Path) -> None:
    (step,) = r["step"]
    assert step["student"] == "tiny" and step["t_step_offline_s"] > 0
    assert len(r["loader"]) == 2 and all(v["samples"] > 0 for v in r["loader"])


def _reference_step(r: dict, out: Path) -> None:
    assert set(r["median_step_s"]) == {"ours_default", "ours_fp32"}
    assert r["median_ratio"]["skipped"].startswith("skipped: no --reference")


def _seeds(r: dict, out: Path) -> None:
    assert set(r["results"]) == {"K=1", "K=2", "fresh"}
    assert all(0 <= res["heldout_mim_acc"][0] <= 100 for res in r["results"].values())
    assert out.with_suffix(".png").is_file()


def _token_bytes(r: list, out: Path) -> None:
    assert [row["images"] for row in r] == [8, 8, 16]
    for row in r:  # no encoding beats the entropy of the token draw
        assert row["parquet"] > row["entropy_bytes_per_token"]
        assert row["webdataset"] > row["entropy_bytes_per_token"]


def _token_sets(r: dict, out: Path) -> None:
    tokens = r["stage2"]["tokens"]
    assert tokens["a"]["fingerprint"] != tokens["b"]["fingerprint"]
    assert all(0 < t["codebook_usage_fraction"] <= 1 for t in tokens.values())
    assert set(r["stage3"]) == {"a", "b"}


def _tokenize(r: dict, out: Path) -> None:
    assert r["views"] == 16 * 2 and r["bytes_per_token"]["parquet"] > 0
    # a rerun over a finished dataset reads receipts only
    assert r["rerun_seconds"] < r["precisions"]["auto"]["wall_seconds_1_worker"]
    assert r["memory_shards"] == [1, 8]


def _verify(r: dict, out: Path) -> None:
    assert r["images"] == 16 and r["median_samples_per_s"]["verify"] > 0
    assert 0 < r["ratio_from_checks_alone"] <= 1


def _vqkd(r: dict, out: Path) -> None:
    (step,) = r["throughput"]
    assert step["size"] == "tiny" and step["images_per_s"] > 0
    assert r["demo"]["epochs"] == 1 and 0 < r["demo"]["codebook_usage_fraction"] <= 1


def _gpu_check(r: dict, out: Path) -> None:
    assert 0.5 <= r["tokenizer"]["agree_bf16"] <= 1.0
    assert r["stage3_step"]["seconds"]["ours_bf16"] > 0
    if r["device"] == "cpu (no CUDA device)":
        assert r["stage2"]["skipped"].startswith("skipped: no CUDA device")


CHECKS: dict[str, Callable[[object, Path], None]] = {
    "bench_key_index": _key_index,
    "bench_learning_signal": _learning_signal,
    "bench_plan": _plan,
    "bench_precision_tokens": _precision_tokens,
    "bench_precision_training": _precision_training,
    "bench_pretrain": _pretrain,
    "bench_reference_step": _reference_step,
    "bench_seeds": _seeds,
    "bench_token_bytes": _token_bytes,
    "bench_token_sets": _token_sets,
    "bench_tokenize": _tokenize,
    "bench_verify": _verify,
    "bench_vqkd": _vqkd,
    "gpu_check": _gpu_check,
}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_smoke_run(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / f"{script.stem}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script.relative_to(ROOT)), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert out.is_file(), f"{script.name} --smoke --out {out} wrote nothing"
    results = json.loads(out.read_text())
    assert all(math.isfinite(x) for x in _numbers(results))
    if script.stem in CHECKS:
        CHECKS[script.stem](results, out)
