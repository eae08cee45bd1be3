"""The student's log-mel front-end in numpy + scipy.fft, for the song-level path.

Same maths as pipeline.data.frontends.StudentMel (EfficientAT's AugmentMelSTFT at evaluation):
pre-emphasis y[n] = x[n+1] - a·x[n], centre reflect padding of n_fft / 2, a symmetric Hann window
of win_length samples centred in n_fft, power of the bins the mel filters use, Kaldi mel banks,
(log(mel + 1e-5) + 4.5) / 5. The exported ONNX front-end does the STFT as two matmuls (a
factorised DFT), since onnxruntime has no fast FFT; scipy's pocketfft, which transforms many rows
at once with SIMD, does the same work in about 60 % of the CPU time (benchmarks/speed.py prints
both). numpy's own FFT is about three times slower than scipy's, no faster than the ONNX graph, so
scipy is a base dependency of the runtime. The ONNX front-end runs only for an export whose
front-end is not described in student_clap.json (a front-end other than EfficientAT's).

Frames are transformed in chunks of a few hundred, so each chunk's frames, spectra and powers stay
in cache. The mel banks are a sparse matrix (each FFT bin feeds at most two triangles): a dense
product would do ~60 times the work, and numpy would hand it to OpenBLAS, whose threads spin-wait
beside onnxruntime's and, at two threads, double the front-end's CPU time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from student_clap.mel_banks import kaldi_mel_banks

KIND = "efficientat_logmel"  # audio.song.frontend.kind in student_clap.json
CHUNK_FRAMES = 256


class LogMel:
    """float32 waveforms [batch, samples] -> normalised log-mel [batch, n_mels, 1 + (samples - 1) // hop]."""

    def __init__(self, *, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int,
                 preemphasis: float, f_min: float, f_max: float) -> None:
        if not 0 < win_length <= n_fft:
            raise ValueError(f"win_length {win_length} must be in 1..n_fft ({n_fft})")
        self.sample_rate, self.n_fft, self.hop = int(sample_rate), int(n_fft), int(hop_length)
        self.win_length, self.n_mels, self.preemphasis = int(win_length), int(n_mels), float(preemphasis)
        n = np.arange(self.win_length)
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / max(self.win_length - 1, 1))).astype(np.float32)
        self.offset = (self.n_fft - self.win_length) // 2  # the window's first tap inside the n_fft frame
        banks = kaldi_mel_banks(self.n_mels, self.n_fft, self.sample_rate, f_min, f_max)
        used = np.flatnonzero(np.any(banks != 0, axis=0))
        self.n_bins = int(used[-1]) + 1 if len(used) else 1  # bins above the top filter are never read
        import scipy.sparse  # here, not at import: a text search never loads scipy

        self.banks = scipy.sparse.csr_matrix(banks[:, : self.n_bins])  # [n_mels, n_bins]

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> LogMel:
        """From audio.song.frontend of student_clap.json (ValueError for another kind)."""
        if spec.get("kind") != KIND:
            raise ValueError(f"front-end kind {spec.get('kind')!r} is not {KIND!r}")
        keys = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "preemphasis", "f_min", "f_max")
        return cls(**{k: spec[k] for k in keys})

    def frames(self, n_samples: int) -> int:
        return 1 + (n_samples - 1) // self.hop

    def __call__(self, waves: np.ndarray) -> np.ndarray:
        waves = np.atleast_2d(np.asarray(waves, dtype=np.float32))
        out = np.empty((len(waves), self.n_mels, self.frames(waves.shape[1])), dtype=np.float32)
        for wave, mel in zip(waves, out):
            self._one(wave, mel)
        return out

    def _one(self, wave: np.ndarray, mel: np.ndarray) -> None:
        """One waveform -> its log-mel, written into `mel` [n_mels, frames]."""
        y = wave[1:] - np.float32(self.preemphasis) * wave[:-1]
        half = self.n_fft // 2
        if len(y) <= half:
            raise ValueError(f"{len(wave)} samples are too few for reflect padding of {half}")
        padded = np.pad(y, half, mode="reflect")
        # frame t's windowed taps: padded[t·hop + offset : t·hop + offset + win_length] (a strided view)
        taps = np.lib.stride_tricks.sliding_window_view(padded, self.win_length)[self.offset :: self.hop]
        for a in range(0, mel.shape[1], CHUNK_FRAMES):
            b = min(a + CHUNK_FRAMES, mel.shape[1])
            # zero-padding the window's taps to n_fft only changes the phase of each bin, not its power
            spectrum = _rfft(taps[a:b] * self.window, n=self.n_fft, axis=1)[:, : self.n_bins]
            power = np.square(spectrum.real)
            power += np.square(spectrum.imag)
            mel[:, a:b] = self.banks @ power.T
        np.add(mel, np.float32(1e-5), out=mel)
        np.log(mel, out=mel)
        mel += np.float32(4.5)
        mel /= np.float32(5.0)


def _rfft(*args, **kwargs):
    import scipy.fft

    return scipy.fft.rfft(*args, **kwargs)
