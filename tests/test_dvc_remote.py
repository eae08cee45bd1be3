"""Sharing teacher embeddings through a DVC remote (a local folder standing in for S3/SSH/...).

Clone A runs the pipeline up to the teacher stage on a tiny profile and `dvc push`es; a fresh
git clone B `dvc pull`s, sees the teacher stage up to date, does not re-run it on `dvc repro`,
and holds byte-identical embeddings.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


# --------------------------------------------------------------------------- outputs linked, not copied


def _cached(project: Path, out: str) -> Path:
    """The file in .dvc/cache that dvc.lock records for output `out`."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out)
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_large_outputs_are_linked_into_the_dvc_cache_not_copied(clones: tuple[Path, Path], dvc_env: dict, run_cmd) -> None:
    a, b = clones
    for project in (a, b):  # the one that ran the stages and the one that pulled them
        for out in ("data/mels.h5", "data/teacher.h5"):
            work, cached = project / out, _cached(project, out)
            assert os.path.samefile(work, cached), f"{work} is a copy of {cached}"  # same inode (or a symlink)
            assert _md5(cached) == cached.parent.name + cached.name
        # directory outputs too: every file of the teacher folder is its cache entry, not a copy of it
        # (with reflink first in cache.type, DVC 3 leaves the files of a directory output as copies)
        files = [f for f in sorted((project / "models" / "teacher").rglob("*")) if f.is_file()]
        assert files
        for work in files:
            md5 = _md5(work)
            cached = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
            assert os.path.samefile(work, cached), f"{work} is a copy of {cached}"
    # du counts a hard-linked file once (--count-links: once per name): one copy of each output on disk
    def du(*flags: str) -> int:
        return int(subprocess.run(["du", "-sb", *flags, str(a)], capture_output=True, text=True, check=True).stdout.split()[0])

    big = sum((a / out).stat().st_size for out in ("data/mels.h5", "data/teacher.h5", "models/teacher/model.safetensors"))
    assert du() <= du("--count-links") - big

    # a stage run outside dvc replaces its linked output instead of writing through the link
    cached = _cached(a, "data/mels.h5")
    run_cmd(["student-clap", "run", "mels"], a, dvc_env)
    assert not os.path.samefile(a / "data/mels.h5", cached)
    assert _md5(cached) == cached.parent.name + cached.name  # DVC's copy is intact
    assert _md5(a / "data/mels.h5") == _md5(cached)  # and the rebuild is byte-identical (deterministic)
    status = run_cmd([sys.executable, "-m", "dvc", "status", "mels"], a, dvc_env)
    assert "data/mels.h5" not in status, status  # (the metrics file records this run's timings)
