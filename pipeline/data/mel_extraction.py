"""One track -> teacher (CLAP) and student (EfficientAT) log-mels, written as one crash-safe part file
(published only when the track is complete). What is computed: docs/mel-cache.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data import decode_notes, mel_cache
from student_clap.audio import (
    AudioDecodeError,
    ResampledWindow,
    decode_track,
    map_starts,
    resample_int16,
    segment_length,
    segment_starts,
)
from student_clap.files import sha256_file

log = logging.getLogger(__name__)

BATCH_SEGMENTS = 16  # segments per front-end span (~85 s of audio): bounded memory for hour-long tracks


@dataclass(frozen=True)
class TrackJob:
    """One manifest track to turn into mels; manifest_index keeps the cache in manifest order."""

    manifest_index: int
    track_id: str
    audio_path: str


@dataclass
class TrackResult:
    track_id: str
    ok: bool
    kind: str = ""  # failure kind: missing, empty, non-audio, corrupt, silent, error
    reason: str = ""
    audio_path: str = ""
    n_segments: int = 0
    duration: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # a kept track's decode flags (partial, NaN/inf)


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

    def process(self, job: TrackJob, writer: mel_cache.PartWriter, source: Path | None = None) -> TrackResult:
        """Decode `source` (default: the job's audio_path), recording the track under the job's path."""
        t0 = time.monotonic()
        path = Path(source or job.audio_path)
        sr = int(self.audio["sample_rate"])
        seg_s, hop_s = float(self.audio["segment_seconds"]), float(self.audio["hop_seconds"])
        max_minutes = float(self.cfg["params"]["max_track_minutes"])
        try:
            track = decode_track(path, sr, max_seconds=max_minutes * 60.0 if max_minutes > 0 else None)
        except AudioDecodeError as exc:
            return TrackResult(job.track_id, False, exc.kind, exc.reason, job.audio_path,
                               seconds=time.monotonic() - t0)
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
                # float32 as computed: the writer rounds them to the cache's precision (one rounding)
                writer.add_segments(
                    self.segment_mels(self.teacher, t_wave, t_starts[sl], t_len, BATCH_SEGMENTS),
                    self.segment_mels(self.student, s_wave, [s - base for s in batch], s_len, BATCH_SEGMENTS),
                    np.asarray(starts[sl], dtype=np.float64) / sr,
                    teacher_starts=t_starts[sl], student_starts=batch,
                )
                if i + BATCH_SEGMENTS < len(starts):
                    s_window.release(min(s_starts[i + BATCH_SEGMENTS:]) - 1)  # keep relative starts > 0
        sha = sha256_file(path)
        writer.commit_track(mel_cache.TrackRecord(job.track_id, len(starts), duration, sha, job.audio_path,
                                                  job.manifest_index))
        return TrackResult(job.track_id, True, audio_path=job.audio_path, n_segments=len(starts), duration=duration,
                           seconds=time.monotonic() - t0, notes=track.notes)


def extract_to_part(proc: TrackProcessor, job: TrackJob, parts_dir: Path, compression: mel_cache.Compression,
                    tag: str, source: Path | None = None) -> TrackResult:
    """Process one track into its own part file; publish it only when the track is complete.
    `source`: where to read the audio when it is not at the job's path (a copy on a cluster worker)."""
    writer = mel_cache.PartWriter(parts_dir, proc.cfg["params"], compression, tag=tag,
                                  chunk_frames=proc.cfg.get("chunk_frames", mel_cache.DEFAULT_CHUNK_FRAMES))
    try:
        result = proc.process(job, writer, source)
    except Exception as exc:  # a bug or an exotic file must not stop the other tracks
        log.exception("%s: unexpected error", job.audio_path)
        writer.discard()
        return TrackResult(job.track_id, False, "error", f"{type(exc).__name__}: {exc}", job.audio_path)
    if result.ok:
        # notes first: a kill between the two leaves the track to redo, never a note lost
        decode_notes.save_track_notes(parts_dir, job.track_id, job.audio_path, result.notes)
        writer.publish()
    else:
        writer.discard()
    return result
