"""Stage 2 end to end on Dask: outputs validate, tokens match online encoding, determinism across
worker counts and an external scheduler, bad input, reruns, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import stage2 as helpers

from engine.errors import ConfigError
from shards.decode import decode_image
from shards.reader import open_token_dataset
from shards.validate import main as validate_main
from shards.views import AugConfig, render_view, to_unit
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.errors import ResumeRefused
from tokenize_corpus.job import tokenize
from tokenize_corpus.tokenizer import load_tokenizer

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return helpers.make_corpus(tmp_path_factory.mktemp("images"), shards=3, per_shard=6)


def config(images: str, tokenizer: str, out: Path, **cluster) -> TokenizeConfig:
    return TokenizeConfig(
        images=images,
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=(0, 1, 2),
        aug=AugConfig(size=32),
        batch_size=5,  # not a multiple of K: batches straddle images
        precision="fp32",
        cluster=ClusterConfig(**{"n_workers": 1, "dashboard": False, **cluster}),
    )


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory, corpus, tokenizer_path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run1") / "tokens"
    return out, tokenize(config(corpus, tokenizer_path, out, n_workers=1))


def test_outputs_validate_and_tokens_match_online_encoding(one_worker_run, corpus, tokenizer_path):
    out, summary = one_worker_run
    assert summary["exit_code"] == 0
    assert summary["shards_tokenized"] == 3 and summary["images"] == 18 and summary["views"] == 54
    assert validate_main([str(out), f"images={corpus}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["seeds"] == [0, 1, 2]
    assert manifest["aug"]["size"] == 32

    # docs/design.md §2's proof: rebuild the stored views from the original bytes, encode online.
    tokenizer = load_tokenizer(tokenizer_path)
    ds = open_token_dataset(str(out))
    with tarfile.open(corpus.replace("{000000..000002}", "000001")) as tar:
        images = {
            m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")
        }
    rows = ds.read_shard(1)
    assert list(rows) == sorted(images)
    for key in list(rows)[:3]:
        row = rows[key]
        image = decode_image(images[key])
        views = torch.stack([render_view(image, v) for v in row.views])  # [K, 3, 32, 32]
        online = tokenizer.encode(to_unit(views)).numpy()  # [K, N]
        np.testing.assert_array_equal(online, row.tokens)
    all_tokens = np.concatenate([r.tokens.ravel() for r in rows.values()])
    assert len(np.unique(all_tokens)) > 1  # the tiny tokenizer is not collapsed


def test_two_workers_and_external_scheduler_write_identical_bytes(
    tmp_path, one_worker_run, corpus, tokenizer_path, cluster2
):
    reference = helpers.dataset_files(one_worker_run[0])
    two = tmp_path / "two"
    assert tokenize(config(corpus, tokenizer_path, two, address=cluster2))["exit_code"] == 0
    assert helpers.dataset_files(two) == reference

    # A separately started `dask scheduler` + `dask worker`, reached through cluster.address.
    port = helpers.free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [VENV_BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", ":0", "--no-show"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    worker = subprocess.Popen(
        [VENV_BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
         "--memory-limit", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=120)
        external = tmp_path / "external"
        summary = tokenize(config(corpus, tokenizer_path, external, address=address))
        assert summary["exit_code"] == 0
        assert helpers.dataset_files(external) == reference
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_rerun_of_a_finished_dataset_reads_no_bytes_on_the_driver_and_loads_no_tokenizer(
    one_worker_run, corpus, tokenizer_path, monkeypatch, caplog
):
    """The resume check runs on the workers: the driver reads only receipts (JSON)."""
    out, _ = one_worker_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    def no_bytes(*args, **kwargs):
        raise AssertionError("the driver must not read image or token bytes")

    import shards.storage
    import tokenize_corpus.identity

    monkeypatch.setattr(tokenize_corpus.identity, "iter_shard", no_bytes)
    monkeypatch.setattr(tokenize_corpus.identity, "file_sha256", no_bytes)
    monkeypatch.setattr(shards.storage, "file_sha256", no_bytes)
    monkeypatch.setattr(shards.dataset.TokenDatasetDir, "sha256", no_bytes)
    with caplog.at_level("INFO", logger="tokenize_corpus"):
        summary = tokenize(config(corpus, tokenizer_path, out, n_workers=1))
    assert summary["exit_code"] == 0
    assert summary["shards_tokenized"] == 0 and summary["shards_already_done"] == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    assert "loading the tokenizer" not in caplog.text


def test_view_size_must_match_tokenizer(tmp_path, corpus, tokenizer_path):
    cfg = TokenizeConfig(
        images=corpus, tokenizer=tokenizer_path, out_dir=str(tmp_path / "t"), aug=AugConfig(size=48)
    )
    with pytest.raises(ConfigError, match=r"aug.size=48.*image_size=32"):
        tokenize(cfg)


def test_out_dir_with_other_settings_is_refused(one_worker_run, corpus, tokenizer_path):
    out, _ = one_worker_run
    cfg = config(corpus, tokenizer_path, out)
    cfg = TokenizeConfig(**{**cfg.__dict__, "seeds": (0, 1)})
    with pytest.raises(ResumeRefused, match="seeds"):
        tokenize(cfg)


def _bad_members() -> list[tuple[str, bytes]]:
    good = helpers.image_bytes(40, 30, 1)
    return [
        *helpers.good_members("s0", 3, 0),
        ("bad_corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 4),
        ("bad_zero.jpg", b""),
        ("bad_trunc.jpg", good[: len(good) // 2]),
        ("bad_txt.txt", b"no image here"),
        ("tiny_1px.png", helpers.image_bytes(1, 1, 2, fmt="PNG")),
        ("cmyk.jpg", helpers.image_bytes(30, 20, 3, mode="CMYK")),
        ("pal.png", helpers.image_bytes(25, 35, 4, fmt="PNG", mode="P")),
        ("s0_000.jpg", helpers.image_bytes(30, 30, 5)),  # the key again, not adjacent
    ]


def test_bad_input_is_listed_bad_shard_fails_alone_and_rerun_fixes_it(
    tmp_path, tokenizer_path, cluster2
):
    root = tmp_path / "images"
    root.mkdir()
    (root / "img-000000.tar").write_bytes(helpers.tar_bytes(_bad_members()))
    (root / "img-000001.tar").write_bytes(helpers.tar_bytes(helpers.good_members("s1", 4, 1)))
    whole = helpers.tar_bytes(helpers.good_members("s2", 4, 2))
    content = whole.rstrip(b"\0")  # tar pads to 10 KiB records: cut inside the members
    (root / "img-000002.tar").write_bytes(content[: len(content) * 2 // 3])  # truncated tar
    images = str(root / "img-{000000..000002}.tar")
    out = tmp_path / "tokens"

    summary = tokenize(config(images, tokenizer_path, out, address=cluster2, retries=0))
    assert summary["exit_code"] == 1
    assert list(summary["failed"]) == ["shard-000002"]
    assert "truncated tar" in summary["failed"]["shard-000002"]
    assert summary["shards_tokenized"] == 2
    assert not (out / "manifest.json").exists()
    receipt = json.loads((out / "receipts" / "shard-000000.json").read_text())
    skipped = dict(receipt["skipped"])
    assert set(skipped) == {"bad_corrupt", "bad_zero", "bad_trunc", "bad_txt", "s0_000"}
    assert "zero bytes" in skipped["bad_zero"] and "truncated" in skipped["bad_trunc"]
    assert "duplicate" in skipped["s0_000"]
    assert receipt["rows"] == 6  # 3 good + 1-pixel + CMYK + palette images all tokenized
    assert not (out / "receipts" / "shard-000002.json").exists()

    done_before = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "000002" not in p.name
    }
    done_before = {p: t for p, t in done_before.items() if p.suffix in (".parquet", ".gz")}
    time.sleep(0.01)
    (root / "img-000002.tar").write_bytes(whole)
    summary = tokenize(config(images, tokenizer_path, out, address=cluster2))
    assert summary["exit_code"] == 0
    assert summary["shards_tokenized"] == 1 and summary["shards_already_done"] == 2
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert validate_main([str(out), f"images={images}"]) == 0
    assert json.loads((out / "manifest.json").read_text())["totals"]["skipped"] == 5


def test_help_loads_without_torch():
    """`pipeline run stage=X --help` builds every stage's config: none of them imports torch."""
    code = (
        "import sys; from pipeline.cli import main; from pipeline.stages import STAGES; "
        "[main(['run', f'stage={s}', '--help']) for s in STAGES]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
