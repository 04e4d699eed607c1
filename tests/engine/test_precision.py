"""precision=auto|fp32|bf16|fp16: what each resolves to, and what autocast then does."""

from pathlib import Path

import pytest
import torch

from engine import precision
from engine.errors import UserError
from engine.precision import PRECISIONS, autocast, resolve_precision


def test_the_four_spellings():
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: fast)
    assert resolve_precision("auto", "cpu") == ("bf16" if fast else "fp32")
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if fast else "fp32")


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert resolve_precision("auto", "cuda") == expected
        assert resolve_precision("fp16", "cuda:0") == "fp16"


def test_cpu_detection_reads_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    has = " avx512_bf16" in flags or " amx_bf16" in flags or " amx_tile" in flags
    if flags:
        assert precision.cpu_supports_bf16() == has


def test_explicit_values_and_refusals():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match="fp16 is for GPUs.*bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UserError, match="not one of auto, fp32, bf16, fp16"):
        resolve_precision("half", "cpu")


def test_autocast_runs_matmuls_at_the_precision():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # switched off again on exit
