"""`student-clap check`: validate params.yaml and the inputs it names without running a stage, whose
`dvc repro` would first delete its outputs (docs/real-teacher.md, step 7)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.deps import PARAM_INPUTS, stage_input_problems
from pipeline.params import Params, ParamsError, load_params

log = logging.getLogger(__name__)


def input_problems(params: Params) -> list[str]:
    """Missing or unusable inputs, each naming the param and the path."""
    problems: list[str] = []

    def need_file(path: str, name: str) -> None:
        if path and not Path(path).is_file():
            problems.append(f"{name}: {path} not found")

    ing = params.ingest
    if not ing.sources:
        problems.append("ingest.sources: no song source configured")
    for src, sp in ing.sources.items():
        where = f"ingest.sources.{src}"
        for key in ("lists", "metadata"):
            for i, path in enumerate(getattr(sp, key)):
                need_file(path, f"{where}.{key}[{i}]")
        need_file(sp.licenses_file, f"{where}.licenses_file")
        if not sp.audio_root:
            problems.append(f"{where}.audio_root: empty")
        elif Path(sp.audio_root).exists() and not Path(sp.audio_root).is_dir():
            problems.append(f"{where}.audio_root: {sp.audio_root} is not a folder")
        elif not Path(sp.audio_root).is_dir() and not ing.download:
            problems.append(f"{where}.audio_root: {sp.audio_root} does not exist (or set ingest.download: true)")
        else:
            problems += _leaving_symlinks(where, sp.audio_root)
    need_file(params.text_queries.terms, "text_queries.terms")
    if params.distillation.audio_enabled:
        need_file(params.distill_audio.pretrained, "distill_audio.pretrained")
    problems += teacher_problems(params)
    return problems


def _leaving_symlinks(where: str, root: str) -> list[str]:
    """Ingest excludes every song reached through a symlink that points outside its audio root."""
    from pipeline.data.sources.base import symlinks_leaving

    links = symlinks_leaving(root) if Path(root).is_dir() else []
    if not links:
        return []
    shown = "; ".join(f"{link} -> {target}" for link, target in links[:5])
    more = f" and {len(links) - 5} more" if len(links) > 5 else ""
    return [f"{where}.audio_root: {len(links)} symlink(s) point outside {root} ({shown}{more}); ingest excludes "
            "the songs behind them as 'path outside audio root': point audio_root at the folder they lead to, "
            "or copy the files in"]


def teacher_problems(params: Params) -> list[str]:
    """A checkpoint teacher: its file (verified as the stage would), and the tokenizer."""
    p = params.teacher.model
    if p.source != "checkpoint":
        return []
    from pipeline.teacher.model import TeacherError
    from pipeline.teacher.convert import (
        load_roberta_tokenizer,
        tokenizer_files_present,
        verify_checkpoint,
    )

    problems = []
    if not Path(p.checkpoint).is_file():
        problems.append(f"teacher.model.checkpoint: {p.checkpoint} not found (`student-clap teacher fetch`)")
    else:
        try:
            verify_checkpoint(p.checkpoint, p.checkpoint_sha256 or None, p.trust_unverified)
        except TeacherError as exc:
            problems.append(f"teacher.model.checkpoint: {exc}")
    if not tokenizer_files_present(p.tokenizer_dir):
        problems.append(f"teacher.model.tokenizer_dir: no roberta-base tokenizer files in {p.tokenizer_dir}")
    else:
        try:
            load_roberta_tokenizer(p.tokenizer_dir)
        except TeacherError as exc:
            problems.append(f"teacher.model.tokenizer_dir: {exc}")
    return problems


def check(params_path: str | Path) -> list[str]:
    """All problems found (an empty list: ready for `dvc repro`)."""
    try:
        params = load_params(params_path)
    except ParamsError as exc:
        return str(exc).splitlines()
    return input_problems(params) + [line for stage in PARAM_INPUTS for line in stage_input_problems(stage, params_path)]


def main(args: argparse.Namespace) -> int:
    problems = check(args.params)
    for line in problems:
        print(f"problem: {line}")
    if problems:
        print(f"{len(problems)} problem(s) in {args.params} or the inputs it names; nothing was run")
        return 1
    print(f"{args.params}: params and inputs look usable")
    return 0
