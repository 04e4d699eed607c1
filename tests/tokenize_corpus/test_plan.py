"""`pipeline plan`: the figures it prints are the job's, counted and measured, not shapes.

FLOPs are checked against a hand count and against torch's own FLOP counter running the real
encode; views and bytes against the job's arithmetic and the real writer; the CLI for its exit
codes. The plan-vs-real-run accuracy is a benchmark (benchmarks/bench_plan.py), not a test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from support.stage2 import TINY, make_corpus, make_tokenizer
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.synthetic import fake_rows
from engine.config import build_stage_config, parse_overrides
from pipeline.cli import main as cli
from shards.writer import parquet_bytes, wds_bytes
from tokenize_corpus import cost
from tokenize_corpus.plan import PlanConfig, format_plan, make_plan
from tokenize_corpus.tokenizer import load_tokenizer

TINY_SHAPE = cost.EncoderShape(
    TINY.image_size, TINY.patch_size, TINY.width, TINY.depth, TINY.code_dim, TINY.codebook_size
)


def plan_config(*keys: str) -> PlanConfig:
    return build_stage_config(PlanConfig, parse_overrides(list(keys)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.pth")


def test_flops_match_a_hand_count_of_the_tiny_encoder() -> None:
    # 32 px / patch 8: N = 16 patches, T = 17 tokens in the blocks, W = 64, D = 8, C = 16.
    n, t, w, d, c = 16, 17, 64, 8, 16
    hand = {
        "patch_embed": n * (3 * 8 * 8) * w,
        "blocks": t * w * 3 * w + t * w * w + 2 * t * w * 4 * w + 2 * t * t * w,
        "task_layer": n * w * w + n * w * d,
        "codebook": n * c * d,
    }
    flops = cost.encode_flops(TINY_SHAPE)
    assert {k: v for k, v in flops.items() if k != "total"} == {k: 2 * v for k, v in hand.items()}
    assert flops["total"] == 2 * sum(hand.values()) == 2_289_920


def test_flops_equal_torch_flop_counter_on_the_real_encode(tokenizer: str) -> None:
    model = load_tokenizer(tokenizer)
    with FlopCounterMode(display=False) as counter:
        model.encode(torch.rand(3, 3, 32, 32))
    assert counter.get_total_flops() == 3 * cost.encode_flops(TINY_SHAPE)["total"]


def test_vit_b_flops_are_the_known_17_6_gmacs() -> None:
    shape = cost.EncoderShape(224, 16, 768, 12, 32, 8192)
    assert cost.encode_flops(shape)["total"] / 2 == pytest.approx(17.7e9, rel=0.01)


def test_bytes_scale_linearly_and_match_the_real_writer() -> None:
    one = cost.dataset_bytes(1000, 4, 2, 196, 8192, ("parquet", "webdataset"))
    two = cost.dataset_bytes(2000, 8, 2, 196, 8192, ("parquet", "webdataset"))
    assert two["total"] == pytest.approx(2 * one["total"], rel=1e-12)
    only = cost.dataset_bytes(1000, 4, 2, 196, 8192, ("parquet",))
    assert "webdataset" not in only and only["parquet"] == one["parquet"]
    # One real shard (256 images, K=2, 196 tokens, uniform ids over 8192 codes): within 8%.
    rows = fake_rows(0, 256, (0, 1), 196, 8192)
    real_pq = sum(len(parquet_bytes(rows, i, 196, {})) for i in range(2))
    real_wds = len(wds_bytes(rows))
    model = cost.dataset_bytes(256, 1, 2, 196, 8192, ("parquet", "webdataset"))
    assert model["parquet"] == pytest.approx(real_pq, rel=0.08)
    assert model["webdataset"] == pytest.approx(real_wds, rel=0.08)
    skewed = cost.dataset_bytes(256, 1, 2, 196, 8192, ("parquet",), "zipf")
    assert skewed["parquet"] < model["parquet"]


def test_makespan_schedules_shards_in_order_on_free_workers() -> None:
    assert cost.makespan([3, 1, 1, 1], 2) == 3  # 3 | 1+1+1
    assert cost.makespan([1, 1, 1, 3], 2) == 4  # 1+1 | 1+3
    assert cost.makespan([2, 2], 4, first=0.5) == 2.5
    assert cost.makespan([], 2) == 0.0


def test_plan_counts_views_and_online_cost_from_a_real_source(
    tmp_path: Path, tokenizer: str
) -> None:
    images = make_corpus(tmp_path / "images", shards=3, per_shard=6)
    cfg = plan_config(
        f"images={images}",
        f"tokenizer={tokenizer}",
        "aug.size=32",
        "seeds=[0,1,5]",
        "epochs=40",
        "precision=fp32",
        "calibration.batches=1",
        "calibration.batch_size=4",
        "cluster.n_workers=1",
    )
    plan = make_plan(cfg)
    assert (plan["images"], plan["shards"], plan["seeds"]) == (18, 3, 3)
    assert plan["views"] == 18 * 3 and plan["tokens"] == 18 * 3 * 16
    assert plan["flops"] == 54 * cost.encode_flops(TINY_SHAPE)["total"]
    assert plan["online"]["views"] == 18 * 40 and plan["online"]["ratio"] == pytest.approx(40 / 3)
    assert plan["precision"] == "fp32"
    measured = plan["measured"]
    assert measured["decoded_images"] == 12  # real images of the first shards were decoded
    assert 0 < measured["seconds_per_view"] < 1 and measured["decode_seconds_per_image"] > 0
    wall = plan["wall_seconds"]
    assert wall["total"] == pytest.approx(wall["start"] + wall["tasks"])
    assert plan["worker_memory_bytes"] > measured["rss_after_load"] > 0
    text = format_plan(plan)
    assert "views   54 = 18 images x 3 seeds" in text and "online  40 epochs" in text


def test_num_images_instead_of_images(tokenizer: str) -> None:
    cfg = plan_config(
        "num_images=1000",
        "shard_size=250",
        f"tokenizer={tokenizer}",
        "aug.size=32",
        "seeds=[0,1]",
        "calibration.batches=1",
        "calibration.batch_size=4",
        "cluster.n_workers=1",
    )
    plan = make_plan(cfg)
    assert (plan["images"], plan["shards"], plan["views"]) == (1000, 4, 2000)
    # Same job with twice the images in twice the shards: bytes double, per-view time is one figure.
    wider = make_plan(dataclasses.replace(cfg, num_images=2000))
    assert wider["bytes"]["total"] == pytest.approx(2 * plan["bytes"]["total"], rel=1e-9)
    assert np.isclose(wider["flops"], 2 * plan["flops"])


def test_gpu_kind_is_a_labelled_estimate(tokenizer: str) -> None:
    cfg = plan_config(
        "num_images=100",
        f"tokenizer={tokenizer}",
        "aug.size=32",
        "gpu=a100",
        "calibration.batches=1",
        "calibration.batch_size=4",
        "cluster.n_workers=1",
    )
    plan = make_plan(cfg)
    assert plan["precision"] == "bf16" and "ESTIMATE" in plan["time_source"]
    expected = cost.encode_flops(TINY_SHAPE)["total"] / (312e12 * cost.GPU_UTILISATION)
    assert plan["measured"]["seconds_per_view"] == pytest.approx(expected)


def test_cli_plan_exit_codes(tmp_path: Path, tokenizer: str, capsys: pytest.CaptureFixture) -> None:
    assert cli(["plan", "--help"]) == 0
    assert "num_images=" in capsys.readouterr().out
    assert cli(["plan", f"tokenizer={tokenizer}", "aug.size=32"]) == 2  # nothing to plan for
    assert "images=" in capsys.readouterr().err
    assert cli(["plan", "num_images=10", f"tokenizer={tmp_path / 'nope.pth'}"]) == 2
    bad_size = ["plan", "num_images=10", f"tokenizer={tokenizer}", "aug.size=64"]
    assert cli(bad_size) == 2
    assert "aug.size=32" in capsys.readouterr().err
    assert cli(["plan", "num_images=10", f"tokenizer={tokenizer}", "aug.size=32", "gpu=x"]) == 2
