"""A disabled student's checkpoint: the marker its distill stage writes in place of the weights.

DVC needs the declared outputs even when `distillation.*_enabled` is false, so the stage writes a
`{"skipped": True, "reason": ...}` file where the student would be; evaluate and export read it
here and leave that student out, saying why.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_path

DEFAULT_REASON = "disabled in params (distillation.*_enabled: false)"


def write_skip_marker(path: Path, reason: str) -> None:
    with atomic_path(path) as tmp:  # replaced, never written through a link into DVC's cache
        torch.save({"skipped": True, "reason": reason}, tmp)


def skip_reason(path: Path) -> str:
    """'' when the checkpoint at `path` holds a trained student; else why its stage skipped it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: student checkpoint missing (run its distill stage first)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and blob.get("skipped"):
        return str(blob.get("reason") or DEFAULT_REASON)
    return ""
