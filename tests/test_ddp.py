"""DDP: two CPU processes (gloo) follow the same loss curve as one process at the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.training.loop import TrainConfig, fit
from repo_params import repo_params, section

from test_train import ToyTask, train_config  # same toy student as the loop tests (tests/ is on sys.path under pytest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out: Path) -> TrainConfig:
    return train_config(out, live=False, epochs=2, stage2_epochs=1, batch_size=16, lr=0.03, stage2_lr=0.01,
                        weight_decay=1e-4, grad_clip=1.0, seed=5, threads=0,
                        scheduler=section("distill_text.scheduler", patience=0, min_lr=1e-5))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # no dropout and no input noise: with per-rank RNG streams those would differ by design
    res = fit(ToyTask(noise=0.0, dropout=0.0), _config(Path(out)))
    if rank == 0:
        torch.save([h["train/loss"] for h in res.history], Path(out) / "losses.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    single = fit(ToyTask(noise=0.0, dropout=0.0), _config(tmp_path / "one"))
    try:
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    except Exception as exc:  # pragma: no cover - environment without process spawning
        pytest.fail(f"2-process run failed: {exc}")
    two = torch.load(tmp_path / "two" / "losses.pt", weights_only=True)
    one = [h["train/loss"] for h in single.history]
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1e-5)
    a = torch.load(tmp_path / "one" / "ckpt" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt" / "latest.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_stage_relaunches_itself_under_torchrun(monkeypatch) -> None:
    """distill_audio.nproc > 1 outside torchrun re-runs the same command through torch.distributed.run."""
    import argparse
    import subprocess

    from pipeline.stages import distill_audio

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    params = repo_params({"distill_audio": {"nproc": 2}})
    args = argparse.Namespace(params="exp.yaml", resume=True, shard=None)
    assert distill_audio.run(params, args) == 0
    (cmd,) = calls
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[-6:] == ["pipeline.cli", "run", "distill_audio", "--params", "exp.yaml", "--resume"]
