"""Search at library size: build time, file size, peak RSS, cold-process latency and recall@10.

For each size, a library index (SQLite, as `student-clap index` writes it) is filled with synthetic
clustered unit vectors (songs are not decoded: this measures the index and the query path), the
approximate index is built when the size reaches student_clap.ann.ANN_MIN_SONGS, and then
`student-clap search "calm piano"` runs in a fresh Python process per repeat, through the real
runtime path: the text student of a tiny export (built here with torch, as the tests build it),
the model check, and the exact or approximate search. Recall@10 compares the approximate search's
top 10 (as the command returns them) with the exact top 10 over the stored vectors.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/library.py --sizes 10000,100000,1000000

Figures: build (SQLite bulk load, then approximate index), files (database + .usearch), per search:
process wall time and CPU time, time inside the process (imports included) and time of the search
call alone (after `student_clap.cli` is imported: the imports it needs, index open, text model load,
query, search), and the process's peak RSS. First the floor a cold process cannot go below: the
interpreter alone, and the interpreter importing what any text search needs (numpy, onnxruntime,
tokenizers) and, from ANN_MIN_SONGS songs, usearch.

`--work DIR --reuse` keeps each size's database, approximate index and vectors in DIR and reuses
them on the next run (a 1M build takes long on a small machine); build times come from the run
that built them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, sys, time, io, contextlib
t0 = time.perf_counter()
from student_clap.cli import main
t1, c1 = time.perf_counter(), time.process_time()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(["search", "calm piano", "--index", sys.argv[1], "--models", sys.argv[2], "-k", "10", "--threads", "1"])
t2, c2 = time.perf_counter(), time.process_time()
assert rc == 0 and len(buf.getvalue().splitlines()) == 10, (rc, buf.getvalue())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's size
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"in_process_ms": (t2 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3, "search_cpu_ms": (c2 - c1) * 1e3,
                  "process_cpu_ms": c2 * 1e3, "peak_rss_mb": hwm / 1024}))
"""


# Where a cold approximate search spends its CPU, phase by phase, in the order `search` runs them.
PHASES = r"""
import json, sys, time
marks, last = [], [0.0]
def mark(name):
    now = time.process_time(); marks.append((name, (now - last[0]) * 1e3)); last[0] = time.process_time()
mark("interpreter start")
import numpy; mark("import numpy")
import onnxruntime; mark("import onnxruntime")
import tokenizers; mark("import tokenizers")
import usearch.index; mark("import usearch.index (with tqdm, urllib.request)")
import student_clap.cli, student_clap.query, student_clap.ann; mark("import student_clap (cli, query, index, ann, identity)")
from student_clap.query import TextEmbedder
text = TextEmbedder(sys.argv[2], threads=1, optimize=False); mark("text model: tokenizer, onnxruntime session, identity")
query = text.embed(["calm piano"]); mark("embed the query")
from student_clap.index import read_index_head
head = read_index_head(sys.argv[1]); mark("open the index: meta and song count")
from student_clap.identity import check_index_model
check_index_model(head[0], sys.argv[2]); mark("model check (sha256 of the audio ONNX files)")
from student_clap.ann import search_ann
assert len(search_ann(sys.argv[1], query, 10)[0]) == 10; mark("approximate search: open the view, search, rescore")
print(json.dumps(marks))
"""


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around random cluster centres (like genres), float16 as the index stores them."""
    x = centres[rng.integers(0, len(centres), n)] + 0.9 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def fill(db: Path, models: Path, n: int, seed: int = 0, chunk: int = 50_000) -> np.ndarray:
    """A library index of n synthetic songs, loaded in bulk (one transaction per chunk)."""
    import time as _t

    from student_clap import StudentClap
    from student_clap.index import IndexWriter
    from student_clap.spec import audio_identity

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, 512)).astype(np.float32)
    out = np.empty((n, 512), np.float16)
    with IndexWriter(db, audio_model=audio_identity(models), text_model="", dim=512,
                     model_identity=StudentClap(models).model_identity) as w:
        for start in range(0, n, chunk):
            vecs = clustered(min(chunk, n - start), 512, rng, centres)
            out[start:start + len(vecs)] = vecs
            now = _t.time()
            w.con.execute("BEGIN")
            w.con.executemany(
                "INSERT INTO tracks (id, path, size, mtime_ns, duration, n_segments, notes, status, reason, updated) "
                "VALUES (?, ?, 1, 1, 200.0, 39, '[]', 'ok', '', ?)",
                ((start + i + 1, os.fsencode(f"/music/{start + i:07d}.flac"), now) for i in range(len(vecs))))
            w.con.executemany("INSERT INTO vectors (track_id, vector) VALUES (?, ?)",
                              ((start + i + 1, v.tobytes()) for i, v in enumerate(vecs)))
            w.con.execute("COMMIT")
        w.touch()
    return out


PATCH = r"""
import json, sys, time
import numpy as np
from student_clap import ann
from student_clap.index import IndexWriter, read_index_head
db, n = sys.argv[1], int(sys.argv[2])
identity = read_index_head(db)[0]
rng = np.random.default_rng(5)
with IndexWriter(db, audio_model=identity.audio_model, text_model="", dim=identity.dim,
                 model_identity=identity.model_identity) as w:
    for i in range(n):
        v = rng.standard_normal(identity.dim).astype(np.float32)
        w.put_song(f"/music/new{i:07d}.flac", (1, 1), v / np.linalg.norm(v), duration=1.0, n_segments=1, notes=[])
    w.forget([f"/music/{i:07d}.flac" for i in range(max(1, n // 10))])
    w.touch()
cpu, wall = time.process_time(), time.perf_counter()
ann.update_ann(db)
print(json.dumps({"patch_added": n, "patch_removed": max(1, n // 10), "patch_cpu_s": round(time.process_time() - cpu, 1),
                  "patch_wall_s": round(time.perf_counter() - wall, 1),
                  "patch_peak_rss_mb": next(int(line.split()[1]) for line in open("/proc/self/status")
                                            if line.startswith("VmHWM:")) / 1024}))
"""


def patch_cost(db: Path, n: int) -> dict:
    """The cost of bringing the approximate index up to date after a small change, on a copy."""
    import shutil

    from student_clap import ann

    with tempfile.TemporaryDirectory(dir=db.parent) as tmp:
        copy = Path(tmp) / db.name
        for src in (db, ann.ann_path(db), ann.ann_path(db).with_name(ann.ann_path(db).name + ".json")):
            shutil.copy2(src, Path(tmp) / src.name)
        proc = subprocess.run([sys.executable, "-c", PATCH, str(copy), str(n)], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])


FLOOR = {"interpreter": "pass", "numpy + onnxruntime + tokenizers": "import numpy, onnxruntime, tokenizers",
         "... + usearch": "import numpy, onnxruntime, tokenizers, usearch.index"}


def cold(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one fresh process."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, check=True, env=env, cwd=ROOT, capture_output=True)
    wall = (time.perf_counter() - t) * 1e3
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e3


def floor(runs: int, env: dict) -> list[dict]:
    rows = []
    for name, code in FLOOR.items():
        got = [cold([sys.executable, "-c", code], env) for _ in range(runs)]
        rows.append({"floor": name, "wall_ms_p50": round(float(np.median([w for w, _ in got])), 1),
                     "cpu_ms_p50": round(float(np.median([c for _, c in got])), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def exact_top(stored: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> list[set[int]]:
    best = [np.empty(0, np.int64)] * len(queries)
    scores = [np.empty(0, np.float32)] * len(queries)
    for start in range(0, len(stored), chunk):
        block = stored[start:start + chunk].astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        s = queries @ block.T
        for qi in range(len(queries)):
            top = np.argpartition(-s[qi], k)[:k] if s.shape[1] > k else np.arange(s.shape[1])
            ids = np.concatenate([best[qi], top + start])
            sc = np.concatenate([scores[qi], s[qi, top]])
            keep = np.argsort(-sc)[:k]
            best[qi], scores[qi] = ids[keep], sc[keep]
    return [set(b.tolist()) for b in best]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--runs", type=int, default=11, help="cold searches per size")
    ap.add_argument("--queries", type=int, default=200, help="queries for recall@10")
    ap.add_argument("--work", default=None, help="folder for the indexes (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="reuse the databases, indexes and vectors left in --work")
    ap.add_argument("--phases", action="store_true", help="also: CPU per phase of a cold approximate search")
    ap.add_argument("--patch", type=int, default=0, metavar="N",
                    help="also: on a copy of each approximate index, add N songs, remove N/10 and time the update")
    args = ap.parse_args()
    if args.reuse and not args.work:
        ap.error("--reuse needs --work")

    from conftest import TINY_CORPUS, make_tiny_export

    from student_clap import ann
    from student_clap.index import _str  # noqa: F401  (the module the child imports, warmed in the page cache)

    work = Path(args.work or tempfile.mkdtemp(prefix="library-bench-"))
    models = work / "export"
    if not (args.reuse and (models / "student_clap.json").is_file()):
        models = make_tiny_export(models, rate=16000, segment_seconds=1.0, hop_seconds=0.5, decode_rate=24000,
                                  corpus=TINY_CORPUS, max_length=16)["export"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    floors = floor(args.runs, env)
    print(f"approximate index from {ann.ANN_MIN_SONGS} songs ({ann.ANN_DTYPE}, M={ann.CONNECTIVITY}, "
          f"ef_add={ann.EXPANSION_ADD}, ef_search={ann.EXPANSION_SEARCH}); work folder {work}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        db, vectors, built = work / f"lib{n}.db", work / f"lib{n}.npy", work / f"lib{n}.build.json"
        if args.reuse and db.is_file() and vectors.is_file() and built.is_file():
            stored = np.load(vectors)
            has_ann = ann.update_ann(db)  # rebuilt only when stale
            t_db, t_ann = (json.loads(built.read_text())[k] for k in ("db_s", "ann_s"))
        else:
            for old in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), ann.ann_path(db)):
                old.unlink(missing_ok=True)
            t = time.perf_counter()
            stored = fill(db, models, n)
            t_db = time.perf_counter() - t
            t = time.perf_counter()
            has_ann = ann.update_ann(db)
            t_ann = time.perf_counter() - t
            np.save(vectors, stored)
            built.write_text(json.dumps({"db_s": t_db, "ann_s": t_ann}))
        size = db.stat().st_size + sum(p.stat().st_size for p in (ann.ann_path(db),) if p.exists())
        runs = []
        for _ in range(args.runs):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(db), str(models)], capture_output=True, text=True,
                                  env=env, cwd=ROOT)
            wall = (time.perf_counter() - t) * 1e3
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_ms": wall})
        recall = None
        if has_ann:
            rng = np.random.default_rng(1)
            picks = rng.choice(n, size=args.queries, replace=False)
            q = stored[picks].astype(np.float32) + 0.05 * rng.standard_normal((args.queries, 512)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            truth = exact_top(stored, q, 10)
            got = ann.search_ann(db, q, 10)
            recall = float(np.mean([len(t & {int(p[0][7:14]) for p in g}) / 10 for t, g in zip(truth, got)]))

        def pct(key: str, p: float) -> float:
            return float(np.percentile([r[key] for r in runs], p))

        row = {"songs": n, "search": "approximate" if has_ann else "exact", "build_db_s": round(t_db, 1),
               "build_ann_s": round(t_ann, 1), "files_mb": round(size / 1e6, 1),
               "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
               "search_ms_p50": round(pct("search_ms", 50), 1), "search_ms_p95": round(pct("search_ms", 95), 1),
               "in_process_ms_p50": round(pct("in_process_ms", 50), 1),
               "search_cpu_ms_p50": round(pct("search_cpu_ms", 50), 1), "search_cpu_ms_p95": round(pct("search_cpu_ms", 95), 1),
               "process_cpu_ms_p50": round(pct("process_cpu_ms", 50), 1),
               "wall_ms_p50": round(pct("wall_ms", 50), 1), "wall_ms_p95": round(pct("wall_ms", 95), 1),
               "recall_at_10": None if recall is None else round(recall, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.phases and has_ann:
            runs = []
            for _ in range(args.runs):
                proc = subprocess.run([sys.executable, "-c", PHASES, str(db), str(models)], capture_output=True,
                                      text=True, env=env, cwd=ROOT, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"\nCPU per phase of a cold approximate search at {n:,} songs (median of {args.runs} processes):\n\n"
                  "| phase | CPU p50 (ms) |\n|---|---|")
            for i, (name, _) in enumerate(runs[0]):
                print(f"| {name} | {statistics.median(r[i][1] for r in runs):.1f} |")
            print(f"| total | {statistics.median(sum(m for _, m in r) for r in runs):.1f} |", flush=True)
        if args.patch and has_ann:
            print(json.dumps({"songs": n, **patch_cost(db, args.patch)}), flush=True)
        del stored
    print("\n| cold process (floor) | wall p50 (ms) | CPU p50 (ms) |\n|---|---|---|")
    for f in floors:
        print(f"| {f['floor']} | {f['wall_ms_p50']} | {f['cpu_ms_p50']} |")
    print("\n| songs | search | build: SQLite / approx. index (s) | files (MB) | peak RSS (MB) | process wall p50 / p95 (ms) "
          "| process CPU p50 (ms) | in-process p50 (ms) | search call p50 / p95 (ms) | search call CPU p50 / p95 (ms) "
          "| recall@10 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['songs']:,} | {r['search']} | {r['build_db_s']} / {r['build_ann_s']} | {r['files_mb']} | "
              f"{r['peak_rss_mb']} | {r['wall_ms_p50']} / {r['wall_ms_p95']} | {r['process_cpu_ms_p50']} | "
              f"{r['in_process_ms_p50']} | {r['search_ms_p50']} / {r['search_ms_p95']} | {r['search_cpu_ms_p50']} / "
              f"{r['search_cpu_ms_p95']} | {r['recall_at_10'] if r['recall_at_10'] is not None else 'exact'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
