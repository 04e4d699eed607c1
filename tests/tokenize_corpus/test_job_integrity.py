"""Stage 2 cannot silently be wrong: the reproductions of the integrity issue, each as a test.

A killed run is reproduced by its on-disk state (a finished run with the manifest and the last
receipts removed: exactly what SIGKILL between two shards leaves, see test_job_resume.py for the
real kill). Each test failed on the job before receipts carried the job identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from support import stage2 as helpers

from engine.errors import ConfigError, OutDirBusy
from engine.lock import hold
from pipeline.cli import main as cli_main
from shards.decode import decode_image
from shards.reader import open_token_dataset
from shards.views import AugConfig, render_view, to_unit
from tokenize_corpus import cluster as cluster_module
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.errors import ResumeRefused
from tokenize_corpus.job import tokenize
from tokenize_corpus.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return helpers.make_corpus(tmp_path_factory.mktemp("images"), shards=3, per_shard=4)


def config(images: str, tokenizer: str, out: Path, address: str | None = None, **kw):
    values = dict(
        images=images,
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=(0, 1),
        aug=AugConfig(size=32),
        batch_size=4,
        shard_size=3,
        precision="fp32",
        cluster=ClusterConfig(n_workers=1, dashboard=False, address=address),
    )
    return TokenizeConfig(**{**values, **kw})


def simulate_kill(out: Path, keep: int) -> None:
    """Leave what a kill of a first run after ``keep`` finished shards leaves: their receipts, no
    manifest, no version log."""
    (out / "manifest.json").unlink()
    (out / "versions.json").unlink()
    for receipt in sorted((out / "receipts").glob("*.json"))[keep:]:
        receipt.unlink()


def no_cluster(*args, **kwargs):
    raise AssertionError("the cluster must not start")


def test_resume_after_kill_with_a_swapped_tokenizer_is_refused(
    tmp_path, corpus, cluster2, monkeypatch
):
    """Reproduction 1: kill, copy another tokenizer over the same path, rerun: never a mix."""
    tok = helpers.make_tokenizer(tmp_path / "tok.pth", seed=0)
    out = tmp_path / "tokens"
    assert tokenize(config(corpus, tok, out, cluster2))["exit_code"] == 0
    simulate_kill(out, keep=2)
    helpers.make_tokenizer(tmp_path / "tok.pth", seed=1)  # other weights, same path
    before = helpers.dataset_files(out)
    monkeypatch.setattr(cluster_module.DaskCluster, "client", no_cluster)
    with pytest.raises(ResumeRefused, match=r"tokenizer_fingerprint.*new out_dir, or delete"):
        tokenize(config(corpus, tok, out))
    assert helpers.dataset_files(out) == before  # refused before anything was written


def test_image_added_to_a_folder_between_kill_and_rerun_is_picked_up(
    tmp_path, tokenizer_path, cluster2
):
    """Reproduction 3: the rerun equals a fresh run on the grown folder (no key lost or twice)."""
    root = tmp_path / "folder"
    for j in range(8):
        (root / f"c{j % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{j % 2}" / f"img{j}.png").write_bytes(helpers.image_bytes(30, 26, j, "PNG"))
    out = tmp_path / "tokens"
    assert tokenize(config(str(root), tokenizer_path, out, cluster2))["shards"] == 3
    simulate_kill(out, keep=2)
    (root / "c0" / "img0b.png").write_bytes(helpers.image_bytes(28, 30, 99, "PNG"))
    (root / "c1" / "img1b.png").write_bytes(helpers.image_bytes(31, 25, 98, "PNG"))

    summary = tokenize(config(str(root), tokenizer_path, out, cluster2))
    assert summary["exit_code"] == 0 and summary["shards"] == 4  # 10 images, 3 per shard
    assert summary["shards_already_done"] == 0 and len(summary["shards_redone"]) == 2
    fresh = tmp_path / "fresh"
    tokenize(config(str(root), tokenizer_path, fresh, cluster2))
    assert helpers.dataset_files(out) == helpers.dataset_files(fresh)  # old layout's files gone
    keys = [k for i in range(4) for k in open_token_dataset(str(out)).read_shard(i)]
    expected = {f"c{j % 2}/img{j}" for j in range(8)} | {"c0/img0b", "c1/img1b"}
    assert sorted(keys) == sorted(expected)  # each image once, the new ones included


@pytest.mark.parametrize("kind", ["missing", "empty folder", "glob matching nothing"])
def test_bad_image_source_is_a_clear_error_and_the_corrected_rerun_is_accepted(
    tmp_path, corpus, tokenizer_path, cluster2, kind, monkeypatch
):
    """Reproduction 5: no traceback, nothing written; the corrected command then runs."""
    bad = {
        "missing": "/nope",
        "empty folder": str(tmp_path / "empty"),
        "glob matching nothing": str(tmp_path / "empty" / "*.tar"),
    }[kind]
    (tmp_path / "empty").mkdir()
    out = tmp_path / "tokens"
    with monkeypatch.context() as m:
        m.setattr(cluster_module.DaskCluster, "client", no_cluster)
        with pytest.raises(ConfigError, match=r"images=.*pass an existing folder"):
            tokenize(config(bad, tokenizer_path, out))
    assert not out.exists()
    assert tokenize(config(corpus, tokenizer_path, out, cluster2))["exit_code"] == 0


def test_bad_image_source_exits_2_without_a_traceback(tmp_path, tokenizer_path, capsys):
    argv = ["run", "stage=tokenize", "images=/nope", f"tokenizer={tokenizer_path}",
            f"out_dir={tmp_path / 't'}", "aug.size=32"]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "/nope" in err and "Traceback" not in err


def test_rerun_repairs_a_flipped_byte_in_a_parquet_file(tmp_path, corpus, tokenizer_path, cluster2):
    """Reproduction 7: done-ness is checked by checksum, so the damaged shard is redone."""
    out = tmp_path / "tokens"
    assert tokenize(config(corpus, tokenizer_path, out, cluster2))["exit_code"] == 0
    reference = helpers.dataset_files(out)
    victim = sorted(out.rglob("*.parquet"))[4]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit
    victim.write_bytes(bytes(data))

    summary = tokenize(config(corpus, tokenizer_path, out, cluster2))
    assert summary["exit_code"] == 0
    assert summary["shards_tokenized"] == 1 and summary["shards_already_done"] == 2
    assert "damaged" in next(iter(summary["shards_redone"].values()))
    assert helpers.dataset_files(out) == reference


@pytest.mark.parametrize(
    ("aug", "message"),
    [(AugConfig(size=32, scale=(1.0, 0.2)), "aug.scale"), (AugConfig(size=32, jitter=(0.4,)), "aug.jitter")],
)  # fmt: skip
def test_bad_aug_settings_are_refused_before_the_cluster_starts(
    tmp_path, corpus, tokenizer_path, monkeypatch, aug, message
):
    """Reproduction 8: found on the driver in a second, not by every worker task."""
    monkeypatch.setattr(cluster_module.DaskCluster, "client", no_cluster)
    out = tmp_path / "tokens"
    with pytest.raises(ConfigError, match=message):
        tokenize(config(corpus, tokenizer_path, out, aug=aug))
    assert not out.exists()


def test_manifest_records_absolute_sources_and_rows_carry_image_digests(
    tmp_path, corpus, tokenizer_path, cluster2, monkeypatch
):
    """Reproduction 9 (absolute image source), plus the identity in receipts and rows."""
    monkeypatch.chdir(Path(corpus).parent.parent)
    relative = os.path.join(Path(corpus).parent.name, Path(corpus).name)
    out = tmp_path / "tokens"
    assert tokenize(config(relative, tokenizer_path, out, cluster2))["exit_code"] == 0
    monkeypatch.chdir(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["source"] == corpus and os.path.isabs(manifest["tokenizer_source"])
    for receipt in manifest["shards"]:
        assert os.path.isfile(receipt["image_shard"]["url"])
        job = receipt["job"]
        assert job["tokenizer_fingerprint"] == manifest["fingerprint"]
        assert job["seeds"] == [0, 1] and job["precision"] == "fp32" and job["aug"]["size"] == 32
        tar_bytes = Path(receipt["image_shard"]["url"]).read_bytes()
        assert receipt["image_shard"]["sha256"] == hashlib.sha256(tar_bytes).hexdigest()
    with tarfile.open(corpus.replace("{000000..000002}", "000001")) as tar:
        members = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if ".jpg" in m.name}
    table = pq.read_table(next((out / "parquet" / "seed=1").glob("train-00001-of-*.parquet")))
    digests = dict(zip(table["key"].to_pylist(), table["image_sha256"].to_pylist(), strict=True))
    assert digests == {k: hashlib.sha256(v).digest() for k, v in members.items()}


def test_a_second_run_into_a_locked_out_dir_is_refused(tmp_path, corpus, tokenizer_path, cluster2):
    out = tmp_path / "tokens"
    with hold(str(out)), pytest.raises(OutDirBusy, match="another run"):
        tokenize(config(corpus, tokenizer_path, out, cluster2))
    assert not (out / "receipts").exists()
    assert tokenize(config(corpus, tokenizer_path, out, cluster2))["exit_code"] == 0
    assert not (out / ".lock").exists()


def test_bf16_is_recorded_matches_online_bf16_and_is_part_of_the_identity(
    tmp_path, corpus, tokenizer_path, cluster2
):
    out = tmp_path / "tokens"
    summary = tokenize(config(corpus, tokenizer_path, out, cluster2, precision="bf16"))
    assert summary["exit_code"] == 0 and summary["precision"] == "bf16"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "bf16"
    assert {r["job"]["precision"] for r in manifest["shards"]} == {"bf16"}

    tokenizer = load_tokenizer(tokenizer_path)
    with tarfile.open(corpus.replace("{000000..000002}", "000000")) as tar:
        images = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if ".jpg" in m.name}
    for key, row in open_token_dataset(str(out)).read_shard(0).items():
        image = decode_image(images[key])
        views = torch.stack([render_view(image, v) for v in row.views])  # [K, 3, 32, 32]
        online = tokenizer.encode(to_unit(views), precision="bf16").numpy()  # [K, N]
        np.testing.assert_array_equal(online, row.tokens)

    with pytest.raises(ResumeRefused, match="precision: 'bf16' there, 'fp32' now"):
        tokenize(config(corpus, tokenizer_path, out, cluster2, precision="fp32"))
