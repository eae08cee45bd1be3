"""Same-space figures: can a student's track embeddings stand in for its teacher's? (numpy only)

Per-track cosine (raw and centred), neighbour agreement (top-k overlap, Spearman), the mean baseline
and the verdict. Evaluate, `student-clap compare`, the calibration after training and the reports
all use these functions, so the figures mean the same everywhere. What each figure means and the
bars: docs/evaluation.md, "Reading the verdict".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import metrics as M

NEIGHBOUR_KS = (5, 10)
MIN_TRACKS = 3  # two tracks have one neighbour each: every ranking of one item agrees


def distribution(values: np.ndarray) -> dict[str, float]:
    """mean, median, p05 and min of a 1-d set of values (NaN when empty)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "p05": float("nan"), "min": float("nan")}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p05": float(np.percentile(v, 5)),
            "min": float(v.min())}


def track_cosines(student: np.ndarray, teacher: np.ndarray, centre: np.ndarray | None = None) -> dict[str, Any]:
    """Distribution of the per-track cosine, raw and (when `centre` is given) centred.

    `centre` is a unit vector (`metrics.mean_embedding`): the student side is L2-normalised first,
    so a student that outputs the centre scores exactly 0 centred."""
    s = M.l2_normalize(np.asarray(student, dtype=np.float64))
    out: dict[str, Any] = {"cosine": distribution(M.cosine_rows(s, teacher))}
    if centre is not None:
        out["centred"] = distribution(M.centred_cosine_rows(s, teacher, centre))
    return out


def neighbour_scores(embeddings: np.ndarray) -> np.ndarray:
    """[n, n-1]: the cosine of every track to every *other* track (the diagonal removed)."""
    e = M.l2_normalize(np.asarray(embeddings, dtype=np.float64))
    n = e.shape[0]
    sims = e @ e.T
    return sims[~np.eye(n, dtype=bool)].reshape(n, n - 1)


def neighbour_agreement(teacher: np.ndarray, student: np.ndarray,
                        ks: Sequence[int] = NEIGHBOUR_KS) -> dict[str, Any]:
    """Top-k neighbour overlap (per k in `ks`) and neighbour-ranking Spearman, student vs teacher.

    Keys: n_tracks, top{k}_overlap and top{k}_k (the k used after clipping) for every k,
    neighbour_spearman, and `note` when a k was clipped. With fewer than MIN_TRACKS tracks the
    figures are None and the note says why.
    """
    t = np.asarray(teacher, dtype=np.float64)
    s = np.asarray(student, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"neighbour_agreement: teacher {t.shape} and student {s.shape} must be equal [n, dim]")
    n = t.shape[0]
    out: dict[str, Any] = {"n_tracks": n}
    if n < MIN_TRACKS:
        for k in ks:
            out[f"top{k}_overlap"] = None
            out[f"top{k}_k"] = 0
        out["neighbour_spearman"] = None
        out["note"] = f"only {n} track(s): neighbour figures need at least {MIN_TRACKS}"
        return out
    ref, test = neighbour_scores(t), neighbour_scores(s)
    clipped = []
    spearman = None
    for k in ks:
        r = M.ranking_agreement(ref, test, k=k)
        out[f"top{k}_overlap"] = r["top_k_overlap"]
        out[f"top{k}_k"] = r["k"]
        spearman = r["spearman"]
        if r["k"] < k:
            clipped.append(f"top-{k} clipped to {r['k']}")
    out["neighbour_spearman"] = spearman
    if clipped:
        out["note"] = f"only {n} tracks: {', '.join(clipped)} (half of the {n - 1} other tracks)"
    return out


def verdict(median_cosine: float | None, top5_overlap: float | None, median_centred: float | None, *,
            min_median_cosine: float, min_top5_overlap: float, min_median_centred_cosine: float) -> dict[str, Any]:
    """{"same_space": bool, "failed": "..."}: the bar is met only when every figure reaches it.

    `failed` is one string (figures joined by "; "), "" when none failed, so `dvc exp show` can
    list it as a column; a missing figure (too few tracks, no centring vector) fails with that reason."""
    failed = []
    for name, value, bar in (("median_track_cosine", median_cosine, min_median_cosine),
                             ("top5_overlap", top5_overlap, min_top5_overlap),
                             ("median_centred_track_cosine", median_centred, min_median_centred_cosine)):
        if value is None or not np.isfinite(value):
            failed.append(f"{name} not measured")
        elif value < bar:
            failed.append(f"{name} {value:.4f} < {bar:g}")
    return {"same_space": not failed, "failed": "; ".join(failed)}


def same_space(teacher: np.ndarray, student: np.ndarray, centre: np.ndarray | None = None, *,
               min_median_cosine: float, min_top5_overlap: float, min_median_centred_cosine: float,
               ks: Sequence[int] = NEIGHBOUR_KS) -> dict[str, Any]:
    """Every same-space figure of a student's track embeddings against the teacher's, with the verdict.

    teacher, student: [n_tracks, dim] track embeddings in the same row order. The result is
    nested at most two levels deep, so `dvc exp show` lists each figure as a column:
    same_space, failed, n_tracks, track_cosine.{mean,median,p05,min},
    track_cosine_centred.{...}, mean_baseline.{...} and median_above_mean_baseline (with a centre),
    top5_overlap, top10_overlap, top*_k, neighbour_spearman, note.
    """
    if 5 not in ks:
        raise ValueError("same_space: the verdict needs k=5 among ks")
    cos = track_cosines(student, teacher, centre)
    nb = neighbour_agreement(teacher, student, ks)
    centred_median = cos["centred"]["median"] if "centred" in cos else None
    judged = verdict(cos["cosine"]["median"], nb["top5_overlap"], centred_median,
                     min_median_cosine=min_median_cosine, min_top5_overlap=min_top5_overlap,
                     min_median_centred_cosine=min_median_centred_cosine)
    out: dict[str, Any] = {**judged, "n_tracks": nb.pop("n_tracks"), "track_cosine": cos["cosine"]}
    if "centred" in cos:
        out["track_cosine_centred"] = cos["centred"]
        baseline = distribution(M.cosine_rows(np.broadcast_to(np.asarray(centre, np.float64).ravel(), teacher.shape),
                                              np.asarray(teacher, np.float64)))
        out["mean_baseline"] = baseline
        out["median_above_mean_baseline"] = cos["cosine"]["median"] - baseline["median"]
    out.update(nb)
    return out


def same_space_section(teacher: np.ndarray, student: np.ndarray, centre: np.ndarray | None,
                       bars: Mapping[str, float], /, **extra: Any) -> dict[str, Any]:
    """`same_space` laid out as a report section (evaluate's, compare's): the verdict, the `bars`
    (the evaluate.same_space params as a dict), any `extra` entries, then the figures."""
    figures = same_space(teacher, student, centre, **bars)
    return {"same_space": figures.pop("same_space"), "failed": figures.pop("failed"), **bars, **extra,
            "audio_student": figures}
