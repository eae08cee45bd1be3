"""ingest: song lists + metadata -> licence-checked manifest, attribution files and an audit.

Reads only `params.ingest`. The decisions are pipeline.data.ingestion's (parse every configured
source, apply the licence policy, find or fetch the audio, split by artist); this stage writes

    data/manifest.jsonl                      tracks that may be used (schema: pipeline/data/manifest.py)
    data/licenses/<SOURCE>_SONGS_LICENSE.md  attribution for exactly those tracks
    data/licenses/audit.json                 every entry: included, or excluded with its reason
    models/report/ingest.json                counts per source and reason (a DVC metric)

One bad entry never stops the stage; it is excluded with one of the reasons in
pipeline.data.ingest_outcome.REASONS.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from pipeline.atomic import write_json, write_text
from pipeline.data.ingest_outcome import DUPLICATE, Outcome
from pipeline.data.ingestion import IngestError, audit_document, ingest, metric_view
from pipeline.data.manifest import write_manifest
from pipeline.data.sources import SOURCES
from pipeline.deps import stage_input_problems
from pipeline.params import IngestParams, Params
from pipeline.paths import AUDIT, MANIFEST
from pipeline.paths import LICENSES as LICENSES_DIR

log = logging.getLogger(__name__)

REPORT = Path("models/report/ingest.json")


def write_outputs(rows: list[dict], outcomes: list[Outcome], report: dict, p: IngestParams,
                  manifest: Path = MANIFEST, licenses_dir: Path = LICENSES_DIR, report_path: Path = REPORT) -> None:
    write_manifest(manifest, rows)
    licenses_dir.mkdir(parents=True, exist_ok=True)
    for name in p.sources:
        source = SOURCES[name]
        mine = [r for r in rows if r["source"] == name]
        base = p.sources[name].download_base_url or report.get("meta", {}).get(name, {}).get("download_base_url", "")
        # a new file renamed into place: the old one may be a link into DVC's cache, never written through
        write_text(licenses_dir / source.attribution_file, source.attribution(mine, base))
    write_json(licenses_dir / "audit.json", audit_document(outcomes, report, p), indent=1)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    metric = metric_view(report)
    write_json(report_path, metric)


def _log_summary(report: dict) -> None:
    log.info("%-10s %8s %8s %6s %6s  excluded", "source", "entries", "included", "train", "val")
    for name, b in report["sources"].items():
        ex = ", ".join(f"{k}: {v}" for k, v in b["excluded"].items() if v) or "-"
        log.info("%-10s %8d %8d %6d %6d  %s", name, b["entries"], b["included"], b["train"], b["val"], ex)


def _log_exclusions(outcomes: list[Outcome]) -> None:
    """The first 20 exclusions of each reason (duplicates aside); the audit has them all."""
    shown: Counter = Counter()
    for o in outcomes:
        if o.status == "excluded" and o.reason != DUPLICATE:
            shown[o.reason] += 1
            level = logging.INFO if shown[o.reason] <= 20 else logging.DEBUG  # the audit has them all
            log.log(level, "excluded %s (%s:%d): %s", o.track_id or "-", o.file, o.line, o.detail or o.reason)
    for reason, n in shown.items():
        if n > 20:
            log.info("… and %d more '%s' entries in %s", n - 20, reason, AUDIT)


def run(params: Params, args: argparse.Namespace) -> int:
    p = params.ingest
    # a list or metadata file no dep covers could change without `dvc status` noticing
    refused = stage_input_problems("ingest", getattr(args, "params", "params.yaml"))
    for line in refused:
        log.error("%s", line)
    if refused:
        return 2
    try:
        rows, outcomes, report = ingest(p)
    except IngestError as exc:
        log.error("%s", exc)
        return 2
    write_outputs(rows, outcomes, report, p)
    _log_summary(report)
    _log_exclusions(outcomes)
    if not rows:
        log.error("no track passed the licence policy with its audio present; see %s", AUDIT)
        return 1
    if report["val"] == 0 and p.val_ratio > 0:
        log.warning("the validation split is empty: change ingest.split_salt or ingest.val_ratio")
    log.info("wrote %s (%d tracks: %d train, %d val), %s, %s", MANIFEST, len(rows), report["train"], report["val"], AUDIT, REPORT)
    return 0
