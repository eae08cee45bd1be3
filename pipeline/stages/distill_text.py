"""Stage distill_text: train the ~1M-parameter text student on the teacher's query embeddings.

Reads the params distillation.text_enabled and distill_text, the text sets and track embeddings
of data/teacher.h5 and the train/validation split of data/manifest.jsonl. Writes
models/text/tokenizer.json, models/text/student.pt ({"state_dict", "config", "metrics"}),
models/text/metrics.json, DVCLive plots under models/text/plots and training checkpoints under
models/text/checkpoints.

The training (centred loss, monitor share, calibration) is
`pipeline.training.text_distillation.train_text_student`; the held-out scores it reports (cosine
raw and centred, retrieval agreement, the mean and bag-of-words baselines) are
`pipeline.evaluation.held_out_text`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.params import Params
from pipeline.paths import MANIFEST, TEACHER_CACHE
from pipeline.training.text_distillation import train_text_student, write_skipped

OUT_DIR = Path("models/text")


def run(params: Params, args: argparse.Namespace) -> int | None:
    if not params.distillation.text_enabled:
        write_skipped(OUT_DIR, "disabled in params (distillation.text_enabled: false)")
        return 0
    train_text_student(params.distill_text, TEACHER_CACHE, MANIFEST, OUT_DIR, resume=bool(getattr(args, "resume", False)))
    return 0
