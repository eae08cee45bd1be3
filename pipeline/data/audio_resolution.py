"""Where each allowed entry's audio is: a file under the source's audio_root, or fetched there."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from tqdm import tqdm

from pipeline.data.download import DownloadJob, download_many
from pipeline.data.ingest_outcome import AUDIO_MISSING, DUPLICATE, PATH_OUTSIDE, Outcome
from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import Entry, escapes_root, outside_root_detail
from pipeline.params import IngestParams, SourceParams

log = logging.getLogger(__name__)


def _find_audio(root: Path, entry: Entry) -> Path | None:
    for rel in entry.candidates:
        p = root / rel
        if p.is_file():
            return p
    return None


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
        found = _find_audio(Path(p.sources[o.source].audio_root), o.entry)
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
