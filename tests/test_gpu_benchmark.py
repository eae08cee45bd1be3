"""benchmarks/gpu.py without a GPU: the smoke run goes through every code path (teacher, the
loop's train_one_epoch, the loader per worker count, a torchrun DDP step over gloo) and writes
the JSON the README and the issue quote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures for minutes, not a smoke")
def test_gpu_benchmark_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["gpu"] is None and figures["date"]
    assert figures["teacher_segments_per_s"] > 0
    assert figures["train_samples_per_s"]["mn04_as"]["2"] > 0
    assert set(figures["loader_segments_per_s"]) == {"0", "1"}
    assert all(v > 0 for v in figures["loader_segments_per_s"].values())
    assert figures["ddp_ok"] is True and figures["ddp_backend"] == "gloo"
    assert "ddp smoke step (torchrun, 1 process, gloo): ok" in done.stdout
