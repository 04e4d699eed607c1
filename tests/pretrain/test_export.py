"""Export to timm: timm itself loads the file and gives the same features."""

import json
from dataclasses import asdict

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pretrain.export import (
    export_backbone,
    main,
    timm_kwargs,
    timm_model_name,
)
from pretrain.model import BEiTConfig, BEiTv2

TINY = BEiTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, vocab_size=16)


def trained_like(cfg: BEiTConfig) -> BEiTv2:
    torch.manual_seed(0)
    model = BEiTv2(cfg).eval()
    with torch.no_grad():  # non-zero tables, biases and norms: every weight must travel
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def model_from_command(command: str) -> torch.nn.Module:
    """The model the export's printed loading code builds (it assigns ``model``)."""
    namespace: dict = {}
    exec(command, namespace)
    return namespace["model"]


def max_feature_diff(model: BEiTv2, timm_model: torch.nn.Module) -> float:
    x = torch.randn(
        2, 3, model.cfg.image_size, model.cfg.image_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours = model.forward_features(x)  # [B, 1+N, D]
        theirs = timm_model.eval().forward_features(x)
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize(
    ("layout", "suffix", "overrides"),
    [
        ("config", ".safetensors", {}),
        ("model_config", ".pth", {}),
        ("bare", ".safetensors", {"layer_scale_init": 0.0, "use_cls_head": False}),
    ],
)
def test_timm_round_trip_gives_same_features(tmp_path, layout, suffix, overrides):
    cfg = BEiTConfig(**{**TINY.__dict__, **overrides})
    model = trained_like(cfg)
    if layout == "config":
        checkpoint = {"model": model.state_dict(), "config": {"model": asdict(cfg)}, "step": 3}
    elif layout == "model_config":
        checkpoint = {"model": model.state_dict(), "model_config": asdict(cfg)}
    else:
        checkpoint = model.state_dict()  # shapes read off the state dict
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, ckpt)
    out = tmp_path / f"backbone{suffix}"
    summary = export_backbone(ckpt, out)
    assert summary["config"] == asdict(cfg)

    timm_model = timm.create_model(timm_model_name(cfg), **timm_kwargs(cfg, out))
    assert max_feature_diff(model, timm_model) <= 1e-5
    # The sidecar alone rebuilds it too: its command is the Python a user runs.
    sidecar = json.loads((tmp_path / f"backbone{suffix}.json").read_text())
    assert sidecar["model_name"] == timm_model_name(cfg)
    assert max_feature_diff(model, model_from_command(sidecar["command"])) <= 1e-5


def test_exported_keys_are_timm_backbone_keys(tmp_path):
    model = trained_like(TINY)
    out = tmp_path / "b.safetensors"
    export_backbone({"model": model.state_dict(), "config": {"model": asdict(TINY)}}, out)
    exported = load_file(out)
    assert not any(
        k.startswith(("mask_token", "lm_head", "cls_pt_layers", "rel_pos_bias")) for k in exported
    )
    table = model.rel_pos_bias.relative_position_bias_table.detach()
    for i in range(TINY.depth):
        assert torch.equal(exported[f"blocks.{i}.attn.relative_position_bias_table"], table)
    reference = timm.create_model(timm_model_name(TINY), **timm_kwargs(TINY))
    assert set(exported) == set(reference.state_dict())


def test_timm_load_is_strict(tmp_path):
    out = tmp_path / "b.safetensors"
    export_backbone(trained_like(TINY).state_dict(), out)
    weights = load_file(out)
    del weights["blocks.1.gamma_2"]
    save_file(weights, out)
    with pytest.raises(RuntimeError, match="gamma_2"):
        timm.create_model(timm_model_name(TINY), **timm_kwargs(TINY, out))


def test_base_kwargs_are_timm_defaults():
    kwargs = timm_kwargs(BEiTConfig(), "x.safetensors")
    assert timm_model_name(BEiTConfig()) == "beitv2_base_patch16_224"
    shape = (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"])
    assert shape == (768, 12, 12, 16)
    assert kwargs["pretrained_cfg_overlay"]["file"] == "x.safetensors"
    assert timm_model_name(BEiTConfig(width=1024, depth=24, heads=16)) == "beitv2_large_patch16_224"


def test_mismatched_checkpoint_is_refused(tmp_path):
    model = trained_like(TINY)
    wrong = asdict(TINY) | {"depth": 3}
    with pytest.raises(ValueError, match="missing blocks.2"):
        export_backbone(
            {"model": model.state_dict(), "config": {"model": wrong}}, tmp_path / "b.pth"
        )


def test_cli_main(tmp_path, capsys):
    model = trained_like(TINY)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "config": {"model": asdict(TINY)}}, ckpt)
    assert main([str(ckpt)]) == 0
    assert (tmp_path / "last.timm.safetensors").is_file()
    assert "timm.create_model" in capsys.readouterr().out
    assert main([str(ckpt), f"out={tmp_path / 'x.pth'}"]) == 0 and (tmp_path / "x.pth").is_file()
    assert main([str(tmp_path / "missing.pt")]) == 2  # a user error
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([str(ckpt), "bogus=1"]) == 2


def test_names_say_the_real_size_and_the_command_uses_an_absolute_path(tmp_path, monkeypatch):
    from pretrain.export import export_name
    from pretrain.model import beit_config

    assert export_name(beit_config("tiny", image_size=96, patch_size=8)) == "beitv2_tiny_patch8_96"
    assert export_name(BEiTConfig()) == "beitv2_base_patch16_224"
    assert export_name(TINY) == "beitv2_w32d2h2_patch8_32"
    monkeypatch.chdir(tmp_path)
    model = trained_like(TINY)
    summary = export_backbone({"model": model.state_dict()}, "rel/b.safetensors")
    assert summary["name"] == "beitv2_w32d2h2_patch8_32"
    absolute = str(tmp_path / "rel" / "b.safetensors")
    assert summary["path"] == absolute and repr(absolute) in summary["command"]
    monkeypatch.chdir("/")  # the printed command works from anywhere
    assert max_feature_diff(model, model_from_command(summary["command"])) <= 1e-5


def test_exports_honour_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        export_backbone({"model": trained_like(TINY).state_dict()}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    for name in ("b.safetensors", "b.safetensors.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644


def test_pickled_checkpoint_is_refused_with_how_to_convert(tmp_path, capsys):
    torch.save({"model": trained_like(TINY)}, tmp_path / "whole_module.pt")
    assert main([str(tmp_path / "whole_module.pt")]) == 2
    err = capsys.readouterr().err
    assert "weights_only=False" in err and "state_dict" in err
