"""Stage teacher_model: put the teacher weights into teacher.model.dir: the committed demo teacher
(sha256-checked), a seeded random one (demo_random), or the converted LAION checkpoint (docs/demo.md,
docs/real-teacher.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.params import Params
from pipeline.teacher.model import TeacherError, build_demo_teacher, install_demo_teacher

log = logging.getLogger(__name__)


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.teacher.model
    out_dir = Path(p.dir)
    if p.source == "demo_random":
        log.info("building the seeded random demo teacher into %s", out_dir)
        build_demo_teacher(p, out_dir)
        return 0
    try:
        if p.source == "demo":
            install_demo_teacher(p, out_dir)
        else:
            from pipeline.teacher.convert import convert_checkpoint, tokenizer_files_present

            checkpoint, tokenizer_dir, hub = Path(p.checkpoint), Path(p.tokenizer_dir), p.checkpoint_hub
            missing = []
            if not checkpoint.is_file():
                source = p.checkpoint_url or f"hf://{hub.repo_id}@{hub.revision}/{hub.filename}"
                missing.append(f"  - the LAION-CLAP checkpoint at {checkpoint} (from {source})")
            if not tokenizer_files_present(tokenizer_dir):
                missing.append(f"  - the roberta-base tokenizer in {tokenizer_dir}/ (tokenizer.json, or vocab.json + merges.txt)")
            if missing:
                log.error("teacher.model.source is 'checkpoint' but files are missing:\n%s\nRun `dvc repro fetch_teacher` or "
                          "`student-clap teacher fetch` (needs network), or place the files there by hand.", "\n".join(missing))
                return 1
            convert_checkpoint(checkpoint, tokenizer_dir, out_dir, sha256=p.checkpoint_sha256 or None,
                               trust=p.trust_unverified)
    except TeacherError as exc:
        log.error("%s", exc)
        return 1
    return 0
