"""export: the students as ONNX files that run anywhere with onnxruntime.

Reads params `audio`, `frontend.student` and `export`, the student checkpoints, and data/mels.h5 +
data/manifest.jsonl for the int8 calibration. Writes models/export/ through a temporary folder that
replaces it only when every ONNX file passed its parity check against PyTorch (a mismatch raises
onnx_export.ParityError and fails the stage). What the folder holds: docs/runtime.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models import onnx_export as onnx_utils
from pipeline.models.audio_export import audio_spec, export_audio
from pipeline.models.skipped import skip_reason
from pipeline.models.song_export import calibration_mels, export_song, song_spec
from pipeline.params import Params
from pipeline.paths import AUDIO_STUDENT, LICENSES, MANIFEST, MELS, REPORT, TEXT_STUDENT, TEXT_TOKENIZER
from student_clap.files import sha256_file
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

TEXT_ONNX = "text_student.onnx"
TOKENIZER = "tokenizer.json"
SPEC = "student_clap.json"
CHECKSUMS = "SHA256SUMS"
SPEC_VERSION = 1
EXPORT_DIR = Path("models/export")
METRICS, LICENCE_REPORT = REPORT / "metrics.json", REPORT / "licences.json"  # for the model card

# Texts for the text parity check: short and long, seen-style and free phrasing.
PARITY_TEXTS = (
    "piano",
    "calm piano",
    "energetic rock with electric guitar and drums",
    "sad acoustic folk ballad with female vocals, slow tempo, recorded live in a small room",
)


def export_text(
    student: nn.Module, tokenizer_path: Path, out_dir: Path, *, opset: int, min_cosine: float
) -> dict[str, Any]:
    """Text ONNX (dynamic batch and length) + tokenizer.json, parity-checked on PARITY_TEXTS."""
    from pipeline.models.text_student import export_text_onnx
    from student_clap.tokenizer import encode, load_tokenizer

    student = student.eval()
    max_length = int(student.config.max_length)
    tok = load_tokenizer(tokenizer_path, vocab_size=student.config.vocab_size)
    path = export_text_onnx(student, out_dir / TEXT_ONNX, opset=opset)
    info: dict[str, Any] = {}
    # a different batch and padded length than the export example, to exercise both dynamic axes
    ids, mask = encode(tok, list(PARITY_TEXTS), max_length)
    info[TEXT_ONNX] = onnx_utils.check_parity(
        student, path, {"input_ids": ids, "attention_mask": mask}, min_cosine
    ).as_dict()
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER)
    info["max_length"] = max_length
    return info


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


def stamp_identity(out_dir: Path, spec: dict[str, Any], teacher: dict[str, Any]) -> str:
    """Compose the model identity of the files in `out_dir` (student_clap.identity), write it into
    every ONNX file's metadata_props and into `spec` (`model_identity`, `teacher`); returns it."""
    import onnx

    from student_clap.identity import METADATA_KEY, TEACHER_METADATA_KEY, compose, teacher_record

    ours = (METADATA_KEY, TEACHER_METADATA_KEY)

    def without_ours(path: Path) -> tuple[Any, dict[str, str]]:
        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props if p.key not in ours}
        onnx.helper.set_model_props(model, props)
        return model, props

    def file_hash(path: Path) -> str:
        # an ONNX file without the identity's own entries: restamping leaves its hash alone
        if path.suffix != ".onnx":
            return sha256_file(path)
        return hashlib.sha256(without_ours(path)[0].SerializeToString()).hexdigest()

    record = teacher_record(teacher)
    identity = compose(out_dir, spec, record, file_hash)
    for path in sorted(out_dir.glob("*.onnx")):
        model, props = without_ours(path)
        props.update({METADATA_KEY: identity, TEACHER_METADATA_KEY: json.dumps(record, sort_keys=True)})
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(path))
    spec["model_identity"] = identity
    spec["teacher"] = record
    return identity


def export_students(params: Params, out_dir: Path) -> Path:
    """Build the whole export folder next to `out_dir`, then put it in its place. On a failed
    parity check the half-built folder is removed and ParityError raised."""
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    try:
        _build(params, tmp_dir)
    except onnx_utils.ParityError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.replace(out_dir)
    log.info("exported to %s: %s", out_dir, ", ".join(sorted(f.name for f in out_dir.iterdir())))
    return out_dir


def _build(params: Params, tmp_dir: Path) -> None:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    spec: dict[str, Any] = {"version": SPEC_VERSION, "embedding_dim": None}
    parity: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    students: dict[str, Any] = {}
    for kind, path, export in (("audio", AUDIO_STUDENT, _export_audio_student),
                               ("text", TEXT_STUDENT, _export_text_student)):
        reason = skip_reason(path)
        if reason:
            skipped[kind] = reason
            log.warning("%s student skipped: %s", kind, reason)
            continue
        spec[kind], info = export(params, tmp_dir)
        parity.update(info)
        blob = torch.load(path, map_location="cpu", weights_only=True)  # its config and metrics, for the model card
        students[kind] = {"config": blob.get("config", {}), "metrics": blob.get("metrics", {})}

    spec["embedding_dim"] = EMBED_DIM
    spec["skipped"] = skipped
    spec["parity"] = parity
    metrics = json.loads(METRICS.read_text(encoding="utf-8")) if METRICS.is_file() else {}
    stamp_identity(tmp_dir, spec, metrics.get("teacher") or {})
    (tmp_dir / SPEC).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    _write_card(params, tmp_dir, spec, metrics, students)
    write_checksums(tmp_dir)


def _export_audio_student(params: Params, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Segment-level and song-level audio files: (audio part of student_clap.json, parity figures)."""
    from pipeline.data.frontends import StudentMel
    from pipeline.models.audio_student import load_audio_student

    p, fe, audio_p = params.export, params.frontend.student, params.audio
    segment_samples = int(round(audio_p.segment_seconds * fe.sample_rate))
    student = load_audio_student(AUDIO_STUDENT)
    info = export_audio(
        student, StudentMel(fe), out_dir, segment_samples=segment_samples, sample_rate=fe.sample_rate,
        opset=p.opset, min_cosine=p.parity_min_cosine, quantize=p.quantize_int8,
    )
    spec = audio_spec(info, sample_rate=fe.sample_rate, segment_seconds=audio_p.segment_seconds,
                      hop_seconds=audio_p.hop_seconds, segment_samples=segment_samples,
                      quantized=p.quantize_int8, decode_sample_rate=audio_p.sample_rate)
    calib, held, held_tracks = (calibration_mels(MELS, MANIFEST, p.int8_calibration_segments)
                                if p.quantize_int8 else (None, None, None))
    info.update(export_song(
        student, StudentMel(fe), out_dir, segment_samples=segment_samples,
        hop_samples=int(round(audio_p.hop_seconds * fe.sample_rate)), sample_rate=fe.sample_rate,
        opset=p.opset, min_cosine=p.parity_min_cosine, quantize=p.quantize_int8,
        calibration_mels=calib, eval_mels=held, eval_tracks=held_tracks,
    ))
    spec["song"] = song_spec(info, p.quantize_int8)
    return spec, info


def _export_text_student(params: Params, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """text_student.onnx and tokenizer.json: (text part of student_clap.json, parity figures)."""
    from pipeline.models.text_student import load_text_student

    info = export_text(load_text_student(TEXT_STUDENT), TEXT_TOKENIZER, out_dir,
                       opset=params.export.opset, min_cosine=params.export.parity_min_cosine)
    return text_spec(info), info


def _write_card(params: Params, out_dir: Path, spec: dict[str, Any], metrics: dict[str, Any],
                students: dict[str, Any]) -> None:
    """README.md (the model card) and licenses/ (the attribution files)."""
    from pipeline.models import model_card

    licence_files = []
    if LICENSES.is_dir():
        (out_dir / "licenses").mkdir()
        for f in sorted(LICENSES.iterdir()):
            if f.is_file():
                shutil.copyfile(f, out_dir / "licenses" / f.name)
                licence_files.append(f"licenses/{f.name}")
    licences = json.loads(LICENCE_REPORT.read_text(encoding="utf-8")) if LICENCE_REPORT.is_file() else {}
    card = model_card.render(
        spec=spec, metrics=metrics, students=students, licences=licences, licence_files=licence_files,
        params={"audio": asdict(params.audio), "frontend.student": asdict(params.frontend.student),
                "export": asdict(params.export)},
        file_sizes={f.name: f.stat().st_size for f in out_dir.glob("*.onnx")},
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def run(params: Params, args: argparse.Namespace) -> int | None:
    try:
        export_students(params, EXPORT_DIR)
    except onnx_utils.ParityError as exc:
        log.error("export failed the ONNX parity check: %s", exc)
        return 1
    return 0
