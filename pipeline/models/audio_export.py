"""The audio student as segment-level ONNX files, each checked against PyTorch.

- audio_student.onnx       waveform [batch, segment_samples] float32 mono at the student sample
                           rate -> embedding [batch, 512] (L2-normalised), embedding_raw [batch, 512]
                           (before normalisation; average these over a track's segments, then
                           normalise, as the teacher cache does). The mel front-end is inside, so
                           callers cannot get its parameters wrong.
- audio_student_mel.onnx   the same network from student log-mels [batch, n_mels, frames].
- audio_student.int8.onnx  dynamic int8 weights of the matrix products (the projection head;
                           convolutions and front-end stay fp32), with its measured cosine to fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.models import onnx_export as onnx_utils

log = logging.getLogger(__name__)

AUDIO_ONNX = "audio_student.onnx"
AUDIO_MEL_ONNX = "audio_student_mel.onnx"
AUDIO_INT8_ONNX = "audio_student.int8.onnx"
INT8_OPS = ("MatMul", "Gemm")
EMBEDDING_OUTPUTS = ("embedding", "embedding_raw")


class WaveformEmbedder(nn.Module):
    """Mel front-end + audio student: waveform segments in, (embedding, embedding_raw) out (with
    nn.Identity() as `frontend`: the audio student on precomputed student log-mels)."""

    def __init__(self, frontend: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.student = student

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.student.embed_raw(self.frontend(waveform))
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


def same_axes(names: list[str], axes: dict[int, str]) -> dict[str, dict[int, str]]:
    """The same dynamic axes for every name in `names` (an export_module dynamic_axes entry)."""
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
) -> dict[str, Any]:
    """Waveform, mel and (optionally) int8 audio ONNX files with their parity figures."""
    student = student.eval()
    frontend = frontend.eval()
    outputs = list(EMBEDDING_OUTPUTS)
    wave_model = WaveformEmbedder(frontend, student).eval()
    example = torch.from_numpy(parity_waveforms(2, segment_samples, sample_rate, seed=1))
    wave_path = onnx_utils.export_module(
        wave_model, (example,), out_dir / AUDIO_ONNX, input_names=["waveform"], output_names=outputs,
        dynamic_axes=same_axes(["waveform", *outputs], {0: "batch"}), opset=opset,
    )
    waves = parity_waveforms(3, segment_samples, sample_rate)
    info: dict[str, Any] = {
        AUDIO_ONNX: onnx_utils.check_parity(wave_model, wave_path, {"waveform": waves}, min_cosine).as_dict()
    }

    with torch.no_grad():
        mels = frontend(torch.from_numpy(waves)).numpy()
    mel_model = WaveformEmbedder(nn.Identity(), student).eval()
    mel_path = onnx_utils.export_module(
        mel_model, (torch.from_numpy(mels[:2]),), out_dir / AUDIO_MEL_ONNX, input_names=["mel"],
        output_names=outputs, dynamic_axes={"mel": {0: "batch", 2: "frames"}, **same_axes(outputs, {0: "batch"})},
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
