"""Does `dvc repro` compute the same thing whatever the machine's state? Compares dvc.lock files.

    python benchmarks/reproduce.py [--work .bench/reproduce] [--variants omp1,omp2,stream,memory]

Each variant is a fresh copy of the working tree (its own git repository, no outputs, no DVC cache)
in which the whole demo `dvc repro` runs under one condition:

- omp1 / omp2: OMP_NUM_THREADS=1 / 2 (torch's thread pool for every stage that does not set its own);
- stream / memory: `distill_audio.in_memory_gb` forced to 0 (mels streamed from HDF5 by the data
  loader) / 8 (held in memory), which also changes the loader's worker count under `num_workers: auto`.

All copies are made before the first run, so every variant runs the same code and params; a
`--work` folder kept from an earlier call keeps the copies it has (delete a variant's folder to
make it again from the working tree). It then prints, for every stage output, whether its md5 in
dvc.lock is the same in every variant, and exits 1 when one differs. The training stages fix their own thread count
(`distill_audio.threads`, `distill_text.threads`), so the students should not depend on the
machine's; bit-identity across CPU kinds (AVX2 against AVX-512 kernels) is not claimed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity import _env, make_project, run  # noqa: E402  (benchmarks/fidelity.py)

VARIANTS = {
    "omp1": ({"OMP_NUM_THREADS": "1"}, {}),
    "omp2": ({"OMP_NUM_THREADS": "2"}, {}),
    "stream": ({}, {"distill_audio.in_memory_gb": 0}),
    "memory": ({}, {"distill_audio.in_memory_gb": 8}),
}


def outs_md5(lock: Path) -> dict[str, str]:
    data = yaml.safe_load(lock.read_text())
    return {f"{stage}:{o['path']}": o.get("md5", "") for stage, spec in data["stages"].items()
            for o in spec.get("outs", [])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "reproduce")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or len(names) < 2:
        raise SystemExit(f"--variants: name at least two of {', '.join(VARIANTS)} (got {args.variants})")
    locks = {}
    # every copy first, so that all variants run the same snapshot of the working tree (a copy made
    # when its turn came would pick up whatever changed during the earlier runs)
    for name in names:
        work = (args.work / name).resolve()
        if not (work / ".git").is_dir():
            make_project(work, _env(work), demo_audio=True)
    for name in names:
        env_over, sets = VARIANTS[name]
        work = (args.work / name).resolve()
        env = _env(work)
        env.update(env_over)
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "-f", "-n", f"reproduce-{name}"]  # -f: a kept folder runs again
        for key, value in sets.items():
            cmd += ["-S", f"{key}={value}"]
        t0 = time.perf_counter()
        run(cmd, work, env)
        print(f"{name}: dvc repro in {time.perf_counter() - t0:.0f} s", flush=True)
        locks[name] = outs_md5(work / "dvc.lock")
    first = locks[names[0]]
    differ = sorted(k for k in first if any(locks[n].get(k) != first[k] for n in names[1:]))
    for key in sorted(first):
        print(f"{'DIFFERS' if key in differ else 'same   '} {key}")
    print(f"\n{len(first) - len(differ)} of {len(first)} outputs identical across {', '.join(names)}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
