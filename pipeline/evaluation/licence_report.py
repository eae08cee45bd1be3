"""Licences in the report: the audit of the cached tracks and what the students trained on."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def licence_metrics(licences: dict[str, Any]) -> dict[str, Any]:
    """The few licence figures that belong in metrics.json (details go to licences.json)."""
    out: dict[str, Any] = {}
    audit = licences.get("audit")
    if audit is not None:
        out.update(audit_ok=bool(audit.get("ok")), tracks=audit.get("tracks"), minutes=audit.get("minutes"),
                   violations=len(audit.get("violations") or []))
    training = licences.get("training", {}).get("by_license", {})
    out["training_tracks"] = sum(v["tracks"] for v in training.values())
    out["training_minutes"] = round(sum(v["minutes"] for v in training.values()), 2)
    return out
