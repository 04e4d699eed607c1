"""``pipeline run stage=all preset=demo``: every stage, in order, on one small corpus.

corpus -> pack -> vqkd -> tokenize (+ validate) -> pretrain (+ timm export) -> linprobe -> report

Each stage writes under ``<out_dir>/<stage>/`` and is run through the same registry and config
builder as ``pipeline run stage=<name>``, so the summary lists, per stage, the exact command that
reruns it alone on these outputs. Stage settings come from each stage's ``demo`` preset; the
wiring keys (images, out_dir, tokenizer, tokens, sizes that must agree) are set here, and
``vqkd=[key=value,...]`` (likewise ``tokenize=``, ``pretrain=``, ``linprobe=``) adds overrides.

Without ``images=``, the corpus is ``pipeline.demo_corpus`` (scikit-image photos + procedural
patterns, 16 classes; built offline in seconds). With ``images=<labelled folder or shards>``
(e.g. the ImageNet sample) that source is packed instead.

``pipeline run stage=all --help`` imports this module for :class:`AllConfig`, so what imports
torch or pyarrow is imported inside the function that needs it, not at the top.

Measured (``preset=demo``, 512 images, on a 2-core machine shared with other jobs, load ~4):
4 min 16 s wall in all; vqkd 147 s, pretrain 55 s, teacher probe 23 s, tokenize 13 s, the rest
a few seconds each. Linear probe top-1 on the 16 demo classes: pretrained 42.7%, random init of
the same ViT 24.0%, the EfficientNet-Lite0 teacher 100% (an ImageNet-trained CNN on easy classes).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from engine.config import Count, Seed, StageConfig, merge, parse_overrides, save_config
from engine.errors import ConfigError, UserError
from engine.layout import DEMO, RunLayout, imagenet_sample_dir
from engine.lock import check_output
from pipeline.cli import build_stage_config
from pipeline.demo_corpus import build_demo_corpus
from pipeline.stages import get_stage

log = logging.getLogger(__name__)

STAGE_ORDER = ("pack", "vqkd", "tokenize", "pretrain", "linprobe", "report")


@dataclass(frozen=True)
class AllConfig(StageConfig):
    """The whole pipeline on one corpus (defaults = the demo: <= 10 minutes on 2 CPU cores)."""

    out_dir: str = DEMO.root  # the run root: one folder per stage (engine/layout.py)
    # labelled images to use instead of the built-in demo corpus (folder, tars or parquet)
    images: str | None = None
    corpus_images: Count = 512  # demo corpus: number of images (16 classes, 32 each)
    corpus_size: Count = 96  # demo corpus: image side in pixels
    corpus_seed: Seed = 0
    shard_size: Count = 128  # images per packed shard (several shards -> several Dask tasks)
    seeds: tuple[Seed, ...] = (0, 1, 2, 3)  # view seeds tokenized in stage 2
    n_workers: Count = 2  # Dask LocalCluster workers
    stage_preset: str = "demo"  # the preset each stage starts from
    stages: tuple[str, ...] = STAGE_ORDER  # which stages to run (later ones use earlier outputs)
    probe_teacher: bool = True  # also probe the teacher's own features (a third baseline)
    # extra key=value overrides per stage, e.g. vqkd=[train.epochs=1]
    vqkd: tuple[str, ...] = ()
    tokenize: tuple[str, ...] = ()
    pretrain: tuple[str, ...] = ()
    linprobe: tuple[str, ...] = ()

    presets: ClassVar[dict[str, dict]] = {
        "demo": {},
        # The ImageNet sample (1000 images, one per class) instead of the demo corpus.
        # $IMAGENET_SAMPLE, default beside the repository (engine.layout.imagenet_sample_dir)
        "imagenet-sample": {"images": str(imagenet_sample_dir()), "shard_size": 256},
    }


def _flatten(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
            out.append(f"{prefix}{key}={text.replace(' ', '')}")
    return out


def command_line(stage: str, overrides: dict[str, Any]) -> str:
    """The ``pipeline run`` command that runs ``stage`` with ``overrides`` alone."""
    args = [f"stage={stage}", *_flatten(overrides)]
    return "pipeline run " + " ".join(shlex.quote(a) for a in args)


class _Runner:
    """Runs stages through the registry, timing them and recording what happened."""

    def __init__(self, cfg: AllConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.stages: dict[str, dict[str, Any]] = {}
        self.failed = False
        self.refused = False  # a stage refused its input (a UserError): the run exits 2

    def overrides(self, stage: str, wiring: dict[str, Any], extra: tuple[str, ...]) -> dict:
        layer = {"preset": self.cfg.stage_preset} if self._has_preset(stage) else {}
        return merge(merge(layer, wiring), parse_overrides(list(extra)))

    def _has_preset(self, stage: str) -> bool:
        return self.cfg.stage_preset in (
            getattr(get_stage(stage).config_class(), "presets", {}) or {}
        )

    def run(self, name: str, stage: str, overrides: dict[str, Any]) -> dict | None:
        """Run ``stage`` (recorded as ``name``); None when it (or an earlier one) failed."""
        if self.failed:
            self.stages[name] = {"status": "skipped (an earlier stage failed)"}
            return None
        command = command_line(stage, overrides)
        log.info("stage %s: %s", name, command)
        start = time.perf_counter()
        try:
            cfg = build_stage_config(stage, dict(overrides))
            summary = get_stage(stage).run_fn()(cfg) or {}
        except Exception as err:  # noqa: BLE001 - record, then write the report anyway
            user = isinstance(err, UserError)  # a message says what to fix: no traceback
            log.error("stage %s failed: %s%s", name, err, "" if user else traceback.format_exc())
            self.refused = self.refused or user
            self.stages[name] = {
                "status": f"failed: {type(err).__name__}: {err}",
                "seconds": round(time.perf_counter() - start, 1),
                "command": command,
            }
            self.failed = True
            return None
        code = int(summary.get("exit_code", 0) or 0)
        self.stages[name] = {
            "status": "ok" if code == 0 else f"exit code {code}",
            "seconds": round(time.perf_counter() - start, 1),
            "command": command,
            "summary": summary,
        }
        if code:
            self.failed = True
        return summary


def _model_shape(tokenizer_path: str) -> dict[str, int]:
    from tokenize_corpus.tokenizer import load_tokenizer  # see the module docstring (torch)

    tok = load_tokenizer(tokenizer_path)
    return {"image_size": int(tok.image_size), "patch_size": int(tok.patch_size)}


def run_all(cfg: AllConfig) -> dict:
    """Run the stages of ``cfg.stages`` in order; returns a summary pointing to the report."""
    from pipeline.report.command import write_report  # see the module docstring (torch)

    start = time.perf_counter()
    # absolute, so every command in the summary can be pasted from any directory
    out = Path(cfg.out_dir).resolve()
    layout = RunLayout(str(out))
    runner = _Runner(cfg, out)
    _preflight(cfg, runner)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    want = set(cfg.stages)

    images = os.path.abspath(cfg.images) if cfg.images and "://" not in cfg.images else cfg.images
    if images is None:
        t0 = time.perf_counter()
        corpus = build_demo_corpus(
            layout.corpus, n_images=cfg.corpus_images, size=cfg.corpus_size, seed=cfg.corpus_seed
        )
        images = corpus["out_dir"]
        runner.stages["corpus"] = {
            "status": "ok",
            "seconds": round(time.perf_counter() - t0, 1),
            "command": f"python -c 'from pipeline.demo_corpus import build_demo_corpus; "
            f'build_demo_corpus("{images}", {cfg.corpus_images}, {cfg.corpus_size})\'',
        }
    shards_dir = layout.pack
    shard_glob = layout.pack_shards  # a glob, not the folder: pack also writes index.json there
    if "pack" in want:
        wiring = {"images": images, "out_dir": shards_dir, "shard_size": cfg.shard_size}
        runner.run("pack", "pack", runner.overrides("pack", wiring, ()))

    tokenizer = layout.tokenizer
    if "vqkd" in want:
        wiring = {"images": shard_glob, "out_dir": layout.vqkd}
        summary = runner.run("vqkd", "vqkd", runner.overrides("vqkd", wiring, cfg.vqkd))
        if summary:
            tokenizer = str(summary.get("tokenizer") or summary.get("checkpoint") or tokenizer)

    tokens = layout.tokenize
    shape: dict[str, int] = {}
    if {"tokenize", "pretrain"} & want and not runner.failed:
        try:
            shape = _model_shape(tokenizer)
        except Exception as err:  # noqa: BLE001
            runner.stages["tokenizer"] = {"status": f"failed: cannot load {tokenizer}: {err}"}
            runner.failed = True
    if "tokenize" in want:
        wiring = {
            "images": shard_glob,
            "tokenizer": tokenizer,
            "out_dir": tokens,
            "seeds": list(cfg.seeds),
            "aug": {"size": shape.get("image_size", 224)},
            "cluster": {"n_workers": cfg.n_workers},
        }
        runner.run("tokenize", "tokenize", runner.overrides("tokenize", wiring, cfg.tokenize))
        if not runner.failed:
            _validate(runner, tokens, shard_glob)

    pretrain_dir = Path(layout.pretrain)
    if "pretrain" in want:
        wiring = {
            "images": shard_glob,
            "tokens": tokens,
            "out_dir": str(pretrain_dir),
            "model": {
                "image_size": shape.get("image_size", 224),
                "patch_size": shape.get("patch_size", 16),
            },
        }
        runner.run("pretrain", "pretrain", runner.overrides("pretrain", wiring, cfg.pretrain))

    probes: dict[str, Any] = {}
    if "linprobe" in want:
        probes = _linprobes(runner, cfg, shard_glob, pretrain_dir, tokenizer)

    report = None
    if "report" in want:
        t0 = time.perf_counter()
        _write_summary(out, runner, start)
        try:
            report = str(write_report(out))
            runner.stages["report"] = {
                "status": "ok",
                "seconds": round(time.perf_counter() - t0, 1),
                "command": f"pipeline report {shlex.quote(str(out))}",
            }
        except Exception as err:  # noqa: BLE001
            runner.stages["report"] = {
                "status": f"failed: {err}",
                "command": f"pipeline report {shlex.quote(str(out))}",
            }
            runner.failed = True
    summary = _write_summary(out, runner, start)
    if report:
        # rewrite once more so the page's timing table includes the report itself
        write_report(out)
    return {
        "report": report,
        "out_dir": str(out),
        "summary": layout.summary,
        "linprobe": probes,
        "commands": {k: v.get("command") for k, v in runner.stages.items() if v.get("command")},
        "stages": {k: v["status"] for k, v in runner.stages.items()},
        "seconds": summary["seconds"],
        "exit_code": 2 if runner.refused else 1 if runner.failed else 0,
    }


def _preflight(cfg: AllConfig, runner: _Runner) -> None:
    """The mistakes found before any stage runs (a ConfigError, nothing written): unknown
    stages, an image source that cannot be listed, per-stage overrides a stage refuses."""
    from shards.images import list_shards  # see the module docstring (pyarrow)

    unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
    if unknown:
        choices = ", ".join(STAGE_ORDER)
        raise ConfigError(f"stages={list(cfg.stages)}: unknown {unknown}; choose from {choices}")
    check_output(cfg.out_dir, "the run's stages")
    if cfg.images is not None:
        if not cfg.images:
            raise ConfigError(
                "images= is empty: leave it out for the demo corpus, or pass labelled images"
            )
        list_shards(cfg.images, cfg.shard_size)
    extras = {
        "vqkd": cfg.vqkd,
        "tokenize": cfg.tokenize,
        "pretrain": cfg.pretrain,
        "linprobe": cfg.linprobe,
    }
    for stage, extra in extras.items():
        if extra:
            try:
                build_stage_config(stage, runner.overrides(stage, {}, extra))
            except ConfigError as err:
                raise ConfigError(f"{stage}=[{','.join(extra)}]: {err}") from None


def _validate(runner: _Runner, tokens: str, shard_glob: str) -> None:
    from shards.validate import main as validate_main  # see the module docstring (pyarrow)

    t0 = time.perf_counter()
    argv = [tokens, f"images={shard_glob}"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = int(validate_main(argv) or 0)
    runner.stages["validate"] = {
        "status": "ok" if code == 0 else f"exit code {code}: {buf.getvalue()[-500:]}",
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "pipeline validate " + " ".join(shlex.quote(a) for a in argv),
    }
    if code:
        runner.failed = True


def _linprobes(
    runner: _Runner, cfg: AllConfig, shard_glob: str, pretrain_dir: Path, tokenizer: str
) -> dict[str, Any]:
    """Probe the pretrained backbone, a random init of the same shape, and the teacher."""
    import torch  # see the module docstring

    backbone = pretrain_dir / "backbone_timm.pth"
    if not backbone.is_file():
        backbone = pretrain_dir / "checkpoint.pth"
    random_init: dict[str, Any] = {}
    ckpt = pretrain_dir / "checkpoint.pth"
    if ckpt.is_file():
        model_cfg = torch.load(ckpt, map_location="cpu", weights_only=True).get("config") or {}
        m = model_cfg.get("model", {})
        random_init = {
            k: m[k] for k in ("image_size", "patch_size", "width", "depth", "heads") if k in m
        }
    runs = {
        "pretrained": {"backbone": str(backbone)},
        "random": {"backbone": "random", "random_init": random_init},
    }
    if cfg.probe_teacher:
        teacher = _teacher_name(tokenizer)
        if teacher:
            runs["teacher"] = {
                "backbone": f"teacher:{teacher}",
                "image_size": random_init.get("image_size", 224),
            }
    results = {}
    for name, wiring in runs.items():
        layout = RunLayout(str(runner.out))
        wiring = {**wiring, "images": shard_glob, "out_dir": layout.linprobe_run(name)}
        res = runner.run(
            f"linprobe-{name}", "linprobe", runner.overrides("linprobe", wiring, cfg.linprobe)
        )
        if res:
            results[name] = {"top1": res.get("top1"), "top5": res.get("top5")}
    return results


def _teacher_name(tokenizer: str) -> str | None:
    try:
        from tokenize_corpus.tokenizer import load_tokenizer  # see the module docstring (torch)

        name = load_tokenizer(tokenizer).describe().get("teacher")
    except Exception:  # noqa: BLE001 - the teacher baseline is optional
        return None
    if isinstance(name, dict):
        name = name.get("name")
    return str(name) if name else None


def _write_summary(out: Path, runner: _Runner, start: float) -> dict:
    summary = {
        "seconds": round(time.perf_counter() - start, 1),
        "stages": {
            k: {kk: vv for kk, vv in v.items() if kk != "summary"}
            | ({"summary": v["summary"]} if "summary" in v else {})
            for k, v in runner.stages.items()
        },
    }
    Path(RunLayout(str(out)).summary).write_text(json.dumps(summary, indent=2, default=str))
    return summary
