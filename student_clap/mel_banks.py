"""Kaldi mel filter banks in numpy: shared by the torch front-ends (pipeline.data.frontends) and the
torch-free song-level front-end of the runtime (student_clap.logmel)."""

from __future__ import annotations

import numpy as np


def _kaldi_mel(freq: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: float, f_min: float, f_max: float) -> np.ndarray:
    """[n_mels, n_fft // 2] Kaldi triangular mel banks (no VTLN warping), as torchaudio builds them.

    Triangles are equally spaced on the 1127·ln(1 + f/700) scale between f_min and f_max
    (f_max <= 0 counts down from Nyquist), unnormalised, evaluated at the first n_fft/2 FFT bins."""
    nyquist = 0.5 * sample_rate
    if f_max <= 0.0:
        f_max += nyquist
    if not (0.0 <= f_min < nyquist and 0.0 < f_max <= nyquist and f_min < f_max):
        raise ValueError(f"mel range {f_min}-{f_max} Hz does not fit a {sample_rate} Hz signal")
    mel_lo, mel_hi = _kaldi_mel(f_min), _kaldi_mel(f_max)
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    idx = np.arange(n_mels, dtype=np.float64)[:, None]
    left, centre, right = mel_lo + idx * delta, mel_lo + (idx + 1) * delta, mel_lo + (idx + 2) * delta
    mel = _kaldi_mel(np.arange(n_fft // 2) * (sample_rate / n_fft))[None, :]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)

