"""Stage fetch_teacher: the real teacher's checkpoint and tokenizer into models/teacher_src/ (DVC-tracked);
with teacher.model.source 'demo' nothing is fetched (fetch.json says so). docs/real-teacher.md."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.params import DownloadParams, Params, TeacherModelParams
from pipeline.paths import TEACHER_SRC
from pipeline.teacher.fetch import RECORD_NAME, FetchError, fetch, manual_instructions, write_record
from pipeline.teacher.model import TeacherError

log = logging.getLogger(__name__)


def fetch_stage(p: TeacherModelParams, d: DownloadParams, out_dir: str | Path) -> None:
    """`out_dir` ends up holding the teacher's inputs and fetch.json; raises FetchError or TeacherError."""
    out_dir = Path(out_dir)
    if p.source == "demo":
        log.info("teacher.model.source is 'demo': nothing to fetch")
        write_record(out_dir / RECORD_NAME, [], "demo")
        return
    root = out_dir.resolve()
    for name, value in (("teacher.model.checkpoint", p.checkpoint), ("teacher.model.tokenizer_dir", p.tokenizer_dir)):
        if not Path(value).resolve().is_relative_to(root):
            raise FetchError(f"{name}: {value} is outside {out_dir}/, the folder the fetch_teacher stage tracks; "
                             f"keep the fetched files under it")
    if Path(p.checkpoint).parent.resolve() != root:
        raise FetchError(f"teacher.model.checkpoint: {p.checkpoint} must sit directly in {out_dir}/ (fetch.json goes beside it)")
    from pipeline.teacher.convert import load_roberta_tokenizer

    fetch(p, d, trust=p.trust_unverified)
    load_roberta_tokenizer(p.tokenizer_dir)  # refuses truncated or empty vocabulary files


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.teacher.model
    try:
        fetch_stage(p, params.ingest.downloads, TEACHER_SRC)
    except (FetchError, TeacherError) as exc:
        log.error("%s\n%s", exc, manual_instructions(p))
        return 1
    return 0
