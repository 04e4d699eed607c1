"""Stage 2 against a real S3 endpoint on loopback (moto's standalone server): images, tokenizer and
the token dataset all live in a bucket; workers find the endpoint through inherited env vars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import stage2 as helpers

from shards.validate import main as validate_main
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1; env vars so this process and every worker reach it."""
    import fsspec
    from moto.server import ThreadedMotoServer

    port = helpers.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # fsspec turns FSSPEC_<PROTOCOL>_<KWARG> into default kwargs when it is imported, which
        # is how LocalCluster workers (spawned with this environment) find the endpoint.
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # This process imported fsspec already: set the same default here.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_tokenize_from_and_to_s3_then_rerun_skips(tmp_path, s3_endpoint):
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint}
    )
    fs.mkdir("tokbucket")
    local = tmp_path / "local"
    pattern = helpers.make_corpus(local / "images", shards=2, per_shard=4)
    for tar in sorted((local / "images").glob("*.tar")):
        fs.put_file(str(tar), f"tokbucket/images/{tar.name}")
    fs.put_file(helpers.make_tokenizer(local / "tok.pth"), "tokbucket/models/tok.pth")

    cfg = TokenizeConfig(
        images="s3://tokbucket/images/" + Path(pattern).name,
        tokenizer="s3://tokbucket/models/tok.pth",
        out_dir="s3://tokbucket/tokens",
        seeds=(0, 1),
        aug=AugConfig(size=32),
        batch_size=4,
        precision="fp32",
        cluster=ClusterConfig(n_workers=1, dashboard=False),
    )
    summary = tokenize(cfg)
    assert summary["exit_code"] == 0, summary
    assert summary["images"] == 8 and summary["shards_tokenized"] == 2
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file("tokbucket/tokens/manifest.json"))
    assert manifest["totals"]["images"] == 8
    assert fs.exists("tokbucket/tokens/receipts/shard-000001.json")

    # Read back: a local copy and the bucket itself both validate.
    local_out = tmp_path / "local_tokens"
    fs.get("tokbucket/tokens", str(local_out), recursive=True)
    assert validate_main([str(local_out)]) == 0
    assert validate_main([cfg.out_dir]) == 0

    again = tokenize(cfg)
    assert again["exit_code"] == 0
    assert again["shards_tokenized"] == 0 and again["shards_already_done"] == 2
