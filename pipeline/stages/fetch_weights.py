"""Stage fetch_weights: EfficientAT pretrained weights into models/pretrained/ (DVC-tracked) when
distill_audio.pretrained names a file; `fetch.json` records it and its sha256. docs/real-teacher.md, step 5."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.models.weights import RELEASE_ASSETS, WeightsError, fetch_weights
from pipeline.params import Params
from pipeline.paths import PRETRAINED
from student_clap.files import sha256_file

log = logging.getLogger(__name__)


def fetch_stage(model: str, pretrained: str, out_dir: str | Path) -> None:
    """Make `pretrained` present in `out_dir`: the release asset of `model` is fetched when missing,
    any other file must have been placed there by hand."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict = {"model": model, "pretrained": None}
    if pretrained:
        path = Path(pretrained)
        if path.resolve().parent != out_dir.resolve():
            raise WeightsError(f"distill_audio.pretrained: {pretrained} must sit in {out_dir}/, the folder the "
                               "fetch_weights stage tracks")
        if RELEASE_ASSETS.get(model) == path.name:
            fetch_weights(model, out_dir)
        elif not path.is_file():
            raise WeightsError(f"distill_audio.pretrained: {pretrained} not found and it is not the released "
                               f"checkpoint of {model} ({RELEASE_ASSETS.get(model, 'none')}); place it there by hand")
        record.update(pretrained=str(path), sha256=sha256_file(path), size=path.stat().st_size)
    (out_dir / "fetch.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.distill_audio
    try:
        fetch_stage(p.model, p.pretrained, PRETRAINED)
    except Exception as exc:  # WeightsError / DownloadError: one clear line, non-zero exit
        log.error("%s", exc)
        return 1
    return 0
