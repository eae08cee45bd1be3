"""What bounds neighbour overlap on the fidelity benchmark: random errors against the teacher's own.

    python benchmarks/fidelity_ceiling.py [--work .bench/fidelity]

Reads the benchmark project's teacher cache and manifest (benchmarks/fidelity.py --work) and scores,
on its held-out songs, with the same neighbour figures as evaluate:
- a "student" whose errors are random: the teacher's track embeddings plus isotropic noise scaled to
  a given median track cosine (the figures a student at that cosine would reach if its errors did
  not care about the directions that tell neighbours apart);
- the teacher itself on part of each song (the mean of the first half of its 10-s segments, and of
  every other segment) against the teacher on the whole song: how far its own neighbours move with
  what it hears;
- how close the neighbours are: the median cosine of each song's 1st, 5th, 6th and 10th nearest
  song by the teacher, and the gap between the 5th and the 6th.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.evaluation.fidelity import neighbour_agreement  # noqa: E402
from pipeline.metrics import cosine_rows, l2_normalize  # noqa: E402


def held_out(work: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """The held-out songs' teacher track embeddings and their segment embeddings."""
    val = {r["track_id"] for r in read_manifest(work / "data" / "manifest.jsonl") if r["split"] == "val"}
    with h5py.File(work / "data" / "teacher.h5", "r") as f:
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in f["tracks/track_id"][:]]
        tracks = f["tracks/embedding"][:].astype(np.float64)
        counts = f["tracks/n_segments"][:]
        segments = f["segments/embedding"][:].astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = [i for i, t in enumerate(ids) if t in val]
    segs = [segments[starts[i]:starts[i] + counts[i]] for i in pick]
    # the cache's track embedding is the normalised mean of its segments (in manifest order)
    whole = l2_normalize(np.stack([s.mean(0) for s in segs]))
    if np.median(cosine_rows(whole, l2_normalize(tracks[pick]))) < 0.999:
        raise SystemExit(f"{work}/data/teacher.h5: segments do not follow the tracks' order")
    return l2_normalize(tracks[pick]), segs


def at_cosine(teacher: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """The teacher plus isotropic noise whose length gives median track cosine `target`."""
    noise = rng.standard_normal(teacher.shape)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    lo, hi = 0.0, 4.0
    for _ in range(60):
        eps = (lo + hi) / 2
        lo, hi = (eps, hi) if np.median(cosine_rows(l2_normalize(teacher + eps * noise), teacher)) > target else (lo, eps)
    return l2_normalize(teacher + lo * noise)


def row(name: str, teacher: np.ndarray, other: np.ndarray) -> dict:
    a = neighbour_agreement(teacher, other)
    out = {"name": name, "median_cosine": round(float(np.median(cosine_rows(other, teacher))), 4),
           "top5_overlap": round(a["top5_overlap"], 4), "top10_overlap": round(a["top10_overlap"], 4),
           "neighbour_spearman": round(a["neighbour_spearman"], 4)}
    print(f"| {name} | {out['median_cosine']:.3f} | {out['top5_overlap']:.3f} | {out['top10_overlap']:.3f} | "
          f"{out['neighbour_spearman']:.3f} |", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "fidelity", help="the benchmark's DVC project")
    args = ap.parse_args(argv)
    teacher, segs = held_out(args.work)
    rng = np.random.default_rng(0)
    print(f"{len(teacher)} held-out songs\n\n| against the teacher on the whole song | median cos | top-5 | top-10 | Spearman |\n"
          "|---|---|---|---|---|")
    for target in (0.959, 0.975, 0.99):
        row(f"random errors at median cosine {target}", teacher, at_cosine(teacher, target, rng))
    row("the teacher on the first half of each song", teacher,
        l2_normalize(np.stack([s[:max(1, len(s) // 2)].mean(0) for s in segs])))
    row("the teacher on every other segment", teacher, l2_normalize(np.stack([s[::2].mean(0) for s in segs])))
    sims = teacher @ teacher.T
    np.fill_diagonal(sims, -2.0)
    ranked = -np.sort(-sims, axis=1)
    first, fifth, sixth, tenth = np.median(ranked[:, [0, 4, 5, 9]], axis=0)
    print(f"\nthe teacher's nearest songs (median over songs): cosine of the 1st {first:.3f}, 5th {fifth:.3f}, "
          f"6th {sixth:.3f}, 10th {tenth:.3f}; 5th - 6th gap {np.median(ranked[:, 4] - ranked[:, 5]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
