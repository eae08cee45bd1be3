"""Running mel track jobs in this process or over a pool of worker processes, with progress and ETA.

A worker that dies (a decoder crash) costs only the track it was on, which is reported as failed,
and is replaced; the other tracks go on.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data import mel_cache
from pipeline.data.mel_extraction import (
    TrackJob,
    TrackProcessor,
    TrackResult,
    extract_to_part,
)

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0


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


def run_jobs(cfg: dict, jobs: list[TrackJob], workers: int, progress: TrackProgress) -> list[TrackResult]:
    """Every job's result, in job order: in this process for one worker or one job, else in a pool."""
    if workers <= 1 or len(jobs) <= 1:
        return run_serial(cfg, jobs, progress)
    return run_parallel(cfg, jobs, workers, progress)


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
