"""Calibrations fitted after training, before a student is written, that never cost it its rankings.

Each student ends with one scalar that training leaves loosely set (audio: the output bias length;
text: the anchor scale). Among candidate values the fit takes the best mean raw cosine to the teacher
*subject to* the neighbour figures (pipeline.evaluation.fidelity) and the centred cosine not falling;
the current value is always a candidate. Why the constraint: docs/students.md, "Calibration".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import metrics as M
from pipeline.evaluation.fidelity import neighbour_agreement

log = logging.getLogger(__name__)

GUARD_K = 5
CRITERION = ("highest mean raw cosine on the calibration sample without lowering its top-5 neighbour "
             "overlap, neighbour-ranking Spearman or centred cosine")


# --------------------------------------------------------------------------- the criterion


def guard_figures(student_rows: np.ndarray, teacher_rows: np.ndarray, student_items: np.ndarray,
                  teacher_items: np.ndarray, centre: np.ndarray | None = None) -> dict[str, float | None]:
    """Mean raw cosine over rows (segments or queries); neighbour figures over items (tracks or
    queries) and, with a centring vector, their mean centred cosine."""
    nb = neighbour_agreement(teacher_items, student_items, ks=(GUARD_K,))
    centred = None
    if centre is not None:
        centred = float(M.centred_cosine_rows(M.l2_normalize(student_items), teacher_items, centre).mean())
    return {"cosine": float(M.cosine_rows(student_rows, teacher_rows).mean()),
            f"top{GUARD_K}_overlap": nb[f"top{GUARD_K}_overlap"],
            "neighbour_spearman": nb["neighbour_spearman"], "centred_cosine": centred}


def keeps_rankings(after: dict[str, Any], before: dict[str, Any]) -> bool:
    """True when no neighbour figure of `after`, nor its centred cosine, is below `before`
    (unmeasured figures constrain nothing)."""
    for key in (f"top{GUARD_K}_overlap", "neighbour_spearman", "centred_cosine"):
        b, a = before.get(key), after.get(key)
        if b is not None and a is not None and a < b - 1e-12:
            return False
    return True


@dataclass
class Fit:
    """The outcome of one calibration: the scalar before and after, and the figures at both."""

    parameter: str
    before: float
    after: float
    figures_before: dict[str, Any]
    figures_after: dict[str, Any]
    n_rows: int
    n_items: int
    rejected: int = 0  # candidates with a higher raw cosine that would have lowered the rankings
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"criterion": CRITERION, "parameter": self.parameter, "before": self.before, "after": self.after,
                "fit_before": self.figures_before, "fit_after": self.figures_after, "n_rows": self.n_rows,
                "n_items": self.n_items, "rejected_candidates": self.rejected, "notes": list(self.notes)}


def choose(candidates: Sequence[float], current: float, cosine_of: Callable[[float], float],
           figures_of: Callable[[float], dict[str, Any]]) -> tuple[float, dict[str, Any], dict[str, Any], int]:
    """The candidate with the highest raw cosine among those that keep the rankings of `current`.

    `cosine_of` is cheap and ranks the candidates; `figures_of` (neighbour figures, quadratic in the
    items) runs only on candidates that beat the current raw cosine, best first, until one passes.
    Returns (value, figures at current, figures at value, rejected count)."""
    before = figures_of(current)
    base = before["cosine"]
    ranked = sorted((c for c in candidates if c != current), key=lambda c: -cosine_of(c))
    rejected = 0
    for c in ranked:
        if cosine_of(c) <= base:
            break
        figures = figures_of(c)
        if keeps_rankings(figures, before):
            return float(c), before, figures, rejected
        rejected += 1
    return float(current), before, before, rejected


# --------------------------------------------------------------------------- audio: output bias length


def calibration_sample(track_segments: Sequence[np.ndarray], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` segments spread evenly over tracks and within each track -> (segments, item of each).

    With more tracks than `limit`, `limit` evenly spaced tracks give one (middle) segment each, so
    the neighbour figures still see as many tracks as the budget allows."""
    if limit < 1:
        raise ValueError(f"calibration sample: limit must be at least 1, got {limit}")
    tracks = [np.asarray(s, dtype=np.int64) for s in track_segments if len(s)]
    if not tracks:
        raise ValueError("calibration sample: no segments")
    if len(tracks) > limit:
        tracks = [tracks[i] for i in np.linspace(0, len(tracks) - 1, limit).round().astype(int)]
    per_track = max(1, limit // len(tracks))
    segs, items = [], []
    for item, s in enumerate(tracks):
        if len(s) > per_track:
            # evenly spaced, centred in the track (one segment -> the middle one)
            s = s[((np.arange(per_track) + 0.5) * len(s) / per_track).astype(int)]
        segs.append(s)
        items.append(np.full(len(s), item, dtype=np.int64))
    return np.concatenate(segs), np.concatenate(items)


def _item_means(rows: np.ndarray, row_item: np.ndarray) -> np.ndarray:
    n = int(row_item.max()) + 1
    sums = np.zeros((n, rows.shape[1]))
    np.add.at(sums, row_item, rows)
    return sums / np.bincount(row_item, minlength=n)[:, None]


def bias_length_candidates(start: float) -> np.ndarray:
    """A log grid from start/64 to start*64 (the range the raw-cosine search used), 1/4-octave steps."""
    return start * np.exp2(np.linspace(-6.0, 6.0, 49))


def fit_bias_length(proj: np.ndarray, row_item: np.ndarray, direction: np.ndarray, teacher_rows: np.ndarray,
                    teacher_items: np.ndarray, start: float, centre: np.ndarray | None = None) -> Fit:
    """Output-bias length for student outputs L2(proj + L * direction), by the ranking-safe criterion.

    proj [rows, D]: the student's raw outputs minus its bias; row_item [rows]: the item (track) of
    each row; teacher_rows [rows, D] unit teacher targets; teacher_items [items, D] the teacher's
    item embeddings (over the same rows). An item's student vector is the mean of its raw rows,
    as track embeddings are made. `start` is the current length: a coarse log grid, then a
    finer one around the coarse choice."""
    proj = np.asarray(proj, dtype=np.float64)
    row_item = np.asarray(row_item, dtype=np.int64)
    d = M.l2_normalize(np.asarray(direction, dtype=np.float64).ravel())
    teacher_rows = np.asarray(teacher_rows, dtype=np.float64)
    teacher_items = np.asarray(teacher_items, dtype=np.float64)
    item_proj = _item_means(proj, row_item)
    cache: dict[float, dict[str, Any]] = {}

    def cosine_of(length: float) -> float:
        return float(M.cosine_rows(proj + length * d[None], teacher_rows).mean())

    def figures_of(length: float) -> dict[str, Any]:
        if length not in cache:
            cache[length] = guard_figures(proj + length * d[None], teacher_rows, item_proj + length * d[None],
                                          teacher_items, centre)
        return cache[length]

    coarse, before, _, rejected = choose(bias_length_candidates(start), start, cosine_of, figures_of)
    fine_grid = coarse * np.exp2(np.linspace(-0.25, 0.25, 21))
    # the refinement must keep the rankings of the *original* length, not of the coarse choice
    after_value, _, after, more = choose(np.append(fine_grid, start), coarse, cosine_of, figures_of)
    if not keeps_rankings(after, before):  # only the start and the coarse choice are known safe
        after_value, after = coarse, figures_of(coarse)
    return Fit("output_bias_length", float(start), float(after_value), before, after,
               n_rows=len(proj), n_items=len(item_proj), rejected=rejected + more)


def calibrate_audio_student(model, student_mels: Callable[[np.ndarray], np.ndarray],
                            track_segments: Sequence[np.ndarray], teacher_seg_emb: np.ndarray,
                            teacher_seg_norm: np.ndarray, limit: int, batch: int = 64,
                            centre: np.ndarray | None = None) -> Fit:
    """Rescale `model.output_bias` (an AudioStudent) in place by `fit_bias_length` on a bounded sample.

    student_mels(segment indices) -> the student log-mels; teacher_seg_emb / teacher_seg_norm: the
    teacher cache's unit segment embeddings and their raw norms (a track's target is the L2 mean
    of the raw teacher projections of its sampled segments, as in training)."""
    import torch

    segs, row_item = calibration_sample(track_segments, limit)
    bias = model.output_bias.detach().cpu().numpy().astype(np.float64)
    old = float(np.linalg.norm(bias))
    teacher_rows = np.asarray(teacher_seg_emb[segs], dtype=np.float64)
    teacher_raw = teacher_rows * np.asarray(teacher_seg_norm[segs], dtype=np.float64)[:, None]
    teacher_items = M.l2_normalize(_item_means(teacher_raw, row_item))
    if old == 0.0:
        figures = {"cosine": None, f"top{GUARD_K}_overlap": None, "neighbour_spearman": None}
        return Fit("output_bias_length", 0.0, 0.0, figures, figures, len(segs), int(row_item.max()) + 1,
                   notes=["the output bias is zero: nothing to rescale"])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    raw = []
    with torch.no_grad():
        for a in range(0, len(segs), batch):
            mels = torch.from_numpy(np.ascontiguousarray(student_mels(segs[a:a + batch]), dtype=np.float32))
            raw.append(model.embed_raw(mels.to(device)).float().cpu().numpy())
        proj = np.concatenate(raw).astype(np.float64) - bias[None]
        fit = fit_bias_length(proj, row_item, bias / old, teacher_rows, teacher_items, old, centre)
        model.output_bias.mul_(fit.after / old)
    model.train(was_training)
    return fit


# --------------------------------------------------------------------------- text: anchor scale


def fit_anchor_scale(student: np.ndarray, teacher: np.ndarray, teacher_mean: np.ndarray) -> float:
    """Least-squares length of the student's offsets from the mean teacher embedding.

    The centred loss fixes the direction of each offset, not its length: the scale g minimising
    sum ||(mean + g * (student - mean)) - teacher||^2 restores it (1.0 when the offsets vanish).
    """
    d = np.asarray(student, np.float64) - teacher_mean
    dt = np.asarray(teacher, np.float64) - teacher_mean
    denom = float((d * d).sum())
    return float((d * dt).sum() / denom) if denom > 1e-12 else 1.0


def anchored(student_unit: np.ndarray, anchor: np.ndarray, scale: float) -> np.ndarray:
    """What TextStudent.forward outputs for a given anchor scale: L2(anchor + g * (unit - anchor))."""
    a = np.asarray(anchor, dtype=np.float64).reshape(1, -1)
    return M.l2_normalize(a + scale * (np.asarray(student_unit, dtype=np.float64) - a))


def fit_text_scale(student_unit: np.ndarray, teacher: np.ndarray, teacher_mean: np.ndarray,
                   limit: int | None = None) -> Fit:
    """Anchor scale for the text student: identity (1.0) or the least-squares scale, by the same criterion.

    student_unit: the uncalibrated student's unit outputs, teacher: the teacher's unit embeddings
    of the same queries (rows and items are the queries). `limit` caps the queries used, evenly
    spaced (the neighbour figures are quadratic in them)."""
    s = np.asarray(student_unit, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    if limit is not None and len(s) > limit:
        keep = np.linspace(0, len(s) - 1, limit).round().astype(int)
        s, t = s[keep], t[keep]
    mean = np.asarray(teacher_mean, dtype=np.float64).ravel()
    least_squares = fit_anchor_scale(s, t, mean)

    def cosine_of(g: float) -> float:
        return float(M.cosine_rows(anchored(s, mean, g), t).mean())

    def figures_of(g: float) -> dict[str, Any]:
        out = anchored(s, mean, g)
        return guard_figures(out, t, out, t, M.l2_normalize(mean))

    value, before, after, rejected = choose([1.0, least_squares], 1.0, cosine_of, figures_of)
    fit = Fit("anchor_scale", 1.0, value, before, after, n_rows=len(s), n_items=len(s), rejected=rejected)
    if rejected:
        fit.notes.append(f"least-squares scale {least_squares:.4f} rejected: it lowered the neighbour rankings")
    return fit


def log_fit(name: str, fit: Fit) -> None:
    b, a = fit.figures_before, fit.figures_after

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    log.info("%s calibration: %s %.4g -> %.4g on %d rows / %d items; raw cosine %s -> %s, top-%d overlap %s -> %s, "
             "neighbour Spearman %s -> %s (%d candidate(s) rejected for lowering the rankings)",
             name, fit.parameter, fit.before, fit.after, fit.n_rows, fit.n_items, f(b.get("cosine")),
             f(a.get("cosine")), GUARD_K, f(b.get(f"top{GUARD_K}_overlap")), f(a.get(f"top{GUARD_K}_overlap")),
             f(b.get("neighbour_spearman")), f(a.get("neighbour_spearman")), fit.rejected)
