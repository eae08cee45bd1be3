"""Decode for inference: int16 mono at the student's rate, the samples the mel cache trained on.

The mel cache decodes at 48 kHz (the teacher's rate), rounds to int16, and resamples the int16
audio again to the student's 32 kHz. The song path does the same two soxr passes and two int16
roundings, streamed block by block (each 48-kHz block rounded to int16 and fed straight to the
second resampler; soxr's stream output does not depend on how its input is cut), so no 48-kHz copy
of the song is kept. The samples are identical to the segment-wise reference's (tests/test_song.py).

One resampling from the file's own rate was measured too (benchmarks/speed.py before this
version): ~15 % less decode CPU on a 44.1-kHz MP3, but not the training samples (int16 rounding
noise ~75 dB down, which moved a test student's song vectors by up to 0.004 in cosine), so it was
dropped.

Segment times are found at the student's rate by the same segmentation rule; the tail window's
start can differ from the mel cache's by a sample (rounding between rates), nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from student_clap.audio import (
    RESAMPLE_QUALITY,
    DecodedTrack,
    DecodeReport,
    check_usable,
    decode_track,
    segment_length,
    segment_starts,
    stream_mono,
    to_int16_into,
)


def decode_student_track(path: str | Path, sample_rate: int, *, via_rate: int | None = None,
                         max_seconds: float | None = None) -> DecodedTrack:
    """The file as int16 mono at `sample_rate` (the student's rate), through int16 at `via_rate`
    (the mel cache's decode rate) when that differs, judged by the one usability rule and carrying
    its decode notes. Raises AudioDecodeError for unreadable, corrupt, silent or too-short files."""
    if via_rate and via_rate != sample_rate:
        return _decode_via(Path(path), via_rate, sample_rate, max_seconds)
    return decode_track(path, sample_rate, max_seconds=max_seconds)


def _decode_via(path: Path, via_rate: int, sample_rate: int, max_seconds: float | None) -> DecodedTrack:
    """resample_int16(decode_int16(path, via_rate), via_rate, sample_rate) plus the usability
    rule, streamed: each block is rounded to int16 at `via_rate` and resampled on at once."""
    import soxr

    report = DecodeReport()
    second = soxr.ResampleStream(via_rate, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    pieces: list[np.ndarray] = []
    at_via = np.empty(0, dtype=np.int16)
    for block in stream_mono(path, via_rate, max_seconds=max_seconds, report=report):
        if len(at_via) != len(block):
            at_via = np.empty(len(block), dtype=np.int16)
        to_int16_into(block, at_via)  # the int16 samples decode_int16 would hold at via_rate
        # int16_to_float(at_via), written back into the block's own buffer: one pass, no temporaries
        np.divide(at_via, np.float32(32767.0), out=block, dtype=np.float32)
        pieces.append(_rounded(second.resample_chunk(block, last=False)))
    pieces.append(_rounded(second.resample_chunk(np.zeros(0, dtype=np.float32), last=True)))
    wave = np.concatenate(pieces)
    check_usable(wave, sample_rate, report, path)
    return DecodedTrack(wave, sample_rate, report)


def _rounded(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x), dtype=np.int16)
    to_int16_into(np.array(x, dtype=np.float32, copy=not x.flags.writeable), out)
    return out


def decode_student(path: str | Path, sample_rate: int, *, via_rate: int | None = None,
                   max_seconds: float | None = None) -> np.ndarray:
    """The waveform of `decode_student_track`."""
    return decode_student_track(path, sample_rate, via_rate=via_rate, max_seconds=max_seconds).wave


def window_starts(n_samples: int, sample_rate: int, segment_seconds: float, hop_seconds: float) -> tuple[list[int], int, int]:
    """(start samples by the one segmentation rule, window length, hop) at the student's rate."""
    starts = segment_starts(n_samples, sample_rate, segment_seconds, hop_seconds)
    return starts, segment_length(sample_rate, segment_seconds), segment_length(sample_rate, hop_seconds)
