"""Audio student vs teacher on the validation tracks: segment- and track-level cosine, raw and centred."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import metrics as M
from pipeline.evaluation.errors import EvaluateError
from pipeline.evaluation.students import Students
from pipeline.params import EvaluateParams
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE


def embed_segments(
    embed_raw: Callable[[np.ndarray], np.ndarray], mels, indices: np.ndarray, batch_size: int
) -> np.ndarray:
    """Raw student embeddings of mel-cache segments `indices` (sorted), in batches."""
    out = []
    for start in tqdm(range(0, len(indices), batch_size), desc="student audio", unit="batch", leave=False):
        idx = indices[start : start + batch_size]
        out.append(np.asarray(embed_raw(mels.student_mels(idx)), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def _teacher_track_rows(teacher) -> dict[str, int]:
    return {tid: i for i, tid in enumerate(teacher.track_ids)}


def _mean_of_rows(table, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Mean (not normalised) of selected rows of a (possibly on-disk) table without loading all of it."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        raise EvaluateError("no training rows to centre on: the manifest has no train track in the caches")
    total = None
    for start in range(0, rows.size, chunk):
        block = np.asarray(table[rows[start : start + chunk]], dtype=np.float64).sum(axis=0)
        total = block if total is None else total + block
    return total / rows.size


def _cosine_block(student: np.ndarray, teacher: np.ndarray, train_mean: np.ndarray) -> dict[str, Any]:
    """Raw/centred cosine of the student and of the mean baseline: summaries plus per-row values."""
    raw = M.cosine_rows(student, teacher)
    centred = M.centred_cosine_rows(student, teacher, train_mean)
    base_raw, base_centred = M.mean_baseline_rows(teacher, train_mean)
    return {
        "summary": {
            "cosine": M.summarize(raw),
            "centred": M.summarize(centred),
            # the baseline's mean only: its spread is of no interest and would crowd `dvc exp show`
            "baseline_cosine": float(base_raw.mean()),
            "baseline_centred": float(base_centred.mean()),
        },
        "rows": {"cosine": raw, "centred": centred, "baseline_cosine": base_raw},
    }


@dataclass
class AudioResult:
    report: dict[str, Any]
    val_track_ids: list[str]
    student_tracks: np.ndarray | None  # [n_val, 512] L2-normalised, None when skipped
    teacher_tracks: np.ndarray  # [n_val, 512]
    track_rows: dict[str, np.ndarray] = field(default_factory=dict)
    centre: np.ndarray | None = None  # the mean training teacher track embedding (unit)


def evaluate_audio(
    students: Students, mels, teacher, train_ids: set[str], val_ids: set[str], p: EvaluateParams
) -> AudioResult:
    """Segment- and track-level agreement of the audio student on the validation tracks."""
    t_rows = _teacher_track_rows(teacher)
    mel_ids = list(mels.track_ids)
    val_tracks = [tid for tid in mel_ids if tid in val_ids and tid in t_rows]
    train_tracks = [tid for tid in mel_ids if tid in train_ids and tid in t_rows]
    if not val_tracks:
        raise EvaluateError(f"no validation track of {MANIFEST} is in both {MELS} and {TEACHER_CACHE}")
    teacher_tracks = np.asarray(teacher.track_embeddings, dtype=np.float64)
    val_track_emb = teacher_tracks[[t_rows[t] for t in val_tracks]]
    train_track_mean = M.mean_embedding(teacher_tracks[[t_rows[t] for t in train_tracks]]) if train_tracks else None

    seg_lists = [np.asarray(mels.track_segments(t), dtype=np.int64) for t in val_tracks]
    val_segments = np.concatenate(seg_lists)
    train_segments = (
        np.concatenate([np.asarray(mels.track_segments(t), dtype=np.int64) for t in train_tracks])
        if train_tracks else np.zeros(0, dtype=np.int64)
    )
    report: dict[str, Any] = {"n_val_tracks": len(val_tracks), "n_val_segments": int(val_segments.size),
                              "n_train_tracks": len(train_tracks)}
    if students.audio_embed_raw is None:
        report.update(skipped=True, reason=students.audio_skipped)
        return AudioResult(report, val_tracks, None, val_track_emb)
    if train_track_mean is None:
        raise EvaluateError("no training track in the caches: cannot centre on the training mean")

    order = np.argsort(val_segments)  # the cache reads sorted indices fastest
    raw_sorted = embed_segments(students.audio_embed_raw, mels, val_segments[order], p.batch_size)
    raw = np.empty_like(raw_sorted)
    raw[order] = raw_sorted
    seg_teacher = np.asarray(teacher.segment_embeddings[np.sort(val_segments)], dtype=np.float64)
    seg_teacher_val = np.empty_like(seg_teacher)
    seg_teacher_val[order] = seg_teacher
    seg_mean = M.l2_normalize(_mean_of_rows(teacher.segment_embeddings, train_segments))
    # centring subtracts a mean of unit vectors, so the student side must be unit vectors too
    seg_block = _cosine_block(M.l2_normalize(raw), seg_teacher_val, seg_mean)

    # track vector = L2(mean of raw segment embeddings), as the teacher cache defines it
    bounds = np.cumsum([0] + [len(s) for s in seg_lists])
    student_tracks = M.l2_normalize(np.stack([raw[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))
    track_block = _cosine_block(student_tracks, val_track_emb, train_track_mean)
    report.update(skipped=False, segment=seg_block["summary"], track=track_block["summary"])
    return AudioResult(report, val_tracks, student_tracks, val_track_emb, track_block["rows"], train_track_mean)
