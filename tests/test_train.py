"""The shared training loop on a toy student: learning, checkpoints, exact resume, stage 2,
plateau schedule, DVCLive output, losses."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.training.losses import WHITEN_FLOOR, DistillLoss, relational_loss, whitener
from pipeline.params import LossParams
from pipeline.training.checkpoint import CheckpointError, load_checkpoint
from pipeline.training import schedule
from pipeline.training.loop import TrainConfig, fit, resolve_num_workers
from repo_params import section


class ToyStudent(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = {"dropout": dropout}
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(32, 6))

    def embed_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_raw(x), dim=-1)


class ToyTask:
    """Teacher = a fixed random non-linear map; the student sees noisy inputs (torch RNG)."""

    def __init__(self, n: int = 64, noise: float = 0.05, dropout: float = 0.1, constant_val: bool = False) -> None:
        g = torch.Generator().manual_seed(123)
        w1, w2 = torch.randn(8, 16, generator=g), torch.randn(16, 6, generator=g)
        x = torch.randn(n + 32, 8, generator=g)
        y = F.normalize(torch.tanh(0.3 * x @ w1) @ w2, dim=-1)
        self.dataset = TensorDataset(x[:n], y[:n])
        self.val = (x[n:], y[n:])
        self.collate_fn = None
        self.noise = noise
        self.constant_val = constant_val
        torch.manual_seed(0)
        self.model = ToyStudent(dropout)

    def embed_batch(self, encode, batch):
        x, y = batch
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return encode(x), y

    def validate(self, model):
        if self.constant_val:
            return {"cosine": 0.5}
        x, y = self.val
        return {"cosine": float((model(x) * y).sum(-1).mean())}

    def enter_stage2(self, model):
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        return list(model.head.parameters())

    def model_config(self):
        return dict(self.model.config)


def _loss(**kw) -> LossParams:
    """params.yaml's text-student loss with some keys changed (unchecked: DistillLoss checks its own)."""
    return dataclasses.replace(section("distill_text.loss"), **kw)


def train_config(tmp: Path, *, resume: bool = False, live: bool = True, **knobs) -> TrainConfig:
    """The text student's params section (the loop reads it as it is) with the toy's knobs; a value
    the params ranges refuse still reaches the loop, whose own checks are under test."""
    knobs.setdefault("scheduler", section("distill_text.scheduler", patience=1, min_lr=1e-5))
    p = dataclasses.replace(section("distill_text"), **knobs)
    return TrainConfig(p, tmp / "ckpt", "cosine", tmp / "live" if live else None, device="cpu", num_workers=0,
                       precision="fp32", channels_last=False, compile=False, resume=resume)


def _cfg(tmp: Path, **kw) -> TrainConfig:
    base = dict(epochs=3, stage2_epochs=1, batch_size=16, lr=0.03, stage2_lr=0.005, weight_decay=1e-4, grad_clip=1.0,
                seed=3, threads=0)
    return train_config(tmp, **{**base, **kw})


def test_learns_and_writes_checkpoints_and_plots(tmp_path: Path) -> None:
    task = ToyTask()
    with torch.no_grad():
        before = task.validate(task.model.eval())["cosine"]
    cfg = _cfg(tmp_path, epochs=6, stage2_epochs=0)
    res = fit(task, cfg)
    assert res.best_metrics["val/cosine"] > before + 0.2
    assert [h["epoch"] for h in res.history] == list(range(1, 7))
    ck = tmp_path / "ckpt"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["best.pt"] + [f"epoch_{i:03d}.pt" for i in range(1, 7)] + ["latest.pt"]
    assert (ck / "latest.pt").samefile(ck / "epoch_006.pt")  # a link, not a third copy
    latest = load_checkpoint(ck / "latest.pt")  # weights_only=True
    for key in ("model", "optimizer", "scheduler", "epoch", "metrics", "params", "rng", "config", "history"):
        assert key in latest
    assert latest["params"] == dataclasses.asdict(cfg.p) and latest["params"]["epochs"] == 6
    assert set(latest["rng"][0]) >= {"python", "numpy", "torch"}
    best = load_checkpoint(ck / "best.pt")
    assert best["epoch"] == res.best_epoch
    assert all(torch.equal(best["model"][k], v) for k, v in res.best_state_dict.items())
    # DVCLive: one row per epoch for every metric, nothing written to dvc.yaml
    tsv = tmp_path / "live" / "plots" / "metrics" / "val" / "cosine.tsv"
    assert len(tsv.read_text().strip().splitlines()) == 1 + 6
    assert (tmp_path / "live" / "plots" / "metrics" / "lr.tsv").is_file()
    assert not (tmp_path / "live" / "dvc.yaml").exists()


def test_resume_is_exact(tmp_path: Path) -> None:
    straight = fit(ToyTask(), _cfg(tmp_path / "a"))
    first = fit(ToyTask(), _cfg(tmp_path / "b", epochs=2, stage2_epochs=0))
    assert len(first.history) == 2
    resumed = fit(ToyTask(), _cfg(tmp_path / "b", resume=True))
    a = load_checkpoint(tmp_path / "a" / "ckpt" / "latest.pt")
    b = load_checkpoint(tmp_path / "b" / "ckpt" / "latest.pt")
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train/loss"] for h in straight.history] == [h["train/loss"] for h in resumed.history]
    # the DVCLive series continues instead of restarting
    tsv = tmp_path / "b" / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(tsv.read_text().strip().splitlines()) == 1 + 4


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path: Path, caplog) -> None:
    """A truncated latest.pt (and the epoch file it links to) is skipped with a warning; the run
    continues from the previous epoch and still matches an uninterrupted one."""
    fit(ToyTask(), _cfg(tmp_path / "a", epochs=4, stage2_epochs=0))
    fit(ToyTask(), _cfg(tmp_path / "b", epochs=3, stage2_epochs=0))
    latest = tmp_path / "b" / "ckpt" / "latest.pt"
    with open(latest, "r+b") as f:  # truncates epoch_003.pt too: the same file under two names
        f.truncate(latest.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        resumed = fit(ToyTask(), _cfg(tmp_path / "b", epochs=4, stage2_epochs=0, resume=True))
    assert "latest.pt: not a readable checkpoint" in caplog.text
    assert "resuming from" in caplog.text and "epoch_002.pt (epoch 2) instead" in caplog.text
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a = load_checkpoint(tmp_path / "a" / "ckpt" / "latest.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "ckpt" / "latest.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_best_is_pointed_back_at_the_recorded_best_epoch(tmp_path: Path) -> None:
    from pipeline.training.checkpoint import repair_best

    fit(ToyTask(), _cfg(tmp_path, epochs=3, stage2_epochs=0))
    ck = tmp_path / "ckpt"
    (ck / "best.pt").unlink()
    (ck / "best.pt").write_bytes(b"truncated")
    epoch2 = load_checkpoint(ck / "epoch_002.pt")
    repair_best(ck, epoch2)
    assert (ck / "best.pt").samefile(ck / f"epoch_{epoch2['best']['epoch']:03d}.pt")
    (ck / "best.pt").unlink()
    (ck / "best.pt").write_bytes(b"truncated")
    repair_best(ck, {"best": {"epoch": 9}})  # no such epoch file: removed rather than left broken
    assert not (ck / "best.pt").exists()


def test_resume_with_no_readable_checkpoint_names_the_files(tmp_path: Path) -> None:
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint.*latest\.pt"):
        fit(ToyTask(), _cfg(tmp_path, epochs=1, stage2_epochs=0, resume=True))


def test_stage2_trains_head_only(tmp_path: Path) -> None:
    fit(ToyTask(), _cfg(tmp_path, epochs=2, stage2_epochs=2))
    e2 = load_checkpoint(tmp_path / "ckpt" / "epoch_002.pt")
    e4 = load_checkpoint(tmp_path / "ckpt" / "epoch_004.pt")
    assert e4["stage"] == 2 and e2["stage"] == 1
    assert torch.equal(e2["model"]["encoder.0.weight"], e4["model"]["encoder.0.weight"])
    assert not torch.equal(e2["model"]["head.1.weight"], e4["model"]["head.1.weight"])
    assert e4["metrics"]["lr"] == pytest.approx(0.005)


def test_plateau_halves_lr_down_to_min(tmp_path: Path) -> None:
    sched = section("distill_text.scheduler", mode="max", factor=0.5, patience=0, threshold=1e-4, min_lr=0.00375)
    res = fit(ToyTask(constant_val=True), _cfg(tmp_path, epochs=5, stage2_epochs=0, scheduler=sched))
    assert [h["lr"] for h in res.history] == pytest.approx([0.03, 0.03, 0.015, 0.0075, 0.00375])


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    res = fit(ToyTask(), _cfg(tmp_path, epochs=1, stage2_epochs=0, resume=True))
    assert len(res.history) == 1


def test_schedule_and_worker_count() -> None:
    assert [schedule.get_lr(0.1, s, 4, True) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert schedule.get_lr(0.1, 2, 4, False) is None
    assert schedule.improved(0.5, None, "max") and not schedule.improved(float("nan"), None, "max")
    assert schedule.improved(0.4, 0.5, "min") and not schedule.improved(0.4, 0.5, "max")
    assert 1 <= resolve_num_workers("auto") <= 8 and resolve_num_workers(3) == 3
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1)


def test_batch_must_split_over_ranks_and_epochs_needed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epoch"):
        fit(ToyTask(), _cfg(tmp_path, epochs=0, stage2_epochs=0))


# ------------------------------------------------------------------------- losses


def test_cosine_loss_has_no_learnable_scale() -> None:
    assert list(DistillLoss(_loss(kind="cosine")).parameters()) == []
    assert list(DistillLoss(_loss(kind="mse")).parameters()) == []
    loss = DistillLoss(_loss(kind="cosine", contrastive_weight=0.5, contrastive_logit_scale=math.log(10)))
    assert [p.numel() for p in loss.parameters()] == [1]


def test_loss_values() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    cos, stats = DistillLoss(_loss(kind="cosine", temperature=0.5))(s, t)
    assert float(cos) == pytest.approx(-(1 + 0) / 2 / 0.5)
    assert stats["cosine"] == pytest.approx(0.5)
    mse, _ = DistillLoss(_loss(kind="mse"))(s, t)
    assert float(mse) == pytest.approx((0 + 2) / 4)  # [0,1] vs [1,0]: squared error 2 over 4 entries
    raw, _ = DistillLoss(_loss(kind="mse_raw"))(s, t)
    assert float(raw) == pytest.approx((0 + 1 + 4) / 4)
    with pytest.raises(ValueError, match="temperature"):
        DistillLoss(_loss(temperature=0.0))


def test_contrastive_term_prefers_matching_rows() -> None:
    p = _loss(kind="cosine", contrastive_weight=1.0, contrastive_logit_scale=math.log(20))
    fn = DistillLoss(p)
    t = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    matched, st = fn(t.clone(), t)
    shuffled, _ = fn(t[torch.tensor([1, 2, 3, 4, 5, 0])], t)
    assert float(matched.detach()) < float(shuffled.detach())
    assert "contrastive" in st and st["logit_scale"] == pytest.approx(math.log(20))


def test_centred_term_rewards_differences_not_the_mean() -> None:
    g = torch.Generator().manual_seed(1)
    centre = F.normalize(torch.randn(8, generator=g), dim=0)
    t = F.normalize(centre + 0.05 * torch.randn(5, 8, generator=g), dim=-1)  # all close to the centre
    fn = DistillLoss(_loss(kind="cosine"), centre=centre)
    _, exact = fn(t.clone(), t)
    _, at_mean = fn(centre.expand(5, 8).clone(), t)
    assert exact["centred_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert at_mean["centred_cosine"] == pytest.approx(0.0, abs=1e-5)
    assert at_mean["cosine"] > 0.95  # the raw cosine cannot tell the two apart
    assert list(fn.parameters()) == [] and "centre" not in fn.state_dict()


def test_relational_term_matches_similarity_structure_not_coordinates() -> None:
    """The similarity-preserving term is zero for any rotation of the teacher's rows (same
    neighbours, other coordinates) and grows when the student reorders who is alike."""
    g = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    rotated = t @ rotation
    assert float(relational_loss(rotated, t)) == pytest.approx(0.0, abs=1e-10)
    shuffled = t[torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])]
    assert float(relational_loss(shuffled, t)) > 0.01
    fn = DistillLoss(_loss(kind="cosine", relational_weight=2.0))
    loss_rot, stats = fn(rotated, t)
    plain, _ = DistillLoss(_loss(kind="cosine"))(rotated, t)
    assert stats["relational"] == pytest.approx(0.0, abs=1e-10)
    assert float(loss_rot) == pytest.approx(float(plain), abs=1e-6)  # the term adds nothing for the same structure
    _, shuffled_stats = fn(shuffled, t)
    assert shuffled_stats["relational"] > 0.01


def test_relational_term_is_centred_around_a_dominant_mean() -> None:
    """Around a shared direction every raw similarity is ~1; centred, the structure shows."""
    g = torch.Generator().manual_seed(4)
    centre = F.normalize(torch.randn(16, generator=g), dim=0)
    t = F.normalize(centre + 0.05 * torch.randn(8, 16, generator=g), dim=-1)
    wrong = F.normalize(centre + 0.05 * torch.randn(8, 16, generator=g), dim=-1)  # other offsets, same mean
    assert float(relational_loss(wrong, t)) < 0.01  # raw: nearly blind to it
    assert float(relational_loss(wrong, t, centre)) > 0.1
    with pytest.raises(ValueError, match="relational_weight"):
        DistillLoss(_loss(relational_weight=-1.0))


def test_whitener_gives_unit_variance_in_every_direction_the_teacher_uses() -> None:
    import numpy as np

    rng = np.random.default_rng(5)
    # a dominant shared direction, one strong and six faint directions of spread (10x smaller, all
    # above the floor), nothing elsewhere
    scales = np.array([1.0, 0.5] + [0.05] * 6)
    basis = np.linalg.qr(rng.standard_normal((16, 8)))[0]
    rows = 5.0 * basis[:, 0] + (rng.standard_normal((4000, 8)) * scales) @ basis.T
    mean, w = whitener(rows)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    white = (unit - mean.numpy()) @ w.numpy().astype(np.float64)
    cov = np.cov(white, rowvar=False)
    spread = basis[:, 1:].T @ cov @ basis[:, 1:]  # the used directions (the shared one is the mean)
    assert np.allclose(np.diag(spread), 1.0, atol=0.1)
    assert np.allclose(w.numpy(), w.numpy().T, atol=1e-5)  # ZCA: symmetric, keeps the orientation
    # unused directions are lifted only to the floor, not divided by a near-zero eigenvalue
    unused = np.linalg.qr(np.concatenate([basis, rng.standard_normal((16, 8))], axis=1))[0][:, 8:]
    gain = np.linalg.norm(w.numpy() @ unused, axis=0)
    assert np.all(gain <= 1.01 / np.sqrt(WHITEN_FLOOR * np.linalg.eigvalsh(np.cov(unit, rowvar=False)).mean()))


def test_whitened_term_weighs_faint_directions_like_strong_ones() -> None:
    """Two students with the same plain cosine to the teacher: one errs along the teacher's strong
    direction of spread, one along a faint direction. The plain cosine cannot tell them apart; the
    whitened cosine scores the faint-direction error far worse."""
    g = torch.Generator().manual_seed(6)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    spread = torch.randn(2000, 3, generator=g) * torch.tensor([0.3, 0.3, 0.02])
    teacher = F.normalize(basis[:, 0] + spread @ basis[:, 1:4].T, dim=-1)
    mean, w = whitener(teacher.numpy())
    t = teacher[:64]
    strong = F.normalize(t + 0.05 * basis[:, 1], dim=-1)
    faint = F.normalize(t + 0.05 * basis[:, 3], dim=-1)
    fn = DistillLoss(_loss(kind="cosine", whitened_weight=1.0), whiten=(mean, w))
    _, on_strong = fn(strong, t)
    _, on_faint = fn(faint, t)
    assert on_strong["cosine"] == pytest.approx(on_faint["cosine"], abs=2e-3)
    assert on_faint["whitened_cosine"] < on_strong["whitened_cosine"] - 0.2
    _, exact = fn(t.clone(), t)
    assert exact["whitened_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert list(fn.parameters()) == [] and "white_w" not in fn.state_dict()
    with pytest.raises(ValueError, match="whitened_weight"):
        DistillLoss(_loss(whitened_weight=1.0))  # no whitening given
    with pytest.raises(ValueError, match="whitened_weight"):
        DistillLoss(_loss(whitened_weight=-1.0))
