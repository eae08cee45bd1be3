"""Where the stages hand artefacts to each other: the file contract that dvc.yaml's deps and outs name.

Stages import these instead of spelling the paths again, so one edit here (and in dvc.yaml)
moves an artefact. Paths are relative to the project root, where dvc runs every stage.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = Path("data/manifest.jsonl")
LICENSES = Path("data/licenses")
AUDIT = LICENSES / "audit.json"
MELS = Path("data/mels.h5")
TEACHER_CACHE = Path("data/teacher.h5")
AUDIO_STUDENT = Path("models/audio/student.pt")
TEXT_STUDENT = Path("models/text/student.pt")
TEXT_TOKENIZER = Path("models/text/tokenizer.json")
REPORT = Path("models/report")  # evaluate's metrics.json and licences.json, read by export
# fetched inputs (DVC-tracked by the fetch_teacher / fetch_weights stages)
TEACHER_SRC = Path("models/teacher_src")
PRETRAINED = Path("models/pretrained")
