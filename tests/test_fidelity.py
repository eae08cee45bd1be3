"""Same-space figures (pipeline.evaluation.fidelity) against brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from pipeline.evaluation import fidelity as F

BARS = {"min_median_cosine": 0.98, "min_top5_overlap": 0.9, "min_median_centred_cosine": 0.9}

DIM = 8


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _dominant_mean_teacher(n: int, seed: int = 0, spread: float = 0.1) -> np.ndarray:
    """Embeddings sharing one dominant direction, as CLAP's (and a random teacher's) do."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=DIM))
    return _unit(base + spread * rng.normal(size=(n, DIM)))


def _brute_neighbours(emb: np.ndarray, k: int) -> list[set[int]]:
    e = _unit(emb)
    out = []
    for i in range(len(e)):
        others = [j for j in range(len(e)) if j != i]
        others.sort(key=lambda j: -float(e[i] @ e[j]))
        out.append(set(others[:k]))
    return out


def _brute_spearman(t: np.ndarray, s: np.ndarray) -> float:
    t, s = _unit(t), _unit(s)
    values = []
    for i in range(len(t)):
        others = [j for j in range(len(t)) if j != i]
        values.append(spearmanr([t[i] @ t[j] for j in others], [s[i] @ s[j] for j in others]).statistic)
    return float(np.mean(values))


def test_distribution_figures() -> None:
    v = np.array([0.9, 0.7, 0.8, 1.0, 0.6])
    d = F.distribution(v)
    assert d["mean"] == pytest.approx(0.8) and d["median"] == pytest.approx(0.8) and d["min"] == pytest.approx(0.6)
    assert d["p05"] == pytest.approx(0.6 + 0.05 * 4 * 0.1)  # linear interpolation between the two lowest
    assert all(np.isnan(x) for x in F.distribution(np.array([])).values())


def test_neighbour_figures_equal_a_brute_force_count() -> None:
    teacher = _dominant_mean_teacher(30)
    rng = np.random.default_rng(1)
    student = _unit(teacher + 0.05 * rng.normal(size=teacher.shape))
    nb = F.neighbour_agreement(teacher, student)
    assert nb["n_tracks"] == 30 and nb["top5_k"] == 5 and nb["top10_k"] == 10 and "note" not in nb
    for k in (5, 10):
        expected = np.mean([len(a & b) / k for a, b in zip(_brute_neighbours(teacher, k), _brute_neighbours(student, k))])
        assert nb[f"top{k}_overlap"] == pytest.approx(expected)
    assert nb["neighbour_spearman"] == pytest.approx(_brute_spearman(teacher, student))
    assert 0.0 < nb["top5_overlap"] < 1.0  # noisy enough to move some neighbours


def test_few_tracks_clip_k_and_say_so() -> None:
    teacher = _dominant_mean_teacher(6)
    nb = F.neighbour_agreement(teacher, teacher[::-1].copy())
    assert nb["top5_k"] == 2 and nb["top10_k"] == 2  # half of the 5 other tracks
    assert "only 6 tracks" in nb["note"] and "top-5 clipped to 2" in nb["note"]
    two = F.neighbour_agreement(teacher[:2], teacher[:2])
    assert two["top5_overlap"] is None and "at least 3" in two["note"]


def test_a_copy_of_the_teacher_is_the_same_space() -> None:
    teacher = _dominant_mean_teacher(20)
    centre = _unit(teacher.mean(0))
    out = F.same_space(teacher, teacher * 3.0, centre, **BARS)  # the norm of a row does not matter
    assert out["same_space"] is True and out["failed"] == ""
    assert out["track_cosine"]["median"] == pytest.approx(1.0) and out["track_cosine_centred"]["min"] == pytest.approx(1.0)
    assert out["top5_overlap"] == 1.0 and out["top10_overlap"] == 1.0 and out["neighbour_spearman"] == pytest.approx(1.0)


def test_the_mean_with_noise_scores_high_raw_cosine_but_fails_the_bar() -> None:
    """A student near the shared mean: raw cosine passes the bar, its rankings do not."""
    teacher = _dominant_mean_teacher(40, spread=0.05)
    centre = _unit(teacher.mean(0))
    rng = np.random.default_rng(2)
    student = _unit(centre + 0.01 * rng.normal(size=teacher.shape))
    out = F.same_space(teacher, student, centre, **BARS)
    assert out["track_cosine"]["median"] > 0.98
    assert out["same_space"] is False
    assert out["failed"].startswith("top5_overlap ") and "< 0.9" in out["failed"]
    assert abs(out["track_cosine_centred"]["mean"]) < 0.3  # centred, the noise explains nothing


def test_verdict_names_every_failed_figure() -> None:
    assert F.verdict(0.99, 0.95, 0.95, **BARS) == {"same_space": True, "failed": ""}
    v = F.verdict(0.854, 0.668, 0.5, **BARS)
    assert v["same_space"] is False
    assert v["failed"] == ("median_track_cosine 0.8540 < 0.98; top5_overlap 0.6680 < 0.9; "
                           "median_centred_track_cosine 0.5000 < 0.9")
    assert F.verdict(0.99, None, 0.95, **BARS)["failed"] == "top5_overlap not measured"
    assert F.verdict(0.99, 0.95, None, **BARS)["failed"] == "median_centred_track_cosine not measured"
    assert F.verdict(0.9, 0.5, 0.4, min_median_cosine=0.85, min_top5_overlap=0.5,
                     min_median_centred_cosine=0.4)["same_space"] is True


def test_a_student_that_moves_onto_the_mean_fails_even_with_its_rankings_kept() -> None:
    """Full-size shape: embeddings share a dominant mean (a random CLAP scores 0.993 raw for the mean).
    A student whose offsets from it carry a shared error keeps the neighbour rankings and scores a
    raw cosine past 0.98 and above the mean's, yet it is not the teacher's space: centred, it fails."""
    teacher = _dominant_mean_teacher(60, spread=0.05)
    centre = _unit(teacher.mean(0))
    offsets = teacher - (teacher @ centre)[:, None] * centre[None]
    shared_error = 1.5 * np.linalg.norm(offsets, axis=1).mean() * _unit(np.random.default_rng(5).normal(size=centre.shape))
    student = _unit(teacher + shared_error[None])
    out = F.same_space(teacher, student, centre, **BARS)
    assert out["track_cosine"]["median"] > 0.98 and out["top5_overlap"] >= 0.9
    assert out["mean_baseline"]["median"] > 0.98  # the mean alone passes the raw bar
    assert out["same_space"] is False
    assert out["failed"].startswith("median_centred_track_cosine ") and ";" not in out["failed"]
    mean_student = np.broadcast_to(centre, teacher.shape).copy()
    flat = F.same_space(teacher, mean_student, centre, **BARS)
    assert flat["track_cosine_centred"]["median"] == pytest.approx(0.0, abs=1e-9)
    assert flat["median_above_mean_baseline"] == pytest.approx(0.0, abs=1e-9)
    assert "median_centred_track_cosine 0.0000 < 0.9" in flat["failed"]


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="teacher"):
        F.neighbour_agreement(np.zeros((4, 3)), np.zeros((5, 3)))
