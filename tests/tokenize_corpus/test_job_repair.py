"""Stage 2 after a user or a fault touched its output: a damaged or edited manifest is rewritten
from the receipts by a rerun; a source in which no image can be read is a failure (exit 1) with
the skip table's summary, never an empty dataset with exit 0; every file honours the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from support import stage2 as helpers

from shards.reader import open_token_dataset
from shards.validate import main as validate_main
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize


def config(images: str, tokenizer: str, out: Path, address: str | None) -> TokenizeConfig:
    """Stage 2 on the module's cluster at ``address``, or on its own LocalCluster (None)."""
    return TokenizeConfig(
        images=images,
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=(0, 1),
        aug=AugConfig(size=32),
        precision="fp32",
        cluster=ClusterConfig(address=address, n_workers=1, dashboard=False),
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return helpers.make_corpus(tmp_path_factory.mktemp("images"), shards=2, per_shard=3)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda text: "{not json", id="garbage"),
        pytest.param(lambda text: "", id="empty"),
        pytest.param(
            lambda text: json.dumps({**json.loads(text), "codebook_size": 9999}), id="edited"
        ),
    ],
)
def test_a_rerun_rewrites_a_damaged_or_edited_manifest(
    tmp_path, corpus, tokenizer_path, cluster2, damage, caplog
):
    out = tmp_path / "tokens"
    cfg = config(corpus, tokenizer_path, out, cluster2)
    assert tokenize(cfg)["exit_code"] == 0
    manifest = out / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_text(damage(original.decode()))
    summary = tokenize(cfg)
    assert summary["exit_code"] == 0 and summary["shards_tokenized"] == 0  # nothing redone
    assert manifest.read_bytes() == original
    assert "did not match the shard receipts; rewrote it" in caplog.text
    assert open_token_dataset(str(out)).num_shards == 2


def test_a_source_with_no_readable_image_is_a_failure_with_the_skip_table(
    tmp_path, tokenizer_path, cluster2
):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not a jpeg")
    (images / "b.png").write_bytes(b"")
    (images / "c.jpg").write_bytes(b"\xff\xd8\xff truncated")
    summary = tokenize(config(str(images), tokenizer_path, tmp_path / "tokens", cluster2))
    assert summary["exit_code"] == 1 and summary["images"] == 0
    assert summary["images_skipped"] == 3
    message = summary["message"]
    assert "no image" in message and "all 3 records were skipped" in message
    assert "1 zero bytes" in message and "b: zero bytes" in message


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_every_file_honours_the_umask(tmp_path, corpus, tokenizer_path, umask):
    """Files get ``0o666 & ~umask`` and folders ``0o777 & ~umask``, as a plain ``open()`` and
    ``mkdir`` give: datasets shared with a team (002) stay writable for it, private ones (077)
    stay private. The run starts its own workers, which inherit the umask as they would from
    the shell."""
    out = tmp_path / "tokens"
    old = os.umask(umask)
    try:
        assert tokenize(config(corpus, tokenizer_path, out, None))["exit_code"] == 0
    finally:
        os.umask(old)
    modes = {
        path.relative_to(out).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in [out, *out.rglob("*")]
        if path.name != ".lock"  # the lock file is the worker's business
    }
    wrong = {
        path: oct(mode)
        for path, mode in modes.items()
        if mode != (0o777 if (out / path).is_dir() else 0o666) & ~umask
    }
    assert not wrong and len(modes) > 10


def test_validate_without_images_checks_the_recorded_source_or_says_it_did_not(
    tmp_path, corpus, tokenizer_path, cluster2, capsys
):
    images = tmp_path / "images"
    pattern = helpers.make_corpus(images, shards=2, per_shard=3)
    out = tmp_path / "tokens"
    assert tokenize(config(pattern, tokenizer_path, out, cluster2))["exit_code"] == 0
    assert validate_main([str(out)]) == 0
    assert f"images: checked at {pattern}" in capsys.readouterr().out
    # other pixels under the same keys: found without images= (exit 1)
    first = sorted(images.glob("*.tar"))[0]
    first.write_bytes(helpers.tar_bytes(helpers.good_members("s0", 3, seed=99)))
    assert validate_main([str(out)]) == 1
    assert "differ from the ones tokenized" in capsys.readouterr().out
    assert validate_main([str(out), "images=none"]) == 0  # the token files alone are sound
    assert "images: NOT checked (images=none)" in capsys.readouterr().out
    # the source is gone: the files are checked, and the output says the images were not
    for tar in images.glob("*.tar"):
        tar.unlink()
    assert validate_main([str(out)]) == 0
    assert "images: NOT checked" in capsys.readouterr().out
