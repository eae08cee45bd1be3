"""Scoring a text student on held-out query sets: the one definition both distill_text and evaluate use.

The student beside two baselines (the mean train embedding; bag-of-words, the mean of the teacher
embeddings of the query's own terms), raw and centred, and their retrieval agreement: docs/students.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import metrics as M
from pipeline.data.queries import HELD_OUT_SETS, split_into_terms

log = logging.getLogger(__name__)

PREDICTORS = ("student", "bag_of_words", "mean_baseline")


def text_fidelity(pred: np.ndarray, teacher: np.ndarray, teacher_mean: np.ndarray) -> dict[str, dict[str, float]]:
    """Raw and centred cosine of predicted text embeddings to the teacher's, row by row, summarised
    (mean/p10/p50/p90); `teacher_mean` is the mean teacher train embedding (`M.mean_embedding`)."""
    return {
        "cosine": M.summarize(M.cosine_rows(pred, teacher)),
        "centred": M.summarize(M.centred_cosine_rows(pred, teacher, teacher_mean)),
    }


def bag_of_words(queries: list[str], terms: tuple[list[str], np.ndarray] | None,
                 fallback: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean of the teacher embeddings of each query's terms (L2), and the share of queries with a term.

    A query without any known term (a free phrasing with none of the listed words) gets `fallback`.
    """
    if terms is None:
        return np.tile(M.l2_normalize(fallback), (len(queries), 1)), 0.0
    names, emb = terms
    exact = {q: emb[i] for i, q in enumerate(names)}
    lower: dict[str, np.ndarray] = {}
    for i, q in enumerate(names):
        lower.setdefault(q.lower(), emb[i])
    rows, covered = [], 0
    for q in queries:
        vecs = [exact.get(p, lower.get(p.lower())) for p in split_into_terms(q, names)]
        vecs = [v for v in vecs if v is not None]
        if vecs:
            covered += 1
            rows.append(np.mean(vecs, axis=0))
        else:
            rows.append(fallback)
    return M.l2_normalize(np.stack(rows)) if rows else np.zeros((0, fallback.shape[0])), covered / max(1, len(queries))


def retrieval_figures(tracks: np.ndarray, teacher: np.ndarray, pred: np.ndarray, k: int,
                      text_mean: np.ndarray | None = None) -> dict[str, float]:
    """`M.retrieval_agreement` of predicted text over `tracks`, with the top-k overlap chance beside it."""
    out = M.retrieval_agreement(tracks, teacher, text_test=pred, k=k, text_mean=text_mean)
    out["top_k_overlap_chance"] = out["k"] / len(tracks)
    return out


def score_held_out_set(name: str, queries: list[str], teacher: np.ndarray, student: np.ndarray,
                       terms: tuple[list[str], np.ndarray] | None, teacher_mean: np.ndarray,
                       tracks: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """Student and both baselines on one held-out set. `terms`: the teacher's "terms" set (queries,
    embeddings) or None; `tracks` maps a report key to the track embeddings to rank (e.g.
    "retrieval": validation tracks)."""
    bow, coverage = bag_of_words(queries, terms, teacher_mean)
    mean_pred = np.tile(M.l2_normalize(teacher_mean), (len(queries), 1))
    report: dict[str, Any] = {
        "n": len(queries),
        "student": text_fidelity(student, teacher, teacher_mean),
        "bag_of_words": {**text_fidelity(bow, teacher, teacher_mean), "term_coverage": coverage},
        "mean_baseline": text_fidelity(mean_pred, teacher, teacher_mean),
    }
    if terms is None:
        report["bag_of_words"]["note"] = "teacher.h5 has no 'terms' set: every query falls back to the mean"
    preds = {"student": student, "bag_of_words": bow, "mean_baseline": mean_pred}
    for key, items in tracks.items():
        for who, pred in preds.items():
            # the mean baseline ranks tracks the same for every query: it shows how much of the
            # agreement the direction all queries share explains on its own
            report[who][key] = retrieval_figures(items, teacher, pred, k)
            # centred: rank by how each query moves the scores away from the mean query's, the
            # part a query adds; the mean baseline has nothing to add (Spearman 0)
            report[who][key + "_centred"] = retrieval_figures(items, teacher, pred, k, text_mean=teacher_mean)
    s, b = report["student"]["centred"]["mean"], report["bag_of_words"]["centred"]["mean"]
    log.info("%s (%d queries): centred cosine student %.3f, bag-of-words %.3f; raw cosine student %.4f",
             name, len(queries), s, b, report["student"]["cosine"]["mean"])
    return report


def held_out_plot(path: Path, report: dict[str, Any]) -> None:
    """Bars: centred cosine of the student and both baselines on every held-out set of `report`."""
    from pipeline.evaluation.plots import agreement_bars

    names = [n for n in HELD_OUT_SETS if n in report]
    if not names:
        return
    results = {n: {w: report[n][w]["centred"]["mean"] for w in PREDICTORS} for n in names}
    agreement_bars(path, results, list(PREDICTORS), "centred cosine to the teacher")
