"""Sharing teacher embeddings through a DVC remote (a local folder standing in for S3/SSH/...).

Clone A runs the pipeline up to the teacher stage on a tiny profile and `dvc push`es; a fresh
git clone B `dvc pull`s, sees the teacher stage up to date, does not re-run it on `dvc repro`,
and holds byte-identical embeddings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = {
    "mels": {"max_track_minutes": 0.25, "workers": 1},
    "text_queries": {"n_train": 40, "n_val": 10},
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`student-clap` on PATH runs the checkout dvc runs it in (python -m pipeline.cli from the repo root)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "student-clap"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = ""
    return env


@pytest.fixture(scope="module")
def clones(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, env: dict, deep_update) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dvc_remote")
    a, b, remote = base / "A", base / "B", base / "remote"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], repo_root, env).split("\n")
    for rel in files:
        if not rel or rel.startswith((".dvc/cache", ".dvc/tmp")) or not (repo_root / rel).is_file():
            continue
        (a / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / rel, a / rel)
    params = yaml.safe_load((a / "params.yaml").read_text())
    deep_update(params, TINY)
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q", "-b", "main"], a, env)
    _run(dvc + ["remote", "add", "-d", "shared", str(remote)], a, env)
    _run(["git", "add", "-A"], a, env)
    _run(["git", "commit", "-qm", "tiny profile"], a, env)

    out = _run(dvc + ["repro", "teacher"], a, env)
    assert "Running stage 'teacher'" in out, out
    _run(["git", "add", "-A"], a, env)
    _run(["git", "commit", "-qm", "teacher embeddings"], a, env)
    _run(dvc + ["push"], a, env)

    _run(["git", "clone", "-q", str(a), str(b)], base, env)
    _run(dvc + ["pull", "--with-deps", "teacher"], b, env)  # the teacher and everything it depends on
    return a, b


def test_pulled_embeddings_are_byte_identical(clones: tuple[Path, Path]) -> None:
    a, b = clones
    assert (b / "data" / "teacher.h5").is_file()
    assert _sha256(a / "data" / "teacher.h5") == _sha256(b / "data" / "teacher.h5")
    assert _sha256(a / "models" / "teacher" / "model.safetensors") == _sha256(b / "models" / "teacher" / "model.safetensors")


def test_clone_sees_teacher_up_to_date_and_does_not_rerun_it(clones: tuple[Path, Path], env: dict) -> None:
    _, b = clones
    dvc = [sys.executable, "-m", "dvc"]
    status = _run(dvc + ["status", "--with-deps", "teacher"], b, env)
    assert "changed" not in status and "up to date" in status, status
    before = (b / "data" / "teacher.h5").stat().st_mtime_ns
    out = _run(dvc + ["repro", "teacher"], b, env)
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


def _reflink_works(folder: Path) -> bool:
    probe = folder / ".reflink-probe"
    probe.write_bytes(b"x")
    try:
        return subprocess.run(["cp", "--reflink=always", str(probe), str(probe) + "2"], capture_output=True).returncode == 0
    finally:
        probe.unlink(missing_ok=True)
        Path(str(probe) + "2").unlink(missing_ok=True)


def test_large_outputs_are_linked_into_the_dvc_cache_not_copied(clones: tuple[Path, Path], env: dict) -> None:
    a, b = clones
    if _reflink_works(a):
        pytest.skip("reflink filesystem: DVC shares blocks with a copy-on-write clone, which du cannot show")
    for project in (a, b):  # the one that ran the stages and the one that pulled them
        for out in ("data/mels.h5", "data/teacher.h5"):
            work, cached = project / out, _cached(project, out)
            assert os.path.samefile(work, cached), f"{work} is a copy of {cached}"  # same inode (or a symlink)
            assert _md5(cached) == cached.parent.name + cached.name
    # du counts a hard-linked file once (--count-links: once per name): one copy of each output on disk
    def du(*flags: str) -> int:
        return int(subprocess.run(["du", "-sb", *flags, str(a)], capture_output=True, text=True, check=True).stdout.split()[0])

    big = (a / "data/mels.h5").stat().st_size + (a / "data/teacher.h5").stat().st_size
    assert du() <= du("--count-links") - big

    # a stage run outside dvc replaces its linked output instead of writing through the link
    cached = _cached(a, "data/mels.h5")
    _run(["student-clap", "run", "mels"], a, env)
    assert not os.path.samefile(a / "data/mels.h5", cached)
    assert _md5(cached) == cached.parent.name + cached.name  # DVC's copy is intact
    assert _md5(a / "data/mels.h5") == _md5(cached)  # and the rebuild is byte-identical (deterministic)
    status = _run([sys.executable, "-m", "dvc", "status", "mels"], a, env)
    assert "data/mels.h5" not in status, status  # (the metrics file records this run's timings)
