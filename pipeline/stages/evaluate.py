"""evaluate: how close are the students to the teacher on the validation (artist-disjoint) tracks?

Reads params `evaluate` and `teacher.model.dir` (the teacher embeds the zero-shot tag prompts),
plus the files dvc.yaml declares. Writes models/report/metrics.json (a DVC metric),
models/report/licences.json and models/report/plots/. The report's sections: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import metrics as M
from pipeline.atomic import write_json
from pipeline.evaluation import fidelity
from pipeline.evaluation.held_out_text import text_fidelity
from pipeline.params import EvaluateParams, Params, SameSpaceParams
from pipeline.paths import AUDIO_STUDENT, MANIFEST, MELS, REPORT, TEACHER_CACHE, TEXT_STUDENT, TEXT_TOKENIZER
from pipeline.paths import AUDIT as AUDIT_JSON

log = logging.getLogger(__name__)


class EvaluateError(RuntimeError):
    """The inputs of evaluate are inconsistent (e.g. no validation track in the caches)."""


# --------------------------------------------------------------------------- the students under evaluation


@dataclass
class Students:
    """What evaluate compares. An entry is None when that student is disabled (see `*_skipped`)."""

    audio_embed_raw: Callable[[np.ndarray], np.ndarray] | None = None  # student mels -> raw [n, 512]
    text_embed: Callable[[Sequence[str]], np.ndarray] | None = None  # texts -> [n, 512]
    teacher_text_embed: Callable[[Sequence[str]], np.ndarray] | None = None  # for tag prompts
    audio_skipped: str = ""
    text_skipped: str = ""
    notes: list[str] = field(default_factory=list)


def student_skip_reason(path: Path) -> str:
    """'' when `path` holds a trained student; the recorded reason when its stage was disabled."""
    from pipeline.models.skipped import skip_reason

    try:
        return skip_reason(path)
    except FileNotFoundError as exc:
        raise EvaluateError(str(exc)) from None


def load_students(audio_path: Path, text_path: Path, tokenizer_path: Path, teacher_dir: Path | None) -> Students:
    """Load whichever students exist, wrapped as numpy-in/numpy-out functions."""
    import torch

    out = Students()
    out.audio_skipped = student_skip_reason(audio_path)
    if not out.audio_skipped:
        from pipeline.models.audio_student import load_audio_student

        audio = load_audio_student(audio_path).eval()

        def audio_embed_raw(mels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return audio.embed_raw(torch.from_numpy(np.ascontiguousarray(mels, dtype=np.float32))).numpy()

        out.audio_embed_raw = audio_embed_raw
    out.text_skipped = student_skip_reason(text_path)
    if not out.text_skipped:
        from student_clap.tokenizer import encode, load_tokenizer
        from pipeline.models.text_student import load_text_student

        text = load_text_student(text_path).eval()
        tok = load_tokenizer(tokenizer_path, vocab_size=text.config.vocab_size)

        def text_embed(texts: Sequence[str]) -> np.ndarray:
            ids, mask = encode(tok, list(texts), text.config.max_length)
            with torch.inference_mode():
                return text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        out.text_embed = text_embed
    if teacher_dir is not None and teacher_dir.is_dir():
        from pipeline.teacher.model import load_teacher

        teacher = None

        def teacher_text_embed(texts: Sequence[str]) -> np.ndarray:
            nonlocal teacher
            if teacher is None:  # the teacher is only needed for tag prompts; load on demand
                teacher = load_teacher(teacher_dir, device="cpu", verify=False)
            return teacher.embed_text(list(texts)).numpy()

        out.teacher_text_embed = teacher_text_embed
    return out


# --------------------------------------------------------------------------- audio student vs teacher


def embed_segments(
    embed_raw: Callable[[np.ndarray], np.ndarray], mels, indices: np.ndarray, batch_size: int
) -> np.ndarray:
    """Raw student embeddings of mel-cache segments `indices` (sorted), in batches."""
    out = []
    for start in tqdm(range(0, len(indices), batch_size), desc="student audio", unit="batch", leave=False):
        idx = indices[start : start + batch_size]
        out.append(np.asarray(embed_raw(mels.student_mels(idx)), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


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
    t_rows = {tid: i for i, tid in enumerate(teacher.track_ids)}
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


# --------------------------------------------------------------------------- text student vs teacher


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
    tests: dict[str, tuple] = {}  # comparison -> (audio, text) student embeddings (None: the teacher's)
    if audio.student_tracks is not None:
        tests["audio_student"] = (audio.student_tracks, None)
    if student_text is not None:
        tests["text_student"] = (None, student_text)
    if len(tests) == 2:
        tests["end_to_end"] = (audio.student_tracks, student_text)
    if not tests:
        return {"skipped": True, "reason": "both students are disabled"}
    for c, (a_test, t_test) in tests.items():
        report[c] = M.retrieval_agreement(audio.teacher_tracks, teacher_text, a_test, text_test=t_test, k=k)
    if TRAIN_TEXT_SET in text_sets:
        # centred: queries minus the teacher's mean training text embedding (see retrieval_agreement)
        text_mean = M.mean_embedding(text_sets[TRAIN_TEXT_SET][1])
        report["centred"] = {c: M.retrieval_agreement(audio.teacher_tracks, teacher_text, a_test, text_test=t_test,
                                                      k=k, text_mean=text_mean)
                             for c, (a_test, t_test) in tests.items()}
    report["k"] = report[next(iter(tests))]["k"]
    for r in [report[c] for c in tests] + list(report.get("centred", {}).values()):
        r.pop("k")
    if student_text is not None and all_teacher_tracks is not None and len(all_teacher_tracks) > len(audio.val_track_ids):
        report["text_student_all_tracks"] = {
            "n_tracks": len(all_teacher_tracks),
            **M.retrieval_agreement(all_teacher_tracks, teacher_text, text_test=student_text, k=k),
        }
    if report["k"] < k:
        report["note"] = f"only {report['n_tracks']} validation tracks: k clipped to {report['k']} (half of them)"
    return report


# --------------------------------------------------------------------------- zero-shot tags


TAG_TEMPLATES = {"instrument": "This is a song with {}.", "default": "This is a {} song."}


def tag_category(tag: str) -> tuple[str, str]:
    """'genre---rock' -> ('genre', 'rock'); an untyped tag falls in category 'tag'."""
    if "---" in tag:
        cat, name = tag.split("---", 1)
        return cat, name
    return "tag", tag


def tag_prompt(category: str, name: str) -> str:
    template = TAG_TEMPLATES.get(category, TAG_TEMPLATES["default"])
    return template.format(name.replace("_", " ").replace("-", " "))


def evaluate_tags(students: Students, audio: AudioResult, manifest: dict[str, dict]) -> dict[str, Any]:
    """Zero-shot tag accuracy per tag category (teacher, audio student, end to end)."""
    val_tags = {tid: list(manifest[tid].get("tags") or []) for tid in audio.val_track_ids}
    if not any(val_tags.values()):
        return {"skipped": True, "reason": "the manifest has no tags on validation tracks"}
    if students.teacher_text_embed is None:
        return {"skipped": True, "reason": "no teacher to embed the tag prompts"}
    vocab: dict[str, set[str]] = defaultdict(set)
    for row in manifest.values():
        for tag in row.get("tags") or []:
            cat, name = tag_category(tag)
            vocab[cat].add(name)
    report: dict[str, Any] = {"skipped": False}
    for cat in sorted(vocab):
        names = sorted(vocab[cat])
        items, labels = [], []
        for i, tid in enumerate(audio.val_track_ids):
            lab = {names.index(n) for c, n in map(tag_category, val_tags[tid]) if c == cat}
            if lab:
                items.append(i)
                labels.append(lab)
        if len(names) < 2 or not items:
            continue
        prompts = [tag_prompt(cat, n) for n in names]
        teacher_prompts = students.teacher_text_embed(prompts)
        entry: dict[str, Any] = {
            "n_tracks": len(items),
            "n_tags": len(names),
            "chance": float(np.mean([len(lab) / len(names) for lab in labels])),
        }
        entry["teacher_accuracy"], teacher_pred = M.zero_shot_accuracy(audio.teacher_tracks[items], teacher_prompts, labels)
        if audio.student_tracks is not None:
            entry["student_accuracy"], student_pred = M.zero_shot_accuracy(
                audio.student_tracks[items], teacher_prompts, labels
            )
            entry["agreement_with_teacher"] = float(np.mean(student_pred == teacher_pred))
            if students.text_embed is not None:
                entry["end_to_end_accuracy"], _ = M.zero_shot_accuracy(
                    audio.student_tracks[items], students.text_embed(prompts), labels
                )
        report[cat] = entry
    if len(report) == 1:
        return {"skipped": True, "reason": "no tag category with at least two tags on validation tracks"}
    return report


# --------------------------------------------------------------------------- licences


def training_licences(manifest: dict[str, dict], durations: dict[str, float]) -> dict[str, Any]:
    """Tracks and minutes per licence (and per source) of the tracks the students trained on."""
    per_licence: dict[str, dict[str, float]] = defaultdict(lambda: {"tracks": 0, "minutes": 0.0})
    per_source: dict[str, dict[str, float]] = defaultdict(lambda: {"tracks": 0, "minutes": 0.0})
    for tid, row in manifest.items():
        if row.get("split") != "train" or tid not in durations:
            continue
        minutes = durations[tid] / 60.0
        for table, key in ((per_licence, row.get("license") or "unknown"), (per_source, row.get("source") or "?")):
            table[key]["tracks"] += 1
            table[key]["minutes"] = round(table[key]["minutes"] + minutes, 3)
    return {"by_license": dict(sorted(per_licence.items())), "by_source": dict(sorted(per_source.items()))}


def licence_audit(manifest_path: Path, mels_path: Path, teacher_path: Path, audit_json: Path) -> dict[str, Any]:
    """Run the licence audit: every cached track must be in the manifest with an allowed licence.

    The policy is ingest's, read from what ingest recorded in audit.json, so evaluate declares no
    ingest params (and a policy tightened since the caches were built still flags old tracks).
    """
    from pipeline.data.audit import AuditError, run_audit

    recorded = json.loads(audit_json.read_text(encoding="utf-8")) if audit_json.is_file() else {}
    policy = recorded.get("policy") if isinstance(recorded, dict) else None
    if not isinstance(policy, dict):
        raise AuditError(f"{audit_json}: no licence policy recorded (run the ingest stage again)")
    return run_audit(manifest_path, mels_path, teacher_path, policy).to_dict()


def audit_failed(summary: dict[str, Any]) -> bool:
    return summary.get("ok") is False or bool(summary.get("violations"))


# --------------------------------------------------------------------------- the report


def evaluate_same_space(audio: AudioResult, retrieval: dict[str, Any], p: SameSpaceParams) -> dict[str, Any]:
    """The verdict and the figures behind it (pipeline.evaluation.fidelity) on the validation tracks:
    the audio student's track cosines and neighbour agreement, and end to end (text student +
    audio student) the text-query result overlap."""
    if audio.student_tracks is None:
        return {"skipped": True, "reason": f"audio student skipped: {audio.report.get('reason', '')}"}
    section = fidelity.same_space_section(audio.teacher_tracks, audio.student_tracks, audio.centre, asdict(p))
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
    by_license = licences["training"]["by_license"]
    # the few licence figures that belong in metrics.json (details go to licences.json)
    report["licences"] = {}
    if audit is not None:
        licences["audit"] = audit
        report["licences"].update(audit_ok=bool(audit.get("ok")), tracks=audit.get("tracks"),
                                  minutes=audit.get("minutes"), violations=len(audit.get("violations") or []))
    report["licences"]["training_tracks"] = sum(v["tracks"] for v in by_license.values())
    report["licences"]["training_minutes"] = round(sum(v["minutes"] for v in by_license.values()), 2)
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


# --------------------------------------------------------------------------- the stage


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.evaluate
    from pipeline.data.manifest import read_manifest
    from pipeline.data.mel_cache import MelCache
    from pipeline.data.teacher_cache import TeacherCache

    manifest = {row["track_id"]: row for row in read_manifest(MANIFEST)}
    audit = licence_audit(MANIFEST, MELS, TEACHER_CACHE, AUDIT_JSON)
    # the teacher model is read only to embed zero-shot tag prompts (teacher.h5 holds no tag set)
    students = load_students(AUDIO_STUDENT, TEXT_STUDENT, TEXT_TOKENIZER, Path(params.teacher.model.dir))
    shutil.rmtree(REPORT / "plots", ignore_errors=True)  # no stale plot of a student since disabled
    with MelCache(MELS) as mels, TeacherCache(TEACHER_CACHE) as teacher:
        report, licences = build_report(p, manifest, mels, teacher, students, audit, REPORT / "plots")
    report["teacher"] = teacher_identity(Path(params.teacher.model.dir))
    for name, data in (("metrics.json", report), ("licences.json", licences)):
        write_json(REPORT / name, data)
        log.info("wrote %s", REPORT / name)
    same = report.get("same_space") or {}
    if not same.get("skipped") and "audio_student" in same:
        a = same["audio_student"]
        log.info("same space: %s (median track cosine %s, top-5 overlap %s)%s",
                 "yes" if same["same_space"] else "no", a["track_cosine"]["median"], a["top5_overlap"],
                 f"; failed: {same['failed']}" if same["failed"] else "")
    audio = report["audio"]
    if not audio.get("skipped"):
        t = audio["track"]
        log.info("audio student, validation tracks: cosine %.4f (baseline %.4f), centred %.4f (baseline %.4f)",
                 t["cosine"]["mean"], t["baseline_cosine"], t["centred"]["mean"], t["baseline_centred"])
    r = report["retrieval"]
    for c in ("audio_student", "text_student", "end_to_end"):
        if c in r:
            log.info("retrieval %s: top-%d overlap %.3f, spearman %.3f", c, r["k"], r[c]["top_k_overlap"], r[c]["spearman"])
    if audit_failed(audit):
        log.error("licence audit failed: a cached track is not in the manifest with an allowed licence")
        return 1
    return 0
