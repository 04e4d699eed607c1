"""The one checkpoint filter: ours, the reference's (unilm) and timm files onto our models."""

import argparse
from dataclasses import asdict

import pytest
import torch

from pretrain import backbones, checkpoints
from pretrain.checkpoints import (
    checkpoint_filter_fn,
    config_from_state_dict,
    load_beitv2,
    split_checkpoint,
)
from pretrain.errors import BackboneError
from pretrain.model import BEiTConfig, BEiTv2

TINY = BEiTConfig(
    image_size=32, patch_size=8, width=32, depth=2, heads=2, vocab_size=16, head_from_layer=1
)


def reference_state_dict(cfg: BEiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out as the reference's VisionTransformerForMaskedImageModelingCLS
    (shared relative position bias, no absolute position) saves it, built key by key.

    The reference saves ``rel_pos_bias.relative_position_index`` (a persistent buffer) beside
    the table; its blocks have gamma_1/2, norm1/2, attn.{q_bias, v_bias, qkv.weight, proj},
    mlp.fc1/fc2, and the CLS head blocks the same under cls_pt_layers.
    """
    g = torch.Generator().manual_seed(seed)
    d, hidden, n = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.num_patches
    side = cfg.grid[0]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "cls_token": rnd(1, 1, d),
        "mask_token": rnd(1, 1, d),
        "patch_embed.proj.weight": rnd(d, 3, cfg.patch_size, cfg.patch_size),
        "patch_embed.proj.bias": rnd(d),
        "rel_pos_bias.relative_position_bias_table": rnd((2 * side - 1) ** 2 + 3, cfg.heads),
        "rel_pos_bias.relative_position_index": torch.randint(0, 9, (n + 1, n + 1)),
    }
    blocks = [f"blocks.{i}." for i in range(cfg.depth)]
    blocks += [f"cls_pt_layers.{i}." for i in range(cfg.head_layers)]
    for prefix in blocks:
        state.update(
            {
                prefix + "gamma_1": rnd(d),
                prefix + "gamma_2": rnd(d),
                prefix + "norm1.weight": rnd(d),
                prefix + "norm1.bias": rnd(d),
                prefix + "attn.q_bias": rnd(d),
                prefix + "attn.v_bias": rnd(d),
                prefix + "attn.qkv.weight": rnd(3 * d, d),
                prefix + "attn.proj.weight": rnd(d, d),
                prefix + "attn.proj.bias": rnd(d),
                prefix + "norm2.weight": rnd(d),
                prefix + "norm2.bias": rnd(d),
                prefix + "mlp.fc1.weight": rnd(hidden, d),
                prefix + "mlp.fc1.bias": rnd(hidden),
                prefix + "mlp.fc2.weight": rnd(d, hidden),
                prefix + "mlp.fc2.bias": rnd(d),
            }
        )
    state.update(
        {
            "norm.weight": rnd(d),
            "norm.bias": rnd(d),
            "lm_head.weight": rnd(cfg.vocab_size, d),
            "lm_head.bias": rnd(cfg.vocab_size),
        }
    )
    return state


def test_reference_key_set_is_ours_plus_the_index_buffer():
    ours = set(BEiTv2(TINY).state_dict())
    assert set(reference_state_dict(TINY)) - ours == {"rel_pos_bias.relative_position_index"}
    assert ours <= set(reference_state_dict(TINY))


def test_reference_checkpoint_loads_strictly(tmp_path):
    state = reference_state_dict(TINY)
    args = argparse.Namespace(early_layers=1, layer_scale_init_value=0.1, model="beit_cls_pt")
    # As the reference's save_model writes it: model, optimizer, epoch, args (a namespace).
    ckpt = {"model": state, "optimizer": {}, "epoch": 3, "args": args}
    torch.save(ckpt, tmp_path / "checkpoint-3.pth")
    raw = checkpoints.read_checkpoint(tmp_path / "checkpoint-3.pth")
    model, cfg = load_beitv2(raw)
    assert cfg.early_layers == 1 and cfg.use_cls_head and cfg.head_layers == 2
    loaded = model.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(RuntimeError, match="relative_position_index"):  # why the filter exists
        BEiTv2(cfg).load_state_dict(state, strict=True)


def test_reference_checkpoint_exports_to_timm(tmp_path):
    import timm

    from pretrain.export import export_backbone, timm_kwargs, timm_model_name

    cfg = BEiTConfig(**{**asdict(TINY), "head_from_layer": 1})
    ckpt = {"model": reference_state_dict(cfg), "args": argparse.Namespace(early_layers=1)}
    torch.save(ckpt, tmp_path / "ref.pth")
    summary = export_backbone(tmp_path / "ref.pth", tmp_path / "b.safetensors")
    timm_model = timm.create_model(timm_model_name(cfg), **timm_kwargs(cfg, summary["path"]))
    ours, _ = load_beitv2(ckpt)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval().forward_features(x) - timm_model.eval().forward_features(x)).abs()
    assert diff.max() <= 1e-5


def test_tap_layer_of_a_bare_state_dict():
    def meta_state(size_cfg: BEiTConfig) -> dict:
        with torch.device("meta"):
            return BEiTv2(size_cfg).state_dict()

    large = BEiTConfig(width=1024, depth=24, heads=16, layer_scale_init=1e-5, head_from_layer=21)
    cfg = config_from_state_dict(meta_state(large))
    assert cfg.head_from_layer == 21 and cfg.early_layers == 21 and cfg.layer_scale_init == 1e-5
    assert config_from_state_dict(meta_state(BEiTConfig())).early_layers == 9  # base
    # Any other shape: the weights do not say which block the head read, so it is refused...
    odd = BEiTConfig(width=64, depth=16, heads=2, vocab_size=16, head_from_layer=12)
    with pytest.raises(BackboneError, match="cannot tell which block feeds the CLS head"):
        config_from_state_dict(meta_state(odd))
    # ...unless stored beside it, or the reference's args say it.
    _, told = split_checkpoint({"model": meta_state(odd), "model_config": {"head_from_layer": 12}})
    assert told.early_layers == 12 and told.depth == 16
    args = argparse.Namespace(early_layers=12)
    assert config_from_state_dict(meta_state(odd), args).early_layers == 12
    # Without a CLS head the tap does not matter.
    plain = BEiTConfig(**{**asdict(odd), "use_cls_head": False})
    assert not config_from_state_dict(meta_state(plain)).use_cls_head


def test_filter_targets():
    state = {f"module.{k}": v for k, v in reference_state_dict(TINY).items()}  # DDP-wrapped
    ours = checkpoint_filter_fn(state, BEiTv2(TINY))
    assert set(ours) == set(BEiTv2(TINY).state_dict())
    shape = checkpoints.infer_beit_shape(ours) | {"shared_table": False}  # timm's per-block form
    timm_model = backbones.build_timm_beit(shape)
    mapped = checkpoint_filter_fn(state, timm_model)
    table = state["module.rel_pos_bias.relative_position_bias_table"]
    assert torch.equal(mapped["blocks.1.attn.relative_position_bias_table"], table)
    timm_model.load_state_dict(mapped, strict=True)
    with pytest.raises(BackboneError, match="backbone file"):
        checkpoint_filter_fn(timm_model.state_dict(), BEiTv2(TINY))


def test_random_and_missing_backbones(tmp_path):
    from pretrain.eval_config import RandomInit

    spec = RandomInit(size="tiny", image_size=32, patch_size=8, depth=1, seed=3)
    a, b = backbones.random_beitv2(spec), backbones.random_beitv2(spec)
    assert torch.equal(a[0].blocks[0].attn.qkv.weight, b[0].blocks[0].attn.qkv.weight)
    state = backbones.timm_state_dict("random", spec)
    assert "blocks.0.attn.relative_position_bias_table" in state and "mask_token" not in state
    with pytest.raises(BackboneError, match="not found"):
        backbones.timm_state_dict(str(tmp_path / "nope.pth"), spec)
