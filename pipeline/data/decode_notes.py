"""Decode notes of kept tracks (partial decodes, NaN/inf samples) for the mels report.

A note must survive the stage being killed and resumed: the track's mels are then reused, not
decoded again. So each flagged track's notes are written, before its part is published, to a
small JSON file beside the part files; the report gathers them (and, for tracks reused from a
finished cache, the previous report's flags), with the newest verdict for a track winning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.atomic import write_json

NOTES_DIR = "decode-notes"


def save_track_notes(parts_dir: str | Path, track_id: str, audio_path: str, notes: list[str]) -> None:
    """Record a track's notes (or remove a stale record when it has none), atomically."""
    name = hashlib.sha256(track_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".json"
    path = Path(parts_dir) / NOTES_DIR / name
    if not notes:
        path.unlink(missing_ok=True)
        return
    write_json(path, {"track_id": track_id, "audio_path": audio_path, "notes": notes}, indent=None)


def saved_notes(parts_dir: str | Path) -> dict[str, dict]:
    """track_id -> {track_id, audio_path, notes} of every record under parts_dir (unreadable ones skipped)."""
    out: dict[str, dict] = {}
    for path in sorted((Path(parts_dir) / NOTES_DIR).glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            out[str(rec["track_id"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def previous_flags(report_path: str | Path) -> dict[str, dict]:
    """track_id -> flag entry from an earlier mels report, if there is a readable one."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
        return {str(f["track_id"]): f for f in report.get("flagged", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def flagged_tracks(kept: Iterable[tuple[str, str]], fresh: Mapping[str, list[str]], saved: Mapping[str, dict],
                   previous: Mapping[str, dict]) -> list[dict]:
    """Flag entries for the kept (track_id, audio_path) pairs: this run's notes (`fresh`, where a
    track with no notes clears older ones) over saved records over the previous report's."""
    out = []
    for track_id, audio_path in kept:
        if track_id in fresh:
            notes = fresh[track_id]
        else:
            older = saved.get(track_id) or previous.get(track_id) or {}
            notes = older.get("notes", []) if older.get("audio_path") == audio_path else []
        if notes:
            out.append({"track_id": track_id, "audio_path": audio_path, "notes": list(notes)})
    return out
