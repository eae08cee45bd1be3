"""`student-clap licenses audit`: prove that every cached track may be used (docs/songs.md).

The evaluate stage calls `run_audit` and puts `AuditReport.to_dict()` into the model card.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.atomic import write_json
from pipeline.data.licenses import decide
from pipeline.data.manifest import ManifestError, read_manifest
from pipeline.params import LicensePolicyParams, ParamsError, load_params, section_from_dict

log = logging.getLogger(__name__)

TRACK_ID_KEYS = ("tracks/track_id", "track_id", "tracks/ids")
DURATION_KEYS = ("tracks/duration", "tracks/durations", "durations")


class AuditError(RuntimeError):
    """A cache or the manifest could not be read at all."""


@dataclass
class Violation:
    track_id: str
    cache: str  # which file holds it
    problem: str


@dataclass
class AuditReport:
    violations: list[Violation] = field(default_factory=list)
    # (source, license) -> {"tracks": n, "minutes": m}; minutes count tracks of known duration
    table: dict[tuple[str, str], dict] = field(default_factory=dict)
    caches: dict[str, int] = field(default_factory=dict)  # file -> number of track ids checked
    unknown_duration: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def tracks(self) -> int:
        return sum(v["tracks"] for v in self.table.values())

    @property
    def minutes(self) -> float:
        return sum(v["minutes"] for v in self.table.values())

    def to_dict(self) -> dict:
        per_source: dict[str, dict] = defaultdict(lambda: {"tracks": 0, "minutes": 0.0, "licenses": {}})
        for (source, lic), v in sorted(self.table.items()):
            s = per_source[source]
            s["tracks"] += v["tracks"]
            s["minutes"] = round(s["minutes"] + v["minutes"], 2)
            s["licenses"][lic] = {"tracks": v["tracks"], "minutes": round(v["minutes"], 2)}
        return {
            "ok": self.ok,
            "tracks": self.tracks,
            "minutes": round(self.minutes, 2),
            "tracks_without_duration": self.unknown_duration,
            "caches": self.caches,
            "sources": dict(per_source),
            "violations": [vars(v) for v in self.violations],
        }

    def format_table(self) -> str:
        lines = [f"{'source':<10} {'licence':<26} {'tracks':>7} {'minutes':>9}"]
        for (source, lic), v in sorted(self.table.items()):
            lines.append(f"{source:<10} {lic:<26} {v['tracks']:>7d} {v['minutes']:>9.1f}")
        lines.append(f"{'total':<10} {'':<26} {self.tracks:>7d} {self.minutes:>9.1f}")
        if self.unknown_duration:
            lines.append(f"({self.unknown_duration} track(s) of unknown duration count 0 minutes)")
        return "\n".join(lines)


def read_cache_ids(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """Track ids (and durations in seconds, when stored) of an HDF5 cache."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: cache not found")
    try:
        with h5py.File(path, "r") as f:
            key = next((k for k in TRACK_ID_KEYS if k in f), None)
            if key is None:
                raise AuditError(f"{path}: no track id dataset (looked for {', '.join(TRACK_ID_KEYS)})")
            ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in f[key][()]]
            dkey = next((k for k in DURATION_KEYS if k in f and f[k].shape == (len(ids),)), None)
            durations = np.asarray(f[dkey][()], dtype=float) if dkey else None
    except OSError as exc:
        raise AuditError(f"{path}: not a readable HDF5 file ({exc})") from exc
    return ids, durations


def run_audit(
    manifest_path: str | Path,
    mels_path: str | Path | None,
    teacher_path: str | Path | None,
    policy: LicensePolicyParams | Mapping[str, bool],
) -> AuditReport:
    """Check the caches against the manifest under `policy`.

    `policy` may also be the dict ingest records in data/licenses/audit.json. A cache path of
    None is skipped. The policy is applied again rather than trusted from the manifest, so
    tightening it (e.g. switching BY-SA off) flags caches built before.
    """
    policy = _as_policy(policy)
    try:
        rows = {r["track_id"]: r for r in read_manifest(manifest_path)}
    except ManifestError as exc:
        raise AuditError(str(exc)) from exc
    excluded = _ingest_exclusions(Path(manifest_path).parent / "licenses" / "audit.json")
    report = AuditReport()
    seen: dict[str, float | None] = {}
    for path in (mels_path, teacher_path):
        if path is None:
            continue
        ids, durations = read_cache_ids(path)
        report.caches[str(path)] = len(ids)
        for i, tid in enumerate(ids):
            row = rows.get(tid)
            if row is None:
                why = excluded.get(tid)
                report.violations.append(Violation(tid, str(path), "not in the manifest" + (f" (ingest excluded it: {why})" if why else "")))
                continue
            allowed, reason = decide(row["license"], policy)
            if not allowed:
                report.violations.append(Violation(tid, str(path), reason))
                continue
            dur = float(durations[i]) if durations is not None and np.isfinite(durations[i]) else None
            if seen.get(tid) is None:
                seen[tid] = dur if dur is not None else row.get("duration")
    for tid, dur in seen.items():
        row = rows[tid]
        cell = report.table.setdefault((row["source"], row["license"]), {"tracks": 0, "minutes": 0.0})
        cell["tracks"] += 1
        if dur is None:
            report.unknown_duration += 1
        else:
            cell["minutes"] += dur / 60.0
    return report


def _ingest_exclusions(path: Path) -> dict[str, str]:
    """track id -> why ingest left it out, from ingest's audit.json when it sits beside the manifest."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {
        e["track_id"]: e.get("detail") or e.get("reason") or "excluded"
        for e in entries
        if isinstance(e, dict) and e.get("track_id") and e.get("status") == "excluded"
    }


def _as_policy(policy: LicensePolicyParams | Mapping[str, bool]) -> LicensePolicyParams:
    if isinstance(policy, Mapping):
        try:
            return section_from_dict(LicensePolicyParams, dict(policy), "licence policy")
        except ParamsError as exc:
            raise AuditError(str(exc)) from None
    return policy


def main(args: argparse.Namespace) -> int:
    try:
        policy = load_params(getattr(args, "params", None) or "params.yaml").ingest.policy
        report = run_audit(args.manifest, args.mels, args.teacher, policy)
    except (AuditError, ParamsError) as exc:
        log.error("%s", exc)
        return 2
    print(report.format_table())
    for v in report.violations:
        print(f"VIOLATION {v.track_id} in {v.cache}: {v.problem}")
    if getattr(args, "json_out", None):
        write_json(args.json_out, report.to_dict())
    if report.ok:
        print(f"OK: all {report.tracks} cached tracks are in the manifest with an allowed licence")
        return 0
    print(f"FAILED: {len(report.violations)} violation(s)")
    return 1
