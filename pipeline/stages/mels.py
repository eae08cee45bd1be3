"""mels: manifest audio -> teacher (CLAP) and student (EfficientAT) log-mels in data/mels.h5.

Reads params `audio`, `frontend`, `mels` and `cluster` only. Resume, workers, what the stage refuses and
reports: docs/mel-cache.md.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.data import decode_notes, mel_cache
from pipeline.data.manifest import read_manifest
from pipeline.data.mel_extraction import TrackJob, TrackProcessor, TrackResult, extract_to_part
from pipeline.params import Params
from pipeline.paths import MANIFEST, MELS as CACHE
from student_clap.files import sha256_file

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0
REPORT = Path("models/report/mels.json")


class TrackProgress:
    """tqdm bar plus a periodic log line with throughput and ETA (logs survive in CI output)."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="mels", unit="track", dynamic_ncols=True)
        self.total, self.done, self.minutes, self.segments = total, 0, 0.0, 0
        self.t0 = self.last_log = time.monotonic()

    def update(self, r: TrackResult) -> None:
        self.done += 1
        self.segments += r.n_segments
        self.minutes += r.duration / 60.0
        self.bar.update(1)
        self.bar.set_postfix(audio_min=f"{self.minutes:.1f}")
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_SECONDS or self.done == self.total:
            self.last_log = now
            elapsed = now - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            log.info("mels: %d/%d tracks, %.1f audio-min, %.2f audio-min/s, ETA %s", self.done, self.total,
                     self.minutes, self.minutes / max(elapsed, 1e-9), hms(eta))

    def close(self) -> None:
        self.bar.close()


def hms(seconds: float) -> str:
    """A duration as 1h02m03s, or 2m03s under an hour."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_serial(cfg: dict, jobs: list[TrackJob], progress: TrackProgress) -> list[TrackResult]:
    proc = TrackProcessor(cfg)
    compression = mel_cache.Compression(**cfg["compression"])
    out = []
    for job in jobs:
        r = extract_to_part(proc, job, Path(cfg["parts_dir"]), compression, "w0")
        out.append(r)
        progress.update(r)
    return out


def _worker(cfg: dict, jobs: Any, results: Any, wid: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    proc = TrackProcessor(cfg)
    compression = mel_cache.Compression(**cfg["compression"])
    parts_dir = Path(cfg["parts_dir"])
    while True:
        job = jobs.get()
        if job is None:
            return
        results.put(("start", wid, job))
        results.put(("done", wid, extract_to_part(proc, job, parts_dir, compression, f"w{wid}")))


def _reap(procs: dict, current: dict, results: dict, progress: TrackProgress, jobs: list[TrackJob],
          start: Callable[[], None], job_q: Any) -> None:
    """Handle workers that exited: a crash on a track fails that track and gets a replacement
    worker; workers that die without having taken a track mean the pool cannot start."""
    for wid, p in list(procs.items()):
        if p.is_alive():
            continue
        job = current.pop(wid, None)
        del procs[wid]
        if p.exitcode == 0:
            continue
        if job is None:
            raise RuntimeError(f"a mel worker exited with code {p.exitcode} before taking a track (see its log above)")
        if job.track_id not in results:
            r = TrackResult(job.track_id, False, "corrupt", f"the decoder crashed (worker exit code {p.exitcode})",
                            job.audio_path)
            results[job.track_id] = r
            progress.update(r)
        if len(results) < len(jobs):
            start()
            job_q.put(None)
    if not procs and len(results) < len(jobs):
        raise RuntimeError("all mel workers exited with tracks left to do")


def run_parallel(cfg: dict, jobs: list[TrackJob], workers: int, progress: TrackProgress) -> list[TrackResult]:
    """Worker processes pull tracks from a queue; a worker that dies (a decoder crash) costs only
    the track it was on, which is reported, and is replaced."""
    ctx = mp.get_context("spawn")  # no fork after torch/h5py are loaded
    job_q, result_q = ctx.Queue(), ctx.Queue()
    for job in jobs:
        job_q.put(job)
    procs: dict[int, Any] = {}
    current: dict[int, TrackJob | None] = {}
    next_id = 0

    def start() -> None:
        nonlocal next_id
        p = ctx.Process(target=_worker, args=(cfg, job_q, result_q, next_id), daemon=True)
        p.start()
        procs[next_id], current[next_id] = p, None
        next_id += 1

    for _ in range(min(workers, len(jobs))):
        start()
    for _ in procs:
        job_q.put(None)
    results: dict[str, TrackResult] = {}
    try:
        while len(results) < len(jobs):
            try:
                kind, wid, payload = result_q.get(timeout=1.0)
            except queue.Empty:
                _reap(procs, current, results, progress, jobs, start, job_q)
                continue
            if kind == "start":
                current[wid] = payload
            else:
                current[wid] = None
                results[payload.track_id] = payload
                progress.update(payload)
    finally:
        for p in procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return [results[job.track_id] for job in jobs]


class MelInputError(ValueError):
    """The manifest cannot be read or lists a track id more than once (the message names the file)."""


def load_jobs(manifest_path: Path, shard: tuple[int, int] | None = None) -> list[TrackJob]:
    """One job per manifest row, or per row of slice k of n; raises MelInputError on a bad manifest."""
    try:
        rows = read_manifest(manifest_path)
    except (OSError, ValueError) as exc:  # ManifestError is a ValueError naming file and line
        raise MelInputError(str(exc)) from exc
    jobs = [TrackJob(i, str(r["track_id"]), str(r["audio_path"])) for i, r in enumerate(rows)]
    if shard:
        k, n = shard
        jobs = [job for job in jobs if job.manifest_index % n == k]
        log.info("shard %d/%d: %d of %d tracks", k, n, len(jobs), len(rows))
    if len({job.track_id for job in jobs}) != len(jobs):
        raise MelInputError(f"{manifest_path} lists a track id more than once")
    return jobs


def _finished_tracks(parts_dir: Path, cache_path: Path, cparams: dict) -> dict:
    """Tracks complete in a published part file or in the previous cache."""
    sources = sorted(parts_dir.glob("*.h5")) + ([cache_path] if cache_path.exists() else [])
    return mel_cache.completed_tracks(sources, cparams)


def jobs_to_compute(jobs: list[TrackJob], parts_dir: Path, cache_path: Path, cparams: dict) -> tuple[list[TrackJob], int]:
    """The jobs still to compute and how many are reused: a finished track is reused if its audio is unchanged."""
    done = _finished_tracks(parts_dir, cache_path, cparams)
    todo, reused = [], 0
    for job in jobs:
        prev = done.get(job.track_id)
        if prev and Path(job.audio_path).is_file() and prev[0] == sha256_file(job.audio_path):
            reused += 1
        else:
            todo.append(job)
    return todo, reused


def _compute(cfg: dict, todo: list[TrackJob], workers: int, ray_address: str = "", tracks_per_task: int = 1
             ) -> list[TrackResult]:
    progress = TrackProgress(len(todo))
    t0 = time.monotonic()
    try:
        if ray_address and todo:  # cluster.ray_address: Ray tasks instead of the local pool
            from pipeline.data.mel_ray import run_jobs_on_ray

            return run_jobs_on_ray(cfg, todo, ray_address, tracks_per_task, progress)
        # every job's result, in job order: in this process for one worker or one job, else in a pool
        if workers <= 1 or len(todo) <= 1:
            return run_serial(cfg, todo, progress)
        return run_parallel(cfg, todo, workers, progress)
    finally:
        progress.close()
        seconds = time.monotonic() - t0
        log.info("computed %d segments of %d tracks in %.1f s (%.2f seg/s)", progress.segments, len(todo), seconds,
                 progress.segments / max(seconds, 1e-9))


def _merge(jobs: list[TrackJob], results: list[TrackResult], parts_dir: Path, cache_path: Path, cparams: dict,
           compression: mel_cache.Compression, chunk_frames: int, report_path: Path) -> tuple[list, list[dict]]:
    """Merge every finished track, in manifest order, into the cache (atomic rename); the merged
    entries and the kept tracks whose decode was patched."""
    done = _finished_tracks(parts_dir, cache_path, cparams)
    failed = {r.track_id for r in results if not r.ok}
    entries = [(done[j.track_id][1], done[j.track_id][2]) for j in jobs if j.track_id in done and j.track_id not in failed]
    kept = [(j.track_id, j.audio_path) for j in jobs if j.track_id in done and j.track_id not in failed]
    flagged = decode_notes.flagged_tracks(kept, {r.track_id: r.notes for r in results if r.ok},
                                          decode_notes.saved_notes(parts_dir), decode_notes.previous_flags(report_path))
    if entries:
        mel_cache.write_cache(cache_path, cparams, compression, entries, chunk_frames)
        shutil.rmtree(parts_dir, ignore_errors=True)
    return entries, flagged


def build_mel_cache(params: Params, manifest_path: Path, cache_path: Path, report_path: Path,
                    shard: tuple[int, int] | None = None) -> dict:
    """Compute the mels of every manifest track (or of shard k of n) into cache_path, write the report
    to report_path and return it; raises MelInputError on a bad manifest. Judge it with failure_verdict."""
    p = params.mels
    jobs = load_jobs(manifest_path, shard)
    cparams = mel_cache.cache_params(params.audio, params.frontend, p.max_track_minutes, p.precision)
    compression = mel_cache.Compression(p.compression, p.compression_level, True)
    parts_dir = mel_cache.parts_dir_for(cache_path)
    parts_dir.mkdir(parents=True, exist_ok=True)
    stale = mel_cache.clean_temporaries(parts_dir)
    if stale:
        log.info("removed %d half-written part(s) of an interrupted run", stale)
    todo, reused = jobs_to_compute(jobs, parts_dir, cache_path, cparams)
    if reused:
        log.info("resuming: %d track(s) already done, %d to compute", reused, len(todo))
    ray_address = params.cluster.ray_address
    where = f"Ray cluster {ray_address!r}" if ray_address else f"{max(1, p.workers)} worker(s)"
    log.info("computing mels of %d track(s) with %s into %s", len(todo), where, cache_path)
    cfg = {"params": cparams, "compression": asdict(compression), "parts_dir": str(parts_dir),
           "chunk_frames": p.chunk_frames}
    results = _compute(cfg, todo, p.workers, ray_address, params.cluster.tracks_per_task)
    entries, flagged = _merge(jobs, results, parts_dir, cache_path, cparams, compression, p.chunk_frames, report_path)
    failures = [r for r in results if not r.ok]
    report = build_report(jobs, entries, failures, reused, cache_path, compression)
    report["tracks_flagged"], report["flagged"] = len(flagged), flagged
    write_json(report_path, report)
    for r in failures:
        log.warning("skipped %s (%s): %s", r.track_id, r.kind, r.reason)
    for f in flagged:
        log.warning("kept %s, flagged: %s", f["track_id"], "; ".join(f["notes"]))
    log.info("mels: %d/%d tracks usable, %d segments, %.1f audio-minutes, %d failed; report in %s",
             report["tracks_ok"], len(jobs), report["segments"], report["audio_minutes"], len(failures), report_path)
    return report


def failure_verdict(report: dict, max_failure_ratio: float, report_path: Path) -> str | None:
    """Why the run failed (no usable track, or too many failed tracks), or None when it did not."""
    if not report["tracks_ok"]:
        return f"no usable track: nothing to train on (see {report_path})"
    ratio = report["tracks_failed"] / max(1, report["tracks_total"])
    if ratio > max_failure_ratio:
        return (f"{100 * ratio:.0f}% of the tracks failed, more than mels.max_failure_ratio="
                f"{100 * max_failure_ratio:.0f}% (see {report_path})")
    return None


def build_report(jobs: list[TrackJob], entries: list, failures: list[TrackResult], reused: int, cache_path: Path,
                 compression: mel_cache.Compression) -> dict:
    # no timings: the report is a stage output, and dvc.lock should hash only what was computed
    # (the log line of the run says how long it took)
    by_kind: dict[str, int] = {}
    for r in failures:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    minutes = sum(rec.duration for _, rec in entries) / 60.0
    size = cache_path.stat().st_size if cache_path.exists() and entries else 0
    return {
        "tracks_total": len(jobs),
        "tracks_ok": len(entries),
        "tracks_reused": reused,
        "tracks_failed": len(failures),
        "failure_ratio": round(len(failures) / max(1, len(jobs)), 4),
        "failures_by_kind": by_kind,
        "segments": int(sum(rec.n_segments for _, rec in entries)),
        "audio_minutes": round(minutes, 3),
        "cache_bytes": size,
        "bytes_per_audio_minute": round(size / minutes) if minutes else 0,
        "compression": compression.describe(),
        "failures": [
            {"track_id": r.track_id, "audio_path": r.audio_path, "kind": r.kind, "reason": r.reason} for r in failures
        ],
    }


def run(params: Params, args: argparse.Namespace) -> int:
    shard = getattr(args, "shard", None)
    cache_path, report_path = CACHE, REPORT
    if shard:
        k, n = shard
        cache_path = CACHE.with_name(f"{CACHE.stem}.shard-{k}-of-{n}{CACHE.suffix}")
        report_path = REPORT.with_name(f"{REPORT.stem}.shard-{k}-of-{n}{REPORT.suffix}")
    try:
        report = build_mel_cache(params, MANIFEST, cache_path, report_path, shard)
    except MelInputError as exc:
        log.error("%s", exc)
        return 1
    problem = failure_verdict(report, params.mels.max_failure_ratio, report_path)
    if problem:
        log.error("%s", problem)
        return 1
    return 0
