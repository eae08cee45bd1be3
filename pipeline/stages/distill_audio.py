"""distill_audio stage: train the EfficientAT audio student against the cached teacher embeddings.

Reads params `distillation.audio_enabled` and `distill_audio` only. Inputs: data/mels.h5 (student
and teacher log-mels per 10-s segment), data/teacher.h5 (teacher segment and track embeddings),
data/manifest.jsonl (the artist-disjoint `split`). Outputs under models/audio/: student.pt (best
epoch), metrics.json, plots/ (DVCLive), checkpoints/ (every epoch, latest, best; kept by DVC
between runs so `student-clap run distill_audio --resume` continues).

The training itself (strategies, task, validation figures, calibration) is
`pipeline.training.audio_distillation.train_audio_student`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.params import Params
from pipeline.training.audio_distillation import train_audio_student, write_skipped
from pipeline.training.distributed import relaunch_with_torchrun, under_torchrun

OUT_DIR = Path("models/audio")


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.distill_audio
    out_dir = OUT_DIR
    if not params.distillation.audio_enabled:
        write_skipped(out_dir, "distillation.audio_enabled is false")
        return 0
    if p.nproc > 1 and not under_torchrun():
        argv = ["run", "distill_audio", "--params", getattr(args, "params", "params.yaml")]
        if getattr(args, "resume", False):
            argv.append("--resume")
        return relaunch_with_torchrun(p.nproc, argv)
    train_audio_student(p, out_dir, resume=bool(getattr(args, "resume", False)), teacher_dir=Path(params.teacher.model.dir))
    return 0
