"""VQ-KD model: outputs, straight-through gradient, reference-math equivalence, official key layout."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenize_corpus.vqkd import VQKD, VQKD_SIZES, VQKDModelConfig

TINY = VQKDModelConfig(
    image_size=32,
    patch_size=8,
    width=32,
    depth=1,
    heads=2,
    code_dim=8,
    codebook_size=16,
    decoder_depth=1,
    teacher_dim=12,
    kmeans_iters=3,
)


def _batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 32, 32, generator=gen)
    features = torch.randn(b, TINY.num_patches, TINY.teacher_dim, generator=gen)
    return images, features


def test_forward_outputs_and_losses():
    torch.manual_seed(0)
    model = VQKD(TINY).train()
    images, features = _batch()
    out = model(images, features)
    assert set(out) == {"loss", "rec_loss", "commit_loss", "rec_cosine", "tokens"}
    assert out["tokens"].shape == (3, 16) and out["tokens"].dtype == torch.int64
    assert torch.allclose(out["loss"], out["rec_loss"] + out["commit_loss"])
    assert torch.allclose(out["rec_loss"], 1 - out["rec_cosine"])
    assert not out["rec_cosine"].requires_grad


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = VQKD(TINY).train()
    images, features = _batch()
    model(images, features)["loss"].backward()
    for name in (
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.0.attn.q_bias",
        "encode_task_layer.0.weight",
        "decoder.patch_embed.proj.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The codebook moves only by EMA, never by the optimiser.
    assert "quantize.embedding.weight" not in dict(model.named_parameters())


def test_encode_matches_forward_and_never_updates():
    torch.manual_seed(0)
    model = VQKD(TINY).train()
    images, features = _batch()
    model(images, features)  # k-means init + one EMA step
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = model.encode(images)
    assert torch.equal(tokens, model(images, features)["tokens"])
    model.train()
    assert torch.equal(model.encode(images), tokens)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def _reference_tokens(state: dict, cfg: VQKDModelConfig, images: torch.Tensor) -> torch.Tensor:
    """The official encode path written out functionally from the state dict (docs/method.md §1)."""
    x = images * 255.0 / 127.5 - 1.0
    x = (
        F.conv2d(
            x,
            state["encoder.patch_embed.proj.weight"],
            state["encoder.patch_embed.proj.bias"],
            stride=cfg.patch_size,
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([state["encoder.cls_token"].expand(len(x), -1, -1), x], 1)
    x = x + state["encoder.pos_embed"]
    width, heads = cfg.width, cfg.heads
    for i in range(cfg.depth):
        p = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"], 1e-6)
        q_b, v_b = state[p + "attn.q_bias"], state[p + "attn.v_bias"]
        qkv = F.linear(
            h, state[p + "attn.qkv.weight"], torch.cat([q_b, torch.zeros_like(q_b), v_b])
        )
        q, k, v = qkv.reshape(len(x), -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = (a @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(h, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    x = F.layer_norm(
        x[:, 1:], (width,), state["encoder.fc_norm.weight"], state["encoder.fc_norm.bias"], 1e-6
    )
    x = F.linear(x, state["encode_task_layer.0.weight"], state["encode_task_layer.0.bias"]).tanh()
    z = F.linear(x, state["encode_task_layer.2.weight"], state["encode_task_layer.2.bias"])
    z = F.normalize(z, dim=-1).reshape(-1, cfg.code_dim)
    w = state["quantize.embedding.weight"]
    d = z.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", z, w)
    return d.argmin(1).view(len(images), -1)


def test_encode_equals_official_encode_path():
    torch.manual_seed(1)
    cfg = VQKDModelConfig(
        image_size=32,
        patch_size=8,
        width=32,
        depth=2,
        heads=2,
        code_dim=8,
        codebook_size=64,
        decoder_depth=1,
        teacher_dim=12,
        kmeans_iters=0,
    )
    model = VQKD(cfg).eval()
    images = torch.rand(4, 3, 32, 32)
    expected = _reference_tokens(model.state_dict(), cfg, images)
    assert torch.equal(model.encode(images), expected)


def test_a_few_steps_improve_reconstruction():
    torch.manual_seed(0)
    model = VQKD(TINY).train()
    images, features = _batch(b=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model(images, features)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = out["rec_cosine"].item() if first is None else first
    assert out["rec_cosine"].item() > first


def test_bad_shapes_are_refused():
    model = VQKD(TINY)
    images, features = _batch()
    with pytest.raises(ValueError, match="teacher features"):
        model(images, features[:, :4])
    with pytest.raises(ValueError, match="32x32"):
        model.encode(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VQKD(VQKDModelConfig(image_size=30, patch_size=8))


def _official_keys(depth: int, decoder_depth: int) -> set[str]:
    """Key list of the official VQ-KD (modeling_vqkd.py with modeling_finetune.VisionTransformer)."""
    keys = {
        f"{t}.{i}.{w}"
        for t in ("encode_task_layer", "decode_task_layer")
        for i in (0, 2)
        for w in ("weight", "bias")
    }
    keys |= {
        "quantize.embedding.weight",
        "quantize.embedding.cluster_size",
        "quantize.embedding.embed_avg",
        "quantize.embedding.initted",
        "quantize.cluster_size",
    }
    for vit, n in (("encoder", depth), ("decoder", decoder_depth)):
        keys |= {
            f"{vit}.{k}"
            for k in (
                "cls_token",
                "pos_embed",
                "patch_embed.proj.weight",
                "patch_embed.proj.bias",
                "fc_norm.weight",
                "fc_norm.bias",
            )
        }
        for i in range(n):
            keys |= {
                f"{vit}.blocks.{i}.{k}"
                for k in (
                    "norm1.weight",
                    "norm1.bias",
                    "attn.qkv.weight",
                    "attn.q_bias",
                    "attn.v_bias",
                    "attn.proj.weight",
                    "attn.proj.bias",
                    "norm2.weight",
                    "norm2.bias",
                    "mlp.fc1.weight",
                    "mlp.fc1.bias",
                    "mlp.fc2.weight",
                    "mlp.fc2.bias",
                )
            }
    return keys


def test_base_size_has_the_official_layout():
    cfg = VQKDModelConfig(**VQKD_SIZES["base"])
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = VQKD(cfg)
    state = model.state_dict()
    assert set(state) - {"quantize.unused_steps"} == _official_keys(12, 3)
    assert state["encoder.pos_embed"].shape == (1, 197, 768)
    assert state["decoder.patch_embed.proj.weight"].shape == (768, 32, 1, 1)
    assert state["quantize.embedding.weight"].shape == (8192, 32)
    assert state["decode_task_layer.2.weight"].shape == (512, 768)
    assert cfg.grid == (14, 14) and cfg.num_patches == 196
    assert math.isclose(cfg.ema_decay, 0.99)


# Encoder parameters (millions) of each size at 224 px / patch 16, counted by hand from the ViT
# formula: 12 * width^2 per block plus embeddings (tiny has 4 blocks, the others 12); base is
# the paper's ViT-B/16 (~86 M).
ENCODER_MILLIONS = {"tiny": (1.9, 2.0), "small": (21.5, 22.0), "base": (85.5, 86.5)}


@pytest.mark.parametrize("size", sorted(VQKD_SIZES))
def test_size_presets_have_the_vit_widths_and_parameter_counts(size):
    with torch.device("meta"):
        model = VQKD(VQKDModelConfig(**VQKD_SIZES[size]))
    encoder = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    low, high = ENCODER_MILLIONS[size]
    assert low <= encoder <= high, f"{size}: {encoder:.2f} M encoder parameters"
    assert model.config.width // model.config.heads == 64  # ViT head width
