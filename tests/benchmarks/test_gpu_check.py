"""benchmarks/gpu_check.py keeps working without a GPU: CUDA parts skipped, saying so."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is what CI runs")
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu (no CUDA device)"
    for part in ("stage2", "nccl_ddp"):
        assert report[part]["skipped"].startswith("skipped: no CUDA device")
    assert 0.5 <= report["tokenizer"]["agree_bf16"] <= 1.0
    assert report["tokenizer"]["views_per_s"]["fp32"] > 0
    assert report["stage3_step"]["baseline"] == "ours_fp32"
    assert report["stage3_step"]["seconds"]["ours_bf16"] > 0
