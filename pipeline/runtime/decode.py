"""Decode for inference: int16 mono at the student's rate, as the segment-wise path decodes it.

The mel cache decodes at 48 kHz (the teacher's rate) and the segment-wise `embed` does the same,
then resamples the int16 audio again to the student's 32 kHz. Two ways here:

- `via_rate=48000` (the song path's default): the same two soxr passes and two int16 roundings,
  streamed block by block (each 48-kHz block rounded to int16 and fed straight to the second
  resampler; soxr's stream output does not depend on how its input is cut), so no 48-kHz copy of
  the song is kept. The samples are identical to the segment-wise path's (tests/test_song.py).
- `via_rate=None`: one resampling from the file's own rate (int16 there, as the 48-kHz decode
  rounds). ~15 % cheaper on a 44.1-kHz MP3, identical for a 48-kHz file; from other rates the
  int16 rounding noise falls elsewhere, ~75 dB below the signal, at most ~15 int16 steps on the
  benchmark's MP3 (benchmarks/speed.py prints both per format). Small as that is, a student can
  weigh near-empty mel bands heavily: the test student of tests/test_song.py (random weights,
  BatchNorm set on the demo songs) moved by up to 0.004 in cosine on the demo songs, more than
  the whole song-level network change, so it is not the default (the trained demo student moved
  by at most 0.0002 on them).

Segment times are found at the student's rate by the same segmentation rule; the tail window's
start can differ from the old path's by a sample (rounding between rates), nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.audio import (
    RESAMPLE_QUALITY,
    DecodedTrack,
    DecodeReport,
    check_usable,
    decode_track,
    resample_int16,
    segment_length,
    segment_starts,
    stream_mono,
    to_int16_into,
)


def decode_student_track(path: str | Path, sample_rate: int, *, via_rate: int | None = None,
                         max_seconds: float | None = None) -> DecodedTrack:
    """The file as int16 mono at `sample_rate` (the student's rate), judged by the one usability
    rule and carrying its decode notes (as `mels` and the segment-wise path do). With `via_rate`
    through int16 at that rate (the segment-wise path's samples exactly), else with one resampling
    from the file's own rate. Raises AudioDecodeError for unreadable, corrupt, silent or too-short files."""
    if via_rate and via_rate != sample_rate:
        return _decode_via(Path(path), via_rate, sample_rate, max_seconds)
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
