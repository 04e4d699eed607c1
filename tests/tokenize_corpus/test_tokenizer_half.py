"""The frozen encoder's half copy: the autocast path's tokens, fp32 and the files untouched."""

import pytest
import timm
import torch
from support import pretrain_data, stage2

import tokenize_corpus.tokenizer as tokenizer_module
from engine.config import build_config
from engine.precision import autocast
from tokenize_corpus.config import VQKDConfig
from tokenize_corpus.tokenizer import (
    Tokenizer,
    half_encoder_copy,
    load_tokenizer,
    released_state_dict,
    save_tokenizer,
    weights_fingerprint,
)
from tokenize_corpus.train import fit
from tokenize_corpus.vqkd import VQKD, VQKDModelConfig

# The official ViT-B width, heads and codebook (768, 12, 8192 codes of 32 dims), cut to two
# blocks at 64 px (16 patches) so a test takes milliseconds; random weights.
WIDE = VQKDModelConfig(
    image_size=64, patch_size=16, width=768, depth=2, heads=12, decoder_depth=1, kmeans_iters=0
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny tokenizer whose codebook was initialised by k-means (stage-2 test helper)."""
    return stage2.make_tokenizer(tmp_path_factory.mktemp("tok") / "tok.pth")


@pytest.fixture(scope="module")
def wide() -> VQKD:
    torch.manual_seed(0)
    model = VQKD(WIDE).eval()
    with torch.no_grad():  # a random unit-norm codebook: a zero one maps every patch to code 0
        codebook = torch.nn.functional.normalize(torch.randn_like(model.quantize.codebook), dim=-1)
        model.quantize.codebook.copy_(codebook)
    return model


def _autocast_path(model: VQKD, images: torch.Tensor, precision: str):
    """Code vectors and tokens as encode made them before the copy: fp32 weights, autocast."""
    with torch.no_grad(), autocast(precision, "cpu"):
        z = model.embed(images)
    return z, model.tokens(z)


def _images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_bf16_tokens_equal_the_autocast_path(which, tiny, wide):
    """Bit for bit, code vectors included; the wide batch spans two lookup chunks (320 rows)."""
    model = load_tokenizer(tiny).model if which == "tiny" else wide
    tok = Tokenizer(model)
    images = _images(20, model.config.image_size, seed=1)
    z_ref, ref = _autocast_path(model, images, "bf16")
    assert torch.equal(tok.code_vectors(images, "bf16"), z_ref)
    assert torch.equal(tok.encode(images, "bf16"), ref)
    assert torch.equal(tok.encode(images, "auto" if which == "wide" else "bf16"), ref)
    assert ref.unique().numel() > 1  # not a degenerate all-one-code comparison


def test_fp32_runs_the_model_itself(tiny, monkeypatch):
    """fp32 makes no copy and gives the model's own tokens and vectors."""
    tok = load_tokenizer(tiny)
    monkeypatch.setattr(tokenizer_module, "half_encoder_copy", _refuse)
    images = _images(6, 32, seed=2)
    assert torch.equal(tok.encode(images), tok.model.encode(images))
    assert torch.equal(tok.code_vectors(images, "fp32"), tok.model.embed(images))


def test_lookup_in_chunks_gives_the_whole_batch_tokens(tiny, monkeypatch):
    """Chunks of 5 rows (uneven against 16 patches a view) give the one-call lookup's tokens."""
    tok = load_tokenizer(tiny)
    images = _images(7, 32, seed=3)
    whole = tok.model.tokens(tok.code_vectors(images, "bf16"))  # [7, 16] in one lookup
    monkeypatch.setattr(tokenizer_module, "LOOKUP_BYTES", 5 * 4 * tok.codebook_size)
    assert torch.equal(tok.encode(images, "bf16"), whole)
    assert torch.equal(tok.encode(images[:1], "bf16"), whole[:1])


def test_copy_changes_no_weight_file_or_identity(tiny, tmp_path):
    tok = load_tokenizer(tiny)
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    described = tok.describe()
    tok.encode(_images(2, 32, seed=4), "bf16")
    after = tok.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert {p.dtype for p in tok.parameters()} == {torch.float32}
    assert weights_fingerprint(released_state_dict(tok.model)) == tok.fingerprint
    assert tok.describe() == described
    saved = torch.load(save_tokenizer(tok.model, tmp_path / "again.pth"), weights_only=True)
    original = torch.load(tiny, weights_only=True)
    assert saved["model"].keys() == original["model"].keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in original["model"].items())
    assert load_tokenizer(str(tmp_path / "again.pth")).fingerprint == tok.fingerprint


def test_copy_holds_only_the_encoder_matrices_in_half(wide):
    """New memory: the encoder's linear and conv weights at 2 bytes; all else is shared."""
    copy = half_encoder_copy(wide, torch.bfloat16)
    ours = {t.data_ptr() for t in (*wide.parameters(), *wide.buffers())}
    new = [t for t in copy.parameters() if t.data_ptr() not in ours]
    matrices = [
        p
        for m in wide.encoder.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        for p in m.parameters(recurse=False)
    ]
    assert {t.dtype for t in new} == {torch.bfloat16}
    assert sum(t.numel() for t in new) == sum(p.numel() for p in matrices)
    assert copy.encode_task_layer is wide.encode_task_layer and copy.quantize is wide.quantize
    assert copy.encoder.pos_embed is wide.encoder.pos_embed
    assert copy.encoder.blocks[0].norm1.weight is wide.encoder.blocks[0].norm1.weight
    assert {p.dtype for p in wide.parameters()} == {torch.float32}  # the original is untouched


def test_one_copy_made_once_and_replaced_per_precision(tiny, monkeypatch):
    tok = load_tokenizer(tiny)
    made = []
    real = tokenizer_module.half_encoder_copy
    monkeypatch.setattr(
        tokenizer_module, "half_encoder_copy", lambda m, d: made.append(d) or real(m, d)
    )
    images = _images(3, 32, seed=5)
    first = tok.encode(images, "bf16")
    for _ in range(3):
        assert torch.equal(tok.encode(images, "bf16"), first)
    tok.encode(images, "fp32")
    assert made == [torch.bfloat16]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # fp16 is GPU-only in
        half = tok._half_model(torch.float16, tok.device)  # encode; the cache still keeps one
    assert made == [torch.bfloat16, torch.float16] and len(tok._half) == 1
    assert next(half.encoder.blocks[0].mlp.fc1.parameters()).dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copy_follows_the_tokenizer_to_the_gpu(tiny):
    """A copy made on CPU is not used after .to('cuda'): the GPU gets its own, same tokens."""
    tok = load_tokenizer(tiny)
    images = _images(8, 32, seed=6)
    tok.encode(images, "bf16")  # a CPU copy exists now
    tok.to("cuda")
    gpu = tok.encode(images, "bf16")
    assert gpu.device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = tok.model.tokens(tok.model.embed(images.cuda()))
    assert torch.equal(gpu, ref)
    assert all(p.device.type == "cuda" for m in tok._half.values() for p in m.parameters())


def test_stage1_training_never_uses_the_copy(tmp_path, monkeypatch):
    """A bf16 stage-1 run (steps, evaluation, tokenizer.pth) makes no half copy."""
    monkeypatch.setattr(tokenizer_module, "half_encoder_copy", _refuse)
    images = pretrain_data.make_images(tmp_path / "images", count=8, bad=())
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    shape = {"size": "tiny", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1}
    layer = {
        "images": str(images),
        "out_dir": str(tmp_path / "run"),
        "model": {**shape, "heads": 2, "decoder_depth": 1, "codebook_size": 16, "kmeans_iters": 2},
        "teacher": {"name": "timm:vit_tiny_patch16_224", "weights": str(tmp_path / "teacher.pt")},
        "train": {"batch_size": 4, "epochs": 1, "precision": "bf16", "num_workers": 0},
        "eval": {"max_images": 8},
    }
    summary, trained = fit(build_config(VQKDConfig, layer))
    assert summary["precision"] == "bf16"
    assert {p.dtype for p in trained.parameters()} == {torch.float32}


def _refuse(model: VQKD, dtype: torch.dtype) -> VQKD:
    raise AssertionError(f"a half copy ({dtype}) was made")
