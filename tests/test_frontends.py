"""Teacher (CLAP) and student (EfficientAT) log-mel front-ends against independent references,
and their ONNX exports against torch."""

from __future__ import annotations

import dataclasses
import io

import librosa
import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.data.frontends import StudentMel, TeacherMel, frontend_hash, kaldi_mel_banks, set_export_stft
from pipeline.params import StudentFrontendParams
from repo_params import section


def _build(cls: type) -> TeacherMel | StudentMel:
    """A front-end with the project's params."""
    return cls(section("frontend.teacher" if cls is TeacherMel else "frontend.student"))

torch.set_num_threads(1)


def music_like(n: int, sr: int, seed: int = 0) -> np.ndarray:
    """Tones + noise with a fade, so quiet and loud frames both occur."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 3520 * t) + 0.05 * rng.standard_normal(n)
    return (x * np.linspace(0.0, 1.0, n)).astype(np.float32)


def run(module: torch.nn.Module, wave: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(np.atleast_2d(wave))).numpy()


# --------------------------------------------------------------------------- teacher


def test_teacher_matches_librosa_slaney_log_mel():
    x = music_like(480000, 48000)
    mel = run(TeacherMel(section("frontend.teacher")), x)[0]
    assert mel.shape == (1001, 64)
    ref = librosa.power_to_db(
        librosa.feature.melspectrogram(
            y=x, sr=48000, n_fft=1024, hop_length=480, win_length=1024, window="hann", center=True,
            pad_mode="reflect", power=2.0, n_mels=64, fmin=50.0, fmax=14000.0, htk=False, norm="slaney",
        ),
        ref=1.0, amin=1e-10, top_db=None,
    ).T
    np.testing.assert_allclose(mel, ref, atol=2e-3)


def test_teacher_floor_is_amin():
    mel = run(TeacherMel(section("frontend.teacher")), np.zeros(480000, np.float32))
    np.testing.assert_allclose(mel, -100.0)


# --------------------------------------------------------------------------- student


def kaldi_banks_reference(n_mels: int, n_fft: int, sr: float, f_lo: float, f_hi: float) -> np.ndarray:
    """Triangle by triangle, bin by bin: the Kaldi definition written out plainly."""
    def mel(f: float) -> float:
        return 1127.0 * np.log(1.0 + f / 700.0)

    step = (mel(f_hi) - mel(f_lo)) / (n_mels + 1)
    out = np.zeros((n_mels, n_fft // 2))
    for m in range(n_mels):
        left, centre, right = (mel(f_lo) + (m + i) * step for i in range(3))
        for k in range(n_fft // 2):
            z = mel(k * sr / n_fft)
            if left < z <= centre:
                out[m, k] = (z - left) / (centre - left)
            elif centre < z < right:
                out[m, k] = (right - z) / (right - centre)
    return out


def test_kaldi_mel_banks_match_the_definition():
    ours = kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0)
    ref = kaldi_banks_reference(128, 1024, 32000.0, 0.0, 15000.0)
    assert ours.shape == (128, 512)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # f_max <= 0 counts down from Nyquist, as in Kaldi
    np.testing.assert_allclose(kaldi_mel_banks(64, 1024, 32000, 0.0, -1000.0), kaldi_mel_banks(64, 1024, 32000, 0.0, 15000.0))


def student_reference(x: np.ndarray, p: StudentFrontendParams) -> np.ndarray:
    """numpy: pre-emphasis, centred reflect-padded framing, symmetric Hann in n_fft, |rfft|², Kaldi
    banks with a zero Nyquist column, log(x + 1e-5), (x + 4.5) / 5."""
    y = x[1:].astype(np.float64) - p.preemphasis * x[:-1]
    y = np.pad(y, p.n_fft // 2, mode="reflect")
    n_frames = 1 + (len(y) - p.n_fft) // p.hop_length
    win = np.hanning(p.win_length)  # numpy's hanning is the symmetric one
    left = (p.n_fft - p.win_length) // 2
    full = np.zeros(p.n_fft)
    full[left : left + p.win_length] = win
    idx = np.arange(p.n_fft)[None, :] + p.hop_length * np.arange(n_frames)[:, None]
    power = np.abs(np.fft.rfft(y[idx] * full, axis=1)) ** 2  # [T, 513]
    banks = kaldi_banks_reference(p.n_mels, p.n_fft, p.sample_rate, p.f_min, p.f_max)
    banks = np.concatenate([banks, np.zeros((p.n_mels, 1))], axis=1)
    return (np.log(banks @ power.T + 1e-5) + 4.5) / 5.0


def test_student_matches_numpy_reference():
    p = section("frontend.student")
    x = music_like(320000, 32000, seed=1)
    mel = run(StudentMel(p), x)[0]
    assert mel.shape == (128, 1000)
    np.testing.assert_allclose(mel, student_reference(x, p), atol=2e-4)


def test_student_silence_is_log_floor():
    mel = run(StudentMel(section("frontend.student")), np.zeros(320000, np.float32))
    np.testing.assert_allclose(mel, (np.log(1e-5) + 4.5) / 5.0, atol=1e-6)


# --------------------------------------------------------------------------- both


@pytest.mark.parametrize("cls,n", [(TeacherMel, 480000), (StudentMel, 320000)])
def test_batch_items_are_independent(cls, n):
    m = _build(cls)
    a, b = music_like(n, 48000, 2), music_like(n, 48000, 3)[::-1].copy()
    both = run(m, np.stack([a, b]))
    np.testing.assert_allclose(both[1], run(m, b)[0], atol=1e-4)


@pytest.mark.parametrize("cls,n", [(TeacherMel, 480000), (StudentMel, 320000)])
def test_export_stft_path_equals_fft_path(cls, n):
    m = _build(cls)
    x = music_like(n, 48000, 4)
    fft = run(m, x)
    set_export_stft(m, True)
    conv = run(m, x)
    np.testing.assert_allclose(conv, fft, atol=5e-4)


@pytest.mark.parametrize("cls,n", [(TeacherMel, 480000), (StudentMel, 320000)])
def test_onnx_export_matches_torch(cls, n):
    m = _build(cls).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        m, (torch.zeros(2, n),), buf, dynamo=False, opset_version=17, input_names=["wave"], output_names=["mel"],
        dynamic_axes={"wave": {0: "batch"}, "mel": {0: "batch"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = np.stack([music_like(n, 48000, s) for s in range(3)])  # a batch size not used at export
    out = session.run(None, {"wave": x})[0]
    np.testing.assert_allclose(out, run(m, x), atol=5e-4)


def test_frontend_hash_tracks_every_field():
    base = section("frontend.teacher")
    h = frontend_hash(base)
    assert h == frontend_hash(section("frontend.teacher")) == frontend_hash(dataclasses.asdict(base))
    assert h != frontend_hash(dataclasses.replace(base, f_min=0.0))
    assert frontend_hash(section("frontend.student")) != frontend_hash(dataclasses.replace(section("frontend.student"), preemphasis=0.0))


@pytest.mark.parametrize("cls,sr", [(TeacherMel, 48000), (StudentMel, 32000)])
def test_shared_stft_over_overlapping_segments_equals_one_by_one(cls, sr):
    from pipeline.data.frontends import segment_mels
    from student_clap.audio import cut, int16_to_float, segment_starts, to_int16

    m = _build(cls)
    for seconds in (27.3, 10.0, 4.2):  # hop-grid windows plus an off-grid tail; one window; a short track
        wave = to_int16(music_like(int(seconds * sr), sr, seed=int(seconds)))
        starts = segment_starts(len(wave), sr, 10.0, 5.0)
        direct = run(m, int16_to_float(cut(wave, starts, 10 * sr)))
        with torch.no_grad():
            shared = segment_mels(m, wave, starts, 10 * sr, batch=3)
        assert shared.shape == direct.shape
        np.testing.assert_allclose(shared, direct, atol=1e-5)


@pytest.mark.parametrize("n_fft,hop,win_length,n_bins", [
    (1024, 320, 800, 481),  # the student's block layout: 32 blocks of 32 taps, 25 of them in the window
    (1024, 480, 1024, None),  # the teacher's
    (400, 160, 400, None),  # blocks of 20 (not a power of two)
    (512, 128, 300, 200),  # a short window off the block grid, bins trimmed
    (256, 100, 256, None),  # hop and n_fft share no block >= 8: the conv1d fallback
])
def test_export_stft_matches_torch_stft_for_other_layouts(n_fft, hop, win_length, n_bins):
    from pipeline.data.frontends import _PowerSTFT

    window = np.hanning(win_length + 2)[1:-1]  # no zero end taps
    stft = _PowerSTFT(n_fft, hop, window, n_bins=n_bins)
    rng = np.random.default_rng(n_fft + hop)
    for n in (5 * hop + 1, 7 * hop - 1, 7 * hop, 3 * n_fft + 17):  # frames that end at, near or past the padding
        x = torch.from_numpy(rng.standard_normal((2, n)).astype(np.float32))
        stft.use_conv = False
        ref = stft(x)
        stft.use_conv = True
        out = stft(x)
        assert out.shape == ref.shape == (2, n_bins or n_fft // 2 + 1, 1 + n // hop)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=2e-5 * float(ref.max()))


def test_onnx_export_with_a_dynamic_length_axis():
    m = StudentMel(section("frontend.student")).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        m, (torch.zeros(1, 64000),), buf, dynamo=False, opset_version=17, input_names=["wave"], output_names=["mel"],
        dynamic_axes={"wave": {0: "batch", 1: "samples"}, "mel": {0: "batch", 2: "frames"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for n in (64000, 40321, 97000):  # the traced length, one off the hop grid, a longer one
        x = music_like(n, 32000, seed=n)[None]
        out = session.run(None, {"wave": x})[0]
        assert out.shape == (1, 128, 1 + (n - 1) // 320)
        np.testing.assert_allclose(out, run(m, x), atol=5e-4)
