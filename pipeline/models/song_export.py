"""The audio student cut for song-level inference (student_clap.song), as ONNX files.

- audio_student_frontend.onnx  waveform of any length -> log-mel;
- audio_student_trunk.onnx     log-mel -> feature map of the blocks before the first
                               squeeze-excitation, run once over consecutive windows;
- audio_student_head.onnx      one window's columns of it -> embedding, embedding_raw;
- audio_student_head.int8.onnx the head with static int8 pointwise convolutions, calibrated on
                               training mels; its loss is measured on validation mels.

Each file is checked against PyTorch, and the song path against the segment-wise waveform model
(audio_export.AUDIO_ONNX) on a synthetic song.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.models import onnx_export as onnx_utils
from pipeline.models.audio_export import AUDIO_ONNX, EMBEDDING_OUTPUTS, parity_waveforms, same_axes
from student_clap.onnxrt import onnx_session

log = logging.getLogger(__name__)

# front-end, convolutional trunk (shared by overlapping windows), per-window head
AUDIO_FRONTEND_ONNX = "audio_student_frontend.onnx"
AUDIO_TRUNK_ONNX = "audio_student_trunk.onnx"
AUDIO_HEAD_ONNX = "audio_student_head.onnx"
AUDIO_HEAD_INT8_ONNX = "audio_student_head.int8.onnx"
STATIC_INT8_OPS = ("Conv",)


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


def segment_song_vector(session, wave: np.ndarray, sample_rate: int, segment_seconds: float,
                         hop_seconds: float) -> np.ndarray:
    """Today's path on a wave at the student rate: every window through the waveform model."""
    from student_clap.audio import cut, int16_to_float, segment_length, segment_starts

    seg = segment_length(sample_rate, segment_seconds)
    starts = segment_starts(len(wave), sample_rate, segment_seconds, hop_seconds)
    raw = np.concatenate([session.run(["embedding_raw"], {"waveform": int16_to_float(cut(wave, starts[i : i + 8], seg))})[0]
                          for i in range(0, len(starts), 8)])
    vec = raw.astype(np.float64).mean(axis=0)
    return vec / np.linalg.norm(vec)


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
    """The files of the module docstring, each parity-checked; the int8 head (with `quantize`) is
    calibrated on `calibration_mels` (training log-mels [n, n_mels, frames]). Measured and returned:
    the song-vector cosine of the song path (fp32 and int8) to the segment-wise audio_student.onnx
    (already in `out_dir`) on a synthetic song, and the int8 loss on `eval_mels` (per segment and,
    with `eval_tracks`, per track mean)."""
    from student_clap.song import SongGeometry

    student, frontend = student.eval(), frontend.eval()
    split = trunk_split(student.encoder)
    trunk, head = SongTrunk(student, split).eval(), SongHead(student, split).eval()
    geometry = song_geometry(frontend, trunk, segment_samples, hop_samples)
    logmel = logmel_spec(frontend)
    info, (fe_path, trunk_path, head_path) = _export_song_pieces(
        frontend, trunk, head, out_dir, segment_samples=segment_samples, hop_samples=hop_samples,
        sample_rate=sample_rate, opset=opset, min_cosine=min_cosine)

    # song-level fidelity to the segment-wise waveform model on a synthetic 60-s song
    spec_geometry = SongGeometry(sample_rate, segment_samples / sample_rate, hop_samples / sample_rate,
                                 geometry["window_columns"], geometry["hop_columns"])
    song = parity_song(4 * (segment_samples + hop_samples) / sample_rate, sample_rate)
    reference = segment_song_vector(onnx_session(out_dir / AUDIO_ONNX, None), song, sample_rate,
                                    spec_geometry.segment_seconds, spec_geometry.hop_seconds)
    fidelity = {"synthetic_song_cosine_fp32": _song_cosine((fe_path, trunk_path, head_path), spec_geometry,
                                                           song, reference, logmel)}
    if quantize:
        if calibration_mels is not None and len(calibration_mels):
            calib = np.asarray(calibration_mels, dtype=np.float32)
        else:
            log.warning("no training mels for the int8 calibration: using synthetic parity waveforms")
            with torch.no_grad():
                calib = frontend(torch.from_numpy(parity_waveforms(8, segment_samples, sample_rate, seed=2))).numpy()
        head8 = _quantize_head(trunk_path, head_path, out_dir / AUDIO_HEAD_INT8_ONNX, calib)
        fidelity["synthetic_song_cosine_int8"] = _song_cosine((fe_path, trunk_path, head8), spec_geometry,
                                                              song, reference, logmel)
        if eval_mels is not None and len(eval_mels):
            fidelity.update(_int8_loss(trunk_path, head_path, trunk_path, head8, np.asarray(eval_mels, np.float32),
                                       eval_tracks))
        log.info("int8 head: synthetic test song cosine to the segment-wise fp32 path %.6f%s", fidelity["synthetic_song_cosine_int8"],
                 "".join(f", {k} {v:.6f}" for k, v in fidelity.items() if k.startswith(("segment_", "track_"))))
    log.info("song path (fp32): synthetic test song cosine to the segment-wise path %.7f", fidelity["synthetic_song_cosine_fp32"])
    info["song"] = {**geometry, "split_block": split, "fidelity": fidelity}
    if logmel:
        info["song"]["frontend"] = logmel
    return info


def logmel_spec(frontend: nn.Module) -> dict[str, Any] | None:
    """audio.song.frontend of student_clap.json: the EfficientAT front-end's parameters, from which
    the runtime computes the same log-mel in numpy (student_clap.logmel); None for another front-end."""
    from pipeline.data.frontends import StudentMel
    from student_clap.logmel import KIND

    if not isinstance(frontend, StudentMel):
        return None
    return {"kind": KIND, **dataclasses.asdict(frontend.params)}


def _export_song_pieces(
    frontend: nn.Module, trunk: nn.Module, head: nn.Module, out_dir: Path, *, segment_samples: int,
    hop_samples: int, sample_rate: int, opset: int, min_cosine: float,
) -> tuple[dict[str, Any], tuple[Path, Path, Path]]:
    """The front-end, trunk and head ONNX files, each parity-checked: (parity figures, their paths)."""
    from pipeline.data.frontends import StudentMel

    outputs = list(EMBEDDING_OUTPUTS)
    info: dict[str, Any] = {}
    # a length unlike the export example's, to exercise the dynamic length axes
    waves = parity_waveforms(2, segment_samples + hop_samples // 3, sample_rate, seed=3)
    fe_path = onnx_utils.export_module(
        # the EfficientAT front-end exports as SongFrontend (the same values, fewer products); any other as it is
        SongFrontend(frontend) if isinstance(frontend, StudentMel) else frontend, (torch.from_numpy(parity_waveforms(1, segment_samples, sample_rate, seed=1)),),
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
        dynamic_axes={"fmap": {0: "batch"}, **same_axes(outputs, {0: "batch"})}, opset=opset)
    info[AUDIO_HEAD_ONNX] = onnx_utils.check_parity(head, head_path, {"fmap": fmaps}, min_cosine).as_dict()
    return info, (fe_path, trunk_path, head_path)


def _song_cosine(paths: tuple[Path, Path, Path], geometry: Any, song: np.ndarray, reference: np.ndarray,
                 logmel: dict[str, Any] | None) -> float:
    """Cosine of the song vector of the (front-end, trunk, head) files to the segment-wise `reference`."""
    from student_clap.song import SongEmbedder

    vec, _ = SongEmbedder(*paths, geometry, logmel=logmel).embed_wave(song)
    return float(vec @ reference)


def _quantize_head(trunk_path: Path, head_path: Path, dst: Path, calib: np.ndarray) -> Path:
    """Static int8 head calibrated on the trunk's feature maps of the `calib` mels."""
    batches = [{"mel": calib[i : i + 4]} for i in range(0, len(calib), 4)]
    # The trunk stays fp32: its narrow early convolutions (8-24 channels) lose the most to int8
    # and, at these widths, run no faster in int8 on onnxruntime (benchmarks/speed.py).
    trunk_sess = onnx_session(trunk_path, None)
    head_batches = [{"fmap": trunk_sess.run(None, b)[0]} for b in batches]
    return onnx_utils.quantize_static_int8(head_path, dst, head_batches, STATIC_INT8_OPS)


def _int8_loss(trunk: Path, head: Path, trunk8: Path, head8: Path, mels: np.ndarray,
               tracks: np.ndarray | None) -> dict[str, float]:
    """Cosine of int8 to fp32 raw embeddings on held-out mels: per segment and per track mean."""
    from pipeline.metrics import cosine_rows

    def raw(t: Path, h: Path) -> np.ndarray:
        ts, hs = onnx_session(t, None), onnx_session(h, None)
        return np.concatenate([hs.run(["embedding_raw"], {"fmap": ts.run(None, {"mel": mels[i : i + 8]})[0]})[0]
                               for i in range(0, len(mels), 8)]).astype(np.float64)

    ref, got = raw(trunk, head), raw(trunk8, head8)
    seg = cosine_rows(ref, got)
    out = {"segment_cosine_min_int8": float(seg.min()), "segment_cosine_mean_int8": float(seg.mean()),
           "eval_segments": len(mels)}
    if tracks is not None and len(tracks) == len(mels):
        ids = np.unique(tracks)
        trk = cosine_rows(*(np.stack([e[tracks == t].mean(axis=0) for t in ids]) for e in (ref, got)))
        out.update({"track_cosine_min_int8": float(trk.min()), "track_cosine_mean_int8": float(trk.mean()),
                    "eval_tracks": len(ids)})
    return out


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
