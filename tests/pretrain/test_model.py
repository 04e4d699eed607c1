"""BEiT v2 student: parameter names, mask token, CLS head wiring, init, loss."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import BEIT_SIZES, BEiTConfig, BEiTv2, beit_config, mim_loss

TINY = BEiTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, vocab_size=16)

# docs/method.md §3 key list (also timm's names), as patterns.
REFERENCE_KEYS = [
    r"cls_token",
    r"mask_token",
    r"patch_embed\.proj\.(weight|bias)",
    r"rel_pos_bias\.relative_position_bias_table",
    r"blocks\.\d+\.norm[12]\.(weight|bias)",
    r"blocks\.\d+\.attn\.(qkv\.weight|q_bias|v_bias|proj\.weight|proj\.bias)",
    r"blocks\.\d+\.gamma_[12]",
    r"blocks\.\d+\.mlp\.fc[12]\.(weight|bias)",
    r"norm\.(weight|bias)",
    r"lm_head\.(weight|bias)",
    r"cls_pt_layers\.\d+\..+",
]


def random_mask(batch: int, n: int, masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    return order < masked  # [B, N], exactly `masked` True per row


def tiny_model(seed: int = 0, **overrides) -> BEiTv2:
    torch.manual_seed(seed)
    cfg = BEiTConfig(**{**TINY.__dict__, **overrides})
    model = BEiTv2(cfg).eval()
    with torch.no_grad():  # move off the init (zero biases/tables) so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_base_parameter_names_match_reference():
    with torch.device("meta"):
        model = BEiTv2(BEiTConfig())
    keys = list(model.state_dict())
    pattern = re.compile("|".join(f"(?:{p})" for p in REFERENCE_KEYS))
    assert [k for k in keys if not pattern.fullmatch(k)] == []
    for i in range(12):
        for suffix in ("attn.q_bias", "attn.v_bias", "attn.qkv.weight", "gamma_1", "mlp.fc2.bias"):
            assert f"blocks.{i}.{suffix}" in keys
    assert "blocks.12.norm1.weight" not in keys
    assert {k.split(".")[1] for k in keys if k.startswith("cls_pt_layers.")} == {"0", "1"}
    assert not any("k_bias" in k or "pos_embed" in k for k in keys)
    assert not any(k.startswith("blocks.") and "relative_position" in k for k in keys)
    table = model.state_dict()["rel_pos_bias.relative_position_bias_table"]
    assert tuple(table.shape) == ((2 * 14 - 1) ** 2 + 3, 12) == (732, 12)
    assert tuple(model.rel_pos_bias.relative_position_index.shape) == (197, 197)
    assert tuple(model.lm_head.weight.shape) == (8192, 768)


def test_config_sizes_and_derived_values():
    assert BEiTConfig().grid == (14, 14) and BEiTConfig().num_patches == 196
    assert BEiTConfig().early_layers == 9
    large = beit_config("large")
    assert (large.width, large.depth, large.heads) == (1024, 24, 16)
    assert large.layer_scale_init == 1e-5 and large.early_layers == 21
    assert set(BEIT_SIZES) == {"tiny", "small", "base", "large"}
    assert beit_config("tiny", depth=4).early_layers == 3  # 9 > 4: scaled to 3/4 of the depth
    assert TINY.early_layers == 2 and TINY.grid == (4, 4)
    with pytest.raises(ValueError, match="patch_size"):
        BEiTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="heads"):
        BEiTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="unknown BEiT size"):
        beit_config("huge")


def test_forward_shapes_and_head_switch():
    model = tiny_model()
    views = torch.randn(3, 3, 32, 32)
    mask = random_mask(3, 16, 6)
    out = model(views, mask)
    assert out["logits"].shape == (18, 16) and out["head_logits"].shape == (18, 16)
    assert model.forward_features(views).shape == (3, 17, 32)
    no_head = tiny_model(use_cls_head=False)
    assert no_head.cls_pt_layers is None
    assert no_head(views, mask)["head_logits"] is None
    assert not any(k.startswith("cls_pt_layers") for k in no_head.state_dict())


def test_masked_patch_pixels_do_not_reach_outputs():
    model = tiny_model()
    views = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = mask[1, 0] = mask[1, 15] = True
    # Patch 5 of a 4x4 grid (8 px patches) = row 1, col 1.
    changed = views.clone()
    changed[0, :, 8:16, 8:16] += 3.0
    with torch.no_grad():
        a, b = model(views, mask), model(changed, mask)
        embedded = model.embed(changed, mask)  # [B, 1+N, D]
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["head_logits"], b["head_logits"])
    # The masked positions carry the mask token, after the CLS token.
    assert torch.equal(embedded[:, 1:][mask], model.mask_token[0].expand(3, -1))
    # An unmasked patch does change the outputs.
    changed[0, :, 0:8, 0:8] += 3.0
    with torch.no_grad():
        c = model(changed, mask)
    assert not torch.allclose(a["logits"], c["logits"])


def test_forward_matches_manual_cls_head_computation():
    model = tiny_model(depth=3, head_from_layer=2, head_layers=1)
    views = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 16, 6, seed=1)
    with torch.no_grad():
        out = model(views, mask)
        x = model.patch_embed(views)
        x = torch.where(mask[..., None], model.mask_token, x)
        x = torch.cat([model.cls_token.expand(2, -1, -1), x], 1)
        bias = model.rel_pos_bias()
        states = []
        for blk in model.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
            states.append(x)
        final = model.lm_head(model.norm(x)[:, 1:][mask])
        h = torch.cat([x[:, :1], states[1][:, 1:]], 1)  # last CLS (pre-norm) + block-2 patches
        h = model.cls_pt_layers[0](h, shared_rel_pos_bias=bias)
        head = model.lm_head(model.norm(h)[:, 1:][mask])
    torch.testing.assert_close(out["logits"], final)
    torch.testing.assert_close(out["head_logits"], head)
    # Without a mask, forward_features is the same trunk.
    with torch.no_grad():
        unmasked = model.forward_features(views)
        empty = torch.zeros(2, 16, dtype=torch.bool)
        x = model.embed(views, empty)
        for blk in model.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
    torch.testing.assert_close(unmasked, model.norm(x))


INIT_CFG = BEiTConfig(
    image_size=64,
    patch_size=8,
    width=192,
    depth=4,
    heads=3,
    vocab_size=64,
    head_from_layer=3,
    layer_scale_init=0.1,
)


def test_backbone_init_is_the_references():
    torch.manual_seed(0)
    model = BEiTv2(INIT_CFG)
    # Truncated at +-1 std as the reference, so the spread is 0.02 * 0.5396.
    trunc_std = 0.02 * 0.5396
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= 0.02
    assert qkv.std().item() == pytest.approx(trunc_std, rel=0.05)
    assert model.mask_token.abs().max() <= 0.02 and model.mask_token.std() > 0
    for layer_id, blk in enumerate(model.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(trunc_std / math.sqrt(2 * layer_id), rel=0.08)
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)
        assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.mlp.fc1.bias == 0)
    assert torch.all(model.rel_pos_bias.relative_position_bias_table == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert torch.all(model.lm_head.bias == 0) and model.lm_head.weight.abs().max() <= 0.02


def _uniform_check(w: torch.Tensor, bound: float) -> None:
    """``w`` looks drawn from U(-bound, bound): inside the bound, std bound/sqrt(3), flat."""
    flat = w.detach().flatten()
    assert flat.abs().max() <= bound
    assert flat.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # A uniform puts half its mass beyond bound/2 (a normal of that std puts ~39% there).
    assert (flat.abs() > bound / 2).float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_cls_head_keeps_pytorch_default_init_then_the_layer_id_rescale():
    """The reference builds cls_pt_layers after its init pass (docs/method.md §3)."""
    torch.manual_seed(0)
    model = BEiTv2(INIT_CFG)
    width, hidden = INIT_CFG.width, int(INIT_CFG.width * INIT_CFG.mlp_ratio)
    for layer_id, blk in enumerate(model.cls_pt_layers, start=INIT_CFG.early_layers + 1):
        scale = math.sqrt(2 * layer_id)  # blocks 4 and 5 of a tap at 3
        # nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), same bias.
        _uniform_check(blk.attn.qkv.weight, 1 / math.sqrt(width))
        _uniform_check(blk.mlp.fc1.weight, 1 / math.sqrt(width))
        _uniform_check(blk.attn.proj.weight, 1 / math.sqrt(width) / scale)
        _uniform_check(blk.mlp.fc2.weight, 1 / math.sqrt(hidden) / scale)
        for bias, fan_in in ((blk.mlp.fc1.bias, width), (blk.attn.proj.bias, width)):
            assert bias.abs().min() > 0 and bias.abs().max() <= 1 / math.sqrt(fan_in)
        assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.gamma_1 == 0.1)
        assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)


def test_drop_path_ramp_and_no_layer_scale():
    model = BEiTv2(BEiTConfig(**{**TINY.__dict__, "depth": 3, "drop_path": 0.2}))
    assert model.blocks[0].drop_path1.__class__.__name__ == "Identity"
    # The reference: the backbone ramps over its depth (3 blocks: 0, 0.1, 0.2); the head blocks
    # take steps 2 and 3 of a ramp over max(depth, tap + head blocks) = 4 (tap 2 of 3).
    rates = [blk.drop_path1.drop_prob for blk in model.blocks[1:]]
    assert rates == pytest.approx([0.1, 0.2])
    heads = [blk.drop_path2.drop_prob for blk in model.cls_pt_layers]
    assert heads == pytest.approx([0.2 * 2 / 3, 0.2])
    no_scale = BEiTv2(BEiTConfig(**{**TINY.__dict__, "layer_scale_init": 0.0}))
    assert no_scale.blocks[0].gamma_1 is None


def test_drop_path_rates_equal_the_references_linspace():
    cfg = BEiTConfig(**{**TINY.__dict__, "depth": 12, "head_from_layer": 11, "drop_path": 0.1})
    model = BEiTv2(cfg)
    backbone = [0.0] + [b.drop_path1.drop_prob for b in model.blocks[1:]]
    assert backbone == [x.item() for x in torch.linspace(0, 0.1, 12)]
    ramp = [x.item() for x in torch.linspace(0, 0.1, 13)]  # tap 11 + 2 head blocks > 12
    assert [b.drop_path1.drop_prob for b in model.cls_pt_layers] == ramp[11:13]


def test_mim_loss_matches_manual_cross_entropy_and_backprops():
    model = tiny_model()
    model.train()
    views = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 16, 6)
    targets = torch.randint(0, 16, (12,))
    out = model(views, mask)
    losses = mim_loss(out, targets)
    final = F.cross_entropy(out["logits"], targets)
    head = F.cross_entropy(out["head_logits"], targets)
    torch.testing.assert_close(losses["mim_loss"], final)
    torch.testing.assert_close(losses["head_loss"], head)
    torch.testing.assert_close(losses["loss"], final + head)
    acc = (out["logits"].argmax(-1) == targets).float().mean()
    torch.testing.assert_close(losses["mim_acc"], acc)
    losses["loss"].backward()
    for name in (
        "mask_token",
        "rel_pos_bias.relative_position_bias_table",
        "cls_pt_layers.0.attn.qkv.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_mim_loss_accuracy_and_no_head():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 0])
    losses = mim_loss({"logits": logits, "head_logits": None}, targets)
    assert losses["mim_acc"].item() == pytest.approx(0.75)
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits, targets))
    assert losses["head_acc"].item() == 0 and losses["head_loss"].item() == 0
