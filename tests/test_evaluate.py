"""evaluate: report sections on small in-memory caches with known answers.

The caches below implement the reader APIs of pipeline.data.mel_cache.MelCache and
pipeline.data.teacher_cache.TeacherCache; their student "mels" carry the global segment index, so a
test student can look up what it should output and the expected figures are known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import metrics as M
from pipeline.stages.evaluate import (
    EvaluateError,
    Students,
    audit_failed,
    build_report,
    student_skip_reason,
    tag_category,
    tag_prompt,
)
from repo_params import section

DIM = 16
TAGS = ["genre---rock", "genre---jazz", "genre---ambient"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeMels:
    def __init__(self, track_ids: list[str], n_segs: list[int]) -> None:
        self.track_ids = track_ids
        starts = np.cumsum([0] + n_segs)
        self._ranges = {t: range(int(a), int(b)) for t, a, b in zip(track_ids, starts[:-1], starts[1:])}
        self.n_segments = int(starts[-1])
        self.durations = np.array([30.0 + 5 * n for n in n_segs])
        self.reads: list[np.ndarray] = []

    def track_segments(self, track_id: str) -> range:
        return self._ranges[track_id]

    def student_mels(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        assert np.all(np.diff(idx) > 0), "reads must be sorted"
        self.reads.append(idx)
        out = np.zeros((len(idx), 2, 3), dtype=np.float32)
        out[:, 0, 0] = idx
        return out


class FakeTeacher:
    """A 'random teacher': every embedding near one direction, tracks shifted towards a tag vector."""

    def __init__(self, mels: FakeMels, tags: dict[str, str], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        base = _unit(rng.normal(size=DIM))
        self.tag_vectors = {t: _unit(rng.normal(size=DIM)) for t in TAGS}
        seg_track = np.concatenate([[i] * len(mels.track_segments(t)) for i, t in enumerate(mels.track_ids)])
        shift = np.stack([0.05 * self.tag_vectors[tags[mels.track_ids[i]]] for i in seg_track])
        self.segment_raw = base + shift + 0.02 * rng.normal(size=(len(seg_track), DIM))
        self.segment_embeddings = _unit(self.segment_raw).astype(np.float32)
        self.track_ids = list(reversed(mels.track_ids))  # a different order than the mel cache
        self.track_embeddings = np.stack(
            [_unit(self.segment_raw[list(mels.track_segments(t))].mean(0)) for t in self.track_ids]
        ).astype(np.float32)
        self.texts = {
            name: ([f"{name} query {i}" for i in range(n)], _unit(base + 0.1 * rng.normal(size=(n, DIM))))
            for name, n in (("train", 30), ("val_free", 5), ("eval_prompts", 6))
        }

    def text_sets(self):
        return self.texts

    def embed_tag_prompts(self, prompts):
        out = []
        for p in prompts:
            (tag,) = [t for t in TAGS if t.split("---")[1] in p]
            out.append(self.tag_vectors[tag])
        return np.stack(out)


def _setup(n_tracks: int = 10):
    ids = [f"fma:{i}" for i in range(n_tracks)]
    mels = FakeMels(ids, [1 + i % 3 for i in range(n_tracks)])
    tags = {t: TAGS[i % 3] for i, t in enumerate(ids)}
    teacher = FakeTeacher(mels, tags)
    manifest = {
        t: {"track_id": t, "source": "fma", "license": "CC-BY-4.0" if i % 2 else "CC0-1.0",
            "split": "val" if i % 2 == 0 else "train", "tags": [tags[t]]}
        for i, t in enumerate(ids)
    }
    return manifest, mels, teacher


def _perfect_audio(teacher: FakeTeacher, scale: float = 3.0):
    # a raw output of any norm: track vectors are averaged raw and then normalised
    return lambda mels: teacher.segment_raw[mels[:, 0, 0].astype(int)] * scale


def _perfect_text(teacher: FakeTeacher):
    lookup = {q: e for qs, es in teacher.texts.values() for q, e in zip(qs, es)}
    return lambda texts: np.stack([lookup[t] if t in lookup else teacher.embed_tag_prompts([t])[0] for t in texts])


P = section("evaluate", top_k=3, batch_size=2)


def test_perfect_students_score_one_and_the_baseline_zero_centred(tmp_path: Path):
    manifest, mels, teacher = _setup()
    students = Students(audio_embed_raw=_perfect_audio(teacher), text_embed=_perfect_text(teacher),
                           teacher_text_embed=teacher.embed_tag_prompts)
    report, licences = build_report(P, manifest, mels, teacher, students, plot_dir=tmp_path / "plots")
    audio = report["audio"]
    assert audio["n_val_tracks"] == 5 and audio["n_val_segments"] == sum(len(mels.track_segments(t)) for t in manifest if manifest[t]["split"] == "val")
    for level in ("segment", "track"):
        assert audio[level]["cosine"]["mean"] == pytest.approx(1.0)
        assert audio[level]["centred"]["p10"] == pytest.approx(1.0)
        # the random teacher: the mean baseline is close to 1 raw and exactly 0 centred
        assert audio[level]["baseline_cosine"] > 0.98
        assert audio[level]["baseline_centred"] == 0.0
    # only validation segments were embedded, in batches of 2, each read sorted
    read = np.concatenate(mels.reads)
    assert max(len(r) for r in mels.reads) == 2
    assert sorted(read.tolist()) == sorted(i for t in manifest if manifest[t]["split"] == "val" for i in mels.track_segments(t))

    assert report["text"]["val_free"]["cosine"] == pytest.approx(1.0)
    assert report["text"]["eval_prompts"]["centred"] == pytest.approx(1.0)
    r = report["retrieval"]
    assert r["k"] == 2 and r["n_queries"] == 6 and r["n_tracks"] == 5  # k=3 clipped to half the tracks
    assert "k clipped to 2" in r["note"]
    for c in ("audio_student", "text_student", "end_to_end"):
        assert r[c]["top_k_overlap"] == 1.0 and r[c]["spearman"] == pytest.approx(1.0)
        assert r["centred"][c]["spearman"] == pytest.approx(1.0)
    genre = report["tags"]["genre"]
    assert genre["n_tags"] == 3 and genre["n_tracks"] == 5 and genre["chance"] == pytest.approx(1 / 3)
    assert genre["teacher_accuracy"] > genre["chance"]
    assert genre["student_accuracy"] == genre["teacher_accuracy"] and genre["agreement_with_teacher"] == 1.0
    assert genre["end_to_end_accuracy"] == genre["teacher_accuracy"]
    assert licences["training"]["by_license"]["CC-BY-4.0"]["tracks"] == 5
    assert report["licences"]["training_tracks"] == 5 and "audit_ok" not in report["licences"]
    assert set(report["plots"]) == {"track_cosine.csv", "track_cosine.png", "retrieval.json", "retrieval.png"}
    assert (tmp_path / "plots/track_cosine.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "plots/retrieval.json").read_text())
    assert {"label": "audio_student spearman", "comparison": "audio_student", "metric": "spearman", "value": 1.0} in rows
    json.dumps(report, allow_nan=False)  # the DVC metric file must be plain JSON


def test_mean_student_scores_zero_centred_and_worse_rankings():
    manifest, mels, teacher = _setup()
    train_rows = [i for t in manifest if manifest[t]["split"] == "train" for i in mels.track_segments(t)]
    mean = M.mean_embedding(teacher.segment_embeddings[train_rows])
    students = Students(audio_embed_raw=lambda m: np.tile(mean * 2.0, (len(m), 1)))
    students.text_skipped = "disabled"
    report, licences = build_report(P, manifest, mels, teacher, students)
    seg = report["audio"]["segment"]
    assert seg["cosine"]["mean"] > 0.98  # looks great raw ...
    assert seg["centred"] == {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0}  # ... and is worth nothing centred
    assert report["retrieval"]["audio_student"]["spearman"] < 0.9
    assert report["text"] == {"skipped": True, "reason": "disabled"}
    assert "text student skipped: disabled" in report["notes"]
    assert "text_student" not in report["retrieval"] and "end_to_end" not in report["retrieval"]


def test_same_space_section_with_perfect_and_noisy_students():
    manifest, mels, teacher = _setup(n_tracks=24)
    perfect = Students(audio_embed_raw=_perfect_audio(teacher), text_embed=_perfect_text(teacher))
    report, _ = build_report(P, manifest, mels, teacher, perfect)
    same = report["same_space"]
    assert same["same_space"] is True and same["failed"] == ""
    assert (same["min_median_cosine"], same["min_top5_overlap"]) == (0.98, 0.9)
    a = same["audio_student"]
    assert a["n_tracks"] == 12 and a["track_cosine"]["median"] == pytest.approx(1.0)
    assert a["track_cosine_centred"]["min"] == pytest.approx(1.0)
    assert a["top5_overlap"] == 1.0 and a["top5_k"] == 5 and a["top10_k"] == 5  # 11 other tracks: 10 -> 5
    assert "top-10 clipped to 5" in a["note"] and any(n.startswith("same space: only 12 tracks") for n in report["notes"])
    e2e = same["end_to_end"]
    assert e2e["text_query_overlap"] == 1.0 and e2e["k"] == 3 and e2e["n_tracks"] == 12
    # the text student over every cached track, not only the validation ones
    assert report["retrieval"]["text_student_all_tracks"]["n_tracks"] == 24
    json.dumps(report, allow_nan=False)

    # noise on every segment: cosine stays high, neighbours move; a strict bar fails on both figures
    rng = np.random.default_rng(5)
    noisy = Students(audio_embed_raw=lambda m: _perfect_audio(teacher)(m) + 0.15 * rng.normal(size=(len(m), DIM)))
    strict = section("evaluate", top_k=3, batch_size=2, same_space={"min_median_cosine": 0.9999,
                                                                    "min_top5_overlap": 0.99})
    report, _ = build_report(strict, manifest, mels, teacher, noisy)
    same = report["same_space"]
    assert same["same_space"] is False and "end_to_end" not in same
    assert same["failed"].startswith("median_track_cosine ") and "top5_overlap " in same["failed"]
    assert same["audio_student"]["top5_overlap"] < 0.99


def test_disabled_audio_student_is_left_out():
    manifest, mels, teacher = _setup()
    students = Students(text_embed=_perfect_text(teacher), audio_skipped="distillation.audio_enabled is false")
    report, licences = build_report(P, manifest, mels, teacher, students)
    assert report["audio"]["skipped"] is True and "audio_enabled" in report["audio"]["reason"]
    assert set(report["retrieval"]) >= {"text_student"} and "audio_student" not in report["retrieval"]
    assert mels.reads == []
    assert any(n.startswith("audio student skipped") for n in report["notes"])
    assert report["same_space"]["skipped"] is True


def test_no_tags_and_no_validation_tracks():
    manifest, mels, teacher = _setup()
    for row in manifest.values():
        row["tags"] = []
    students = Students(audio_embed_raw=_perfect_audio(teacher), text_skipped="off")
    report, licences = build_report(P, manifest, mels, teacher, students)
    assert report["tags"]["skipped"] and "no tags" in report["tags"]["reason"]
    for row in manifest.values():
        row["split"] = "train"
    with pytest.raises(EvaluateError, match="no validation track"):
        build_report(P, manifest, mels, teacher, students)


def test_tag_prompts():
    assert tag_category("genre---rock") == ("genre", "rock")
    assert tag_category("mood/theme---happy") == ("mood/theme", "happy")
    assert tag_category("piano") == ("tag", "piano")
    assert tag_prompt("genre", "hiphop") == "This is a hiphop song."
    assert tag_prompt("instrument", "acousticguitar") == "This is a song with acousticguitar."


def test_skipped_checkpoint_is_detected(tmp_path: Path):
    skipped = tmp_path / "skipped.pt"
    torch.save({"skipped": True, "reason": "distillation.text_enabled: false"}, skipped)
    assert student_skip_reason(skipped) == "distillation.text_enabled: false"
    trained = tmp_path / "trained.pt"
    torch.save({"state_dict": {}, "config": {}, "metrics": {}}, trained)
    assert student_skip_reason(trained) == ""
    with pytest.raises(EvaluateError, match="missing"):
        student_skip_reason(tmp_path / "absent.pt")


def test_audit_summary_in_the_report():
    manifest, mels, teacher = _setup()
    students = Students(audio_embed_raw=_perfect_audio(teacher), text_skipped="off")
    audit = {"ok": False, "tracks": 10, "minutes": 7.5, "sources": {},
             "violations": [{"track_id": "fma:x", "cache": "data/mels.h5", "problem": "not in the manifest"}]}
    report, licences = build_report(P, manifest, mels, teacher, students, audit)
    assert report["licences"]["audit_ok"] is False and report["licences"]["violations"] == 1
    assert licences["audit"]["violations"][0]["track_id"] == "fma:x"


def test_audit_failure_detection():
    assert audit_failed({"ok": False})
    assert audit_failed({"violations": [{"track_id": "x"}]})
    assert not audit_failed({"ok": True, "violations": []})
