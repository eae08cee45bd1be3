"""Distillation losses, chosen by a `LossParams` section (distill_audio.loss / distill_text.loss).

``cosine`` (default), ``mse`` (on L2-normalised vectors) or ``mse_raw``, plus the centred cosine
term around `centre`, the optional batch-contrastive term (the only one with a learnable logit
scale), the optional relational term and the optional whitened cosine (with `whitener`). Each term and why: docs/students.md, "Losses".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.params import LossParams

MAX_LOGIT_SCALE = math.log(100.0)
# Whitening floor, a share of the mean eigenvalue: directions the teacher barely uses are lifted to
# it rather than blown up by 1 / sqrt(eigenvalue).
WHITEN_FLOOR = 0.01


def whitener(teacher: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], W [D, D]) of unit-length teacher rows [N, D]: W (x - mean) has unit variance in
    every direction the rows span above the floor (ZCA, so the space keeps its orientation)."""
    x = teacher.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    values = np.maximum(values, WHITEN_FLOOR * max(values.mean(), 1e-12))
    w = (vectors / np.sqrt(values)) @ vectors.T
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(w.astype(np.float32))


class DistillLoss(nn.Module):
    """`loss, stats = DistillLoss(p)(student_raw [N, D], teacher [N, D])`.

    `stats` holds detached per-batch figures: "cosine" (mean cos of the normalised pair), "main"
    (the main term) and, with the contrastive term, "contrastive" and "logit_scale".
    """

    def __init__(self, p: LossParams, centre: torch.Tensor | None = None,
                 whiten: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        if p.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {p.temperature}")
        if p.contrastive_weight < 0:
            raise ValueError(f"loss.contrastive_weight must be >= 0, got {p.contrastive_weight}")
        self.kind = p.kind
        self.temperature = p.temperature
        self.contrastive_weight = p.contrastive_weight
        if p.relational_weight < 0:
            raise ValueError(f"loss.relational_weight must be >= 0, got {p.relational_weight}")
        self.relational_weight = p.relational_weight
        if p.whitened_weight < 0:
            raise ValueError(f"loss.whitened_weight must be >= 0, got {p.whitened_weight}")
        if p.whitened_weight > 0 and whiten is None:
            raise ValueError("loss.whitened_weight > 0 needs the teacher's whitening (mean, W): see whitener()")
        self.whitened_weight = p.whitened_weight
        # The plain cosine weighs each direction by the teacher's variance along it, so the small
        # differences that order near-equal songs count for little; whitened, every direction of
        # the teacher's space weighs the same.
        self.register_buffer("white_mean", None if whiten is None else whiten[0].float(), persistent=False)
        self.register_buffer("white_w", None if whiten is None else whiten[1].float(), persistent=False)
        # Only the contrastive term owns a learnable scale; the module has no parameters otherwise.
        self.logit_scale = nn.Parameter(torch.tensor(float(p.contrastive_logit_scale))) if p.contrastive_weight > 0 else None
        # Optional centring point (the mean training teacher embedding, unit length). A teacher whose
        # embeddings all lie close to one direction (every random teacher, and CLAP to a lesser
        # degree) gives a raw cosine that is ~1 for any student near that mean; the centred term
        # -cos(s - c, t - c) rewards reproducing how each target differs from the mean.
        self.register_buffer("centre", None if centre is None else F.normalize(centre.float().flatten(), dim=0),
                             persistent=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
        teacher = teacher.to(student.dtype)
        s_n = F.normalize(student, dim=-1)
        t_n = F.normalize(teacher, dim=-1)
        cos = (s_n * t_n).sum(dim=-1)
        if self.kind == "cosine":
            main = -cos.mean()
        elif self.kind == "mse":
            main = F.mse_loss(s_n, t_n)
        elif self.kind == "mse_raw":
            main = F.mse_loss(student, teacher)
        else:  # params.py restricts the values; this guards direct construction
            raise ValueError(f"unknown loss kind {self.kind!r}")
        loss = main / self.temperature
        stats = {"cosine": float(cos.detach().mean()), "main": float(main.detach())}
        if self.centre is not None:
            c = self.centre.to(s_n.dtype)
            centred = F.cosine_similarity(s_n - c, t_n - c, dim=-1, eps=1e-8)
            loss = loss - centred.mean() / self.temperature
            stats["centred_cosine"] = float(centred.detach().mean())
        if self.relational_weight > 0 and student.shape[0] > 2:
            relational = relational_loss(s_n, t_n, None if self.centre is None else self.centre.to(s_n.dtype))
            loss = loss + self.relational_weight * relational
            stats["relational"] = float(relational.detach())
        if self.whitened_weight > 0:
            m, w = self.white_mean.to(s_n.dtype), self.white_w.to(s_n.dtype)
            whitened = F.cosine_similarity((s_n - m) @ w, (t_n - m) @ w, dim=-1, eps=1e-8)
            loss = loss - self.whitened_weight * whitened.mean()
            stats["whitened_cosine"] = float(whitened.detach().mean())
        if self.logit_scale is not None and student.shape[0] > 1:
            scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
            logits = scale * s_n @ t_n.T
            target = torch.arange(logits.shape[0], device=logits.device)
            contrastive = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            loss = loss + self.contrastive_weight * contrastive
            stats["contrastive"] = float(contrastive.detach())
            stats["logit_scale"] = float(self.logit_scale.detach())
        return loss, stats


def relational_loss(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of the off-diagonal cosine matrices of `student` and `teacher` rows [N, D]."""
    if centre is not None:
        student, teacher = student - centre, teacher - centre
    a = F.normalize(student, dim=-1, eps=1e-8)
    b = F.normalize(teacher, dim=-1, eps=1e-8)
    off = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    return ((a @ a.T - b @ b.T)[off] ** 2).mean()
