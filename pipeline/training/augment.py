"""Training augmentations on cached log-mels, applied identically to the student and teacher mels.

`Augmenter.draw()` makes a `Plan` (one draw per batch from torch's global RNG, so a resumed run
repeats it); `apply_student()` / `apply_teacher()` apply the same plan to either front-end's
representation: gain, mixup (both in the power domain), masks, then student-only changes with the
teacher's target fixed. Each step's maths and why: docs/students.md, "Augmentations".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pipeline.params import AugmentParams

STUDENT_LOG_OFFSET = 1e-5  # EfficientAT: log(mel + 1e-5)
STUDENT_SHIFT, STUDENT_SCALE = 4.5, 5.0  # then (x + 4.5) / 5
TEACHER_FLOOR_DB = -100.0  # power_to_db(amin=1e-10)
MIXUP_ALPHA = 0.4


# ----------------------------------------------------------------------------- domain maps


def student_mel_to_power(x: torch.Tensor) -> torch.Tensor:
    return (torch.exp(x * STUDENT_SCALE - STUDENT_SHIFT) - STUDENT_LOG_OFFSET).clamp_min(0.0)


def power_to_student_mel(p: torch.Tensor) -> torch.Tensor:
    return (torch.log(p + STUDENT_LOG_OFFSET) + STUDENT_SHIFT) / STUDENT_SCALE


def teacher_db_to_power(db: torch.Tensor) -> torch.Tensor:
    return torch.pow(10.0, db / 10.0)


def power_to_teacher_db(p: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(p.clamp_min(10.0 ** (TEACHER_FLOOR_DB / 10.0)))


def student_gain(x: torch.Tensor, gain_db: torch.Tensor) -> torch.Tensor:
    """Level change of `gain_db` [S] on student mels [S, F, T] (exact, through the power domain)."""
    factor = torch.pow(10.0, gain_db / 10.0).to(x.dtype)[:, None, None]
    return power_to_student_mel(student_mel_to_power(x) * factor)


def teacher_gain(db: torch.Tensor, gain_db: torch.Tensor) -> torch.Tensor:
    """Level change of `gain_db` [S] on teacher log-mels in dB [S, T, F]."""
    return (db + gain_db.to(db.dtype)[:, None, None]).clamp_min(TEACHER_FLOOR_DB)


def student_colour(x: torch.Tensor, tilt_db: torch.Tensor | None, snr_db: torch.Tensor | None) -> torch.Tensor:
    """Spectral tilt and/or a flat noise floor on student mels [S, F, T], in the power domain."""
    power = student_mel_to_power(x)
    if tilt_db is not None:
        ramp = torch.linspace(-1.0, 1.0, x.shape[1], device=x.device, dtype=x.dtype)  # mel bands ~ log frequency
        power = power * torch.pow(10.0, tilt_db.to(x.device, x.dtype)[:, None, None] * ramp[None, :, None] / 10.0)
    if snr_db is not None:
        floor = power.mean(dim=(1, 2), keepdim=True) * torch.pow(10.0, -snr_db.to(x.device, x.dtype) / 10.0)[:, None, None]
        power = power + floor
    return power_to_student_mel(power)


def time_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Delay each row of [S, F, T] by shift[S] frames (negative: advance), repeating the edge frame."""
    t = torch.arange(x.shape[-1], device=x.device)
    src = (t[None, :] - shift[:, None]).clamp(0, x.shape[-1] - 1)  # [S, T]
    return torch.gather(x, 2, src[:, None, :].expand(-1, x.shape[1], -1))


# ----------------------------------------------------------------------------- mel frequencies


def kaldi_mel_centres(n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Centre frequencies (Hz) of Kaldi-style mel bins (EfficientAT's filterbank)."""
    to_mel = lambda f: 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    lo, hi = to_mel(f_min), to_mel(f_max)
    mels = lo + (hi - lo) * np.arange(1, n_mels + 1) / (n_mels + 1)
    return 700.0 * np.expm1(mels / 1127.0)


def slaney_mel_centres(n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Centre frequencies (Hz) of Slaney mel bins (CLAP's filterbank)."""
    import librosa

    return librosa.mel_frequencies(n_mels + 2, fmin=f_min, fmax=f_max, htk=False)[1:-1]


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    gain_db: torch.Tensor  # [S] per row (equal within an item)
    partner: torch.Tensor  # [S] row index mixed in, -1 = none
    lam: torch.Tensor  # [S] weight of the row itself
    f_lo: torch.Tensor  # [S] first masked student bin (f_lo == f_hi: no band)
    f_hi: torch.Tensor
    t_lo: torch.Tensor  # [S] first masked frame
    t_hi: torch.Tensor
    tilt_db: torch.Tensor | None = None  # [S] student only: tilt from -t (lowest band) to +t dB
    snr_db: torch.Tensor | None = None  # [S] student only: noise floor below the row's mean power
    shift: torch.Tensor | None = None  # [S] student only: frames the row is delayed (negative: advanced)

    @property
    def mixed(self) -> torch.Tensor:
        return self.partner >= 0

    def to(self, device: torch.device | str) -> Plan:
        return Plan(*(None if v is None else v.to(device) for v in (getattr(self, f.name) for f in fields(self))))


class Augmenter:
    """Draw one plan per batch; apply it to student mels [S, F, T] or teacher mels [S, T, F]."""

    def __init__(
        self,
        p: AugmentParams,
        student_centres_hz: np.ndarray | None = None,
        teacher_centres_hz: np.ndarray | None = None,
    ) -> None:
        self.p = p  # ranges checked by pipeline.params
        self.student_centres = student_centres_hz
        self.teacher_centres = teacher_centres_hz

    @property
    def active(self) -> bool:
        p = self.p
        return (p.gain_db > 0 or p.mixup > 0 or p.spec_masks or p.eq_tilt_db > 0 or p.noise_snr_db > 0
                or p.time_shift_frames > 0)

    def draw(self, row_item: torch.Tensor, n_bins: int, n_frames: int) -> Plan:
        """`row_item` [S]: the item (segment or track) each mel row belongs to."""
        s = row_item.shape[0]
        n_items = int(row_item.max()) + 1 if s else 0
        p = self.p
        item_gain = (torch.rand(n_items) * 2.0 - 1.0) * p.gain_db if p.gain_db > 0 else torch.zeros(n_items)
        gain = item_gain[row_item]

        partner = torch.full((s,), -1, dtype=torch.long)
        lam = torch.ones(s)
        if p.mixup > 0 and s > 1:
            chosen = torch.rand(s) < p.mixup
            # partner: uniform over rows of other items (any other row when there is one item)
            other = (row_item[:, None] != row_item[None, :]).float()
            if not bool(other.any()):
                other = 1.0 - torch.eye(s)
            pick = torch.multinomial(other, 1).flatten()
            b = torch.distributions.Beta(MIXUP_ALPHA, MIXUP_ALPHA).sample((s,))
            partner[chosen] = pick[chosen]
            lam[chosen] = torch.maximum(b, 1 - b)[chosen]

        zeros = torch.zeros(s, dtype=torch.long)
        f_lo = f_hi = t_lo = t_hi = zeros
        if p.spec_masks:
            fw = torch.randint(0, min(p.freq_mask, n_bins) + 1, (s,))
            f_lo = (torch.rand(s) * (n_bins - fw + 1)).long()
            f_hi = f_lo + fw
            tw = torch.randint(0, min(p.time_mask, n_frames) + 1, (s,))
            t_lo = (torch.rand(s) * (n_frames - tw + 1)).long()
            t_hi = t_lo + tw
        # student-only draws come after the others, so turning them on leaves the rest of the plan as it was
        tilt = snr = shift = None
        if p.eq_tilt_db > 0:
            tilt = ((torch.rand(n_items) * 2.0 - 1.0) * p.eq_tilt_db)[row_item]
        if p.noise_snr_db > 0:
            snr = (p.noise_snr_db + 20.0 * torch.rand(n_items))[row_item]
        if p.time_shift_frames > 0:
            shift = torch.randint(-p.time_shift_frames, p.time_shift_frames + 1, (s,))
        return Plan(gain, partner, lam, f_lo, f_hi, t_lo, t_hi, tilt, snr, shift)

    # -- application ------------------------------------------------------------------------

    def apply_student(self, mels: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Student mels [S, F, T] (EfficientAT normalised log-mel)."""
        x = mels
        if self.p.gain_db > 0:
            x = student_gain(x, plan.gain_db.to(x.device))
        if bool(plan.mixed.any()):
            x = self._mix(x, plan, student_mel_to_power, power_to_student_mel)
        if self.p.spec_masks:
            x = self._mask(x, plan.f_lo, plan.f_hi, plan.t_lo, plan.t_hi, freq_axis=1)
        if plan.tilt_db is not None or plan.snr_db is not None:
            x = student_colour(x, plan.tilt_db, plan.snr_db)
        if plan.shift is not None:
            x = time_shift(x, plan.shift.to(x.device))
        return x

    def apply_teacher(self, db: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Teacher log-mels in dB [S, T, F] (CLAP)."""
        x = db
        if self.p.gain_db > 0:
            x = teacher_gain(x, plan.gain_db.to(x.device))
        if bool(plan.mixed.any()):
            x = self._mix(x, plan, teacher_db_to_power, power_to_teacher_db)
        if self.p.spec_masks:
            f_lo, f_hi = self._teacher_band(plan, x.shape[2])
            x = self._mask(x, f_lo, f_hi, plan.t_lo, plan.t_hi, freq_axis=2)
        return x

    @staticmethod
    def _mix(x: torch.Tensor, plan: Plan, to_power, from_power) -> torch.Tensor:
        """Mix rows in the power domain; rows without a partner are left bit-identical."""
        rows = torch.nonzero(plan.mixed).flatten().to(x.device)
        partners = plan.partner.to(x.device)[rows]
        lam = plan.lam.to(x.device, x.dtype)[rows][:, None, None]
        out = x.clone()
        out[rows] = from_power(lam * to_power(x[rows]) + (1 - lam) * to_power(x[partners]))
        return out

    @staticmethod
    def _mask(x: torch.Tensor, f_lo, f_hi, t_lo, t_hi, freq_axis: int) -> torch.Tensor:
        n_f = x.shape[freq_axis]
        n_t = x.shape[3 - freq_axis]
        dev = x.device
        f = torch.arange(n_f, device=dev)[None, :]
        t = torch.arange(n_t, device=dev)[None, :]
        fmask = (f >= f_lo.to(dev)[:, None]) & (f < f_hi.to(dev)[:, None])  # [S, F]
        tmask = (t >= t_lo.to(dev)[:, None]) & (t < t_hi.to(dev)[:, None])  # [S, T]
        if freq_axis == 1:
            hole = fmask[:, :, None] | tmask[:, None, :]
        else:
            hole = fmask[:, None, :] | tmask[:, :, None]
        mean = x.mean(dim=(1, 2), keepdim=True)
        return torch.where(hole, mean.expand_as(x), x)

    def _teacher_band(self, plan: Plan, n_teacher_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher bins whose centre lies inside the masked student band."""
        if self.student_centres is None or self.teacher_centres is None:
            raise ValueError("spectral masks on teacher mels need both front-ends' mel centre frequencies")
        sc = torch.as_tensor(self.student_centres)
        tc = torch.as_tensor(self.teacher_centres)
        if len(tc) != n_teacher_bins:
            raise ValueError(f"teacher mel has {n_teacher_bins} bins, its front-end params say {len(tc)}")
        has = plan.f_hi > plan.f_lo
        lo_hz = sc[plan.f_lo.clamp(max=len(sc) - 1)]
        hi_hz = sc[(plan.f_hi - 1).clamp(min=0, max=len(sc) - 1)]
        f_lo = torch.searchsorted(tc, lo_hz, right=False)
        f_hi = torch.searchsorted(tc, hi_hz, right=True)
        f_hi = torch.where(has, f_hi, f_lo)
        return f_lo, f_hi


def frontend_centres(attrs: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(student, teacher) mel centre frequencies from a mel cache's attributes.

    The mel cache records its front-end params as JSON (``attrs["params"]["frontend"]``, or a
    bare ``attrs["frontend"]``); a side that cannot be found gives None, and masks on teacher mels
    then refuse to run with a clear error."""
    front: Any = None
    for key in ("params", "frontend"):
        value = attrs.get(key)
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, Mapping):
            front = value.get("frontend", value) if key == "params" else value
            break
    if not isinstance(front, Mapping):
        return None, None
    s, t = front.get("student"), front.get("teacher")
    sc = kaldi_mel_centres(int(s["n_mels"]), float(s["f_min"]), float(s["f_max"])) if isinstance(s, Mapping) else None
    tc = slaney_mel_centres(int(t["n_mels"]), float(t["f_min"]), float(t["f_max"])) if isinstance(t, Mapping) else None
    return sc, tc


def mixup_targets(raw_rows: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Cached-teacher approximation for mixed rows: the same mix of the raw teacher projections."""
    out = raw_rows.clone()
    if bool(plan.mixed.any()):
        rows = torch.nonzero(plan.mixed).flatten()
        lam = plan.lam[rows][:, None].to(raw_rows.dtype)
        out[rows] = lam * raw_rows[rows] + (1 - lam) * raw_rows[plan.partner[rows]]
    return out
