"""`student-clap teacher fetch`: download the LAION-CLAP checkpoint and the roberta-base tokenizer.

Files land where the teacher_model stage looks for them (teacher.model.checkpoint and
teacher.model.tokenizer_dir). Downloads resume, retry and verify the checkpoint's sha256 when
teacher.model.checkpoint_sha256 is set. Without network the command fails with a message naming
each file and where to place it by hand.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.params import DownloadParams, TeacherModelParams, load_params

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "config.json")


def planned_files(p: TeacherModelParams) -> list[tuple[str, Path, str | None]]:
    """(url, destination, expected sha256 or None) for every file the real teacher needs."""
    base = p.tokenizer_url.rstrip("/")
    files = [(p.checkpoint_url, Path(p.checkpoint), p.checkpoint_sha256 or None)]
    files += [(f"{base}/{name}", Path(p.tokenizer_dir) / name, None) for name in TOKENIZER_FILES]
    return files


def manual_instructions(p: TeacherModelParams) -> str:
    lines = ["Place these files by hand (e.g. copied from a machine with network access):"]
    lines += [f"  {dest}  <-  {url}" for url, dest, _ in planned_files(p)]
    lines.append("then run `dvc repro` (teacher.model.source must be 'checkpoint').")
    return "\n".join(lines)


def fetch(p: TeacherModelParams, d: DownloadParams | None = None, progress: bool = True) -> dict[str, str]:
    """Download every missing file; returns {destination: sha256}. Raises DownloadError."""
    from pipeline.data.download import download

    d = d or DownloadParams()
    digests = {}
    for url, dest, sha in planned_files(p):
        log.info("fetching %s -> %s", url, dest)
        digests[str(dest)] = download(
            url, dest, sha, retries=d.retries, backoff=d.backoff_seconds, timeout=d.timeout_seconds, progress=progress
        )
    return digests


def main(args: argparse.Namespace) -> int:
    from pipeline.data.download import DownloadError
    from pipeline.teacher.model import TeacherError
    from pipeline.teacher.convert import load_roberta_tokenizer

    params = load_params(getattr(args, "params", "params.yaml"))
    p = params.teacher.model
    try:
        digests = fetch(p, params.ingest.downloads)
        load_roberta_tokenizer(p.tokenizer_dir)  # refuses truncated or empty vocabulary files
    except DownloadError as exc:
        log.error("%s\n%s", exc, manual_instructions(p))
        return 1
    except TeacherError as exc:
        log.error("%s\n%s", exc, manual_instructions(p))
        return 1
    checkpoint_sha = digests[str(Path(p.checkpoint))]
    if not p.checkpoint_sha256:
        log.warning(
            "teacher.model.checkpoint_sha256 is empty; the file fetched has sha256 %s - put it into "
            "params.yaml so later runs verify it", checkpoint_sha,
        )
    log.info(
        "teacher files ready: %s and %s/. Set teacher.model.source: checkpoint and run `dvc repro`.",
        p.checkpoint, p.tokenizer_dir,
    )
    return 0
