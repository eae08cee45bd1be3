"""The fidelity benchmark: can a student trained by this recipe stand in for its teacher?

    python benchmarks/fidelity.py [--profile benchmarks/fidelity.yaml] [--work .bench/fidelity]
                                  [--songs N] [-S KEY=VALUE ...] [--runs default|all|songs100,...]
                                  [--out benchmarks/results/fidelity.json]

It makes a DVC project beside the repository (a copy of the working tree in `--work`, its own git
repository; a `--work` folder made earlier keeps the code and params it was made with), synthesises the profile's corpus of labelled songs into it (`student-clap demo corpus`),
writes the profile's params over params.yaml and runs each named run as `dvc exp run evaluate -S ...`
there: ingest, mels, teacher and the rest run once, and each later run re-runs only what its params
touch (distill_audio and evaluate). `dvc exp show` in the work folder lists them all afterwards.

For every run it records the held-out figures of evaluate's same-space section (median track cosine
raw and centred, the mean-embedding baseline, top-5 and top-10 neighbour overlap, neighbour Spearman,
the verdict), the per-epoch validation curve, and the cost (CPU seconds of the run's processes, wall
seconds), and checks that no held-out artist's song was trained on. The JSON goes to `--out`, a plot
of the curves beside it, and a table to stdout.

`--songs` and `-S` change the profile for every run (a reduced benchmark: fewer songs or epochs); the
JSON says what was changed. Rerunning with the same `--work` reuses the corpus and the cached stages,
and with the same `--out`, corpus and `-S`, keeps the runs measured before that it does not repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.atomic import write_json  # noqa: E402

BASE_PARAMS = Path(".fidelity") / "base-params.yaml"  # in the work project
FIGURES = ("track_cosine_median", "track_cosine_centred_median", "mean_baseline_median", "top5_overlap",
           "top10_overlap", "neighbour_spearman")


def parse_set(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as YAML (numbers, booleans, lists), as `dvc exp run -S` does."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"-S wants KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"-S {key}: {part} is not a mapping in params")
    node[parts[-1]] = value


def merge(base: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="fidelity", GIT_AUTHOR_EMAIL="fidelity@localhost",
               GIT_COMMITTER_NAME="fidelity", GIT_COMMITTER_EMAIL="fidelity@localhost")
    # dvc runs `student-clap` from PATH; the work copy's own `pipeline` package is what runs
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(work)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], quiet: bool = False) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=quiet)
    if proc.returncode != 0:
        detail = f"\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}" if quiet else ""
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode} in {cwd}{detail}")
    return proc.stdout if quiet else ""


def make_project(work: Path, env: dict[str, str], demo_audio: bool = False) -> None:
    """A copy of the working tree (tracked and new files; no outputs, no DVC cache) as its own git
    repository; the demo songs only when asked (the benchmark's corpus replaces them)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    work.mkdir(parents=True, exist_ok=True)
    for rel in files:
        src = ROOT / rel
        skip = (".dvc/cache", ".dvc/tmp") + (() if demo_audio else ("data/demo/audio/",))
        if not src.is_file() or rel.startswith(skip):
            continue
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    # the params every run starts from: the working tree's at the time the project was made
    (work / BASE_PARAMS).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "params.yaml", work / BASE_PARAMS)
    with open(work / ".gitignore", "a", encoding="utf-8") as f:
        f.write("\n# the benchmark corpus: an input made by benchmarks/fidelity.py, not versioned\n/data/corpus/\n")
    run(["git", "init", "-q", "-b", "main"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "fidelity benchmark project"], work, env)


def held_out_check(work: Path) -> dict[str, Any]:
    """The split the runs used: held-out artists never have a training song."""
    rows = [json.loads(line) for line in (work / "data" / "manifest.jsonl").read_text().splitlines() if line.strip()]
    artists = {s: {(r.get("artist") or r["track_id"]).casefold() for r in rows if r.get("split") == s} for s in ("train", "val")}
    return {"train_songs": sum(r.get("split") == "train" for r in rows),
            "held_out_songs": sum(r.get("split") == "val" for r in rows),
            "held_out_artists": len(artists["val"]),
            "held_out_artists_in_training": len(artists["train"] & artists["val"])}


def epoch_curve(work: Path) -> list[dict[str, float]]:
    """Per-epoch validation figures from DVCLive's files (models/audio/plots/**/metrics/val/*.tsv)."""
    found = sorted((work / "models" / "audio" / "plots").glob("**/metrics/val"))
    folder = found[0] if found else work / "models" / "audio" / "plots" / "metrics" / "val"
    curve: dict[int, dict[str, float]] = {}
    for name in ("track_cosine", "track_cosine_centred", "track_top5_overlap", "track_neighbour_spearman"):
        path = folder / f"{name}.tsv"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split("\t")  # DVCLive: step, value (older versions: step, timestamp, value)
            step, value = fields[0], fields[-1]
            curve.setdefault(int(step) + 1, {"epoch": int(step) + 1})[name] = float(value)
    return [curve[e] for e in sorted(curve)]


def figures(work: Path) -> dict[str, Any]:
    report = json.loads((work / "models" / "report" / "metrics.json").read_text())
    audio = json.loads((work / "models" / "audio" / "metrics.json").read_text())
    section = report["same_space"]
    fig = section["audio_student"]
    clipped = [f"top-{k} clipped to {fig.get(f'top{k}_k')}" for k in (5, 10) if fig.get(f"top{k}_k") != k]
    if clipped:  # a reduced corpus only: the profile's ~200 held-out songs score k = 5 and 10 unclipped
        print(f"note: {', '.join(clipped)}: only {fig['n_tracks']} held-out songs", flush=True)
    return {
        "held_out_tracks": fig["n_tracks"],
        "track_cosine_median": fig["track_cosine"]["median"],
        "track_cosine_mean": fig["track_cosine"]["mean"],
        "track_cosine_p05": fig["track_cosine"]["p05"],
        "track_cosine_centred_median": fig["track_cosine_centred"]["median"],
        "mean_baseline_median": fig["mean_baseline"]["median"],
        "top5_overlap": fig["top5_overlap"],
        "top10_overlap": fig["top10_overlap"],
        "neighbour_spearman": fig["neighbour_spearman"],
        "top5_k": fig.get("top5_k"),
        "top10_k": fig.get("top10_k"),
        "same_space": section["same_space"],
        "failed": section["failed"],
        "train_tracks": audio.get("n_train_tracks"),
        "best_epoch": audio.get("best_epoch"),
        "epochs": audio.get("epochs"),
        "model": audio.get("model"),
        "params_count": audio.get("params_count"),
        "calibration": audio.get("calibration", {}).get("after") if isinstance(audio.get("calibration"), dict) else None,
    }


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curve = sorted((r["figures"]["train_tracks"], r["figures"]) for r in result["runs"]
                   if set(r["set"]) <= {"distill_audio.max_train_tracks"})
    if curve:
        xs = [c[0] for c in curve]
        for key, label in (("track_cosine_median", "median track cosine"),
                           ("track_cosine_centred_median", "median centred cosine"),
                           ("top5_overlap", "top-5 overlap"), ("top10_overlap", "top-10 overlap")):
            ax1.plot(xs, [c[1][key] for c in curve], marker="o", label=label)
        ax1.set_xlabel("training songs")
        ax1.set_title("held-out fidelity against training data")
        ax1.set_ylim(0, 1.02)
        ax1.legend(loc="lower right", fontsize=8)
    default = next((r for r in result["runs"] if r["name"] == "default"), None)
    if default and default["epoch_curve"]:
        ep = default["epoch_curve"]
        for key, label in (("track_cosine", "track cosine"), ("track_cosine_centred", "centred cosine"),
                           ("track_top5_overlap", "top-5 overlap")):
            if key in ep[0]:
                ax2.plot([e["epoch"] for e in ep], [e[key] for e in ep], marker=".", label=label)
        ax2.set_xlabel("epoch")
        ax2.set_title("held-out figures per epoch (default run)")
        ax2.set_ylim(0, 1.02)
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    head = ["run", "train songs", "median cos", "centred", "mean base", "top-5", "top-10", "Spearman", "CPU-s", "set"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        f = r["figures"]
        sets = " ".join(f"{k}={v}" for k, v in r["set"].items()) or "(profile)"
        lines.append(f"| {r['name']} | {f['train_tracks']} | {f['track_cosine_median']:.4f} | "
                     f"{f['track_cosine_centred_median']:.4f} | {f['mean_baseline_median']:.4f} | {f['top5_overlap']:.3f} | "
                     f"{f['top10_overlap']:.3f} | {f['neighbour_spearman']:.3f} | {r['cost']['cpu_seconds']:.0f} | {sets} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, default=ROOT / "benchmarks" / "fidelity.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "fidelity", help="the benchmark's DVC project")
    ap.add_argument("--songs", type=int, default=None, help="corpus size (default: the profile's)")
    ap.add_argument("-S", "--set", dest="sets", action="append", type=parse_set, default=[],
                    help="KEY=VALUE over the profile's params, for every run")
    ap.add_argument("--runs", default="default",
                    help="comma-separated run names of the profile, or `all` (default: %(default)s, about 1.5 h here)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="songs synthesised at once")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fidelity.json")
    args = ap.parse_args(argv)

    profile = yaml.safe_load(args.profile.read_text())
    corpus = dict(profile["corpus"])
    if args.songs is not None:
        corpus["songs"] = args.songs
    runs = profile.get("runs") or {"default": {}}
    names = list(runs) if args.runs == "all" else [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"{args.profile}: no run named {', '.join(unknown)} (runs: {', '.join(runs)})")

    work = args.work.resolve()
    env = _env(work)
    if not (work / ".git").is_dir():
        make_project(work, env)
    cpu0, wall0 = children_cpu(), time.perf_counter()
    run([sys.executable, "-m", "pipeline.cli", "demo", "corpus", "--out", str(work / "data" / "corpus"),
         "--songs", str(corpus["songs"]), "--seed", str(corpus["seed"]), "--min-seconds", str(corpus["min_seconds"]),
         "--max-seconds", str(corpus["max_seconds"]), "--jobs", str(max(1, args.jobs))], work, env)
    corpus_cost = {"cpu_seconds": round(children_cpu() - cpu0, 1), "wall_seconds": round(time.perf_counter() - wall0, 1)}

    params = yaml.safe_load((work / BASE_PARAMS).read_text())
    merge(params, profile.get("params") or {})
    for key, value in args.sets:
        set_dotted(params, key, value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    # the corpus lists live outside data/sources/: they become deps of ingest, as for any user's lists
    run([sys.executable, "-m", "pipeline.cli", "deps", "--write"], work, env, quiet=True)
    run(["git", "add", "-A"], work, env)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=work).returncode:
        run(["git", "commit", "-qm", "benchmark profile"], work, env)

    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/fidelity.py", *(sys.argv[1:] if argv is None else argv)]),
        "profile": str(args.profile.relative_to(ROOT) if args.profile.is_relative_to(ROOT) else args.profile),
        "corpus": {**corpus, "cost": corpus_cost},
        "set": {k: v for k, v in args.sets},
        "machine": {"cpus": os.cpu_count(), "torch_threads": params["distill_audio"].get("threads")},
        # the recipe every run starts from, before its own -S
        "distill_audio": {k: params["distill_audio"][k] for k in ("model", "epochs", "batch_size", "strategy", "lr",
                                                                   "loss", "centred_loss", "augment", "calibrate")},
        "runs": [],
    }
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else None
    if earlier and (earlier.get("corpus", {}).get("songs"), earlier.get("corpus", {}).get("seed"), earlier.get("set")) == (
            corpus["songs"], corpus["seed"], result["set"]):
        # the same benchmark: runs measured before and not repeated now are kept
        result["runs"] = [r for r in earlier.get("runs", []) if r["name"] not in names]
    baseline_done = subprocess.run(["git", "log", "--format=%s"], cwd=work, capture_output=True,
                                   text=True).stdout.count("benchmark baseline:") > 0
    for name in names:
        sets = runs[name] or {}
        # every run starts from the profile: the previous experiment's params and lock are put back
        run(["git", "checkout", "-q", "--", "params.yaml"], work, env)
        if (work / "dvc.lock").is_file() and subprocess.run(["git", "ls-files", "--error-unmatch", "dvc.lock"], cwd=work,
                                                            capture_output=True).returncode == 0:
            run(["git", "checkout", "-q", "--", "dvc.lock"], work, env)
        cmd = ["dvc", "exp", "run", "evaluate", "-n", name]
        for key, value in sets.items():
            cmd += ["-S", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        print(f"\n=== run {name}: {' '.join(cmd)}", flush=True)
        cpu0, wall0 = children_cpu(), time.perf_counter()
        run([sys.executable, "-m", "dvc", *cmd[1:]], work, env)
        cost = {"cpu_seconds": round(children_cpu() - cpu0, 1), "wall_seconds": round(time.perf_counter() - wall0, 1)}
        entry = {"name": name, "set": sets, "command": " ".join(cmd), "figures": figures(work), "cost": cost,
                 "epoch_curve": epoch_curve(work), "held_out": held_out_check(work)}
        if entry["held_out"]["held_out_artists_in_training"]:
            raise SystemExit(f"run {name}: {entry['held_out']['held_out_artists_in_training']} held-out artists "
                             "have training songs: the split leaks")
        result["runs"].append(entry)
        if name == names[0] and not baseline_done:
            # the first run's outputs become the baseline the others start from (mels, teacher reused)
            run(["git", "checkout", "-q", "--", "params.yaml"], work, env)
            run(["git", "add", "-A"], work, env)
            run(["git", "commit", "-qm", f"benchmark baseline: {name}"], work, env)
        f = entry["figures"]
        print(f"run {name}: median cosine {f['track_cosine_median']:.4f} (centred {f['track_cosine_centred_median']:.4f}, "
              f"mean baseline {f['mean_baseline_median']:.4f}), top-5 {f['top5_overlap']:.3f}, top-10 "
              f"{f['top10_overlap']:.3f}, Spearman {f['neighbour_spearman']:.3f}; {cost['cpu_seconds']:.0f} CPU-s, "
              f"{cost['wall_seconds']:.0f} s", flush=True)
        write_json(args.out, result, sort_keys=False)

    plot(result, args.out.with_suffix(".png"))
    print("\n" + table(result))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}; `dvc exp show` in {work} lists the runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
