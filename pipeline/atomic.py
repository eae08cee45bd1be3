"""Write-then-rename: a reader sees the old file or the new one, never half of one.

Every artefact the pipeline writes goes through here, so an interrupted stage leaves no torn
file behind, and outputs get ordinary permissions (the umask's, not a temp file's 0600).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from student_clap.files import atomic_path, temp_path

__all__ = ["atomic_path", "temp_path", "write_json", "write_text"]


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")
