"""Tokenizer files: our round trip, official-layout checkpoints, fsspec paths, clear refusals."""

import json

import pytest
import torch

from engine.errors import CheckpointError
from tokenize_corpus.errors import TokenizerError
from tokenize_corpus.tokenizer import Tokenizer, load_tokenizer, save_tokenizer, tokenizer_info
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


def test_missing_and_bad_files_fail_clearly(tmp_path, trained):
    with pytest.raises(CheckpointError, match="not found at .*nope.pth"):
        load_tokenizer(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TokenizerError, match="not a readable torch checkpoint"):
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


def test_info_reads_the_file_without_building_the_model(tmp_path, trained, monkeypatch):
    path = save_tokenizer(trained, tmp_path / "tok.pth", extra={"teacher": "clip"})
    expected = load_tokenizer(path).describe()
    import tokenize_corpus.tokenizer as module

    monkeypatch.setattr(module, "VQKD", None)  # building a model would now fail
    assert tokenizer_info(path) == expected
    assert tokenizer_info(path)["teacher"] == "clip"


def test_info_fingerprint_of_an_official_half_precision_file(tmp_path, trained):
    """A release stored in fp16 loads into fp32 weights; the fingerprint follows the model."""
    state = {k: v.half() for k, v in trained.state_dict().items() if k != "quantize.unused_steps"}
    torch.save({"model": state}, tmp_path / "half.pth")
    info = tokenizer_info(tmp_path / "half.pth")
    assert info["fingerprint"] == load_tokenizer(str(tmp_path / "half.pth")).fingerprint
    assert info["teacher"] is None and info["grid"] == [4, 4]


def test_pickled_objects_are_refused_with_how_to_convert(tmp_path, trained):
    torch.save({"model": trained}, tmp_path / "pickled.pth")  # a whole module: needs unpickling
    with pytest.raises(TokenizerError, match="weights_only=False.*converted.pth"):
        load_tokenizer(str(tmp_path / "pickled.pth"))


def test_saved_file_honours_the_umask(tmp_path, trained):
    import os

    old = os.umask(0o022)
    try:
        path = save_tokenizer(trained, tmp_path / "tok.pth")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def _margins(tok: Tokenizer, images: torch.Tensor, other: str):
    """fp32 tokens, tokens at ``other``, and per patch the bound a flip must respect."""
    import torch.nn.functional as F

    z32 = F.normalize(tok.code_vectors(images), dim=-1).reshape(-1, CFG.code_dim)  # [M, D]
    zo = F.normalize(tok.code_vectors(images, other), dim=-1).reshape(-1, CFG.code_dim)
    codebook = tok.model.quantize.codebook  # [K, D]
    dist = torch.cdist(z32, codebook).pow(2)  # [M, K]
    return z32, zo, dist, codebook


@pytest.mark.parametrize("batch", [1, 7])
def test_same_precision_gives_identical_tokens(trained, batch):
    """Offline == online per precision: same precision and code path, same tokens, any batch."""
    tok = Tokenizer(trained)
    images = torch.rand(14, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for precision in ("fp32", "bf16"):
        whole = tok.encode(images, precision=precision)
        split = torch.cat([tok.encode(part, precision) for part in images.split(batch)])
        assert torch.equal(whole, split)
        assert torch.equal(whole, tok.encode(images.clone(), precision=precision))


def test_bf16_moves_only_near_ties(trained):
    """A patch whose code differs under bf16 had an fp32 top-2 margin within the bf16 noise.

    If bf16 picks code j where fp32 picks i, then z_bf16.(c_j - c_i) >= 0, so the fp32 margin
    d_j - d_i = 2 z32.(c_i - c_j) <= 2 |z32 - z_bf16| |c_i - c_j|: a flip needs a tie closer
    than the encoder's rounding noise, which is small (|z32 - z_bf16| of unit vectors < 0.05).
    """
    tok = Tokenizer(trained)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref, half = tok.encode(images).flatten(), tok.encode(images, "bf16").flatten()
    z32, zb, dist, codebook = _margins(tok, images, "bf16")
    noise = (z32 - zb).norm(dim=-1)  # [M]
    assert noise.max() < 0.05
    assert (ref == half).float().mean() > 0.95
    assert torch.equal(ref, dist.argmin(dim=1))
    for m in (ref != half).nonzero().flatten().tolist():
        i, j = ref[m].item(), half[m].item()
        margin = dist[m, j] - dist[m, i]
        assert 0 <= margin <= 2 * noise[m] * (codebook[i] - codebook[j]).norm() + 1e-5


def test_encode_keeps_the_task_layer_and_lookup_in_fp32(trained, monkeypatch):
    tok = Tokenizer(trained)
    seen = {}
    layer = tok.model.encode_task_layer[2]
    hook = layer.register_forward_hook(lambda mod, inp, out: seen.update(task=out.dtype))
    lookup = tok.model.quantize.lookup
    monkeypatch.setattr(tok.model.quantize, "lookup", lambda z: seen.update(z=z.dtype) or lookup(z))
    try:
        tok.encode(torch.rand(2, 3, 32, 32), precision="bf16")
    finally:
        hook.remove()
    assert seen == {"task": torch.float32, "z": torch.float32}
    calls = []  # (in the task layer, weight dtype, output dtype) of every nn.Linear module call

    def record(module, inputs, out):
        if isinstance(module, torch.nn.Linear):
            calls.append((module in task, module.weight.dtype, out.dtype))

    task = set(tok.model.encode_task_layer.modules())
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        tok.encode(torch.rand(2, 3, 32, 32), precision="bf16")
    finally:
        hook.remove()
    # attn.proj, fc1, fc2 run in bf16 on the half copy's weights (qkv is a functional call);
    # the task layer's two linears in fp32
    bf16, fp32 = (False, torch.bfloat16, torch.bfloat16), (True, torch.float32, torch.float32)
    assert calls == [bf16] * 3 + [fp32] * 2
