"""Zero-shot tag accuracy: tracks against "This is a <tag> song." prompts, per tag category."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from pipeline import metrics as M
from pipeline.evaluation.audio_scores import AudioResult
from pipeline.evaluation.students import Students

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
