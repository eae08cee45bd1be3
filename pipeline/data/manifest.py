"""data/manifest.jsonl: one JSON object per track that passed the licence policy and has audio.

Every row has every field of `REQUIRED`, plus the source_path and sha256 that ingest adds (docs/songs.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_text

REQUIRED = ("track_id", "source", "artist", "title", "audio_path", "license", "license_url", "url", "split", "tags", "duration")
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """The manifest file is not valid; the message names the file and line."""


def _check(row: object, where: str, seen: set[str]) -> dict:
    """The row, valid and with a track_id not in `seen` (which it is added to)."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    if not isinstance(row["track_id"], str) or ":" not in row["track_id"]:
        raise ManifestError(f"{where}: track_id must look like '<source>:<id>', got {row['track_id']!r}")
    if row["split"] not in SPLITS:
        raise ManifestError(f"{where}: split must be one of {SPLITS}, got {row['split']!r}")
    if not isinstance(row["tags"], list):
        raise ManifestError(f"{where}: tags must be a list")
    if row["duration"] is not None and not isinstance(row["duration"], (int, float)):
        raise ManifestError(f"{where}: duration must be a number or null")
    if row["track_id"] in seen:
        raise ManifestError(f"{where}: track_id {row['track_id']} appears twice")
    seen.add(row["track_id"])
    return row


def read_manifest(path: str | Path) -> list[dict]:
    """All rows, validated; raises ManifestError naming the file and line of the first bad row."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found (run `student-clap run ingest` first)")
    rows, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not JSON ({exc.msg})") from None
            rows.append(_check(row, where, seen))
    return rows


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    """Validate and write rows (in the given order) atomically."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        _check(row, f"row {i} ({row.get('track_id') if isinstance(row, dict) else '?'})", seen)
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows))
