"""Sharing teacher embeddings through a DVC remote (a local folder standing in for S3/SSH/...).

Clone A runs the pipeline up to the teacher stage on a tiny profile and `dvc push`es; a fresh
git clone B `dvc pull`s, sees the teacher stage up to date, does not re-run it on `dvc repro`,
and holds byte-identical embeddings.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clones(tmp_path_factory: pytest.TempPathFactory, tiny_repo, dvc_env: dict, run_cmd) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dvc_remote")
    a, b, remote = base / "A", base / "B", base / "remote"
    tiny_repo(a)
    dvc = [sys.executable, "-m", "dvc"]
    run_cmd(dvc + ["remote", "add", "-d", "shared", str(remote)], a, dvc_env)
    run_cmd(["git", "add", "-A"], a, dvc_env)
    run_cmd(["git", "commit", "-qm", "tiny profile"], a, dvc_env)

    out = run_cmd(dvc + ["repro", "teacher"], a, dvc_env)
    assert "Running stage 'teacher'" in out, out
    run_cmd(["git", "add", "-A"], a, dvc_env)
    run_cmd(["git", "commit", "-qm", "teacher embeddings"], a, dvc_env)
    run_cmd(dvc + ["push"], a, dvc_env)

    run_cmd(["git", "clone", "-q", str(a), str(b)], base, dvc_env)
    run_cmd(dvc + ["pull", "--with-deps", "teacher"], b, dvc_env)  # the teacher and everything it depends on
    return a, b


def test_pulled_embeddings_are_byte_identical(clones: tuple[Path, Path]) -> None:
    a, b = clones
    assert (b / "data" / "teacher.h5").is_file()
    assert _sha256(a / "data" / "teacher.h5") == _sha256(b / "data" / "teacher.h5")
    assert _sha256(a / "models" / "teacher" / "model.safetensors") == _sha256(b / "models" / "teacher" / "model.safetensors")


def test_clone_sees_teacher_up_to_date_and_does_not_rerun_it(clones: tuple[Path, Path], dvc_env: dict, run_cmd) -> None:
    _, b = clones
    dvc = [sys.executable, "-m", "dvc"]
    status = run_cmd(dvc + ["status", "--with-deps", "teacher"], b, dvc_env)
    assert "changed" not in status and "up to date" in status, status
    before = (b / "data" / "teacher.h5").stat().st_mtime_ns
    out = run_cmd(dvc + ["repro", "teacher"], b, dvc_env)
    assert "Running stage" not in out, out
    assert (b / "data" / "teacher.h5").stat().st_mtime_ns == before
