"""ingest: song lists + metadata -> licence-checked manifest, attribution files and an audit (docs/songs.md).

Reads only `params.ingest`. One bad entry never stops the stage; it is excluded with one of REASONS.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from tqdm import tqdm

from pipeline.atomic import write_json, write_text
from pipeline.data import licenses
from pipeline.data.download import DownloadJob, download_many
from pipeline.data.manifest import write_manifest
from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import (
    Entry,
    ParseResult,
    Problem,
    SourceFiles,
    escapes_root,
    is_checksum_file,
    outside_root_detail,
    parse_checksums,
)
from pipeline.deps import stage_input_problems
from pipeline.params import IngestParams, Params, SourceParams
from pipeline.paths import AUDIT, LICENSES as LICENSES_DIR, MANIFEST

log = logging.getLogger(__name__)

REPORT = Path("models/report/ingest.json")

LICENCE_NOT_ALLOWED = "licence not allowed"
UNKNOWN_LICENCE = "unknown licence"
AUDIO_MISSING = "audio missing"
DUPLICATE = "duplicate"
MALFORMED = "malformed"
PATH_OUTSIDE = "path outside audio root"
REASONS = (LICENCE_NOT_ALLOWED, UNKNOWN_LICENCE, AUDIO_MISSING, DUPLICATE, MALFORMED, PATH_OUTSIDE)


class IngestError(RuntimeError):
    """A configuration problem (a list that does not exist, an unknown source name)."""


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


def _need(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"{what}: {path} not found")
    return p


def parse_source(name: str, sp: SourceParams) -> ParseResult:
    """Every list and metadata file configured for one source.

    A metadata file in `sha256sum` format (MTG-Jamendo publishes one per subset) is not a song
    list: it gives the expected sha256 of each audio path, checked when ingest downloads it.
    """
    if name not in SOURCES:
        raise IngestError(f"ingest.sources.{name}: unknown source (known: {', '.join(SOURCES)})")
    res = ParseResult()
    sums: dict[str, str] = {}
    metadata = []
    for path in sp.metadata:
        if is_checksum_file(_need(path, f"ingest.sources.{name}.metadata")):
            got, problems = parse_checksums(Path(path), name)
            sums.update(got)
            res.problems += problems
        else:
            metadata.append(path)
    files = SourceFiles(
        lists=[_need(path, f"ingest.sources.{name}.lists") for path in sp.lists],
        metadata=[Path(path) for path in metadata],
        licenses_file=_need(sp.licenses_file, f"ingest.sources.{name}.licenses_file") if sp.licenses_file else None,
    )
    res.extend(SOURCES[name].parse(files))
    if sums:
        res.meta["sha256"] = sums
    log.info("%s: %d entries, %d unusable records", name, len(res.entries), len(res.problems))
    return res


def _page_key(url: str | None) -> str:
    """A song page URL without scheme, 'www.', case of the host and trailing slash ('' if none)."""
    if not url:
        return ""
    parts = urlsplit(url.strip())
    host = parts.netloc.lower().removeprefix("www.")
    return f"{host}{unquote(parts.path).rstrip('/')}" if host else ""


def _merge(first: Entry, later: Entry) -> None:
    """Fill what the first entry of a track lacks from a later one (tags are united)."""
    for attr in ("artist", "title", "url", "duration", "artist_key"):
        if getattr(first, attr) in (None, "") and getattr(later, attr) not in (None, ""):
            setattr(first, attr, getattr(later, attr))
    if licenses.normalize_license(first.license_text or first.license_url) == licenses.UNKNOWN and later.license_text:
        first.license_text, first.license_url = later.license_text, later.license_url
    first.tags = list(dict.fromkeys(first.tags + later.tags))
    first.candidates = list(dict.fromkeys(first.candidates + later.candidates))


def ingest(p: IngestParams, *, progress: bool = True) -> tuple[list[dict], list[Outcome], dict]:
    """Decide every entry; returns (manifest rows, outcomes in list order, report)."""
    outcomes, unique, metas = _collect(p)
    check_audio_roots(p)
    _decide(unique, p)
    resolve_audio(unique, p, metas, progress)
    drop_shared_files(unique)
    rows = [_manifest_row(o, p) for o in unique if not o.reason]
    report = _report(p, outcomes, rows)
    report["meta"] = metas
    return rows, outcomes, report


def _collect(p: IngestParams) -> tuple[list[Outcome], list[Outcome], dict[str, dict]]:
    """Parse every source; merge repeated tracks into their first entry (the rest: duplicates)."""
    outcomes: list[Outcome] = []
    by_id: dict[str, Outcome] = {}
    by_page: dict[str, Outcome] = {}
    metas: dict[str, dict] = {}
    for name, sp in p.sources.items():
        res = parse_source(name, sp)
        metas[name] = res.meta
        outcomes += [malformed(prob) for prob in res.problems]
        for e in res.entries:
            # the same track under the same id, or under another id with the same page
            # (an FMA list LINK and the metadata CSV's track_url)
            first = by_id.get(e.track_id) or by_page.get(_page_key(e.url))
            if first is not None:
                _merge(first.entry, e)
                outcomes.append(
                    Outcome(e.source, e.file, e.line, e.track_id, reason=DUPLICATE, entry=e,
                            detail=f"same track as {first.track_id} ({first.entry.where}); details merged there")
                )
                continue
            o = Outcome(e.source, e.file, e.line, e.track_id, entry=e)
            by_id[e.track_id] = o
            if _page_key(e.url):
                by_page[_page_key(e.url)] = o
            outcomes.append(o)
    return outcomes, list(by_id.values()), metas


def check_audio_roots(p: IngestParams) -> None:
    """Every source needs an existing audio_root (created when ingest.download fetches into it)."""
    for name, sp in p.sources.items():
        root = Path(sp.audio_root) if sp.audio_root else None
        if root is None:
            raise IngestError(f"ingest.sources.{name}.audio_root is empty")
        if root.is_dir():
            continue
        if root.exists():
            raise IngestError(f"ingest.sources.{name}.audio_root: {root} is not a folder")
        if p.download:
            log.info("ingest.sources.%s.audio_root %s does not exist yet: created for the downloads", name, root)
            root.mkdir(parents=True, exist_ok=True)
            continue
        raise IngestError(
            f"ingest.sources.{name}.audio_root: {root} does not exist (every track would be 'audio missing'); "
            "fix the path, or set ingest.download: true to fetch the audio there"
        )


def _decide(unique: list[Outcome], p: IngestParams) -> None:
    """Exclude an entry whose audio path (or download target) could leave its audio_root (it is never
    used), then apply the licence policy to the rest."""
    for o in unique:
        e = o.entry
        root = p.sources[o.source].audio_root
        paths = list(e.candidates) + ([e.download_path] if e.download_path else [])
        bad = next((rel for rel in paths if escapes_root(root, rel)), None)
        if bad is not None:
            o.reason, o.detail = PATH_OUTSIDE, outside_root_detail(root, bad)
            continue
        o.license = licenses.normalize_license(e.license_text or e.license_url)
        allowed, why = licenses.decide(o.license, p.policy)
        if not allowed:
            o.reason = UNKNOWN_LICENCE if o.license == licenses.UNKNOWN else LICENCE_NOT_ALLOWED
            o.detail = why if o.license != licenses.UNKNOWN else f"cannot read a licence from {e.license_text!r}"


def download_url(name: str, sp: SourceParams, entry: Entry, meta: dict) -> str | None:
    """Where to fetch an entry's audio: the download_base_url param, else the entry's own URL, else the
    base its list or source names; None when there is none."""
    if sp.download_base_url:
        base = sp.download_base_url
    elif entry.download_url:
        return entry.download_url
    else:
        base = meta.get("download_base_url") or SOURCES[name].download_base
    if not base or not entry.download_path:
        return None
    return base.rstrip("/") + "/" + quote(entry.download_path, safe="/")


def resolve_audio(unique: list[Outcome], p: IngestParams, metas: dict[str, dict], progress: bool) -> None:
    """Local files first; with ingest.download, fetch what is missing (allowed tracks only)."""
    candidates = [o for o in unique if not o.reason]
    missing: list[Outcome] = []
    for o in tqdm(candidates, desc="finding audio", unit="song", disable=not progress or len(candidates) < 1000):
        root = Path(p.sources[o.source].audio_root)
        found = next((root / rel for rel in o.entry.candidates if (root / rel).is_file()), None)
        if found is None:
            missing.append(o)
        else:
            o.audio_path = found.as_posix()
    if p.download and missing:
        _fetch(p, missing, metas, progress)
    for o in missing:
        if o.audio_path is None and not o.reason:
            o.reason = AUDIO_MISSING
            tried = ", ".join((Path(p.sources[o.source].audio_root) / c).as_posix() for c in o.entry.candidates[:3])
            o.detail = o.detail or f"no file at {tried}"


def drop_shared_files(unique: list[Outcome]) -> None:
    """The same audio file listed under two ids is one track: the later id is a duplicate."""
    by_file: dict[str, Outcome] = {}
    for o in unique:
        if o.reason or o.audio_path is None:
            continue
        key = str(Path(o.audio_path).resolve())
        if key in by_file:
            o.reason, o.detail = DUPLICATE, f"same audio file as {by_file[key].track_id} ({by_file[key].entry.where})"
            continue
        by_file[key] = o


def _fetch(p: IngestParams, missing: list[Outcome], metas: dict[str, dict], progress: bool) -> None:
    jobs, owners = [], []
    for o in missing:
        sp = p.sources[o.source]
        url = download_url(o.source, sp, o.entry, metas.get(o.source, {}))
        if url is None:
            o.detail = f"no download URL for {o.source} (set ingest.sources.{o.source}.download_base_url)"
            continue
        if escapes_root(sp.audio_root, o.entry.download_path):  # (excluded earlier; never write outside)
            o.reason, o.detail = PATH_OUTSIDE, outside_root_detail(sp.audio_root, o.entry.download_path)
            continue
        expected = metas.get(o.source, {}).get("sha256", {}).get(o.entry.download_path)
        jobs.append(DownloadJob(url, Path(sp.audio_root) / o.entry.download_path, expected))
        owners.append(o)
    if not jobs:
        return
    d = p.downloads
    log.info("fetching %d missing audio files (%d at a time)", len(jobs), d.concurrency)
    results = download_many(jobs, d.concurrency, retries=d.retries, backoff=d.backoff_seconds,
                            timeout=d.timeout_seconds, progress=progress, max_bytes=int(d.max_megabytes * 2**20))
    for o, r in zip(owners, results):
        if r.ok:
            o.audio_path, o.sha256 = r.job.dest.as_posix(), r.sha256
        else:
            o.detail = f"download failed: {r.error}"


# --------------------------------------------------------------------------- the artist-disjoint split
# Each artist group goes to validation when sha256(salt + group) maps below `val_ratio`. The
# decision depends only on the artist and the salt, so adding or removing other songs never moves
# an artist across the split (and cached features stay valid).

# Names that say "no artist known"; grouping all their songs together would make one huge group.
PLACEHOLDER_ARTISTS = frozenset(
    {"unknown", "unknown artist", "unknown author", "anonymous", "anon", "various", "various artists", "n/a", "none", "-"}
)


def artist_group(artist: str | None, track_id: str) -> str:
    """Normalised grouping key: the same artist spelt with other case/spacing/Unicode form matches;
    songs without an artist form a group of their own, keyed by their track id."""
    name = " ".join(unicodedata.normalize("NFKC", artist or "").casefold().split())
    if name and name not in PLACEHOLDER_ARTISTS:
        return "artist:" + name
    return "track:" + track_id


def split_of(group: str, val_ratio: float, salt: str) -> str:
    """'val' or 'train': a stable number in [0, 1) for the group against `val_ratio`."""
    digest = hashlib.sha256(f"{salt}\x00{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_ratio else "train"


def _split_group(e: Entry) -> str:
    """The artist's name groups the split; a dataset's artist id only when no name is known.

    Names are what every list and metadata file share (ids exist only in some of them), so a song
    known by name in one list and by id in another still lands beside the artist's other songs."""
    group = artist_group(e.artist, e.track_id)
    if group.startswith("track:") and e.artist_key:
        group = artist_group(e.artist_key, e.track_id)
    return group


def _manifest_row(o: Outcome, p: IngestParams) -> dict:
    e = o.entry
    o.status = "included"
    o.split = split_of(_split_group(e), p.val_ratio, p.split_salt)
    return {
        "track_id": e.track_id,
        "source": e.source,
        "artist": e.artist,
        "title": e.title,
        "audio_path": o.audio_path,
        "license": o.license,
        "license_url": e.license_url or licenses.canonical_url(o.license) or None,
        "url": e.url,
        "split": o.split,
        "tags": e.tags,
        "duration": e.duration,
        "source_path": e.source_path,
        "sha256": o.sha256,
    }


def _report(p: IngestParams, outcomes: list[Outcome], rows: list[dict]) -> dict:
    def block(source: str | None) -> dict:
        outs = [o for o in outcomes if source is None or o.source == source]
        rs = [r for r in rows if source is None or r["source"] == source]
        reasons = Counter(o.reason for o in outs if o.status == "excluded")
        return {
            "entries": len(outs),
            "included": len(rs),
            "train": sum(r["split"] == "train" for r in rs),
            "val": sum(r["split"] == "val" for r in rs),
            "excluded": {reason: reasons.get(reason, 0) for reason in REASONS},
            "licenses": dict(sorted(Counter(r["license"] for r in rs).items())),
        }

    report = block(None)
    report["sources"] = {name: block(name) for name in p.sources}
    return report


def metric_view(report: dict) -> dict:
    """The DVC metric: a few counts with keys free of spaces and dots, so `dvc exp show` stays
    readable. The per-source and per-licence breakdown is in audit.json's "counts"."""
    metric = {k: report[k] for k in ("entries", "included", "train", "val")}
    metric["excluded"] = {reason.replace(" ", "_"): n for reason, n in report["excluded"].items()}
    metric["included_per_source"] = {name: b["included"] for name, b in report["sources"].items()}
    return metric


def write_outputs(rows: list[dict], outcomes: list[Outcome], report: dict, p: IngestParams) -> None:
    write_manifest(MANIFEST, rows)
    for name in p.sources:
        source = SOURCES[name]
        mine = [r for r in rows if r["source"] == name]
        base = p.sources[name].download_base_url or report.get("meta", {}).get(name, {}).get("download_base_url", "")
        # a new file renamed into place: the old one may be a link into DVC's cache, never written through
        write_text(LICENSES_DIR / source.attribution_file, source.attribution(mine, base))
    # audit.json: the policy applied, the counts, and every entry with its decision
    audit = {"policy": {k: getattr(p.policy, k) for k in vars(p.policy)},
             "counts": {k: v for k, v in report.items() if k != "meta"},
             "entries": [o.audit_record() for o in outcomes]}
    write_json(AUDIT, audit, indent=1)
    write_json(REPORT, metric_view(report))


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
    log.info("%-10s %8s %8s %6s %6s  excluded", "source", "entries", "included", "train", "val")
    for name, b in report["sources"].items():
        ex = ", ".join(f"{k}: {v}" for k, v in b["excluded"].items() if v) or "-"
        log.info("%-10s %8d %8d %6d %6d  %s", name, b["entries"], b["included"], b["train"], b["val"], ex)
    shown: Counter = Counter()  # the first 20 exclusions of each reason, duplicates aside; the audit has them all
    for o in outcomes:
        if o.status == "excluded" and o.reason != DUPLICATE:
            shown[o.reason] += 1
            level = logging.INFO if shown[o.reason] <= 20 else logging.DEBUG
            log.log(level, "excluded %s (%s:%d): %s", o.track_id or "-", o.file, o.line, o.detail or o.reason)
    for reason, n in shown.items():
        if n > 20:
            log.info("… and %d more '%s' entries in %s", n - 20, reason, AUDIT)
    if not rows:
        log.error("no track passed the licence policy with its audio present; see %s", AUDIT)
        return 1
    if report["val"] == 0 and p.val_ratio > 0:
        log.warning("the validation split is empty: change ingest.split_salt or ingest.val_ratio")
    log.info("wrote %s (%d tracks: %d train, %d val), %s, %s", MANIFEST, len(rows), report["train"], report["val"], AUDIT, REPORT)
    return 0
