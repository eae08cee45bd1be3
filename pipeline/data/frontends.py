"""Log-mel front-ends as torch modules that export to ONNX.

- TeacherMel: the CLAP HTSAT front-end (laion_clap's torchlibrosa Spectrogram + LogmelFilterBank):
  48 kHz, periodic Hann, n_fft 1024, hop 480, centre reflect padding, power spectrum, 64 Slaney
  mels 50–14000 Hz, 10·log10(max(x, 1e-10)) (ref 1, no top_db). 480 000 samples -> [1001, 64].
- StudentMel: EfficientAT's AugmentMelSTFT at evaluation: pre-emphasis (x[n+1] - 0.97·x[n]),
  symmetric Hann of 800 samples centred in n_fft 1024, hop 320, centre reflect padding, power,
  128 Kaldi mel bins 0–15000 Hz (plus the zero column for the Nyquist bin), log(x + 1e-5),
  (x + 4.5) / 5. 320 000 samples -> [128, 1000].
For ONNX (opset 17, no deprecated real-valued stft output) the STFT is a two-stage DFT: see _PowerSTFT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.params import StudentFrontendParams, TeacherFrontendParams
from student_clap.mel_banks import kaldi_mel_banks

# Bump when the maths of a front-end changes, so caches built by older code are refused.
FRONTEND_VERSION = 1


def frontend_hash(params_section: Any) -> str:
    """sha256 over the front-end params (a dataclass or mapping) and FRONTEND_VERSION."""
    data = dataclasses.asdict(params_section) if dataclasses.is_dataclass(params_section) else dict(params_section)
    blob = json.dumps({"version": FRONTEND_VERSION, "params": data}, sort_keys=True, default=float)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- STFT


def _used_bins(banks: np.ndarray) -> int:
    """1 + the highest FFT bin any [n_mels, n_bins] filter gives non-zero weight."""
    nonzero = np.flatnonzero(np.any(banks != 0, axis=0))
    return int(nonzero[-1]) + 1 if len(nonzero) else 1


class _PowerSTFT(nn.Module):
    """|STFT|² with centre reflect padding: [B, N] -> [B, n_bins, 1 + N // hop].

    Only the first n_bins frequency bins are kept (default all n_fft // 2 + 1): bins above the
    mel filters' top frequency have zero weight, so skipping them changes nothing but the cost.

    Eager mode uses torch.stft. The export path (ONNX export, or `use_conv`) is a two-stage
    (Cooley–Tukey) DFT written as two batched matmuls, which onnxruntime runs several times faster
    than one conv1d with the full [n_bins, n_fft] windowed-DFT basis: with the taps n = s0 + P·a + b
    over the window's non-zero span and the bins k = k1 + Q·k2 (Q = n_fft / P),

        X[k] · e^{2πi·k·s0/n_fft} = Σ_b e^{-2πi·k·b/n_fft} · Σ_a w[n]·x[n]·e^{-2πi·k1·a/Q},

    and the unit phase on the left vanishes in |X|². Stage 1 (the inner sum, real input) needs only
    k1 <= Q/2, the rest being complex conjugates; stage 2 (one small matrix per k1, twiddles folded
    in) serves k1 and Q - k1 together. Blocks of P samples are framed by reshapes and slices (hop is
    a multiple of P), keeping time innermost so no costly transpose is needed. When hop and n_fft
    share no block size >= 8 the export path falls back to a strided conv1d with the DFT basis."""

    def __init__(self, n_fft: int, hop: int, window: np.ndarray, n_bins: int | None = None) -> None:
        super().__init__()
        self.n_fft, self.hop, self.win_length = n_fft, hop, len(window)
        self.n_bins = n_bins or n_fft // 2 + 1
        self.register_buffer("window", torch.from_numpy(window.astype(np.float32)), persistent=False)
        left = (n_fft - len(window)) // 2  # a short window zero-padded to n_fft, centred (torch.stft's convention)
        full = np.pad(window.astype(np.float64), (left, n_fft - len(window) - left))
        self.use_conv = False  # force the export path in eager mode (tests)
        # the largest divisor P of both n_fft and hop with P² <= n_fft (0 if below 8: not worth factorising)
        g = math.gcd(n_fft, hop)
        block = max(d for d in range(1, g + 1) if g % d == 0 and d * d <= n_fft)
        self.block = block if block >= 8 else 0
        if self.block:
            self._init_factorised(full)
        else:
            k = np.arange(self.n_bins)[:, None]
            n = np.arange(n_fft)[None, :]
            angle = 2.0 * np.pi * k * n / n_fft
            basis = np.concatenate([np.cos(angle) * full, -np.sin(angle) * full])[:, None, :]
            self.register_buffer("dft_basis", torch.from_numpy(basis.astype(np.float32)), persistent=False)

    def _init_factorised(self, full: np.ndarray) -> None:
        n_fft, P = self.n_fft, self.block
        Q = n_fft // P
        nonzero = np.flatnonzero(full)
        lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if len(nonzero) else (0, 1)
        s0 = min(lo, n_fft // 2)  # first tap used (<= n_fft/2 so reflect padding can start there)
        A = -(-(hi - s0) // P)  # blocks of P taps covering the window's support
        s0 = min(s0, n_fft - A * P)  # stay inside the frame; taps outside [lo, hi) have weight 0
        J = Q // 2 + 1  # stage-1 frequencies k1 = 0 .. Q/2
        K2 = -(-self.n_bins // Q)
        self.taps_start, self.n_blocks, self.n_k1, self.n_k2 = s0, A, J, K2
        # the blocks of the last frame reach at most this far past the reflect padding
        self.tail_zeros = max(0, -(-A // (self.hop // P)) * self.hop + s0 - n_fft)
        taps = s0 + P * np.arange(A)[:, None] + np.arange(P)[None, :]  # [A, P]
        self.register_buffer("block_window", torch.from_numpy(full[taps][:, :, None].astype(np.float32)), persistent=False)
        angle = 2.0 * np.pi * np.arange(J)[:, None] * np.arange(A)[None, :] / Q
        stage1 = np.stack([np.cos(angle), -np.sin(angle)], axis=1).reshape(2 * J, A)  # rows (k1, re/im)
        self.register_buffer("stage1", torch.from_numpy(stage1.astype(np.float32)), persistent=False)
        # stage 2, per k1 = j: rows (re/im of X, partner p (k1 = j or Q - j), k2), columns (re/im of Y, b)
        stage2 = np.zeros((J, 2, 2, K2, 2, P))
        for j in range(J):
            for p, k1 in enumerate((j, (Q - j) % Q)):
                conj = 1.0 if p == 0 else -1.0  # Y[Q - j] = conj(Y[j])
                angle = 2.0 * np.pi * (k1 + Q * np.arange(K2))[:, None] * np.arange(P)[None, :] / n_fft
                cos, sin = np.cos(angle), -np.sin(angle)  # e^{-iθ} = cos + i·sin
                stage2[j, 0, p, :, 0], stage2[j, 0, p, :, 1] = cos, -conj * sin
                stage2[j, 1, p, :, 0], stage2[j, 1, p, :, 1] = sin, conj * cos
        self.register_buffer("stage2", torch.from_numpy(stage2.reshape(J, 4 * K2, 2 * P).astype(np.float32)),
                             persistent=False)
        order = []
        for k in range(self.n_bins):  # where bin k sits among the [k1 = j, partner, k2] power rows
            k1, k2 = k % Q, k // Q
            p, j = (0, k1) if k1 < J else (1, Q - k1)
            order.append((j * 2 + p) * K2 + k2)
        self.register_buffer("bin_order", torch.tensor(order, dtype=torch.long), persistent=False)

    def _factorised(self, x: torch.Tensor) -> torch.Tensor:
        P, A, s0 = self.block, self.n_blocks, self.taps_start
        H = self.hop // P  # hop in blocks
        pieces = -(-A // H)
        # Sizes stay tensor arithmetic while tracing, so an export with a dynamic length axis holds.
        n_samples = x.shape[-1]
        n_frames = n_samples // self.hop + 1
        rows = n_frames + (pieces - 1)  # rows of H blocks, enough for every frame's A blocks
        half = self.n_fft // 2
        # torch.stft's reflect padding, started at tap s0 of frame 0; the zeros after it feed only
        # taps of weight 0 or blocks past A.
        xp = F.pad(x.unsqueeze(1), (half - s0, half), mode="reflect")
        if self.tail_zeros:
            xp = F.pad(xp, (0, self.tail_zeros))
        xp = xp[..., : rows * (H * P)]
        g = xp.reshape(-1, rows, H * P).transpose(1, 2).reshape(-1, H, P, rows)  # [B, r, b, row]
        frames = torch.cat([g[:, : min(H, A - q * H), :, q : q + n_frames] for q in range(pieces)], dim=1)
        frames = (frames * self.block_window).reshape(-1, A, P * n_frames)  # [B, a, (b, t)]
        y = torch.matmul(self.stage1, frames).reshape(-1, self.n_k1, 2 * P, n_frames)  # [B, k1, (re/im, b), t]
        z = torch.matmul(self.stage2, y)  # [B, k1, (re/im, partner, k2), t]
        real, imag = z.chunk(2, dim=2)
        power = (real * real + imag * imag).reshape(-1, self.n_k1 * 2 * self.n_k2, n_frames)
        return power.index_select(1, self.bin_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv or torch.onnx.is_in_onnx_export():
            if self.block:
                return self._factorised(x)
            pad = self.n_fft // 2
            x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect")
            spec = F.conv1d(x, self.dft_basis, stride=self.hop)
            real, imag = spec.chunk(2, dim=1)
            return real * real + imag * imag
        spec = torch.stft(x, self.n_fft, hop_length=self.hop, win_length=self.win_length, window=self.window,
                          center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        spec = spec[:, : self.n_bins]
        return spec.real.square() + spec.imag.square()


# --------------------------------------------------------------------------- front-ends


class TeacherMel(nn.Module):
    """Waveform [B, N] at 48 kHz -> CLAP log-mel dB [B, 1 + N // hop, n_mels] (1001 x 64 for 10 s)."""

    def __init__(self, p: TeacherFrontendParams) -> None:
        super().__init__()
        self.params = p
        window = np.hanning(p.n_fft + 1)[:-1]  # periodic Hann, as librosa's get_window('hann')
        # [n_fft // 2 + 1, n_mels] Slaney-scale, Slaney-normalised triangles (what torchlibrosa uses)
        fb = librosa.filters.mel(sr=p.sample_rate, n_fft=p.n_fft, n_mels=p.n_mels, fmin=p.f_min, fmax=p.f_max,
                                 htk=False, norm="slaney").T.astype(np.float32)
        fb = fb[: _used_bins(fb.T)]
        self.stft = _PowerSTFT(p.n_fft, p.hop_length, window, n_bins=len(fb))
        self.register_buffer("mel_fb", torch.from_numpy(np.ascontiguousarray(fb)), persistent=False)
        self.amin = 1e-10
        self.time_axis = 1  # output [B, T, M]
        self.signal_offset = 0  # the STFT sees the waveform as it is

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = self.stft(wave)  # [B, F, T]
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb)  # [B, T, M]
        return 10.0 * torch.log10(torch.clamp(mel, min=self.amin))


class StudentMel(nn.Module):
    """Waveform [B, N] at 32 kHz -> EfficientAT normalised log-mel [B, n_mels, 1 + (N - 1) // hop]."""

    def __init__(self, p: StudentFrontendParams) -> None:
        super().__init__()
        self.params = p
        n = np.arange(p.win_length)
        window = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (p.win_length - 1))  # symmetric Hann
        banks = kaldi_mel_banks(p.n_mels, p.n_fft, p.sample_rate, p.f_min, p.f_max)
        banks = np.pad(banks, ((0, 0), (0, 1)))  # the Nyquist bin gets weight 0, as in EfficientAT
        banks = banks[:, : _used_bins(banks)]
        self.stft = _PowerSTFT(p.n_fft, p.hop_length, window, n_bins=banks.shape[1])
        self.register_buffer("mel_banks", torch.from_numpy(np.ascontiguousarray(banks)), persistent=False)
        self.preemphasis = float(p.preemphasis)
        self.time_axis = 2  # output [B, M, T]
        self.signal_offset = 1  # pre-emphasis makes the STFT input one sample shorter

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # EfficientAT applies this as conv1d with kernel [-a, 1]; the same two-tap filter written as
        # a difference is ~50x faster on CPU (tiny-kernel convs are slow) and exports as Slice/Sub.
        x = wave[:, 1:] - self.preemphasis * wave[:, :-1]  # y[n] = x[n+1] - a·x[n]
        mel = torch.matmul(self.mel_banks, self.stft(x))  # [B, M, T]
        return (torch.log(mel + 1e-5) + 4.5) / 5.0


def set_export_stft(module: nn.Module, enabled: bool = True) -> None:
    """Make every STFT inside `module` use the conv1d (export) path even in eager mode."""
    for m in module.modules():
        if isinstance(m, _PowerSTFT):
            m.use_conv = enabled


# --------------------------------------------------------------------------- overlapping segments


def _take(x: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    return x.narrow(axis, start, stop - start)


def segment_mels(module: nn.Module, wave: np.ndarray, starts: list[int], seg_len: int, batch: int = 8) -> np.ndarray:
    """module(wave[s : s + seg_len]) for every start s, each exactly as if computed on its own.

    Segments overlap by half, so computing them one by one runs every STFT frame twice. Runs of
    segments whose starts are a whole number of STFT hops apart share one STFT over their span;
    only the frames whose window reaches a segment edge (where centre padding makes them differ)
    are recomputed from short excerpts. Other segments (a tail window off the hop grid, a short
    repeat-padded track) are computed directly. `wave` is a 1-D int16 or float32 array."""
    from student_clap.audio import cut, int16_to_float

    def as_float(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(int16_to_float(x) if x.dtype == np.int16 else np.ascontiguousarray(x, np.float32))

    hop, half, ax = module.stft.hop, module.stft.n_fft // 2, module.time_axis
    sig_len = seg_len - module.signal_offset
    n_frames = 1 + sig_len // hop
    head_bad = -(-half // hop)  # frames 0 .. head_bad-1 see the left padding
    tail_bad = (sig_len - half) // hop + 1  # frames tail_bad .. n_frames-1 see the right padding
    head_len = (head_bad + 2) * hop + 2 * half  # long enough that frames < head_bad are exact
    tail_off = max(0, (tail_bad - head_bad - 1) * hop)
    fits = [0 <= s and s + seg_len <= len(wave) for s in starts]

    out: list[np.ndarray] = []
    i = 0
    while i < len(starts):
        j = i + 1
        while (j < len(starts) and j - i < batch and fits[j] and fits[i] and starts[j] > starts[j - 1]
               and (starts[j] - starts[i]) % hop == 0 and starts[j] - starts[j - 1] < seg_len):
            j += 1
        group = starts[i:j]
        if len(group) == 1 or tail_bad <= head_bad:
            out.append(module(as_float(cut(wave, group, seg_len))).numpy())
            i = j
            continue
        span = module(as_float(wave[group[0] : group[-1] + seg_len])[None])[0]
        segs = torch.stack([_take(span, ax - 1, (s - group[0]) // hop, (s - group[0]) // hop + n_frames) for s in group])
        heads = module(as_float(cut(wave, group, head_len)))
        tails = module(as_float(cut(wave, [s + tail_off for s in group], seg_len - tail_off)))
        _take(segs, ax, 0, head_bad).copy_(_take(heads, ax, 0, head_bad))
        k = tail_bad - tail_off // hop
        _take(segs, ax, tail_bad, n_frames).copy_(_take(tails, ax, k, k + n_frames - tail_bad))
        out.append(segs.numpy())
        i = j
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
