"""The fidelity benchmark (benchmarks/fidelity.py), reduced: 40 songs, one epoch, one run.

It builds its own DVC project from the working tree, synthesises the corpus, runs ingest through
evaluate as a `dvc exp run`, and writes its figures; the full-size run is a benchmark, not a test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_reduced_benchmark_writes_its_figures_and_never_trains_on_held_out_songs(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "results" / "fidelity.json"
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(repo_root / "benchmarks" / "fidelity.py"), "--work", str(work), "--songs", "40",
           "-S", "distill_audio.epochs=1", "-S", "ingest.val_ratio=0.3", "--runs", "default", "--jobs", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    result = json.loads(out.read_text())
    assert result["corpus"]["songs"] == 40 and result["set"] == {"distill_audio.epochs": 1, "ingest.val_ratio": 0.3}
    (run,) = result["runs"]
    f = run["figures"]
    for key in ("track_cosine_median", "track_cosine_centred_median", "mean_baseline_median", "top5_overlap",
                "top10_overlap", "neighbour_spearman"):
        assert isinstance(f[key], float) and math.isfinite(f[key]), key
    assert isinstance(f["same_space"], bool) and f["epochs"] == 1
    assert run["cost"]["cpu_seconds"] > 0 and run["epoch_curve"][0]["epoch"] == 1
    assert out.with_suffix(".png").stat().st_size > 1000

    # held-out songs never train: their artists have no training song, the student trained on the
    # training split only, and every held-out song was scored
    manifest = [json.loads(line) for line in (work / "data" / "manifest.jsonl").read_text().splitlines() if line]
    train = [r for r in manifest if r["split"] == "train"]
    held_out = [r for r in manifest if r["split"] == "val"]
    assert len(manifest) == 40 and train and len(held_out) >= 5
    assert not {r["artist"] for r in train} & {r["artist"] for r in held_out}
    assert run["held_out"] == {"train_songs": len(train), "held_out_songs": len(held_out),
                               "held_out_artists": len({r["artist"].casefold() for r in held_out}),
                               "held_out_artists_in_training": 0}
    assert f["train_tracks"] == len(train) and f["held_out_tracks"] == len(held_out)
    # the run is a DVC experiment of the benchmark's project
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only"], cwd=work,
                           capture_output=True, text=True, env=dict(env, PYTHONPATH=str(work)))
    assert shown.stdout.split() == ["default"], shown.stdout + shown.stderr[-2000:]
