"""`student-clap ckpt ls | show | reset` on checkpoints written by the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import CheckpointError, describe, list_checkpoints, parameter_count, reset
from pipeline.cli import main as cli_main
from pipeline.models.audio_student import build_audio_student, save_audio_student
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.loop import TrainConfig, fit
from repo_params import section

from test_train import ToyTask, train_config  # the loop tests' toy student (tests/ is on sys.path under pytest)


def _cfg(tmp: Path, **kw) -> TrainConfig:
    base = dict(epochs=3, stage2_epochs=0, batch_size=16, lr=0.03, stage2_lr=1e-4, weight_decay=0.0, grad_clip=0.0,
                seed=0, threads=0, scheduler=section("distill_text.scheduler", patience=5))
    return train_config(tmp, live=False, **{**base, **kw})


@pytest.fixture()
def trained(tmp_path: Path) -> Path:
    fit(ToyTask(), _cfg(tmp_path))
    return tmp_path / "ckpt"


def test_ls_lists_epochs_with_metrics(trained: Path, capsys) -> None:
    rows = list_checkpoints(trained)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert sum(r["best"] for r in rows) == 1 and rows[-1]["latest"]
    assert {"train/loss", "train/cosine", "val/cosine"} <= set(rows[0]["metrics"])
    assert cli_main(["ckpt", "ls", str(trained)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["epoch", "stage", "lr"] and "val/cosine" in out[0]
    assert len(out) == 4 and "latest" in out[-1]


def test_show_config_and_parameter_count(trained: Path, tmp_path: Path, capsys) -> None:
    info = describe(trained / "best.pt")
    assert info["parameters"] == 8 * 32 + 32 + 32 * 6 + 6
    assert info["config"] == {"dropout": 0.1} and info["has_optimizer"]
    # a final audio student file: BatchNorm statistics are not counted as parameters
    student = build_audio_student({"backbone": "mn04_as", "dropout": 0.1})
    save_audio_student(tmp_path / "student.pt", student, {"pretrained": False})
    assert describe(tmp_path / "student.pt")["parameters"] == student.num_parameters()
    assert cli_main(["ckpt", "show", str(tmp_path / "student.pt")]) == 0
    assert '"backbone": "mn04_as"' in capsys.readouterr().out
    assert parameter_count({"bn.running_mean": torch.zeros(3), "w": torch.zeros(2, 2)}) == 4


def test_reset_lr_and_states_then_resume(trained: Path, tmp_path: Path) -> None:
    assert cli_main(["ckpt", "reset", str(trained), "--lr", "0.001", "--optimizer", "--scheduler"]) == 0
    assert (trained / "latest.pt.bak").is_file()
    assert load_checkpoint(trained / "latest.pt.bak")["optimizer"] is not None
    ck = load_checkpoint(trained / "latest.pt")
    assert ck["optimizer"] is None and ck["scheduler"] is None and ck["lr_override"] == 0.001
    res = fit(ToyTask(), _cfg(tmp_path, epochs=5, resume=True))
    assert [h["lr"] for h in res.history] == pytest.approx([0.03, 0.03, 0.03, 0.001, 0.001])


def test_reset_lr_keeps_optimizer_moments(trained: Path) -> None:
    before = load_checkpoint(trained / "epoch_002.pt")
    reset(trained / "epoch_002.pt", lr=0.002)
    after = load_checkpoint(trained / "epoch_002.pt")
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [0.002]
    s0, s1 = before["optimizer"]["state"], after["optimizer"]["state"]
    assert all(torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) for k in s0)


def test_reset_refuses_nonsense(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to reset"):
        reset(trained / "latest.pt")
    save_audio_student(tmp_path / "student.pt", build_audio_student({"backbone": "mn04_as", "dropout": 0.1}), {})
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        reset(tmp_path / "student.pt", lr=0.1)
    with pytest.raises(CheckpointError, match="no such file"):
        describe(tmp_path / "missing.pt")
