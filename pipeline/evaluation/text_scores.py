"""Text student vs teacher: cosine on the held-out query sets and text-to-music ranking agreement."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import metrics as M
from pipeline.evaluation.held_out_text import text_fidelity
from pipeline.evaluation.audio_scores import AudioResult
from pipeline.evaluation.errors import EvaluateError
from pipeline.evaluation.students import Students
from pipeline.paths import TEACHER_CACHE

EVAL_PROMPT_SET = "eval_prompts"
HELD_OUT_TEXT_SETS = ("val_combos", "val_terms", "val_free", EVAL_PROMPT_SET)
TRAIN_TEXT_SET = "train"


def evaluate_text(students: Students, text_sets: dict[str, tuple[list[str], np.ndarray]]) -> dict[str, Any]:
    """Text student vs teacher text embeddings on every held-out query set."""
    if students.text_embed is None:
        return {"skipped": True, "reason": students.text_skipped}
    if TRAIN_TEXT_SET not in text_sets:
        raise EvaluateError(f"{TEACHER_CACHE}: text set {TRAIN_TEXT_SET!r} missing (needed to centre)")
    train_mean = M.mean_embedding(text_sets[TRAIN_TEXT_SET][1])
    report: dict[str, Any] = {"skipped": False}
    for name in HELD_OUT_TEXT_SETS:
        if name not in text_sets or not len(text_sets[name][0]):
            continue
        queries, teacher_emb = text_sets[name]
        fig = text_fidelity(students.text_embed(queries), teacher_emb, train_mean)  # as distill_text scores them
        report[name] = {
            "n": len(queries),
            "cosine": fig["cosine"]["mean"],
            "centred": fig["centred"]["mean"],
            "baseline_cosine": M.summarize(M.mean_baseline_rows(teacher_emb, train_mean)[0])["mean"],
        }
    return report


def evaluate_retrieval(
    students: Students, audio: AudioResult, text_sets: dict[str, tuple[list[str], np.ndarray]], k: int,
    all_teacher_tracks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Ranking agreement of val tracks per eval prompt: reference = teacher text x teacher audio.

    `all_teacher_tracks` (every cached track) adds the text student's agreement over all tracks:
    it never saw audio, so no track is seen data for it, and more tracks give top-k room."""
    if EVAL_PROMPT_SET not in text_sets or not len(text_sets[EVAL_PROMPT_SET][0]):
        return {"skipped": True, "reason": f"{TEACHER_CACHE} has no {EVAL_PROMPT_SET!r} text set"}
    prompts, teacher_text = text_sets[EVAL_PROMPT_SET]
    report: dict[str, Any] = {"n_queries": len(prompts), "n_tracks": len(audio.val_track_ids)}
    student_text = students.text_embed(prompts) if students.text_embed is not None else None
    if audio.student_tracks is not None:
        report["audio_student"] = M.retrieval_agreement(audio.teacher_tracks, teacher_text, audio.student_tracks, k=k)
    if student_text is not None:
        report["text_student"] = M.retrieval_agreement(audio.teacher_tracks, teacher_text, text_test=student_text, k=k)
    if audio.student_tracks is not None and student_text is not None:
        report["end_to_end"] = M.retrieval_agreement(
            audio.teacher_tracks, teacher_text, audio.student_tracks, text_test=student_text, k=k
        )
    comparisons = [c for c in ("audio_student", "text_student", "end_to_end") if c in report]
    if not comparisons:
        return {"skipped": True, "reason": "both students are disabled"}
    if TRAIN_TEXT_SET in text_sets:
        # centred: queries minus the teacher's mean training text embedding (see retrieval_agreement)
        text_mean = M.mean_embedding(text_sets[TRAIN_TEXT_SET][1])
        tests = {"audio_student": (audio.student_tracks, None), "text_student": (None, student_text),
                 "end_to_end": (audio.student_tracks, student_text)}
        report["centred"] = {
            c: M.retrieval_agreement(audio.teacher_tracks, teacher_text, tests[c][0], text_test=tests[c][1],
                                     k=k, text_mean=text_mean)
            for c in comparisons
        }
        for c in comparisons:
            report["centred"][c].pop("k")
    report["k"] = report[comparisons[0]].pop("k")
    for c in comparisons[1:]:
        report[c].pop("k")
    if student_text is not None and all_teacher_tracks is not None and len(all_teacher_tracks) > len(audio.val_track_ids):
        report["text_student_all_tracks"] = {
            "n_tracks": len(all_teacher_tracks),
            **M.retrieval_agreement(all_teacher_tracks, teacher_text, text_test=student_text, k=k),
        }
    if report["k"] < k:
        report["note"] = f"only {report['n_tracks']} validation tracks: k clipped to {report['k']} (half of them)"
    return report
