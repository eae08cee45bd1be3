"""Decode for inference: straight to the student's rate and int16, one resampling pass.

The mel cache decodes at 48 kHz (the teacher's rate) and `embed` used to do the same, then
resample the int16 audio again to the student's 32 kHz: two soxr passes and two int16 roundings.
For inference only the student's rate matters, so here the file is decoded to int16 at its own
rate (no resampling; the decoder's float output rounded as the 48-kHz decode rounds it) and
resampled once to 32 kHz with the same soxr quality.

Tolerance against the old path: from a 48-kHz file the samples are identical. From other rates
they differ by resampler rounding only: on the benchmark's 240-s MP3 ~75 dB below the signal,
at most ~15 int16 steps (benchmarks/speed.py prints both per format; tests/test_song.py holds
every format to >= 60 dB and 64 steps, and the song vectors to the bars stated there).

Segment times are found at the student's rate by the same segmentation rule; the tail window's
start can differ from the old path's by a sample (rounding between rates), nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.audio import (
    DecodedTrack,
    decode_track,
    resample_int16,
    segment_length,
    segment_starts,
)


def decode_student_track(path: str | Path, sample_rate: int, *, max_seconds: float | None = None) -> DecodedTrack:
    """The file as int16 mono at `sample_rate` (the student's rate) with one resampling from its own
    rate, judged by the one usability rule and carrying its decode notes (as `mels` and the
    segment-wise path do). Raises AudioDecodeError for unreadable, corrupt, silent or too-short files."""
    import soundfile as sf

    try:
        source_rate = int(sf.info(str(path)).samplerate)
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):  # let the decoder word the error
        source_rate = sample_rate
    # int16 at the file's own rate first (no resampling: the decoder's float output rounded, as the
    # 48-kHz decode rounds), then one resampling to the student's rate.
    track = decode_track(path, source_rate, max_seconds=max_seconds)
    if source_rate != sample_rate:
        track = DecodedTrack(resample_int16(track.wave, source_rate, sample_rate), sample_rate, track.report)
    return track


def decode_student(path: str | Path, sample_rate: int, *, max_seconds: float | None = None) -> np.ndarray:
    """The waveform of `decode_student_track`."""
    return decode_student_track(path, sample_rate, max_seconds=max_seconds).wave


def window_starts(n_samples: int, sample_rate: int, segment_seconds: float, hop_seconds: float) -> tuple[list[int], int, int]:
    """(start samples by the one segmentation rule, window length, hop) at the student's rate."""
    starts = segment_starts(n_samples, sample_rate, segment_seconds, hop_seconds)
    return starts, segment_length(sample_rate, segment_seconds), segment_length(sample_rate, hop_seconds)
