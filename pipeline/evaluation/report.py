"""The evaluate report: every section from opened caches and loaded students, plots, the teacher's identity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import metrics as M
from pipeline.evaluation import fidelity
from pipeline.evaluation.audio_scores import AudioResult, evaluate_audio
from pipeline.evaluation.licence_report import licence_metrics, training_licences
from pipeline.evaluation.students import Students
from pipeline.evaluation.tag_scores import evaluate_tags
from pipeline.evaluation.text_scores import evaluate_retrieval, evaluate_text
from pipeline.params import EvaluateParams, SameSpaceParams

log = logging.getLogger(__name__)


def evaluate_same_space(audio: AudioResult, retrieval: dict[str, Any], p: SameSpaceParams) -> dict[str, Any]:
    """The verdict and the figures behind it (pipeline.evaluation.fidelity) on the validation tracks:
    the audio student's track cosines and neighbour agreement, and end to end (text student +
    audio student) the text-query result overlap."""
    if audio.student_tracks is None:
        return {"skipped": True, "reason": f"audio student skipped: {audio.report.get('reason', '')}"}
    figures = fidelity.same_space(audio.teacher_tracks, audio.student_tracks, audio.centre,
                                  min_median_cosine=p.min_median_cosine, min_top5_overlap=p.min_top5_overlap,
                                  min_median_centred_cosine=p.min_median_centred_cosine)
    section: dict[str, Any] = {
        "same_space": figures.pop("same_space"),
        "failed": figures.pop("failed"),
        "min_median_cosine": p.min_median_cosine,
        "min_top5_overlap": p.min_top5_overlap,
        "min_median_centred_cosine": p.min_median_centred_cosine,
        "audio_student": figures,
    }
    if "end_to_end" in retrieval:
        e2e, centred = retrieval["end_to_end"], (retrieval.get("centred") or {}).get("end_to_end") or {}
        section["end_to_end"] = {
            "n_tracks": retrieval["n_tracks"], "n_queries": retrieval["n_queries"], "k": retrieval["k"],
            "text_query_overlap": e2e["top_k_overlap"], "text_query_spearman": e2e["spearman"],
            "text_query_overlap_centred": centred.get("top_k_overlap"),
            "text_query_spearman_centred": centred.get("spearman"),
        }
    return section


def write_plots(out_dir: Path, audio: AudioResult, retrieval: dict[str, Any]) -> list[str]:
    from pipeline.evaluation import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if audio.student_tracks is not None:
        rows = audio.track_rows
        plots.write_csv(
            out_dir / "track_cosine.csv",
            [
                {"track_id": tid, "cosine": round(float(c), 6), "centred": round(float(z), 6),
                 "baseline_cosine": round(float(b), 6)}
                for tid, c, z, b in zip(audio.val_track_ids, rows["cosine"], rows["centred"], rows["baseline_cosine"])
            ],
        )
        plots.cosine_histogram(
            out_dir / "track_cosine.png",
            {"student": rows["cosine"], "student, centred": rows["centred"], "mean baseline": rows["baseline_cosine"]},
            "Audio student vs teacher, validation tracks",
        )
        written += ["track_cosine.csv", "track_cosine.png"]
    comparisons = {c: retrieval[c] for c in ("audio_student", "text_student", "end_to_end") if c in retrieval}
    comparisons.update({f"{c} centred": r for c, r in (retrieval.get("centred") or {}).items()})
    if comparisons:
        names = ("top_k_overlap", "spearman", "recall_at_k")
        plots.write_json(
            out_dir / "retrieval.json",
            [{"label": f"{c} {m}", "comparison": c, "metric": m, "value": round(float(r[m]), 6)}
             for c, r in comparisons.items() for m in names],
        )
        plots.agreement_bars(
            out_dir / "retrieval.png", comparisons, names,
            f"Text-to-music ranking agreement with the teacher (k={retrieval['k']})",
        )
        written += ["retrieval.json", "retrieval.png"]
    return written


def build_report(
    p: EvaluateParams, manifest: dict[str, dict], mels, teacher, students: Students,
    audit: dict[str, Any] | None = None, plot_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.json, licences.json) from opened caches and loaded students; `audit` is the
    licence audit's summary (`AuditReport.to_dict()`)."""
    train_ids = {tid for tid, r in manifest.items() if r.get("split") == "train"}
    val_ids = {tid for tid, r in manifest.items() if r.get("split") == "val"}
    log.info("evaluating on %d validation tracks (%d train tracks for centring)", len(val_ids), len(train_ids))
    audio = evaluate_audio(students, mels, teacher, train_ids, val_ids, p)
    text_sets = teacher.text_sets()
    retrieval = evaluate_retrieval(students, audio, text_sets, p.top_k,
                                   np.asarray(teacher.track_embeddings, dtype=np.float64))
    report: dict[str, Any] = {
        "same_space": evaluate_same_space(audio, retrieval, p.same_space),
        "audio": audio.report,
        "text": evaluate_text(students, text_sets),
        "retrieval": retrieval,
        "tags": evaluate_tags(students, audio, manifest),
    }
    durations = dict(zip(mels.track_ids, np.asarray(mels.durations, dtype=float)))
    licences: dict[str, Any] = {"training": training_licences(manifest, durations)}
    if audit is not None:
        licences["audit"] = audit
    report["licences"] = licence_metrics(licences)
    notes = list(students.notes)
    for name, reason in (("audio", students.audio_skipped), ("text", students.text_skipped)):
        if reason:
            notes.append(f"{name} student skipped: {reason}")
    for section in ("retrieval", "tags"):
        if report[section].get("skipped"):
            notes.append(f"{section}: {report[section]['reason']}")
    if report["same_space"].get("audio_student", {}).get("note"):
        notes.append(f"same space: {report['same_space']['audio_student']['note']}")
    report["notes"] = notes
    if plot_dir is not None:
        report["plots"] = write_plots(plot_dir, audio, report["retrieval"])
    return M.json_safe(report), M.json_safe(licences)


def teacher_identity(teacher_dir: Path) -> dict[str, Any]:
    """Which teacher the figures are measured against (from its provenance file)."""
    from pipeline.teacher.model import read_provenance

    prov = read_provenance(teacher_dir)
    # checkpoint_sha256: the LAION .pt file a converted teacher came from (none for the demo one)
    identity = {"kind": prov.get("kind", "unknown"), "source": prov.get("source", ""),
                "checkpoint_sha256": prov.get("source_sha256", ""), "weights_sha256": prov.get("weights_sha256", "")}
    # a converted checkpoint: how its file was verified, or that it was trusted unverified
    identity.update({k: prov[k] for k in ("verified", "trusted_unverified") if k in prov})
    return identity


def read_manifest_rows(path: Path) -> dict[str, dict]:
    from pipeline.data.manifest import read_manifest

    return {row["track_id"]: row for row in read_manifest(path)}
