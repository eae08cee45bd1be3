"""Which outputs DVC links into its cache, per `cache.type`: file, directory, persistent directory.

    python benchmarks/cache_links.py [--types reflink,hardlink,symlink hardlink,symlink ...]

For each `cache.type` it makes a throw-away DVC project in a temporary folder (on the filesystem
of $TMPDIR), runs a stage with a file output, a directory output and a persistent directory
output, re-runs the persistent stage with `--force` (it leaves one file unchanged and adds one),
and prints whether each workspace file is the cache's own file (a hard link or a symlink into
.dvc/cache) or a separate copy. Needs `dvc` and `git`; no network.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DVC_YAML = """\
stages:
  make:
    cmd: mkdir -p outdir && head -c 100000 /dev/urandom > outdir/a.bin && head -c 100000 /dev/urandom > one.bin
    outs:
      - outdir
      - one.bin
  keep:
    cmd: mkdir -p pdir && (test -f pdir/kept.bin || head -c 100000 /dev/urandom > pdir/kept.bin) && date +%N > pdir/new
    outs:
      - pdir:
          persist: true
"""


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")


def _state(path: Path) -> str:
    st = path.lstat()
    if path.is_symlink():
        return "linked (symlink)"
    return f"linked ({st.st_nlink} links)" if st.st_nlink > 1 else "copy (1 link)"


def measure(cache_type: str, work: Path) -> dict[str, str]:
    dvc = [sys.executable, "-m", "dvc"]
    work.mkdir()
    _run(["git", "init", "-q"], work)
    _run([*dvc, "init", "-q"], work)
    _run([*dvc, "config", "cache.type", cache_type], work)
    (work / "dvc.yaml").write_text(DVC_YAML)
    _run([*dvc, "repro", "-q"], work)
    first = {"file output": _state(work / "one.bin"), "directory output": _state(work / "outdir" / "a.bin")}
    _run([*dvc, "repro", "-q", "--force", "keep"], work)
    return {**first, "persistent directory, unchanged file after a forced re-run": _state(work / "pdir" / "kept.bin")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+",
                    default=["reflink,hardlink,symlink", "hardlink,reflink,symlink", "hardlink,symlink"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {t: measure(t, Path(tmp) / f"p{i}") for i, t in enumerate(a.types)}
        fs = subprocess.run(["df", "-T", tmp], capture_output=True, text=True).stdout.split("\n")[1:2]
    import dvc

    print(f"dvc {dvc.__version__}; filesystem of the projects: {' '.join(fs[0].split()[:2]) if fs else '?'}")
    cols = list(next(iter(rows.values())))
    print("| `cache.type` | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for t, r in rows.items():
        print(f"| `{t}` | " + " | ".join(r[c] for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
