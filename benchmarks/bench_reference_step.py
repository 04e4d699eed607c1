"""Stage 3 step vs the reference's own: ViT-B/16 at 224 px, batch 8, interleaved.

Three training steps on the same machine, in one process, interleaved round by round (the order
rotates every round, so drifting load from other processes hits all of them alike):

  ref_fp32     the reference's pretraining step, built from its own code
               (``modeling_pretrain.beit_base_patch16_224_8k_vocab_cls_pt`` with the
               PRETRAINING.md recipe: shared relative position bias, layer scale 0.1, drop path
               0.1, 9 early layers + 2 head layers, shared LM head; its ``optim_factory`` AdamW
               param groups; its step: forward, the two cross-entropies, backward, clip 3.0,
               AdamW step). On a CPU its ``torch.cuda.amp.autocast`` and CUDA grad scaler are
               inactive, so this is its fp32 step.
  ours_default our stage-3 step (``pretrain.loop.train_step``: the code ``stage=pretrain`` runs) at
               ``train.precision=auto`` (bf16 autocast on a CPU with AVX512-BF16/AMX or a bf16
               GPU, fp32 master weights, foreach/fused AdamW, clip 3.0)
  ours_fp32    the same step at ``train.precision=fp32``
  ours_compile (``--compile``) the default step with ``train.compile=true`` (torch.compile)

Goals: ours_default / ref_fp32 <= 0.6 and ours_fp32 / ref_fp32 <= 1.0. Ratios are taken
per round (same-moment measurements) and their median reported, with the medians of the times.
``--reference ''`` times our steps alone (no ratios); ``--student`` and ``--image-size`` shrink our
student and the views (the reference's model is always its ViT-B/16, at ``--image-size``).

The reference's ``optim_factory`` imports optimizers that current timm renamed (``Nadam``...);
only those missing names are shimmed, inside this process, before importing it.

    .venv/bin/python benchmarks/bench_reference_step.py --reference /work/ref/unilm/beit2 \
        --rounds 5 --steps 2

Prints JSON and writes benchmarks/results/reference_step.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import smoke
import torch
import torch.nn.functional as F

from engine.optim import adamw, param_groups
from engine.precision import resolve_precision
from pretrain.loop import train_step
from pretrain.masking import block_mask, num_masked_for
from pretrain.model import BEiTv2, beit_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [
    "--reference=", "--student=tiny", "--image-size=32", "--batch=2", "--rounds=1", "--steps=1",
    "--out={tmp}/reference_step.json",
]  # fmt: skip
SHIMMED_OPTIMIZERS = {
    "timm.optim.adafactor": "Adafactor",
    "timm.optim.adahessian": "Adahessian",
    "timm.optim.adamp": "AdamP",
    "timm.optim.lookahead": "Lookahead",
    "timm.optim.nadam": "Nadam",
    "timm.optim.novograd": "NovoGrad",
    "timm.optim.nvnovograd": "NvNovoGrad",
    "timm.optim.radam": "RAdam",
    "timm.optim.rmsprop_tf": "RMSpropTF",
    "timm.optim.sgdp": "SGDP",
}


def import_reference(path: str) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """(modeling_pretrain, optim_factory) of the reference checkout at ``path``; the shims."""
    shims = []
    for module_name, attr in SHIMMED_OPTIMIZERS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = types.ModuleType(module_name)
            sys.modules[module_name] = module
        if not hasattr(module, attr):
            # never used by the benchmark (it builds AdamW); only the import must succeed
            setattr(module, attr, type(attr, (), {}))
            shims.append(f"{module_name}.{attr}")
    sys.path.insert(0, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its registry names overwrite timm's in this process
        modeling = importlib.import_module("modeling_pretrain")
        optim_factory = importlib.import_module("optim_factory")
    return modeling, optim_factory, shims


def reference_step(ref, optim_factory, args: argparse.Namespace):
    """The reference model, its optimiser, and its step as a closure."""
    torch.manual_seed(0)
    model = ref.beit_base_patch16_224_8k_vocab_cls_pt(
        drop_path_rate=0.1, use_shared_rel_pos_bias=True, use_abs_pos_emb=False,
        init_values=0.1, vocab_size=8192, early_layers=9, head_layers=2, shared_lm_head=True,
        img_size=args.image_size,
    )  # fmt: skip
    model.train()
    opt_args = argparse.Namespace(
        opt="adamw", lr=1.5e-3, weight_decay=0.05, opt_eps=1e-8, opt_betas=(0.9, 0.98),
        momentum=0.9,
    )  # fmt: skip
    optimizer = optim_factory.create_optimizer(opt_args, model)

    def step(views: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> float:
        labels = tokens[mask]
        with torch.cuda.amp.autocast(enabled=torch.cuda.is_available() and args.ref_amp):
            outputs = model(views, bool_masked_pos=mask)
            loss = F.cross_entropy(outputs[0], labels) + F.cross_entropy(outputs[1], labels)
        value = loss.item()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        return value

    return model, step


def our_step(precision: str, compile_model: bool, device: torch.device, args: argparse.Namespace):
    """Our student and ``pretrain.loop.train_step`` at ``precision`` as a closure."""
    torch.manual_seed(0)
    mcfg = beit_config(
        args.student, image_size=args.image_size, patch_size=16, vocab_size=8192, drop_path=0.1
    )
    model = BEiTv2(mcfg).to(device).train()
    train = types.SimpleNamespace(precision=precision, clip_grad=3.0)
    loop = types.SimpleNamespace(
        cfg=types.SimpleNamespace(train=train), device=device, model=model,
        net=torch.compile(model) if compile_model else model, tokenizer=None,
        optimizer=adamw(param_groups(model, 0.05), lr=1.5e-3, betas=(0.9, 0.98), device=device),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
    )  # fmt: skip

    def step(views: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> float:
        result = train_step(loop, {"view": views, "mask": mask, "tokens": tokens})
        return float(result["loss"].detach())

    return model, step


def timed(step, batch, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        step(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - tic)
    return out


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--reference", default="/work/ref/unilm/beit2", help="reference beit2/ folder ('': none)"
    )
    p.add_argument("--student", default="base", help="our student's size (pretrain.model)")
    p.add_argument("--image-size", type=int, default=224, help="views, patch 16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time train.compile=true")
    p.add_argument("--ref-amp", action="store_true", help="on CUDA: the reference's fp16 autocast")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reference_step.json"))
    args = smoke.parse_args(p, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = uptime()
    default = resolve_precision("auto", device)

    variants, shims, no_reference = {}, [], None
    if args.reference:
        ref, optim_factory, shims = import_reference(args.reference)
        ref_model, variants["ref_fp32"] = reference_step(ref, optim_factory, args)
        ref_model.to(device)
    else:
        no_reference = smoke.skipped("the reference's step", "no --reference checkout")
    _, variants["ours_default"] = our_step(default, False, device, args)
    _, variants["ours_fp32"] = our_step("fp32", False, device, args)
    if args.compile:
        _, variants["ours_compile"] = our_step(default, True, device, args)

    size = args.image_size
    rng = np.random.default_rng(0)
    grid = (size // 16, size // 16)
    views = torch.randn(args.batch, 3, size, size, device=device)  # normalised pixels
    mask = torch.from_numpy(
        np.stack([block_mask(grid, num_masked_for(grid), rng) for _ in range(args.batch)])
    ).to(device)  # [B, N] bool, 75 of 196 masked at 224 px
    tokens = torch.randint(0, 8192, (args.batch, grid[0] * grid[1]), device=device)
    batch = (views, mask, tokens)

    warm_seconds = {}
    for name, step in variants.items():
        tic = time.perf_counter()
        timed(step, batch, args.warmup, device)
        warm_seconds[name] = round(time.perf_counter() - tic, 2)
    names = list(variants)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            per_round[name].append(
                statistics.median(timed(variants[name], batch, args.steps, device))
            )
        print(f"round {r + 1}: " + ", ".join(f"{n} {per_round[n][-1]:.3f}s" for n in names))
    ratios = {
        f"{n}/ref_fp32": statistics.median(
            a / b for a, b in zip(per_round[n], per_round["ref_fp32"], strict=True)
        )
        for n in names
        if n != "ref_fp32" and "ref_fp32" in per_round
    }
    result = {
        "what": f"MIM train step, ours {args.student}/16"
        + (" vs the reference's ViT-B/16" if args.reference else "")
        + f", {size} px, batch {args.batch}, interleaved rounds",
        "device": str(device),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "default_precision": default,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median_step_s": {n: round(statistics.median(v), 4) for n, v in per_round.items()},
        "per_round_s": {n: [round(x, 4) for x in v] for n, v in per_round.items()},
        "median_ratio": {k: round(v, 4) for k, v in ratios.items()} if ratios else no_reference,
        "goals": {"ours_default/ref_fp32": 0.6, "ours_fp32/ref_fp32": 1.0},
        "first_steps_s": warm_seconds,
        "reference_shims": shims,
        "load_before": load_before,
        "load_after": uptime(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
