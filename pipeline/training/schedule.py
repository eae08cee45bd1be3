"""Learning-rate schedules as small functions: per-step linear warmup, then plateau decay per epoch.

`get_lr` gives the rate of one optimisation step; `plateau` builds the ReduceLROnPlateau that
lowers it when the monitored validation metric stops improving; `override_lr` applies a rate set
by `student-clap ckpt reset --lr` on resume.
"""

from __future__ import annotations

import math

import torch

from pipeline.params import PlateauParams


def get_lr(base_lr: float, step: int, steps_per_epoch: int, warming_up: bool) -> float | None:
    """The rate for `step` of the epoch, or None to keep what the plateau schedule left: while warming
    up, a linear rise from base_lr / steps_per_epoch (step 0) to base_lr (the epoch's last step)."""
    return base_lr * (step + 1) / steps_per_epoch if warming_up else None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def plateau(optimizer: torch.optim.Optimizer, p: PlateauParams) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=p.mode, factor=p.factor, patience=p.patience, threshold=p.threshold, min_lr=p.min_lr
    )


def override_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
                lr: float) -> None:
    """A manually chosen rate: every group starts from it and the plateau patience starts anew."""
    set_lr(optimizer, lr)
    scheduler.num_bad_epochs = 0


def improved(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` beats `best` (strictly; NaN never does, anything beats no best yet)."""
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best
