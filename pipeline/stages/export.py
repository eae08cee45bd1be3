"""export: the students as ONNX files that run anywhere with onnxruntime.

Reads params `audio`, `frontend.student` and `export`, and data/mels.h5 + data/manifest.jsonl for
the int8 calibration. Writes models/export/:

- audio_student.onnx       waveform [batch, segment_samples] float32 mono at the student sample
                           rate -> embedding [batch, 512] (L2-normalised), embedding_raw [batch, 512]
                           (before normalisation; average these over a track's segments, then
                           normalise, as the teacher cache does). The EfficientAT mel front-end is
                           inside, so callers cannot get its parameters wrong.
- audio_student_mel.onnx   the same network from student log-mels [batch, n_mels, frames].
- audio_student.int8.onnx  (export.quantize_int8) dynamic int8 weights of the matrix products
                           (the projection head; convolutions and front-end stay fp32): a smaller
                           file, with its measured cosine to the fp32 model.
- audio_student_frontend.onnx, audio_student_trunk.onnx, audio_student_head.onnx
                           the song-level pieces (pipeline.runtime.song, the default of `embed` and
                           `index`): waveform of any length -> log-mel -> feature map of the blocks
                           before the first squeeze-excitation, run once over consecutive windows;
                           one window's columns of it -> embedding, embedding_raw.
- audio_student_head.int8.onnx  (export.quantize_int8) the head with static int8 pointwise
                           convolutions, calibrated on export.int8_calibration_segments training
                           mels of data/mels.h5; its loss is measured on validation mels.
- text_student.onnx        input_ids, attention_mask int64 [batch, length] -> embedding [batch, 512].
- tokenizer.json           the text student's tokenizer.
- student_clap.json        what `student-clap embed/index/search` need: file names, sample rate,
                           segment and hop, tokenizer max length.
- README.md                the model card; licenses/ the attribution files; SHA256SUMS.

Every ONNX file is checked against PyTorch (cosine >= export.parity_min_cosine per row); the stage
fails on a mismatch. A disabled student is left out and the card says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.models import onnx_export as onnx_utils
from pipeline.hashing import sha256_file
from pipeline.params import Params, as_dict
from pipeline.paths import (
    AUDIO_STUDENT,
    LICENSES,
    MANIFEST,
    MELS,
    TEXT_STUDENT,
    TEXT_TOKENIZER,
)

log = logging.getLogger(__name__)

METRICS = Path("models/report/metrics.json")
LICENCE_REPORT = Path("models/report/licences.json")
EXPORT_DIR = Path("models/export")

AUDIO_ONNX = "audio_student.onnx"
AUDIO_MEL_ONNX = "audio_student_mel.onnx"
AUDIO_INT8_ONNX = "audio_student.int8.onnx"
# song-level inference: front-end, convolutional trunk (shared by overlapping windows), per-window head
AUDIO_FRONTEND_ONNX = "audio_student_frontend.onnx"
AUDIO_TRUNK_ONNX = "audio_student_trunk.onnx"
AUDIO_HEAD_ONNX = "audio_student_head.onnx"
AUDIO_HEAD_INT8_ONNX = "audio_student_head.int8.onnx"
STATIC_INT8_OPS = ("Conv",)
TEXT_ONNX = "text_student.onnx"
TOKENIZER = "tokenizer.json"
SPEC = "student_clap.json"
CHECKSUMS = "SHA256SUMS"
SPEC_VERSION = 1
INT8_OPS = ("MatMul", "Gemm")

# Texts for the text parity check: short and long, seen-style and free phrasing.
PARITY_TEXTS = (
    "piano",
    "calm piano",
    "energetic rock with electric guitar and drums",
    "sad acoustic folk ballad with female vocals, slow tempo, recorded live in a small room",
)


class ExportError(RuntimeError):
    """Something the export needs is missing or inconsistent."""


class WaveformEmbedder(nn.Module):
    """Mel front-end + audio student: waveform segments in, (embedding, embedding_raw) out."""

    def __init__(self, frontend: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.student = student

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.student.embed_raw(self.frontend(waveform))
        return nn.functional.normalize(raw, dim=-1), raw


class MelEmbedder(nn.Module):
    """Audio student on precomputed student log-mels: (embedding, embedding_raw)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.student.embed_raw(mel)
        return nn.functional.normalize(raw, dim=-1), raw


def parity_waveforms(batch: int, length: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Test segments unlike each other: tones, a chirp, noise, near-silence; int16-rounded like
    decoded audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / sample_rate
    rows = []
    for i in range(batch):
        kind = i % 4
        if kind == 0:
            f = rng.uniform(80, 2000)
            x = 0.5 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(2 * np.pi * 2.5 * f * t)
        elif kind == 1:
            x = 0.4 * np.sin(2 * np.pi * (100 + 400 * t) * t)
        elif kind == 2:
            x = 0.3 * rng.standard_normal(length)
        else:
            x = 1e-3 * rng.standard_normal(length)
        rows.append(np.clip(x, -1, 1))
    waves = np.round(np.stack(rows) * 32767) / 32767
    return waves.astype(np.float32)


def _dynamic(names: list[str], axes: dict[int, str]) -> dict[str, dict[int, str]]:
    return {n: dict(axes) for n in names}


def export_audio(
    student: nn.Module,
    frontend: nn.Module,
    out_dir: Path,
    *,
    segment_samples: int,
    sample_rate: int,
    opset: int,
    min_cosine: float,
    quantize: bool,
    parity_batch: int = 3,
) -> dict[str, Any]:
    """Waveform, mel and (optionally) int8 audio ONNX files with their parity figures."""
    student = student.eval()
    frontend = frontend.eval()
    outputs = ["embedding", "embedding_raw"]
    wave_model = WaveformEmbedder(frontend, student).eval()
    example = torch.from_numpy(parity_waveforms(2, segment_samples, sample_rate, seed=1))
    wave_path = onnx_utils.export_module(
        wave_model, (example,), out_dir / AUDIO_ONNX, input_names=["waveform"], output_names=outputs,
        dynamic_axes=_dynamic(["waveform", *outputs], {0: "batch"}), opset=opset,
    )
    waves = parity_waveforms(parity_batch, segment_samples, sample_rate)
    info: dict[str, Any] = {
        AUDIO_ONNX: onnx_utils.check_parity(wave_model, wave_path, {"waveform": waves}, min_cosine).as_dict()
    }

    with torch.no_grad():
        mels = frontend(torch.from_numpy(waves)).numpy()
    mel_model = MelEmbedder(student).eval()
    mel_path = onnx_utils.export_module(
        mel_model, (torch.from_numpy(mels[:2]),), out_dir / AUDIO_MEL_ONNX, input_names=["mel"],
        output_names=outputs, dynamic_axes={"mel": {0: "batch", 2: "frames"}, **_dynamic(outputs, {0: "batch"})},
        opset=opset,
    )
    info[AUDIO_MEL_ONNX] = onnx_utils.check_parity(mel_model, mel_path, {"mel": mels}, min_cosine).as_dict()
    info["mel_shape"] = list(mels.shape[1:])

    if quantize:
        # Only the matrix products (projection head) are quantised: onnxruntime's dynamic int8
        # convolutions (ConvInteger) run the MobileNet 3-4x slower on x86 CPUs than fp32.
        int8_path = onnx_utils.quantize_int8(
            wave_path, out_dir / AUDIO_INT8_ONNX, exclude_prefixes=("/frontend/",), op_types=INT8_OPS
        )
        loss = onnx_utils.quantization_loss(wave_path, int8_path, {"waveform": waves})
        log.info("int8 audio model: cosine to fp32 min %.6f, mean %.6f", loss["cosine_min"], loss["cosine_mean"])
        info[AUDIO_INT8_ONNX] = loss
    return info


# --------------------------------------------------------------------------- song-level export


def trunk_split(encoder: nn.Module) -> int:
    """Index of the first `encoder.features` block that looks at a whole window at once (a
    squeeze-excitation gate averages over every time step). The blocks before it are local
    convolutions, so they can run over a whole song and be cut into windows afterwards."""
    from pipeline.models.efficientat import SqueezeExcite

    for i, block in enumerate(encoder.features):
        if any(isinstance(m, SqueezeExcite) for m in block.modules()):
            return i
    return len(encoder.features)


def time_stride(module: nn.Module) -> int:
    """Product of the time strides of the convolutions in `module`."""
    stride = 1
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            stride *= int(m.stride[1])
    return stride


class SongFrontend(nn.Module):
    """The student front-end (StudentMel) with its mel filterbank applied group by group.

    At 10 s the front-end costs more than the mn04 network (0.31 vs 0.22 GFLOP), and 40 % of it is
    the dense [128 mels x 480 bins] filterbank product, whose rows are narrow triangles. Cut into
    `groups` runs of consecutive mel bands, each group multiplies only the FFT bins its triangles
    cover: with 8 groups 13 % of the dense product's work, the same values (zeros skipped)."""

    def __init__(self, mel: nn.Module, groups: int = 8) -> None:
        super().__init__()
        self.stft, self.preemphasis = mel.stft, mel.preemphasis
        self.time_axis, self.signal_offset, self.params = mel.time_axis, mel.signal_offset, mel.params
        banks = mel.mel_banks.detach().cpu().numpy()
        edges = np.linspace(0, len(banks), groups + 1).round().astype(int)
        self.ranges: list[tuple[int, int]] = []
        for g in range(groups):
            rows = banks[edges[g] : edges[g + 1]]
            cols = np.flatnonzero(np.any(rows != 0, axis=0))
            lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
            self.ranges.append((lo, hi))
            self.register_buffer(f"bank{g}", torch.from_numpy(np.ascontiguousarray(rows[:, lo:hi])), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave[:, 1:] - self.preemphasis * wave[:, :-1]  # as StudentMel
        power = self.stft(x)
        mel = torch.cat([torch.matmul(getattr(self, f"bank{g}"), power[:, lo:hi])
                         for g, (lo, hi) in enumerate(self.ranges)], dim=1)
        return (torch.log(mel + 1e-5) + 4.5) / 5.0


def song_frontend(frontend: nn.Module) -> nn.Module:
    """SongFrontend for the EfficientAT front-end; any other front-end as it is."""
    from pipeline.data.frontends import StudentMel

    return SongFrontend(frontend) if isinstance(frontend, StudentMel) else frontend


class SongTrunk(nn.Module):
    """Log-mel [B, n_mels, T] (any T) -> feature map of the local blocks [B, C, F', T / stride]."""

    def __init__(self, student: nn.Module, split: int) -> None:
        super().__init__()
        self.layers = student.encoder.features[:split]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.layers(mel.unsqueeze(1))


class SongHead(nn.Module):
    """One window's trunk feature map -> (embedding, embedding_raw): the blocks with global gates,
    global average pooling, projection and output offset (AudioStudent.embed_raw from the split on)."""

    def __init__(self, student: nn.Module, split: int) -> None:
        super().__init__()
        self.layers = student.encoder.features[split:]
        self.projection = student.projection
        self.output_bias = student.output_bias

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.projection(self.layers(fmap).mean(dim=(2, 3))) + self.output_bias
        return nn.functional.normalize(raw, dim=-1), raw


def song_geometry(frontend: nn.Module, trunk: nn.Module, segment_samples: int, hop_samples: int) -> dict[str, int]:
    """Feature-map columns of one window and between windows (0: windows cannot share the trunk,
    because the hop is not a whole number of mel frames or of trunk columns)."""
    with torch.no_grad():
        def columns(n: int) -> tuple[int, int]:
            mel = frontend(torch.zeros(1, n))
            return int(mel.shape[-1]), int(trunk(mel).shape[-1])

        frames1, cols1 = columns(segment_samples)
        frames2, cols2 = columns(segment_samples + hop_samples)
    stride = time_stride(trunk)
    hop_frames = frames2 - frames1
    mel_hop = hop_samples / hop_frames if hop_frames else 0
    aligned = (hop_frames > 0 and hop_frames % stride == 0 and float(mel_hop).is_integer()
               and cols2 - cols1 == hop_frames // stride)
    return {"window_columns": cols1, "hop_columns": hop_frames // stride if aligned else 0, "trunk_stride": stride,
            "window_frames": frames1}


def parity_song(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """A test song for the song-level fidelity figures: 2.5-s pieces of the parity waveforms
    (tones, chirp, noise, near-silence) one after another, int16 as decoded audio is."""
    piece = int(2.5 * sample_rate)
    n = int(np.ceil(seconds * sample_rate / piece))
    wave = parity_waveforms(n, piece, sample_rate, seed=seed).reshape(-1)[: int(seconds * sample_rate)]
    return np.round(wave * 32767).astype(np.int16)


def _segment_song_vector(session, wave: np.ndarray, sample_rate: int, segment_seconds: float,
                         hop_seconds: float) -> np.ndarray:
    """Today's path on a wave at the student rate: every window through the waveform model."""
    from pipeline.data.audio import cut, int16_to_float, segment_length, segment_starts

    seg = segment_length(sample_rate, segment_seconds)
    starts = segment_starts(len(wave), sample_rate, segment_seconds, hop_seconds)
    raw = np.concatenate([session.run(["embedding_raw"], {"waveform": int16_to_float(cut(wave, starts[i : i + 8], seg))})[0]
                          for i in range(0, len(starts), 8)])
    vec = raw.astype(np.float64).mean(axis=0)
    return vec / np.linalg.norm(vec)


def _calibration_mels(mels: np.ndarray | None, frontend: nn.Module, segment_samples: int, sample_rate: int) -> np.ndarray:
    if mels is not None and len(mels):
        return np.asarray(mels, dtype=np.float32)
    log.warning("no training mels for the int8 calibration: using synthetic parity waveforms")
    with torch.no_grad():
        return frontend(torch.from_numpy(parity_waveforms(8, segment_samples, sample_rate, seed=2))).numpy()


def export_song(
    student: nn.Module,
    frontend: nn.Module,
    out_dir: Path,
    *,
    segment_samples: int,
    hop_samples: int,
    sample_rate: int,
    opset: int,
    min_cosine: float,
    quantize: bool,
    calibration_mels: np.ndarray | None = None,
    eval_mels: np.ndarray | None = None,
    eval_tracks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Front-end, trunk and head ONNX files for song-level inference (pipeline.runtime.song), each
    parity-checked, and with `quantize` a static int8 head (convolutions
    calibrated on `calibration_mels`, training log-mels [n, n_mels, frames]).

    The int8 variant quantises the head's pointwise convolutions (depthwise, first and last
    convolutions and the trunk stay fp32; see pipeline.models.onnx_export.quantize_static_int8).

    Measured and returned: the song-vector cosine of the song path (fp32 and int8) to the
    segment-wise waveform model (audio_student.onnx, already in `out_dir`) on a synthetic 60-s song,
    and the int8 loss on `eval_mels` (per segment and, with `eval_tracks`, per track mean)."""
    from pipeline.runtime.song import SongEmbedder, SongGeometry

    student, frontend = student.eval(), frontend.eval()
    split = trunk_split(student.encoder)
    trunk, head = SongTrunk(student, split).eval(), SongHead(student, split).eval()
    geometry = song_geometry(frontend, trunk, segment_samples, hop_samples)
    outputs = ["embedding", "embedding_raw"]
    info: dict[str, Any] = {}

    # a length unlike the export example's, to exercise the dynamic length axes
    waves = parity_waveforms(2, segment_samples + hop_samples // 3, sample_rate, seed=3)
    fe_path = onnx_utils.export_module(
        song_frontend(frontend), (torch.from_numpy(parity_waveforms(1, segment_samples, sample_rate, seed=1)),),
        out_dir / AUDIO_FRONTEND_ONNX, input_names=["waveform"], output_names=["mel"],
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "mel": {0: "batch", 2: "frames"}}, opset=opset)
    info[AUDIO_FRONTEND_ONNX] = onnx_utils.check_parity(frontend, fe_path, {"waveform": waves}, min_cosine).as_dict()
    with torch.no_grad():
        mels = frontend(torch.from_numpy(waves)).numpy()
        seg_mels = frontend(torch.from_numpy(parity_waveforms(3, segment_samples, sample_rate))).numpy()
    trunk_path = onnx_utils.export_module(
        trunk, (torch.from_numpy(seg_mels[:1]),), out_dir / AUDIO_TRUNK_ONNX, input_names=["mel"],
        output_names=["fmap"], dynamic_axes={"mel": {0: "batch", 2: "frames"}, "fmap": {0: "batch", 3: "columns"}},
        opset=opset)
    info[AUDIO_TRUNK_ONNX] = onnx_utils.check_parity(trunk, trunk_path, {"mel": mels}, min_cosine).as_dict()
    with torch.no_grad():
        fmaps = trunk(torch.from_numpy(seg_mels)).numpy()
    head_path = onnx_utils.export_module(
        head, (torch.from_numpy(fmaps[:2]),), out_dir / AUDIO_HEAD_ONNX, input_names=["fmap"], output_names=outputs,
        dynamic_axes={"fmap": {0: "batch"}, **_dynamic(outputs, {0: "batch"})}, opset=opset)
    info[AUDIO_HEAD_ONNX] = onnx_utils.check_parity(head, head_path, {"fmap": fmaps}, min_cosine).as_dict()

    # song-level fidelity to the segment-wise waveform model on a synthetic 60-s song
    spec_geometry = SongGeometry(sample_rate, segment_samples / sample_rate, hop_samples / sample_rate,
                                 geometry["window_columns"], geometry["hop_columns"])
    song = parity_song(4 * (segment_samples + hop_samples) / sample_rate, sample_rate)
    reference = _segment_song_vector(onnx_utils.session(out_dir / AUDIO_ONNX), song, sample_rate,
                                     spec_geometry.segment_seconds, spec_geometry.hop_seconds)
    fp32_vec, _ = SongEmbedder(fe_path, trunk_path, head_path, spec_geometry).embed_wave(song)
    fidelity = {"synthetic_song_cosine_fp32": float(fp32_vec @ reference)}

    if quantize:
        calib = _calibration_mels(calibration_mels, frontend, segment_samples, sample_rate)
        batches = [{"mel": calib[i : i + 4]} for i in range(0, len(calib), 4)]
        # The trunk stays fp32: its narrow early convolutions (8-24 channels) lose the most to int8
        # and, at these widths, run no faster in int8 on onnxruntime (benchmarks/speed.py).
        trunk_sess = onnx_utils.session(trunk_path)
        head_batches = [{"fmap": trunk_sess.run(None, b)[0]} for b in batches]
        head8 = onnx_utils.quantize_static_int8(head_path, out_dir / AUDIO_HEAD_INT8_ONNX, head_batches,
                                                STATIC_INT8_OPS, keep_fp32_convs=True)
        int8_vec, _ = SongEmbedder(fe_path, trunk_path, head8, spec_geometry).embed_wave(song)
        fidelity["synthetic_song_cosine_int8"] = float(int8_vec @ reference)
        if eval_mels is not None and len(eval_mels):
            fidelity.update(_int8_loss(trunk_path, head_path, trunk_path, head8, np.asarray(eval_mels, np.float32),
                                       eval_tracks))
        log.info("int8 head: synthetic test song cosine to the segment-wise fp32 path %.6f%s", fidelity["synthetic_song_cosine_int8"],
                 "".join(f", {k} {v:.6f}" for k, v in fidelity.items() if k.startswith(("segment_", "track_"))))
    log.info("song path (fp32): synthetic test song cosine to the segment-wise path %.7f", fidelity["synthetic_song_cosine_fp32"])
    info["song"] = {**geometry, "split_block": split, "fidelity": fidelity}
    return info


def _int8_loss(trunk: Path, head: Path, trunk8: Path, head8: Path, mels: np.ndarray,
               tracks: np.ndarray | None) -> dict[str, float]:
    """Cosine of int8 to fp32 raw embeddings on held-out mels: per segment and per track mean."""
    from pipeline.evaluation.metrics import cosine_rows

    def raw(t: Path, h: Path) -> np.ndarray:
        ts, hs = onnx_utils.session(t), onnx_utils.session(h)
        return np.concatenate([hs.run(["embedding_raw"], {"fmap": ts.run(None, {"mel": mels[i : i + 8]})[0]})[0]
                               for i in range(0, len(mels), 8)]).astype(np.float64)

    ref, got = raw(trunk, head), raw(trunk8, head8)
    seg = cosine_rows(ref, got)
    out = {"segment_cosine_min_int8": float(seg.min()), "segment_cosine_mean_int8": float(seg.mean()),
           "eval_segments": len(mels)}
    if tracks is not None and len(tracks) == len(mels):
        ids = np.unique(tracks)
        ref_t = np.stack([ref[tracks == t].mean(axis=0) for t in ids])
        got_t = np.stack([got[tracks == t].mean(axis=0) for t in ids])
        trk = cosine_rows(ref_t, got_t)
        out.update({"track_cosine_min_int8": float(trk.min()), "track_cosine_mean_int8": float(trk.mean()),
                    "eval_tracks": len(ids)})
    return out


def export_text(
    student: nn.Module, tokenizer_path: Path, out_dir: Path, *, opset: int, min_cosine: float
) -> dict[str, Any]:
    """Text ONNX (dynamic batch and length) + tokenizer.json, parity-checked on PARITY_TEXTS."""
    from pipeline.models.text_tokenizer import encode, load_tokenizer

    student = student.eval()
    max_length = int(student.config.max_length)
    tok = load_tokenizer(tokenizer_path, vocab_size=student.config.vocab_size)
    ids, mask = encode(tok, list(PARITY_TEXTS[:2]), max_length)
    path = onnx_utils.export_module(
        student, (torch.from_numpy(ids), torch.from_numpy(mask)), out_dir / TEXT_ONNX,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                      "embedding": {0: "batch"}},
        opset=opset,
    )
    info: dict[str, Any] = {}
    # a different batch and padded length than the export example, to exercise both dynamic axes
    ids, mask = encode(tok, list(PARITY_TEXTS), max_length)
    info[TEXT_ONNX] = onnx_utils.check_parity(
        student, path, {"input_ids": ids, "attention_mask": mask}, min_cosine
    ).as_dict()
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER)
    info["max_length"] = max_length
    return info


def audio_spec(info: dict[str, Any], *, sample_rate: int, segment_seconds: float, hop_seconds: float,
               segment_samples: int, quantized: bool, decode_sample_rate: int | None = None) -> dict[str, Any]:
    """The audio part of student_clap.json (pops `mel_shape` from `info`).

    `decode_sample_rate` is the rate the mel cache decoded at (audio.sample_rate): segment times
    are found there and the int16 audio resampled to `sample_rate`, as the mels stage does.
    """
    return {
        "decode_sample_rate": decode_sample_rate or sample_rate,
        "file": AUDIO_ONNX,
        "mel_file": AUDIO_MEL_ONNX,
        "int8_file": AUDIO_INT8_ONNX if quantized else None,
        "input": "waveform",
        "outputs": ["embedding", "embedding_raw"],
        "sample_rate": sample_rate,
        "segment_seconds": segment_seconds,
        "hop_seconds": hop_seconds,
        "segment_samples": segment_samples,
        "mel_shape": info.pop("mel_shape"),
        "track_embedding": "l2_normalize(mean(embedding_raw over the track's segments))",
    }


def song_spec(info: dict[str, Any], quantized: bool) -> dict[str, Any]:
    """audio.song of student_clap.json: the song-level files and how windows map onto the trunk's
    feature map (pops `song` from `info`, the output of export_song)."""
    song = info.pop("song")
    return {
        "frontend_file": AUDIO_FRONTEND_ONNX,
        "trunk_file": AUDIO_TRUNK_ONNX,
        "head_file": AUDIO_HEAD_ONNX,
        "trunk_int8_file": AUDIO_TRUNK_ONNX if quantized else None,  # the trunk stays fp32 (see export_song)
        "head_int8_file": AUDIO_HEAD_INT8_ONNX if quantized else None,
        **song,
        "how": "frontend(excerpt of consecutive windows) -> trunk once -> each window's columns "
               "[i * hop_columns, i * hop_columns + window_columns) -> head -> embedding_raw",
    }


def calibration_mels(path: Path, manifest: Path, n: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(calibration mels of training tracks, held-out mels of validation tracks, their track rows),
    up to `n` segments each, spread evenly over the cache; Nones when the cache is missing."""
    from pipeline.data.manifest import read_manifest
    from pipeline.data.mel_cache import MelCache

    if not path.is_file():
        log.warning("%s missing: the int8 models are calibrated on synthetic audio", path)
        return None, None, None
    split = {r["track_id"]: r["split"] for r in read_manifest(manifest)} if manifest.is_file() else {}
    with MelCache(path) as cache:
        tracks = cache.segment_track
        kinds = np.array([split.get(cache.track_ids[t], "train") for t in tracks])

        def pick(kind: str) -> np.ndarray:
            idx = np.flatnonzero(kinds == kind)
            return idx[np.unique(np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int))] if len(idx) else idx

        calib, held = pick("train"), pick("val")
        log.info("int8 calibration on %d training segments, loss measured on %d validation segments",
                 len(calib), len(held))
        return cache.student_mels(calib), cache.student_mels(held), tracks[held]


def text_spec(info: dict[str, Any]) -> dict[str, Any]:
    """The text part of student_clap.json (pops `max_length` from `info`)."""
    return {"file": TEXT_ONNX, "tokenizer": TOKENIZER, "max_length": info.pop("max_length"),
            "inputs": ["input_ids", "attention_mask"], "output": "embedding"}


def write_checksums(out_dir: Path) -> Path:
    """`sha256sum -c`-compatible list of every file in out_dir (except the list itself)."""
    lines = [
        f"{sha256_file(p)}  {p.relative_to(out_dir).as_posix()}"
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    ]
    path = out_dir / CHECKSUMS
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _skip_reason(path: Path) -> str:
    if not path.is_file():
        raise ExportError(f"{path}: student checkpoint missing (run its distill stage first)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and blob.get("skipped"):
        return str(blob.get("reason") or "disabled in params")
    return ""


def _checkpoint_summary(path: Path) -> dict[str, Any]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return {"config": blob.get("config", {}), "metrics": blob.get("metrics", {})}


def run(params: Params, args: argparse.Namespace) -> int | None:
    tmp_dir = EXPORT_DIR.with_name(EXPORT_DIR.name + ".tmp")
    try:
        return _export(params, tmp_dir)
    except onnx_utils.ParityError as exc:
        log.error("export failed the ONNX parity check: %s", exc)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return 1


def _export(params: Params, tmp_dir: Path) -> int:
    from pipeline.evaluation import model_card

    p = params.export
    fe = params.frontend.student
    audio_p = params.audio
    segment_samples = int(round(audio_p.segment_seconds * fe.sample_rate))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    spec: dict[str, Any] = {"version": SPEC_VERSION, "embedding_dim": None}
    parity: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    students: dict[str, Any] = {}

    reason = _skip_reason(AUDIO_STUDENT)
    if reason:
        skipped["audio"] = reason
        log.warning("audio student skipped: %s", reason)
    else:
        from pipeline.data.frontends import StudentMel
        from pipeline.models.audio_student import load_audio_student

        student = load_audio_student(AUDIO_STUDENT)
        info = export_audio(
            student, StudentMel(fe), tmp_dir, segment_samples=segment_samples, sample_rate=fe.sample_rate,
            opset=p.opset, min_cosine=p.parity_min_cosine, quantize=p.quantize_int8,
        )
        spec["audio"] = audio_spec(info, sample_rate=fe.sample_rate, segment_seconds=audio_p.segment_seconds,
                                   hop_seconds=audio_p.hop_seconds, segment_samples=segment_samples,
                                   quantized=p.quantize_int8, decode_sample_rate=audio_p.sample_rate)
        calib, held, held_tracks = (calibration_mels(MELS, MANIFEST, p.int8_calibration_segments)
                                    if p.quantize_int8 else (None, None, None))
        info.update(export_song(
            student, StudentMel(fe), tmp_dir, segment_samples=segment_samples,
            hop_samples=int(round(audio_p.hop_seconds * fe.sample_rate)), sample_rate=fe.sample_rate,
            opset=p.opset, min_cosine=p.parity_min_cosine, quantize=p.quantize_int8,
            calibration_mels=calib, eval_mels=held, eval_tracks=held_tracks,
        ))
        spec["audio"]["song"] = song_spec(info, p.quantize_int8)
        parity.update(info)
        students["audio"] = _checkpoint_summary(AUDIO_STUDENT)

    reason = _skip_reason(TEXT_STUDENT)
    if reason:
        skipped["text"] = reason
        log.warning("text student skipped: %s", reason)
    else:
        from pipeline.models.text_student import load_text_student

        info = export_text(load_text_student(TEXT_STUDENT), TEXT_TOKENIZER, tmp_dir,
                           opset=p.opset, min_cosine=p.parity_min_cosine)
        spec["text"] = text_spec(info)
        parity.update(info)
        students["text"] = _checkpoint_summary(TEXT_STUDENT)

    spec["embedding_dim"] = 512
    spec["skipped"] = skipped
    spec["parity"] = parity
    (tmp_dir / SPEC).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")

    licence_files = []
    if LICENSES.is_dir():
        (tmp_dir / "licenses").mkdir()
        for f in sorted(LICENSES.iterdir()):
            if f.is_file():
                shutil.copyfile(f, tmp_dir / "licenses" / f.name)
                licence_files.append(f"licenses/{f.name}")
    metrics = json.loads(METRICS.read_text(encoding="utf-8")) if METRICS.is_file() else {}
    licences = json.loads(LICENCE_REPORT.read_text(encoding="utf-8")) if LICENCE_REPORT.is_file() else {}
    card = model_card.render(
        spec=spec, metrics=metrics, students=students, licences=licences, licence_files=licence_files,
        params={"audio": as_dict(audio_p), "frontend.student": as_dict(fe), "export": as_dict(p)},
        file_sizes={f.name: f.stat().st_size for f in tmp_dir.glob("*.onnx")},
    )
    (tmp_dir / "README.md").write_text(card, encoding="utf-8")
    write_checksums(tmp_dir)

    shutil.rmtree(EXPORT_DIR, ignore_errors=True)
    tmp_dir.replace(EXPORT_DIR)
    log.info("exported to %s: %s", EXPORT_DIR, ", ".join(sorted(f.name for f in EXPORT_DIR.iterdir())))
    return 0
