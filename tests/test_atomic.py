"""Write-then-rename: an error leaves the old artefact whole and no temporary behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.atomic import atomic_path, write_json, write_text


def test_error_keeps_old_file_and_removes_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_folder_replaces_folder(tmp_path: Path) -> None:
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.onnx").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.onnx").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_outputs_get_the_umask_permissions_not_a_temp_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.parent.stat().st_mode & 0o777 == 0o755
