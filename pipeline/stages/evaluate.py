"""evaluate: how close are the students to the teacher on the validation (artist-disjoint) tracks?

Reads params `evaluate` and `teacher.model.dir` (the teacher embeds the zero-shot tag prompts),
plus the files dvc.yaml declares. Writes models/report/metrics.json (a DVC metric),
models/report/licences.json and models/report/plots/. The report's sections: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.evaluation.licence_report import audit_failed, licence_audit
from pipeline.evaluation.report import build_report, read_manifest_rows, teacher_identity
from pipeline.evaluation.students import load_students
from pipeline.params import Params
from pipeline.paths import AUDIO_STUDENT, MANIFEST, MELS, TEACHER_CACHE, TEXT_STUDENT, TEXT_TOKENIZER
from pipeline.paths import AUDIT as AUDIT_JSON

log = logging.getLogger(__name__)

REPORT_DIR = Path("models/report")


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.evaluate
    from pipeline.data.teacher_cache import TeacherCache
    from pipeline.data.mel_cache import MelCache

    manifest = read_manifest_rows(MANIFEST)
    audit = licence_audit(MANIFEST, MELS, TEACHER_CACHE, AUDIT_JSON)
    # the teacher model is read only to embed zero-shot tag prompts (teacher.h5 holds no tag set)
    students = load_students(AUDIO_STUDENT, TEXT_STUDENT, TEXT_TOKENIZER, Path(params.teacher.model.dir))
    shutil.rmtree(REPORT_DIR / "plots", ignore_errors=True)  # no stale plot of a student since disabled
    with MelCache(MELS) as mels, TeacherCache(TEACHER_CACHE) as teacher:
        report, licences = build_report(p, manifest, mels, teacher, students, audit, REPORT_DIR / "plots")
    report["teacher"] = teacher_identity(Path(params.teacher.model.dir))
    for name, data in (("metrics.json", report), ("licences.json", licences)):
        write_json(REPORT_DIR / name, data)
        log.info("wrote %s", REPORT_DIR / name)
    _log_headline(report)
    if audit_failed(audit):
        log.error("licence audit failed: a cached track is not in the manifest with an allowed licence")
        return 1
    return 0


def _log_headline(report: dict[str, Any]) -> None:
    same = report.get("same_space") or {}
    if not same.get("skipped") and "audio_student" in same:
        a = same["audio_student"]
        log.info("same space: %s (median track cosine %s, top-5 overlap %s)%s",
                 "yes" if same["same_space"] else "no", a["track_cosine"]["median"], a["top5_overlap"],
                 f"; failed: {same['failed']}" if same["failed"] else "")
    audio = report["audio"]
    if not audio.get("skipped"):
        t = audio["track"]
        log.info(
            "audio student, validation tracks: cosine %.4f (baseline %.4f), centred %.4f (baseline %.4f)",
            t["cosine"]["mean"], t["baseline_cosine"], t["centred"]["mean"], t["baseline_centred"],
        )
    r = report["retrieval"]
    for c in ("audio_student", "text_student", "end_to_end"):
        if c in r:
            log.info("retrieval %s: top-%d overlap %.3f, spearman %.3f", c, r["k"], r[c]["top_k_overlap"], r[c]["spearman"])
