"""Quality metrics of a student against its teacher (numpy only: training, export parity checks and evaluation share them).

Embeddings are compared row by row, raw and centred on the teacher mean (a student that outputs the
mean direction scores ~1.0 raw but exactly 0 centred: docs/evaluation.md), and rankings query by query.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_EPS = 1e-12


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a [n, dim] array, got shape {arr.shape}")
    return arr


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit rows; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _EPS)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of `a` with row i of `b` -> [n] (0 where a row is all zeros)."""
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape != b2.shape:
        raise ValueError(f"cosine_rows: shapes differ: {a2.shape} vs {b2.shape}")
    return np.sum(l2_normalize(a2) * l2_normalize(b2), axis=1)


def centred_cosine_rows(student: np.ndarray, teacher: np.ndarray, teacher_mean: np.ndarray) -> np.ndarray:
    """Cosine after subtracting the teacher mean from both sides: how each embedding *differs* from
    the average one (a student that outputs the mean scores exactly 0: its centred row is zero)."""
    s, t = _as_2d(student, "student"), _as_2d(teacher, "teacher")
    mean = np.asarray(teacher_mean, dtype=np.float64).reshape(1, -1)
    if mean.shape[1] != t.shape[1]:
        raise ValueError(f"teacher_mean has dim {mean.shape[1]}, embeddings have {t.shape[1]}")
    return cosine_rows(zero_rounding_rows(s - mean), zero_rounding_rows(t - mean))


def zero_rounding_rows(x: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """`x` with rows shorter than `tol` set to exact zeros: after centring, a row equal to the mean
    up to float rounding must count as "adds nothing", not as a random direction."""
    x = np.array(x, dtype=np.float64)
    x[np.linalg.norm(x, axis=1) < tol] = 0.0
    return x


def summarize(values: Iterable[float] | np.ndarray) -> dict[str, float]:
    """mean, p10, p50, p90 of a 1-d set of values (NaN when empty)."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"mean": float("nan"), "p10": float("nan"), "p50": float("nan"), "p90": float("nan")}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"mean": float(v.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


# --------------------------------------------------------------------------- mean baseline


def mean_embedding(embeddings: np.ndarray) -> np.ndarray:
    """The mean direction of the (teacher) embeddings: L2(mean of the rows) -> [dim].

    It is the best constant unit-vector prediction for cosine, i.e. what the mean-embedding
    baseline outputs, and the centring point of `centred_cosine_rows`. Students output unit
    vectors, so centring on the *unit* mean makes that baseline score exactly 0 centred.
    """
    e = _as_2d(embeddings, "embeddings")
    if e.shape[0] == 0:
        raise ValueError("mean_embedding: no embeddings")
    return l2_normalize(e.mean(axis=0))


def mean_baseline_rows(teacher: np.ndarray, teacher_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw and centred cosine of the constant "predict the mean" student against `teacher` rows
    (`teacher_mean` as returned by `mean_embedding`)."""
    t = _as_2d(teacher, "teacher")
    constant = np.broadcast_to(np.asarray(teacher_mean, dtype=np.float64).reshape(1, -1), t.shape)
    return cosine_rows(constant, t), centred_cosine_rows(constant, t, teacher_mean)


# --------------------------------------------------------------------------- rankings


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank (as Spearman needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="mergesort")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(x.shape[-1], dtype=np.float64), x.shape), axis=-1)
    sorted_vals = np.take_along_axis(x, order, axis=-1)
    tied_rows = np.flatnonzero((np.diff(sorted_vals, axis=-1) == 0).any(axis=-1).reshape(-1))
    flat_ranks, flat_order, flat_sorted = (
        a.reshape(-1, x.shape[-1]) for a in (ranks, order, sorted_vals)
    )
    for i in tied_rows:  # rare with float scores: fix only the rows that have ties
        boundaries = np.flatnonzero(np.diff(flat_sorted[i])) + 1
        starts = np.concatenate([[0], boundaries])
        ends = np.concatenate([boundaries, [x.shape[-1]]])
        for s, e in zip(starts, ends):
            flat_ranks[i, flat_order[i, s:e]] = (s + e - 1) / 2.0
    return flat_ranks.reshape(x.shape)


def spearman_rows(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row of two [q, n] score matrices -> [q] (0 for constant rows)."""
    r, t = _ranks(ref), _ranks(test)
    r -= r.mean(axis=-1, keepdims=True)
    t -= t.mean(axis=-1, keepdims=True)
    denom = np.sqrt((r * r).sum(-1) * (t * t).sum(-1))
    return np.where(denom > 0, (r * t).sum(-1) / np.maximum(denom, _EPS), 0.0)


def ranking_agreement(ref_scores: np.ndarray, test_scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """How well the test ranking of items per query agrees with the reference ranking.

    ref_scores, test_scores: [n_queries, n_items] similarity matrices (higher = better).
    Returns, averaged over queries:
    - top_k_overlap: |ref top-k ∩ test top-k| / k — with the reference's top-k as the relevant
      set this is also the recall of those items within the test's top-k;
    - spearman: rank correlation of the full item rankings;
    - recall_at_k: fraction of queries whose reference best item is in the test's top-k
      (R@k as CLAP retrieval benchmarks report it, with the reference standing in for labels);
    - k: the effective k: at most half the number of items, so that the overlap means something.
    """
    ref = _as_2d(ref_scores, "ref_scores")
    test = _as_2d(test_scores, "test_scores")
    if ref.shape != test.shape:
        raise ValueError(f"ranking_agreement: score shapes differ: {ref.shape} vs {test.shape}")
    n_items = ref.shape[1]
    if n_items == 0 or ref.shape[0] == 0:
        raise ValueError("ranking_agreement: need at least one query and one item")
    # with k >= the number of items every top-k is the whole set and overlap is trivially 1
    k_eff = max(1, min(int(k), n_items // 2))
    # indices of the k highest scores per row, best first (stable on ties)
    ref_top, test_top = (np.argsort(-s, axis=-1, kind="mergesort")[:, :k_eff] for s in (ref, test))
    overlap = np.array([len(np.intersect1d(a, b)) / k_eff for a, b in zip(ref_top, test_top)])
    hit = np.array([a[0] in set(b.tolist()) for a, b in zip(ref_top, test_top)], dtype=np.float64)
    return {
        "top_k_overlap": float(overlap.mean()),
        "spearman": float(spearman_rows(ref, test).mean()),
        "recall_at_k": float(hit.mean()),
        "k": k_eff,
    }


def retrieval_agreement(
    audio_ref: np.ndarray,
    text_ref: np.ndarray,
    audio_test: np.ndarray | None = None,
    *,
    text_test: np.ndarray | None = None,
    k: int = 10,
    text_mean: np.ndarray | None = None,
) -> dict[str, float]:
    """Text-to-music retrieval agreement of a student (or two) with the teacher.

    audio_ref [n_items, d], text_ref [n_queries, d]: teacher embeddings, define the reference
    ranking `text_ref @ audio_ref.T`. The test ranking swaps in whichever student embeddings are
    given: `audio_test` (audio student), `text_test` (text student), or both (end to end).
    Rows need not be normalised: rankings per query only depend on the item side's norms, so the
    item side is L2-normalised here.

    `text_mean` (the teacher's mean text embedding) gives the centred variant: it is subtracted
    from every query, reference and test, so the rankings follow what distinguishes the queries
    rather than the direction they all share. (Centring the items would shift each query's scores
    by a constant and change no ranking.)
    """
    if audio_test is None and text_test is None:
        raise ValueError("retrieval_agreement: give audio_test and/or text_test")
    a_ref = l2_normalize(_as_2d(audio_ref, "audio_ref"))
    t_ref = _as_2d(text_ref, "text_ref")
    a_test = a_ref if audio_test is None else l2_normalize(_as_2d(audio_test, "audio_test"))
    t_test = t_ref if text_test is None else _as_2d(text_test, "text_test")
    if a_test.shape[0] != a_ref.shape[0]:
        raise ValueError(f"audio_test has {a_test.shape[0]} items, audio_ref {a_ref.shape[0]}")
    if t_test.shape[0] != t_ref.shape[0]:
        raise ValueError(f"text_test has {t_test.shape[0]} queries, text_ref {t_ref.shape[0]}")
    if text_mean is not None:
        mean = np.asarray(text_mean, dtype=np.float64).reshape(1, -1)
        t_ref, t_test = zero_rounding_rows(t_ref - mean), zero_rounding_rows(t_test - mean)
    return ranking_agreement(t_ref @ a_ref.T, t_test @ a_test.T, k=k)


# --------------------------------------------------------------------------- zero-shot tags


def zero_shot_accuracy(
    audio: np.ndarray, prompts: np.ndarray, labels: Sequence[Iterable[int]]
) -> tuple[float, np.ndarray]:
    """Accuracy of nearest-prompt tagging; an item counts as right when its predicted tag is
    one of its (possibly several) true tags. Returns (accuracy, predictions: the index of the most
    similar prompt embedding for every audio embedding)."""
    pred = np.argmax(l2_normalize(_as_2d(audio, "audio")) @ l2_normalize(_as_2d(prompts, "prompts")).T, axis=1)
    if len(labels) != pred.shape[0]:
        raise ValueError(f"zero_shot_accuracy: {len(labels)} label sets for {pred.shape[0]} items")
    if pred.shape[0] == 0:
        return float("nan"), pred
    correct = [int(p) in set(lab) for p, lab in zip(pred, labels)]
    return float(np.mean(correct)), pred


def json_safe(obj: Any) -> Any:
    """JSON-safe copy of a report: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
