"""Stage fetch_teacher: the real teacher's checkpoint and tokenizer into models/teacher_src/ (DVC-tracked).

With teacher.model.source 'checkpoint' the files are fetched (Hugging Face Hub at the pinned
revision, or the configured mirror URL) and verified against their pinned sha256, so dvc.lock
records their hashes and `dvc push` shares them. With 'demo' nothing is fetched and the stage
needs no network. Reads only teacher.model (sources, pins, trust) and ingest.downloads.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.params import Params
from pipeline.paths import TEACHER_SRC
from pipeline.teacher.model import TeacherError
from pipeline.teacher.fetch import FetchError, fetch_stage, manual_instructions

log = logging.getLogger(__name__)


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.teacher.model
    try:
        fetch_stage(p, params.ingest.downloads, TEACHER_SRC)
    except (FetchError, TeacherError) as exc:
        log.error("%s\n%s", exc, manual_instructions(p))
        return 1
    return 0
