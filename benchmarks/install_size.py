"""Disk size of the runtime-only install against the pipeline install (prints a table; not a test).

Builds two fresh virtual environments from this checkout in a temporary folder:
  runtime:  pip install .                                   (embed / index / search, the Python API)
  pipeline: pip install torch==2.13.0 && pip install '.[pipeline]'   (what `dvc repro` needs)
and reports the bytes under each site-packages folder and the number of installed distributions.
Needs the package index (pip's cache makes a rerun quick). Usage: python benchmarks/install_size.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pip(venv: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"pip {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _size(venv: Path) -> int:
    (site,) = venv.glob("lib/python*/site-packages")
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(REPO / name, src / name)
        for package in ("pipeline", "student_clap"):
            shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        rows = []
        for label, steps in (("runtime (pip install .)", [[str(src)]]),
                             ("pipeline (torch==2.13.0, then '.[pipeline]')", [["torch==2.13.0"], [f"{src}[pipeline]"]])):
            venv = Path(tmp) / label.split()[0]
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            for step in steps:
                _pip(venv, "install", "-q", *step)
            packages = json.loads(_pip(venv, "list", "--format=json"))
            has = sorted(n for n in ("torch", "transformers", "dvc", "h5py", "librosa")
                         if n in {p["name"].lower() for p in packages})
            rows.append((label, _size(venv), len(packages), has))
        print(f"{'install':48s} {'site-packages':>14s} {'packages':>9s}  pipeline-only packages")
        for label, size, count, has in rows:
            print(f"{label:48s} {size / 2**20:11.0f} MiB {count:9d}  {', '.join(has) or '-'}")
        print(f"ratio: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
