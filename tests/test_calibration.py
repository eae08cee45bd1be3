"""Post-training calibration (pipeline.training.calibration): better raw cosine, never worse rankings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import metrics as M
from pipeline.evaluation.fidelity import neighbour_agreement
from pipeline.training import calibration as C

D = 64


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _dominant_mean_case(seed: int = 0, n: int = 60, start: float = 10.0):
    """A teacher whose embeddings share a dominant mean (offsets ~0.1 of it, as the demo teacher's),
    and a student trained at bias length `start`: at that length its tangent offsets are the
    teacher's plus noise, and its component along the mean varies from track to track.

    A longer bias shrinks the noisy offsets, so raw cosine rises; but it also rescales every
    track's offset by a different factor (start + along) / (L + along), which reorders neighbours."""
    rng = np.random.default_rng(seed)
    dim = 512
    d = np.zeros(dim)
    d[0] = 1.0
    u = rng.normal(size=(n, dim))
    u[:, 0] = 0.0
    u *= 0.1 / np.linalg.norm(u, axis=1, keepdims=True).mean()  # offsets ~0.1 of the mean
    teacher = _unit(d + u)
    along = rng.uniform(-0.5, 0.5, n) * start
    noise = 0.05 * rng.normal(size=(n, dim)) / np.sqrt(dim)  # |noise| ~ half the offsets
    noise[:, 0] = 0.0
    proj = (u + noise) * (start + along)[:, None]
    proj[:, 0] = along
    return proj, d, teacher


def _figures(proj: np.ndarray, d: np.ndarray, teacher: np.ndarray, length: float) -> dict:
    out = proj + length * d
    nb = neighbour_agreement(teacher, out, ks=(5,))
    return {"cosine": float(M.cosine_rows(out, teacher).mean()), "top5": nb["top5_overlap"],
            "spearman": nb["neighbour_spearman"]}


def test_bias_fit_on_a_dominant_mean_teacher_keeps_the_rankings() -> None:
    proj, d, teacher = _dominant_mean_case()
    start = 10.0
    before = _figures(proj, d, teacher, start)
    # the trap is real: the raw-cosine optimum over the same candidates costs neighbour overlap
    greedy = max(C.bias_length_candidates(start), key=lambda L: _figures(proj, d, teacher, L)["cosine"])
    trap = _figures(proj, d, teacher, greedy)
    assert trap["cosine"] > before["cosine"] and trap["top5"] < before["top5"] - 0.1

    fit = C.fit_bias_length(proj, np.arange(len(proj)), d, teacher, teacher, start)
    after = _figures(proj, d, teacher, fit.after)
    assert after["top5"] >= before["top5"] and after["spearman"] >= before["spearman"]
    assert after["cosine"] >= before["cosine"]
    assert fit.before == start and fit.rejected > 0
    assert fit.figures_before["top5_overlap"] == pytest.approx(before["top5"])
    assert fit.figures_after["top5_overlap"] == pytest.approx(after["top5"])
    report = fit.report()
    assert report["parameter"] == "output_bias_length" and "without lowering" in report["criterion"]


def test_bias_fit_still_fixes_an_overshoot_that_costs_no_ranking() -> None:
    """Student offsets 10x the teacher's in every direction: a 10x longer bias restores raw cosine
    and, scaling every offset alike, leaves the neighbours as they were."""
    rng = np.random.default_rng(0)
    d = np.zeros(16)
    d[0] = 1.0
    offsets = rng.standard_normal((50, 16)) * 0.2
    offsets[:, 0] = 0
    teacher = _unit(offsets * 0.1 + d)
    fit = C.fit_bias_length(offsets, np.arange(50), d, teacher, teacher, start=1.0)
    assert 8.0 < fit.after < 12.0
    assert fit.figures_after["cosine"] > fit.figures_before["cosine"]
    assert fit.figures_after["top5_overlap"] >= fit.figures_before["top5_overlap"]


def test_items_average_their_rows() -> None:
    """Neighbour figures are over items (tracks): the mean of their rows, as track embeddings are made."""
    proj, d, teacher = _dominant_mean_case(n=20)
    rows = np.repeat(proj, 2, axis=0) + np.tile([[0.01], [-0.01]], (20, proj.shape[1]))
    row_item = np.repeat(np.arange(20), 2)
    fit = C.fit_bias_length(rows, row_item, d, np.repeat(teacher, 2, axis=0), teacher, 10.0)
    assert fit.n_rows == 40 and fit.n_items == 20


def test_calibration_sample_is_bounded_and_spread() -> None:
    tracks = [np.arange(10 * t, 10 * t + 10) for t in range(5)]
    segs, items = C.calibration_sample(tracks, 12)
    assert len(segs) == 10 and list(np.bincount(items)) == [2] * 5  # 12 // 5 = 2 per track
    assert list(segs[:2]) == [2, 7]  # evenly spaced within the track
    segs, items = C.calibration_sample(tracks, 3)  # fewer segments than tracks: one from each of 3 tracks
    assert len(segs) == 3 and list(items) == [0, 1, 2] and list(segs) == [5, 25, 45]
    segs, _ = C.calibration_sample([np.arange(3)], 100)
    assert list(segs) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        C.calibration_sample(tracks, 0)


class _TinyStudent(torch.nn.Module):
    """embed_raw = W x + output_bias, the shape of AudioStudent's output."""

    def __init__(self, proj: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.from_numpy(proj.astype(np.float32)), requires_grad=False)
        self.output_bias = torch.nn.Parameter(torch.from_numpy(bias.astype(np.float32)))

    def embed_raw(self, mels: torch.Tensor) -> torch.Tensor:
        return self.table[mels[:, 0, 0].long()] + self.output_bias


def test_calibrate_audio_student_rescales_the_bias_in_place() -> None:
    proj, d, teacher = _dominant_mean_case(n=24)
    model = _TinyStudent(proj, 10.0 * d)
    mels = lambda segs: np.asarray(segs, dtype=np.float32)[:, None, None]  # noqa: E731 - row index as the "mel"
    tracks = [np.array([i]) for i in range(24)]
    model.train()
    fit = C.calibrate_audio_student(model, mels, tracks, teacher, np.ones(24), limit=100, batch=5)
    assert fit.before == pytest.approx(10.0, rel=1e-6)
    assert float(model.output_bias.detach().norm()) == pytest.approx(fit.after, rel=1e-5)
    assert fit.figures_after["top5_overlap"] >= fit.figures_before["top5_overlap"]
    assert fit.n_items == 24 and model.training  # the mode it had is given back


def test_anchor_scale_recovers_a_known_length() -> None:
    rng = np.random.default_rng(0)
    mean = rng.normal(size=D)
    offsets = rng.normal(size=(50, D))
    assert C.fit_anchor_scale(mean + 0.25 * offsets, mean + offsets, mean) == pytest.approx(4.0)
    assert C.fit_anchor_scale(np.tile(mean, (3, 1)), mean + offsets[:3], mean) == 1.0


def test_text_scale_accepts_a_safe_gain_and_refuses_a_harmful_one() -> None:
    rng = np.random.default_rng(0)
    mean = np.zeros(D)
    mean[0] = 1.0
    off = rng.normal(size=(40, D)) * 0.1
    off[:, 0] = 0
    teacher = _unit(mean + off)
    shrunk = _unit(mean + 0.25 * off)  # right directions, offsets 4x too short
    fit = C.fit_text_scale(shrunk, teacher, mean)
    assert fit.after > 2.0 and fit.rejected == 0
    assert fit.figures_after["cosine"] > fit.figures_before["cosine"]
    assert fit.figures_after["top5_overlap"] >= fit.figures_before["top5_overlap"]
    out = C.anchored(shrunk, mean, fit.after)
    assert M.cosine_rows(out, teacher).mean() == pytest.approx(fit.figures_after["cosine"])
    # a student whose offsets are mostly noise: shrinking them towards the anchor lifts raw cosine
    # but (with the mean varying along the anchor) reorders neighbours; the identity must stay
    proj, d, teacher2 = _dominant_mean_case(seed=3)
    noisy = _unit(proj + 10.0 * d)
    figures = {g: C.guard_figures(C.anchored(noisy, d, g), teacher2, C.anchored(noisy, d, g), teacher2)
               for g in (1.0, C.fit_anchor_scale(noisy, teacher2, d))}
    fit2 = C.fit_text_scale(noisy, teacher2, d)
    chosen = figures[fit2.after] if fit2.after in figures else None
    assert chosen is not None and C.keeps_rankings(chosen, figures[1.0])
    assert C.fit_text_scale(noisy, teacher2, d, limit=10).n_rows == 10


def test_centred_cosine_guards_the_fit_too() -> None:
    """A candidate that keeps the neighbour figures but lowers the centred cosine is refused."""
    before = {"cosine": 0.90, "top5_overlap": 0.8, "neighbour_spearman": 0.7, "centred_cosine": 0.60}
    assert C.keeps_rankings({**before, "cosine": 0.95}, before)
    assert not C.keeps_rankings({**before, "cosine": 0.95, "centred_cosine": 0.59}, before)
    assert C.keeps_rankings({**before, "centred_cosine": None}, before)  # unmeasured constrains nothing

    proj, d, teacher = _dominant_mean_case(seed=3)
    fit = C.fit_bias_length(proj, np.arange(len(proj)), d, teacher, teacher, 10.0, centre=d)
    b, a = fit.figures_before, fit.figures_after
    assert b["centred_cosine"] is not None and a["centred_cosine"] >= b["centred_cosine"] - 1e-12
    assert a["top5_overlap"] >= b["top5_overlap"] and a["cosine"] >= b["cosine"]
    assert "centred cosine" in fit.report()["criterion"]
