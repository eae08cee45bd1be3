"""CPU cost of `student-clap index` on a library, built from scratch and then updated.

    python benchmarks/index.py [--songs 8] [--song-seconds 60] [--backbone mn04_as] [--threads 1]

Exports a waveform audio student (random weights; speed does not depend on them) at the real
conventions (48 kHz decode, 32 kHz student, 10-s windows, 5-s hop), writes --songs MP3s, then
runs, each as its own `student-clap index` process on the same --out:
  1. full: the first index of the library;
  2. unchanged: again, nothing changed;
  3. one added: after copying in one more song.
Reported per run: CPU seconds of the process (user + system, from getrusage of the child) and
the reused/embedded/removed counts the command prints; the CPU ratios compare runs of this one
invocation side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.speed import export_student, make_song


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_index(library: Path, out: Path, models: Path, threads: int) -> dict:
    """One `student-clap index` process: its CPU seconds and the counts it reports."""
    before = _child_cpu()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "index", str(library), "--out", str(out), "--models", str(models),
         "--threads", str(threads)],
        capture_output=True, text=True, env=env, check=False,
    )
    cpu = _child_cpu() - before
    if proc.returncode != 0:
        raise SystemExit(f"index failed ({proc.returncode}):\n{proc.stderr}")
    m = re.search(r"(\d+) songs: reused (\d+), embedded (\d+), removed (\d+)", proc.stderr)
    if not m:
        raise SystemExit(f"no summary line in the index output:\n{proc.stderr}")
    songs, reused, embedded, removed = map(int, m.groups())
    return {"cpu_s": round(cpu, 2), "songs": songs, "reused": reused, "embedded": embedded, "removed": removed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=8)
    ap.add_argument("--song-seconds", type=float, default=60.0)
    ap.add_argument("--backbone", default="mn04_as")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        models, library = tmp_dir / "export", tmp_dir / "library"
        models.mkdir()
        library.mkdir()
        song = make_song(tmp_dir / "song.mp3", args.song_seconds)
        export_student(args.backbone, models, song)
        for i in range(args.songs):
            shutil.copy(song, library / f"song{i:03d}.mp3")
        out = tmp_dir / "library.db"
        runs = {"full": run_index(library, out, models, args.threads)}
        runs["unchanged"] = run_index(library, out, models, args.threads)
        shutil.copy(song, library / "added.mp3")
        runs["one added"] = run_index(library, out, models, args.threads)

    full = runs["full"]["cpu_s"]
    print(f"library: {args.songs} x {args.song_seconds:.0f}-s MP3, {args.backbone}, {args.threads} thread(s)")
    print(f"{'run':<10} {'CPU s':>7} {'vs full':>8} {'songs':>6} {'reused':>7} {'embedded':>9} {'removed':>8}")
    for name, r in runs.items():
        print(f"{name:<10} {r['cpu_s']:7.2f} {r['cpu_s'] / full:8.2f} {r['songs']:6d} {r['reused']:7d} "
              f"{r['embedded']:9d} {r['removed']:8d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
