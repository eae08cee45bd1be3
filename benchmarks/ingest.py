"""Parse speed of the three song list formats (FMA, MTG-Jamendo, Wikimedia `*_SONGS_LICENSE.md`).

Repeats the shared sample lists (../shared/data/seed-lists, ~300 entries each) until the three
lists hold 11 000 entries together (a corpus of 11 000 songs), parses them and prints
entries per second. Target: 11 000 entries in under 2 s.

    python benchmarks/ingest.py [--entries 11000] [--lists ../shared/data/seed-lists]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.licenses import normalize_license  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.data.sources import fma, jamendo, wikimedia  # noqa: E402
from pipeline.stages.ingest import ingest  # noqa: E402

FILES = {
    "FMA_SONGS_LICENSE.md": (fma.parse_list, re.compile(r"(?ms)^SONG:.*?(?=^SONG:|\Z)")),
    "MTG_JAMENDO_SONGS_LICENSE.md": (jamendo.parse_list, re.compile(r"(?ms)^\d+/\d+\.mp3$.*?(?=^\d+/\d+\.mp3$|\Z)")),
    "WIKIMEDIA_SONGS_LICENSE.md": (wikimedia.parse_list, re.compile(r"(?m)^\| (?!FILENAME|---).*$\n?")),
}


def build(src: Path, out: Path, per_file: int) -> None:
    """Write each list with its entries repeated (header once) up to `per_file` entries."""
    for name, (_, entry_re) in FILES.items():
        text = (src / name).read_text(encoding="utf-8")
        blocks = entry_re.findall(text)
        head = text[: text.index(blocks[0])]
        reps = [blocks[i % len(blocks)] for i in range(per_file)]
        sep = "" if name.startswith("WIKIMEDIA") else "\n"
        (out / name).write_text(head + sep.join(b.rstrip("\n") + ("\n" if sep == "" else "\n") for b in reps), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=11_000)
    ap.add_argument("--lists", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "seed-lists"))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = ap.parse_args()
    src = Path(args.lists)
    if not src.is_dir():
        sys.exit(f"{src} not found: pass --lists with the folder holding the three *_SONGS_LICENSE.md samples")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        build(src, out, -(-args.entries // len(FILES)))
        best, n_entries, n_problems = float("inf"), 0, 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n_entries = n_problems = 0
            for name, (parse, _) in FILES.items():
                res = parse(out / name)
                for e in res.entries:  # licence normalisation is part of reading a list
                    normalize_license(e.license_text or e.license_url)
                n_entries += len(res.entries)
                n_problems += len(res.problems)
            best = min(best, time.perf_counter() - t0)
            # the whole decision pass (parse, dedupe, policy, audio lookup in empty roots, split)
            project = load_params(Path(__file__).resolve().parents[1] / "params.yaml").ingest
            sources = {
                key: dataclasses.replace(project.sources["fma"], lists=[str(out / name)], audio_root=str(out / "audio" / key))
                for key, name in zip(("fma", "jamendo", "wikimedia"), FILES)
            }
            for sp in sources.values():  # ingest refuses a missing audio_root; an empty one finds nothing
                Path(sp.audio_root).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            _, outcomes, _ = ingest(dataclasses.replace(project, sources=sources, download=False), progress=False)
            stage_s = time.perf_counter() - t0
    print(f"parsed {n_entries} entries ({n_problems} problems) in {best:.3f} s (best of {args.repeat})")
    print(f"{n_entries / best:,.0f} entries/s; target 11 000 entries in < 2 s: {'PASS' if best * 11_000 / max(n_entries, 1) < 2 else 'FAIL'}")
    print(f"ingest decisions for {len(outcomes)} entries (repeats count as duplicates, no audio present): {stage_s:.3f} s")


if __name__ == "__main__":
    main()
