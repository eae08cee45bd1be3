"""mels: manifest audio -> teacher (CLAP) and student (EfficientAT) log-mels in data/mels.h5.

Reads params `audio`, `frontend` and `mels` only. Every track is decoded once at audio.sample_rate
(48 kHz, int16 round trip), cut by the one segmentation rule into 10-s windows and turned into the
teacher log-mel; the same int16 waveform resampled to the student rate is cut at the same times
into the student log-mel; the cache keeps each front-end's frames once per track and every segment
reads back exactly as computed here. Workers write one crash-safe part file per finished track (see
pipeline/data/mel_cache.py), so a killed run resumes where it stopped; the parts are merged into the cache
in manifest order at the end.

Bad tracks (missing, unreadable, empty, non-audio, corrupt, and by the one usability rule of
pipeline/data/audio.py too short, silent or all NaN) are reported in models/report/mels.json and
skipped; kept tracks the decoder had to patch (a partial decode, NaN/inf samples) are listed there
as flagged. The stage fails only when no track is usable or when more than
mels.max_failure_ratio of the tracks failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data import mel_cache
from pipeline.data.audio import (
    AudioDecodeError,
    ResampledWindow,
    decode_track,
    map_starts,
    resample_int16,
    segment_length,
    segment_starts,
)
from pipeline.data import decode_notes
from pipeline.hashing import sha256_file
from pipeline.params import Params
from pipeline.paths import MANIFEST
from pipeline.paths import MELS as CACHE

log = logging.getLogger(__name__)

REPORT = Path("models/report/mels.json")
BATCH_SEGMENTS = 16  # segments per front-end span (~85 s of audio): bounded memory for hour-long tracks
LOG_EVERY_SECONDS = 30.0


@dataclass(frozen=True)
class Task:
    manifest_index: int
    track_id: str
    audio_path: str


@dataclass
class Result:
    track_id: str
    ok: bool
    kind: str = ""  # failure kind: missing, empty, non-audio, corrupt, silent, error
    reason: str = ""
    audio_path: str = ""
    n_segments: int = 0
    duration: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # a kept track's decode flags (partial, NaN/inf)


# --------------------------------------------------------------------------- one track


class TrackProcessor:
    """Front-ends and settings for one worker process."""

    def __init__(self, cfg: dict) -> None:
        import torch

        from pipeline.data.frontends import StudentMel, TeacherMel, segment_mels
        from pipeline.params import StudentFrontendParams, TeacherFrontendParams

        torch.set_num_threads(1)  # parallelism comes from the worker processes
        self.torch = torch
        self.cfg = cfg
        params = cfg["params"]
        self.audio = params["audio"]
        self.teacher_p = TeacherFrontendParams(**params["frontend"]["teacher"])
        self.student_p = StudentFrontendParams(**params["frontend"]["student"])
        self.segment_mels = segment_mels
        self.teacher = TeacherMel(self.teacher_p).eval()
        self.student = StudentMel(self.student_p).eval()

    def process(self, task: Task, writer: mel_cache.PartWriter) -> Result:
        t0 = time.monotonic()
        path = Path(task.audio_path)
        sr = int(self.audio["sample_rate"])
        seg_s, hop_s = float(self.audio["segment_seconds"]), float(self.audio["hop_seconds"])
        max_minutes = float(self.cfg["params"]["max_track_minutes"])
        try:
            track = decode_track(path, sr, max_seconds=max_minutes * 60.0 if max_minutes > 0 else None)
        except AudioDecodeError as exc:
            return Result(task.track_id, False, exc.kind, exc.reason, task.audio_path, seconds=time.monotonic() - t0)
        wave = track.wave
        duration = len(wave) / sr
        starts = segment_starts(len(wave), sr, seg_s, hop_s)
        t_rate, s_rate = self.teacher_p.sample_rate, self.student_p.sample_rate
        # The student waveform is resampled from the same int16 samples as the run goes, keeping
        # only what the next batch needs (a 60-minute track never holds a second full copy).
        t_wave = wave if t_rate == sr else resample_int16(wave, sr, t_rate)
        s_window = ResampledWindow(wave, sr, s_rate)
        t_starts, s_starts = map_starts(starts, sr, t_rate), map_starts(starts, sr, s_rate)
        t_len, s_len = segment_length(t_rate, seg_s), segment_length(s_rate, seg_s)
        with self.torch.no_grad():
            for i in range(0, len(starts), BATCH_SEGMENTS):
                sl = slice(i, i + BATCH_SEGMENTS)
                batch = s_starts[sl]
                s_wave, base = s_window.view(min(batch), max(batch) + s_len)
                writer.add_segments(
                    self.segment_mels(self.teacher, t_wave, t_starts[sl], t_len, BATCH_SEGMENTS).astype(np.float16),
                    self.segment_mels(self.student, s_wave, [s - base for s in batch], s_len,
                                      BATCH_SEGMENTS).astype(np.float16),
                    np.asarray(starts[sl], dtype=np.float64) / sr,
                    teacher_starts=t_starts[sl], student_starts=batch,
                )
                if i + BATCH_SEGMENTS < len(starts):
                    s_window.release(min(s_starts[i + BATCH_SEGMENTS:]) - 1)  # keep relative starts > 0
        sha = sha256_file(path)
        writer.commit_track(mel_cache.TrackRecord(task.track_id, len(starts), duration, sha, task.audio_path,
                                              task.manifest_index))
        return Result(task.track_id, True, audio_path=task.audio_path, n_segments=len(starts), duration=duration,
                      seconds=time.monotonic() - t0, notes=track.notes)


def _run_one(proc: TrackProcessor, task: Task, parts_dir: Path, compression: mel_cache.Compression, tag: str) -> Result:
    """Process one track into its own part file; publish it only when the track is complete."""
    writer = mel_cache.PartWriter(parts_dir, proc.cfg["params"], compression, tag=tag,
                              chunk_frames=proc.cfg.get("chunk_frames", mel_cache.DEFAULT_CHUNK_FRAMES))
    try:
        result = proc.process(task, writer)
    except Exception as exc:  # a bug or an exotic file must not stop the other tracks
        log.exception("%s: unexpected error", task.audio_path)
        writer.discard()
        return Result(task.track_id, False, "error", f"{type(exc).__name__}: {exc}", task.audio_path)
    if result.ok:
        # notes first: a kill between the two leaves the track to redo, never a note lost
        decode_notes.save_track_notes(parts_dir, task.track_id, task.audio_path, result.notes)
        writer.publish()
    else:
        writer.discard()
    return result


def _worker(cfg: dict, tasks: Any, results: Any, wid: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    proc = TrackProcessor(cfg)
    compression = mel_cache.Compression(**cfg["compression"])
    parts_dir = Path(cfg["parts_dir"])
    while True:
        task = tasks.get()
        if task is None:
            return
        results.put(("start", wid, task))
        results.put(("done", wid, _run_one(proc, task, parts_dir, compression, f"w{wid}")))


# --------------------------------------------------------------------------- scheduling


class Progress:
    """tqdm bar plus a periodic log line with throughput and ETA (logs survive in CI output)."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="mels", unit="track", dynamic_ncols=True)
        self.total, self.done, self.minutes = total, 0, 0.0
        self.t0 = self.last_log = time.monotonic()

    def update(self, r: Result) -> None:
        self.done += 1
        self.minutes += r.duration / 60.0
        self.bar.update(1)
        self.bar.set_postfix(audio_min=f"{self.minutes:.1f}")
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY_SECONDS or self.done == self.total:
            self.last_log = now
            elapsed = now - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            log.info("mels: %d/%d tracks, %.1f audio-min, %.2f audio-min/s, ETA %s", self.done, self.total,
                     self.minutes, self.minutes / max(elapsed, 1e-9), _hms(eta))

    def close(self) -> None:
        self.bar.close()


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _run_serial(cfg: dict, tasks: list[Task], progress: Progress) -> list[Result]:
    proc = TrackProcessor(cfg)
    compression = mel_cache.Compression(**cfg["compression"])
    out = []
    for task in tasks:
        r = _run_one(proc, task, Path(cfg["parts_dir"]), compression, "w0")
        out.append(r)
        progress.update(r)
    return out


def _reap(procs: dict, current: dict, results: dict, progress: Progress, tasks: list[Task], start: Any,
          task_q: Any) -> None:
    """Handle workers that exited: a crash on a track fails that track and gets a replacement
    worker; workers that die without having taken a track mean the pool cannot start."""
    for wid, p in list(procs.items()):
        if p.is_alive():
            continue
        task = current.pop(wid, None)
        del procs[wid]
        if p.exitcode == 0:
            continue
        if task is None:
            raise RuntimeError(f"a mel worker exited with code {p.exitcode} before taking a track (see its log above)")
        if task.track_id not in results:
            r = Result(task.track_id, False, "corrupt", f"the decoder crashed (worker exit code {p.exitcode})",
                       task.audio_path)
            results[task.track_id] = r
            progress.update(r)
        if len(results) < len(tasks):
            start()
            task_q.put(None)
    if not procs and len(results) < len(tasks):
        raise RuntimeError("all mel workers exited with tracks left to do")


def _run_parallel(cfg: dict, tasks: list[Task], workers: int, progress: Progress) -> list[Result]:
    """Worker processes pull tracks from a queue; a worker that dies (a decoder crash) costs only
    the track it was on, which is reported, and is replaced."""
    ctx = mp.get_context("spawn")  # no fork after torch/h5py are loaded
    task_q, result_q = ctx.Queue(), ctx.Queue()
    for t in tasks:
        task_q.put(t)
    procs: dict[int, Any] = {}
    current: dict[int, Task | None] = {}
    next_id = 0

    def start() -> None:
        nonlocal next_id
        p = ctx.Process(target=_worker, args=(cfg, task_q, result_q, next_id), daemon=True)
        p.start()
        procs[next_id], current[next_id] = p, None
        next_id += 1

    for _ in range(min(workers, len(tasks))):
        start()
    for _ in procs:
        task_q.put(None)
    results: dict[str, Result] = {}
    try:
        while len(results) < len(tasks):
            try:
                kind, wid, payload = result_q.get(timeout=1.0)
            except queue.Empty:
                _reap(procs, current, results, progress, tasks, start, task_q)
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
    return [results[t.track_id] for t in tasks]


# --------------------------------------------------------------------------- stage


def _load_manifest(path: Path) -> list[dict]:
    try:
        from pipeline.data.manifest import read_manifest
    except ImportError:  # pragma: no cover - the manifest module ships with the package
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return read_manifest(path)


def _outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    shard = getattr(args, "shard", None)
    cache = Path(getattr(args, "mels_out", None) or CACHE)
    report = Path(getattr(args, "report_out", None) or REPORT)
    if shard:
        k, n = shard
        cache = cache.with_name(f"{cache.stem}.shard-{k}-of-{n}{cache.suffix}")
        report = report.with_name(f"{report.stem}.shard-{k}-of-{n}{report.suffix}")
    return cache, report


def run(params: Params, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    p = params.mels
    cache_path, report_path = _outputs(args)
    manifest_path = Path(getattr(args, "manifest", None) or MANIFEST)
    try:
        rows = _load_manifest(manifest_path)
    except (OSError, ValueError) as exc:  # ManifestError is a ValueError naming file and line
        log.error("%s", exc)
        return 1
    tasks = [Task(i, str(r["track_id"]), str(r["audio_path"])) for i, r in enumerate(rows)]
    shard = getattr(args, "shard", None)
    if shard:
        k, n = shard
        tasks = [t for t in tasks if t.manifest_index % n == k]
        log.info("shard %d/%d: %d of %d tracks", k, n, len(tasks), len(rows))
    if len({t.track_id for t in tasks}) != len(tasks):
        log.error("%s lists a track id more than once", manifest_path)
        return 1

    cparams = mel_cache.cache_params(params.audio, params.frontend, p.max_track_minutes)
    compression = mel_cache.Compression(p.compression, p.compression_level, True)
    parts_dir = mel_cache.parts_dir_for(cache_path)
    parts_dir.mkdir(parents=True, exist_ok=True)
    stale = mel_cache.clean_temporaries(parts_dir)
    if stale:
        log.info("removed %d half-written part(s) of an interrupted run", stale)

    # Resume: reuse tracks already in a published part or in the previous cache, if the audio is unchanged.
    sources = sorted(parts_dir.glob("*.h5")) + ([cache_path] if cache_path.exists() else [])
    done = mel_cache.completed_tracks(sources, cparams)
    todo, reused = [], 0
    for t in tasks:
        prev = done.get(t.track_id)
        if prev and Path(t.audio_path).is_file() and prev[0] == sha256_file(t.audio_path):
            reused += 1
        else:
            todo.append(t)
    if reused:
        log.info("resuming: %d track(s) already done, %d to compute", reused, len(todo))
    log.info("computing mels of %d track(s) with %d worker(s) into %s", len(todo), max(1, p.workers), cache_path)

    cfg = {"params": cparams, "compression": asdict(compression), "parts_dir": str(parts_dir),
           "chunk_frames": p.chunk_frames}
    progress = Progress(len(todo))
    try:
        if p.workers <= 1 or len(todo) <= 1:
            results = _run_serial(cfg, todo, progress)
        else:
            results = _run_parallel(cfg, todo, p.workers, progress)
    finally:
        progress.close()

    # Merge every finished track, in manifest order, into the cache (atomic rename).
    sources = sorted(parts_dir.glob("*.h5")) + ([cache_path] if cache_path.exists() else [])
    done = mel_cache.completed_tracks(sources, cparams)
    failed = {r.track_id for r in results if not r.ok}
    entries = [(done[t.track_id][1], done[t.track_id][2]) for t in tasks if t.track_id in done and t.track_id not in failed]
    kept = [(t.track_id, t.audio_path) for t in tasks if t.track_id in done and t.track_id not in failed]
    flagged = decode_notes.flagged_tracks(kept, {r.track_id: r.notes for r in results if r.ok},
                                          decode_notes.saved_notes(parts_dir), decode_notes.previous_flags(report_path))
    if entries:
        mel_cache.write_cache(cache_path, cparams, compression, entries, p.chunk_frames)
        shutil.rmtree(parts_dir, ignore_errors=True)
    failures = [r for r in results if not r.ok]
    report = _report(tasks, entries, failures, reused, time.monotonic() - t0, cache_path, compression)
    report["tracks_flagged"], report["flagged"] = len(flagged), flagged
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, report_path)
    for r in failures:
        log.warning("skipped %s (%s): %s", r.track_id, r.kind, r.reason)
    for f in flagged:
        log.warning("kept %s, flagged: %s", f["track_id"], "; ".join(f["notes"]))
    log.info("mels: %d/%d tracks usable, %d segments, %.1f audio-minutes, %d failed; report in %s",
             report["tracks_ok"], len(tasks), report["segments"], report["audio_minutes"], len(failures), report_path)

    if not entries:
        log.error("no usable track: nothing to train on (see %s)", report_path)
        return 1
    ratio = len(failures) / max(1, len(tasks))
    if ratio > p.max_failure_ratio:
        log.error("%.0f%% of the tracks failed, more than mels.max_failure_ratio=%.0f%% (see %s)",
                  100 * ratio, 100 * p.max_failure_ratio, report_path)
        return 1
    return 0


def _report(tasks: list[Task], entries: list, failures: list[Result], reused: int, seconds: float,
            cache_path: Path, compression: mel_cache.Compression) -> dict:
    by_kind: dict[str, int] = {}
    for r in failures:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    minutes = sum(rec.duration for _, rec in entries) / 60.0
    size = cache_path.stat().st_size if cache_path.exists() and entries else 0
    return {
        "tracks_total": len(tasks),
        "tracks_ok": len(entries),
        "tracks_reused": reused,
        "tracks_failed": len(failures),
        "failure_ratio": round(len(failures) / max(1, len(tasks)), 4),
        "failures_by_kind": by_kind,
        "segments": int(sum(rec.n_segments for _, rec in entries)),
        "audio_minutes": round(minutes, 3),
        "seconds": round(seconds, 2),
        "cache_bytes": size,
        "bytes_per_audio_minute": round(size / minutes) if minutes else 0,
        "compression": compression.describe(),
        "failures": [
            {"track_id": r.track_id, "audio_path": r.audio_path, "kind": r.kind, "reason": r.reason} for r in failures
        ],
    }
