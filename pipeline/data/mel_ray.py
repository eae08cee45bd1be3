"""The mels stage's track jobs as Ray tasks over batches of tracks (cluster.ray_address set), running
the local path's own code; why the cache is byte-identical, retries and failures: docs/cluster.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from pipeline import cluster
from pipeline.data import decode_notes, mel_cache
from pipeline.data.mel_extraction import TrackJob, TrackProcessor, TrackResult, extract_to_part

log = logging.getLogger(__name__)

_PROCESSORS: dict[str, TrackProcessor] = {}  # per worker process: front-ends built once per cache params


def _processor(cfg: dict) -> TrackProcessor:
    key = repr(sorted(cfg["params"].items()))
    if key not in _PROCESSORS:
        _PROCESSORS[key] = TrackProcessor(cfg)
    return _PROCESSORS[key]


def _as_if_local(r: TrackResult, copy: Path, job: TrackJob) -> TrackResult:
    """A result computed from a copy of the audio, worded as the local run words it (the job's path)."""
    r.reason = r.reason.replace(str(copy), job.audio_path)
    r.notes = [n.replace(str(copy), job.audio_path) for n in r.notes]
    r.audio_path = job.audio_path
    return r


def extract_batch(cfg: dict, jobs: list[TrackJob], blobs: list[bytes]) -> list[tuple[TrackResult, str, bytes]]:
    """Ray task body: each track (its audio given as bytes) -> (result, part file name, part bytes);
    the name and bytes are empty for a failed track."""
    proc = _processor(cfg)
    compression = mel_cache.Compression(**cfg["compression"])
    out = []
    with tempfile.TemporaryDirectory(prefix="student-clap-mels-") as tmp:
        for job, blob in zip(jobs, blobs):
            copy = Path(tmp) / "audio" / str(job.manifest_index) / Path(job.audio_path).name
            copy.parent.mkdir(parents=True)
            copy.write_bytes(blob)
            parts = Path(tmp) / "parts" / str(job.manifest_index)
            r = _as_if_local(extract_to_part(proc, job, parts, compression, "ray", source=copy), copy, job)
            published = sorted(parts.glob("*.h5")) if r.ok else []
            out.append((r, published[0].name, published[0].read_bytes()) if published else (r, "", b""))
            copy.unlink()
    return out


def _publish(parts_dir: Path, r: TrackResult, name: str, data: bytes) -> None:
    """Put a finished track's part file where a local worker would have published it."""
    if not r.ok:
        return
    # notes first, as extract_to_part: a kill between the two leaves the track to redo, never a note lost
    decode_notes.save_track_notes(parts_dir, r.track_id, r.audio_path, r.notes)
    tmp = parts_dir / f"{name}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, parts_dir / name)


def _read_audio(job: TrackJob) -> bytes | None:
    try:
        return Path(job.audio_path).read_bytes()
    except OSError:  # missing or unreadable here: the local code reports it (and fails fast)
        return None


def run_jobs_on_ray(cfg: dict, jobs: list[TrackJob], address: str, tracks_per_task: int, progress: Any) -> list[TrackResult]:
    """Every job's result, in job order, computed by Ray tasks of `tracks_per_task` tracks each."""
    parts_dir = Path(cfg["parts_dir"])
    compression = mel_cache.Compression(**cfg["compression"])
    results: dict[str, TrackResult] = {}

    def done(r: TrackResult, name: str = "", data: bytes = b"") -> None:
        _publish(parts_dir, r, name, data)
        results[r.track_id] = r
        progress.update(r)

    shipped = []
    for job in jobs:
        if Path(job.audio_path).is_file():
            shipped.append(job)
        else:  # missing or not a file: nothing to ship, the local code says why
            done(extract_to_part(_processor(cfg), job, parts_dir, compression, "w0"))
    with cluster.connect(address) as ray:
        t0, segments0 = time.monotonic(), progress.segments
        task = ray.remote(num_cpus=1, max_retries=cluster.RETRIES, scheduling_strategy="SPREAD")(extract_batch)
        batches = deque(cluster.chunks(shipped, tracks_per_task))

        def submit(batch: list[TrackJob]) -> Any:
            blobs = [_read_audio(job) or b"" for job in batch]
            return task.remote(cfg, batch, blobs)

        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 0)))
        for batch, ref in cluster.windowed(ray, batches, submit, window):
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if len(batch) > 1:  # try its tracks one by one: only a track that crashes alone fails
                    log.warning("a mels task of %d tracks failed after %d retries (%s); retrying them one by one",
                                len(batch), cluster.RETRIES, type(exc).__name__)
                    batches.extend([job] for job in batch)
                    continue
                job = batch[0]
                done(TrackResult(job.track_id, False, "corrupt", f"the decoder crashed ({type(exc).__name__})",
                                 job.audio_path))
                continue
            for r, name, data in rows:
                done(r, name, data)
        seconds, segments = time.monotonic() - t0, progress.segments - segments0
        log.info("on the Ray cluster: %d segments in %.1f s after connecting (%.2f seg/s)", segments, seconds,
                 segments / max(seconds, 1e-9))
    return [results[job.track_id] for job in jobs]
