"""export: the students as ONNX files that run anywhere with onnxruntime.

Reads params `audio`, `frontend.student` and `export`. Writes models/export/:

- audio_student.onnx       waveform [batch, segment_samples] float32 mono at the student sample
                           rate -> embedding [batch, 512] (L2-normalised), embedding_raw [batch, 512]
                           (before normalisation; average these over a track's segments, then
                           normalise, as the teacher cache does). The EfficientAT mel front-end is
                           inside, so callers cannot get its parameters wrong.
- audio_student_mel.onnx   the same network from student log-mels [batch, n_mels, frames].
- audio_student.int8.onnx  (export.quantize_int8) dynamic int8 weights of the matrix products
                           (the projection head; convolutions and front-end stay fp32): a smaller
                           file, with its measured cosine to the fp32 model.
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
from pipeline.paths import AUDIO_STUDENT, LICENSES, TEXT_STUDENT, TEXT_TOKENIZER

log = logging.getLogger(__name__)

METRICS = Path("models/report/metrics.json")
LICENCE_REPORT = Path("models/report/licences.json")
EXPORT_DIR = Path("models/export")

AUDIO_ONNX = "audio_student.onnx"
AUDIO_MEL_ONNX = "audio_student_mel.onnx"
AUDIO_INT8_ONNX = "audio_student.int8.onnx"
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
