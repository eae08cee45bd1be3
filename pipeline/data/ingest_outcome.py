"""What ingest decided for each list entry: the exclusion reasons and one Outcome per entry."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data import licenses
from pipeline.data.sources.base import Entry, Problem

LICENCE_NOT_ALLOWED = "licence not allowed"
UNKNOWN_LICENCE = "unknown licence"
AUDIO_MISSING = "audio missing"
DUPLICATE = "duplicate"
MALFORMED = "malformed"
PATH_OUTSIDE = "path outside audio root"
REASONS = (LICENCE_NOT_ALLOWED, UNKNOWN_LICENCE, AUDIO_MISSING, DUPLICATE, MALFORMED, PATH_OUTSIDE)


@dataclass
class Outcome:
    """What ingest decided for one entry (or one unusable record)."""

    source: str
    file: str
    line: int
    track_id: str | None
    status: str = "excluded"  # included | excluded
    reason: str = ""
    detail: str = ""
    entry: Entry | None = None
    license: str = licenses.UNKNOWN
    audio_path: str | None = None
    sha256: str | None = None
    split: str | None = None
    notes: list[str] = field(default_factory=list)

    def audit_record(self) -> dict:
        e = self.entry
        return {
            "track_id": self.track_id,
            "source": self.source,
            "file": self.file,
            "line": self.line,
            "status": self.status,
            "reason": self.reason or None,
            "detail": self.detail or None,
            "license": self.license if e else None,
            "license_text": e.license_text if e else None,
            "artist": e.artist if e else None,
            "title": e.title if e else None,
            "audio_path": self.audio_path,
            "split": self.split,
            "notes": (e.notes if e else []) + self.notes,
        }


def malformed(prob: Problem) -> Outcome:
    """An unusable record of a list or metadata file, excluded as malformed."""
    return Outcome(prob.source, prob.file, prob.line, None, reason=MALFORMED, detail=prob.detail,
                   notes=[prob.text] if prob.text else [])
