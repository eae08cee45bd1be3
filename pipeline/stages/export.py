"""export: the students as ONNX files that run anywhere with onnxruntime.

Reads params `audio`, `frontend.student` and `export`, the student checkpoints, and data/mels.h5 +
data/manifest.jsonl for the int8 calibration. Writes models/export/ (pipeline.models.export_bundle
lists its files): the segment-level audio models (pipeline.models.audio_export), the song-level
pieces (pipeline.models.song_export), the text model and tokenizer, student_clap.json, the model
card, the licences and SHA256SUMS.

Every ONNX file is checked against PyTorch (cosine >= export.parity_min_cosine per row); the stage
fails on a mismatch. A disabled student is left out and the card says so.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.models.export_bundle import ExportInputs, export_students
from pipeline.models.onnx_export import ParityError
from pipeline.params import Params
from pipeline.paths import AUDIO_STUDENT, LICENSES, MANIFEST, MELS, TEXT_STUDENT, TEXT_TOKENIZER

log = logging.getLogger(__name__)

EXPORT_DIR = Path("models/export")
INPUTS = ExportInputs(
    audio_student=AUDIO_STUDENT,
    text_student=TEXT_STUDENT,
    text_tokenizer=TEXT_TOKENIZER,
    mels=MELS,
    manifest=MANIFEST,
    licenses=LICENSES,
    metrics=Path("models/report/metrics.json"),
    licence_report=Path("models/report/licences.json"),
)


def run(params: Params, args: argparse.Namespace) -> int | None:
    try:
        export_students(params, INPUTS, EXPORT_DIR)
    except ParityError as exc:
        log.error("export failed the ONNX parity check: %s", exc)
        return 1
    return 0
