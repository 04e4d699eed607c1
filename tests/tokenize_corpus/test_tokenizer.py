"""Tokenizer files: our round trip, official-layout checkpoints, fsspec paths, clear refusals."""

import json

import pytest
import torch

import tokenize_corpus
from tokenize_corpus.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

# heads = width // 64, the only head count an official checkpoint (no config) can imply.
CFG = VQKDModelConfig(
    image_size=32,
    patch_size=8,
    width=64,
    depth=1,
    heads=1,
    code_dim=8,
    codebook_size=16,
    decoder_depth=1,
    teacher_dim=12,
    kmeans_iters=3,
    dead_code_steps=2,
)


@pytest.fixture(scope="module")
def trained() -> VQKD:
    """A tiny model after k-means init and a couple of EMA steps (codebook not all zero)."""
    torch.manual_seed(0)
    model = VQKD(CFG).train()
    for _ in range(3):
        model(torch.rand(4, 3, 32, 32), torch.randn(4, 16, 12))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_round_trip_gives_same_tokens_and_fingerprint(tmp_path, trained, images):
    path = save_tokenizer(trained, tmp_path / "tok.pth", extra={"teacher": "efficientnet_lite0"})
    tok = load_tokenizer(path)
    again = load_tokenizer(str(tmp_path / "tok.pth"))
    assert isinstance(tok, Tokenizer)
    assert torch.equal(tok.encode(images), trained.encode(images))
    assert tok.fingerprint == again.fingerprint and len(tok.fingerprint) == 64
    assert tok.codebook_size == 16 and tok.patch_size == 8 and tok.image_size == 32
    assert tok.grid == (4, 4)
    assert not any(p.requires_grad for p in tok.parameters())
    assert not tok.train().model.training
    info = tok.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["teacher"] == "efficientnet_lite0" and info["code_dim"] == 8
    assert info["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert list(tmp_path.iterdir()) == [tmp_path / "tok.pth"]  # no temp file left behind


def test_saved_file_has_the_official_layout(tmp_path, trained):
    save_tokenizer(trained, tmp_path / "tok.pth")
    ckpt = torch.load(tmp_path / "tok.pth", weights_only=True)
    assert set(ckpt) == {"model", "config"}
    assert "quantize.unused_steps" not in ckpt["model"]
    assert ckpt["config"]["codebook_size"] == 16


def test_official_checkpoint_without_config_loads(tmp_path, trained, images):
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "quantize.unused_steps"}
    state["loss.weight"] = torch.ones(1)
    state["teacher_model.visual.proj"] = torch.ones(3, 3)
    state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save({"model": state, "epoch": 99}, tmp_path / "vqkd_official.pth")
    tok = load_tokenizer(str(tmp_path / "vqkd_official.pth"))
    assert tok.config.width == 64 and tok.config.depth == 1 and tok.config.decoder_depth == 1
    assert tok.config.teacher_dim == 12 and tok.image_size == 32 and tok.codebook_size == 16
    assert torch.equal(tok.encode(images), trained.encode(images))
    ours = load_tokenizer(save_tokenizer(trained, tmp_path / "ours.pth"))
    assert tok.fingerprint == ours.fingerprint  # same weights, same fingerprint
    assert tok.describe()["teacher"] is None


def test_fsspec_url(trained, images):
    url = "memory://tokenizers/tok.pth"
    assert save_tokenizer(trained, url) == url
    assert torch.equal(load_tokenizer(url).encode(images), trained.encode(images))


def test_fingerprint_tracks_weights(tmp_path, trained):
    first = load_tokenizer(save_tokenizer(trained, tmp_path / "a.pth"))
    changed = VQKD(CFG)
    changed.load_state_dict(trained.state_dict())
    with torch.no_grad():
        changed.quantize.embedding.weight[0, 0] += 1e-3
    second = load_tokenizer(save_tokenizer(changed, tmp_path / "b.pth"))
    assert first.fingerprint != second.fingerprint


def test_package_exports_load_tokenizer():
    assert tokenize_corpus.load_tokenizer is load_tokenizer


def test_missing_and_bad_files_fail_clearly(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="not found at .*nope.pth"):
        load_tokenizer(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_tokenizer(str(tmp_path / "junk.pth"))
    torch.save({"model": {"something.else": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a VQ-KD tokenizer state dict"):
        load_tokenizer(str(tmp_path / "other.pth"))
    save_tokenizer(trained, tmp_path / "tok.pth")
    ckpt = torch.load(tmp_path / "tok.pth", weights_only=True)
    ckpt["config"]["codebook_size"] = 32  # config disagrees with the weights
    torch.save(ckpt, tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match="do not match"):
        load_tokenizer(str(tmp_path / "mismatch.pth"))


def test_wrong_image_size_is_refused(tmp_path, trained):
    tok = load_tokenizer(save_tokenizer(trained, tmp_path / "tok.pth"))
    with pytest.raises(ValueError, match="32x32"):
        tok.encode(torch.rand(1, 3, 64, 64))
