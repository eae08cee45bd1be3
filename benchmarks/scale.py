"""Scale projection: unit costs measured on this machine, projected to a corpus size.

    python benchmarks/scale.py [--songs 11000 --minutes 4 --epochs 10 --stage2-epochs 1]
                               [--strategy segments --segments-per-track 4]
                               [--gpu-json gpu.json] [--cores N] [--json out.json]

Measures here, on one core each (OMP_NUM_THREADS=1, torch threads 1, CPU seconds from getrusage):
- mels:    the mels stage (decode, resample, both front-ends, the mel cache) on synthesised songs in
           mixed formats (MP3, Ogg Vorbis, Opus, FLAC, WAV): CPU-s and cache bytes per audio-minute,
           and (untimed) the bytes of the same songs' cache with mels.precision 0 (float16 values);
- teacher: a randomly initialised HTSAT-base audio tower on 10-s log-mels: CPU-s per segment;
- student: one mn10_as training step (forward, loss, backward, AdamW) and one forward: CPU-s per segment;
- loader:  segments read from that mel cache through MelCache (whole tracks, and random single
           segments): segments per CPU-second.
Then prints wall time and disk for the corpus (default: 11 000 songs x 4 min, 10 + 1 epochs) on
this machine (all its cores, perfect scaling assumed) and on one GPU machine. GPU rates
come from `--gpu-json` (written by benchmarks/gpu.py on a real GPU: keys teacher_segments_per_s,
train_samples_per_s {model: {batch: value}}, loader_segments_per_s {workers: value}, gpu, date);
without it they are ASSUMPTIONS, printed as such. An epoch trains on the segments the training
data of `--strategy` (distill_audio.strategy) hands the student: every train segment for
"segments"; for "tracks" and "both" one item per train track, each drawing at most
`--segments-per-track` of its segments (0: all), so a 4-minute song trains 4 of its 47 segments
per epoch ("both" adds one track row per item to the loss, at no extra network cost: the track
embedding is the mean of its segments' outputs). Validation per epoch is a bounded subset of
`--val-max-segments` (distill_audio.val_max_segments, 2048 by default), the full validation once at
the end; its share of an epoch is printed against the 10 % target. The mel cache on real music is
an ESTIMATE: the 3.5 MB per audio-minute measured on real music for the per-segment float16 layout,
times the frame ratio and the int16 / float16 byte ratio, both measured here on the synthesised songs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# Stated until benchmarks/gpu.py has measured them on a real GPU (see --gpu-json).
ASSUMED_GPU = {
    "gpu": "H100-class GPU (ASSUMED rates, not measured)",
    # HTSAT-base is 30.7 GFLOP per segment: 1000 seg/s is ~31 TFLOP/s, a modest share of bf16 peak.
    "teacher_segments_per_s": 1000.0,
    "train_samples_per_s": {"mn10_as": {"256": 2000.0}},  # mn10 with AMP bf16
    "forward_to_train_ratio": 3.0,  # a forward costs about a third of a training step (as on CPU here)
    "cpu_cores": 16,  # for the mels stage and the loader workers on that machine
}
REAL_MUSIC_OLD_MB_PER_MIN = 3.5  # per-segment float16 mel cache (format 1), measured on a real-music corpus
AUDIO_MB_PER_MIN = 1.0  # the corpus audio itself (~128 kbit/s MP3); assumption, shown separately


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- unit costs


def measure_mels(work: Path, seconds: float) -> dict:
    """The mels stage (serial, in this process) over five demo recipes in five formats."""
    from pipeline.data.demo_audio import SONGS, write_song
    from pipeline.stages.mels import build_mel_cache, failure_verdict
    from pipeline.data.mel_cache import MelCache
    from pipeline.params import load_params

    picks = [s for s in SONGS if s.path.endswith((".mp3", ".ogg", ".flac", ".wav", ".opus"))]
    chosen, seen = [], set()
    for song in picks:  # one song per container format
        ext = Path(song.path).suffix
        if ext not in seen:
            seen.add(ext)
            chosen.append(song)
    rows = []
    for i, song in enumerate(chosen):
        path = write_song(dataclasses.replace(song, seconds=seconds), work / "audio")
        rows.append({"track_id": f"scale:{i}", "source": "bench", "artist": f"a{i}", "title": str(i),
                     "audio_path": str(path), "license": "CC0-1.0", "license_url": "", "url": "", "split": "train",
                     "tags": [], "duration": None})
    (work / "data").mkdir(parents=True, exist_ok=True)
    with open(work / "data" / "manifest.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    p.mels.workers = 1
    (work / "warm").mkdir()
    (work / "warm/manifest.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    for name, manifest in (("warm", work / "warm/manifest.jsonl"), ("timed", work / "data/manifest.jsonl")):
        # the warm-up pays the one-off costs (imports, FFT plans) a long run spreads over hours
        report_path = work / name / "mels.json"
        c0 = cpu_seconds()
        report = build_mel_cache(p, manifest, work / name / "mels.h5", report_path)
        if failure_verdict(report, p.mels.max_failure_ratio, report_path):
            raise RuntimeError("the mels stage failed on the benchmark songs")
        cpu = cpu_seconds() - c0
    report = json.loads((work / "timed/mels.json").read_text())
    float16_bytes = float16_cache_bytes(p, work / "data/manifest.jsonl", work / "float16")
    with MelCache(work / "timed/mels.h5") as cache:
        stored = cache.stored_frames()
        n = cache.n_segments
        (tf, tm), (sm, sf_) = (cache.layouts["teacher"].segment_shape(), cache.layouts["student"].segment_shape())
    # raw (uncompressed) frames against the per-segment layout: the saving on any music
    frame_ratio = (stored["teacher"] * tm + stored["student"] * sm) / (n * (tf * tm + sm * sf_))
    return {"audio_minutes": report["audio_minutes"], "formats": sorted(seen), "segments": n,
            "cpu_s_per_audio_minute": cpu / report["audio_minutes"],
            "mb_per_audio_minute": report["cache_bytes"] / 1e6 / report["audio_minutes"],
            "raw_frames_vs_per_segment": frame_ratio,
            "int16_bytes": report["cache_bytes"], "float16_bytes": float16_bytes,
            "int16_vs_float16_bytes": report["cache_bytes"] / float16_bytes, "cache": str(work / "timed/mels.h5")}


def float16_cache_bytes(p: Any, manifest: Path, out: Path) -> int:
    """Bytes of the same songs' mel cache with mels.precision 0 (full float16 values; untimed)."""
    from pipeline.stages.mels import build_mel_cache, failure_verdict

    p = dataclasses.replace(p, mels=dataclasses.replace(
        p.mels, precision=dataclasses.replace(p.mels.precision, teacher_db=0.0, student=0.0)))
    out.mkdir()
    report = build_mel_cache(p, manifest, out / "mels.h5", out / "mels.json")
    if failure_verdict(report, p.mels.max_failure_ratio, out / "mels.json") or not report["cache_bytes"]:
        raise RuntimeError("the float16 mel cache of the benchmark songs failed")
    return int(report["cache_bytes"])


def measure_teacher(batch: int = 2, reps: int = 2) -> dict:
    import torch
    from transformers import ClapModel

    from pipeline.teacher.model import Teacher, clap_config, htsat_base_audio_config, roberta_base_text_config

    text = roberta_base_text_config(vocab_size=300)
    text.update(num_hidden_layers=1, hidden_size=64, num_attention_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    model = ClapModel(clap_config(htsat_base_audio_config(), text)).eval()
    teacher = Teacher(model=model, tokenizer=None, device="cpu", dtype=torch.float32, sha256="", provenance={})
    mels = torch.randn(batch, 1001, 64) * 15 - 40
    with torch.no_grad():
        teacher.embed_mels(mels)  # warm-up
        c0 = cpu_seconds()
        for _ in range(reps):
            teacher.embed_mels(mels)
    return {"cpu_s_per_segment": (cpu_seconds() - c0) / (batch * reps), "batch": batch}


def measure_student(model_name: str, batch: int = 8, steps: int = 2) -> dict:
    import torch

    from pipeline.training.losses import DistillLoss
    from pipeline.models.audio_student import build_audio_student
    from pipeline.params import load_params

    torch.manual_seed(0)
    model = build_audio_student({"backbone": model_name, "dropout": 0.1}).train()
    loss = load_params(Path(__file__).resolve().parents[1] / "params.yaml").distill_text.loss  # a plain cosine loss
    loss_fn = DistillLoss(loss, centre=torch.nn.functional.normalize(torch.randn(512), dim=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mels = torch.randn(batch, 128, 1000) * 0.3 - 0.5
    target = torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1)

    def step() -> None:
        loss, _ = loss_fn(model.embed_raw(mels), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    c0 = cpu_seconds()
    for _ in range(steps):
        step()
    train = (cpu_seconds() - c0) / (batch * steps)
    model.eval()
    with torch.no_grad():
        model.embed_raw(mels)
        c0 = cpu_seconds()
        for _ in range(steps):
            model.embed_raw(mels)
    forward = (cpu_seconds() - c0) / (batch * steps)
    return {"model": model_name, "batch": batch, "train_cpu_s_per_segment": train, "forward_cpu_s_per_segment": forward}


def measure_loader(cache_path: str, min_cpu_s: float = 1.0) -> dict:
    """Student + teacher mels per segment through MelCache, by whole tracks and by random segments."""
    from pipeline.data.mel_cache import MelCache

    with MelCache(cache_path) as cache:
        def rate(read) -> float:
            n, c0 = 0, cpu_seconds()
            while cpu_seconds() - c0 < min_cpu_s:
                n += read()
            return n / (cpu_seconds() - c0)

        rng = np.random.default_rng(0)
        tracks = iter(np.resize(np.arange(len(cache.track_ids)), 10_000))

        def whole_track() -> int:
            t = int(next(tracks))
            cache.teacher_track(t)
            return len(cache.student_track(t))

        def random_segment() -> int:
            i = int(rng.integers(0, cache.n_segments))
            cache.student_mels(i), cache.teacher_mels(i)
            return 1

        return {"track_segments_per_cpu_s": rate(whole_track), "random_segments_per_cpu_s": rate(random_segment)}


# --------------------------------------------------------------------------- projection


def segments_per_song(minutes: float) -> int:
    from student_clap.audio import segment_starts

    return len(segment_starts(int(round(minutes * 60 * 48000)), 48000, 10.0, 5.0))


def gpu_rates(path: str | None, model: str, cpu_loader_rate: float) -> dict:
    """Rates for one GPU machine: from benchmarks/gpu.py's JSON when given, else the assumptions."""
    if path is None:
        g = dict(ASSUMED_GPU)
        workers = g["cpu_cores"] // 2
        return {"source": "ASSUMED (no --gpu-json)", "gpu": g["gpu"], "date": "",
                "teacher": g["teacher_segments_per_s"],
                "train": max(g["train_samples_per_s"]["mn10_as"].values()),
                "forward": max(g["train_samples_per_s"]["mn10_as"].values()) * g["forward_to_train_ratio"],
                # loader workers on that machine, assumed to scale like this machine's one process
                "loader": cpu_loader_rate * workers, "loader_note": f"ASSUMED {workers} workers x this machine's rate",
                "cores": g["cpu_cores"]}
    data = json.loads(Path(path).read_text())
    try:
        train_by_batch = data["train_samples_per_s"][model]
        loader = data["loader_segments_per_s"]
        train = max(float(v) for v in train_by_batch.values())
        return {"source": f"measured by benchmarks/gpu.py ({path})", "gpu": str(data["gpu"]), "date": str(data["date"]),
                "teacher": float(data["teacher_segments_per_s"]), "train": train,
                "forward": train * ASSUMED_GPU["forward_to_train_ratio"],
                "loader": max(float(v) for v in loader.values()),
                "loader_note": f"best of workers {sorted(loader, key=lambda w: int(w))}",
                "cores": int(data.get("cpu_cores", ASSUMED_GPU["cpu_cores"]))}
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"{path}: not a benchmarks/gpu.py result ({type(exc).__name__}: {exc}); expected keys "
                         "teacher_segments_per_s, train_samples_per_s {model: {batch: v}}, loader_segments_per_s "
                         "{workers: v}, gpu, date") from None


def epoch_segments(strategy: str, train_tracks: int, per_song: int, segments_per_track: int) -> dict:
    """What one training epoch hands the student (pipeline.data.datasets.TrainItems and Collate).

    "segments": every train segment is an item. "tracks" / "both": every train track is an item
    and draws min(its segments, segments_per_track) of them (all when segments_per_track is 0).
    The network runs on the drawn segments only; "both" also scores one track row per item."""
    if strategy == "segments":
        return {"items": train_tracks * per_song, "segments": train_tracks * per_song, "track_rows": 0}
    if strategy not in ("tracks", "both"):
        raise SystemExit(f"--strategy: {strategy!r} is not one of segments, tracks, both")
    drawn = per_song if segments_per_track <= 0 else min(per_song, segments_per_track)
    return {"items": train_tracks, "segments": train_tracks * drawn,
            "track_rows": train_tracks}


def project(units: dict, a: argparse.Namespace, gpu: dict) -> dict:
    minutes = a.songs * a.minutes
    per_song = segments_per_song(a.minutes)
    segs = a.songs * per_song
    val_tracks = int(round(a.songs * a.val_ratio))  # the split is by artist, so by whole tracks
    val = val_tracks * per_song
    train_segs = segs - val
    epoch = epoch_segments(a.strategy, a.songs - val_tracks, per_song, a.segments_per_track)
    train = epoch["segments"]
    val_epoch = min(val, a.val_max_segments)
    epochs = a.epochs + a.stage2_epochs
    m, t, s, ld = units["mels"], units["teacher"], units["student"], units["loader"]
    cores = a.cores

    def epoch_parts(train_rate: float, fwd_rate: float, load_rate: float) -> dict:
        # compute and loading overlap (workers prefetch): an epoch takes the slower of the two
        train_s = max(train / train_rate, train / load_rate)
        val_s = max(val_epoch / fwd_rate, val_epoch / load_rate)
        return {"train_s": train_s, "val_s": val_s, "val_share": val_s / (train_s + val_s)}

    cpu_loader = ld["random_segments_per_cpu_s"] * cores
    here = {
        "mels_s": minutes * m["cpu_s_per_audio_minute"] / cores,
        "teacher_s": segs * t["cpu_s_per_segment"] / cores,
        **epoch_parts(cores / s["train_cpu_s_per_segment"], cores / s["forward_cpu_s_per_segment"], cpu_loader),
        "final_val_s": val * s["forward_cpu_s_per_segment"] / cores,
    }
    one_gpu = {
        "mels_s": minutes * m["cpu_s_per_audio_minute"] / gpu["cores"],
        "teacher_s": segs / gpu["teacher"],
        **epoch_parts(gpu["train"], gpu["forward"], gpu["loader"]),
        "final_val_s": val / gpu["forward"],
    }
    for r in (here, one_gpu):
        r["training_s"] = epochs * (r["train_s"] + r["val_s"]) + r["final_val_s"]
        r["total_s"] = r["mels_s"] + r["teacher_s"] + r["training_s"]
    mel_mb = m["mb_per_audio_minute"]
    # ESTIMATE: the per-segment float16 bytes measured on real music, scaled by the two savings measured
    # here on synthesised songs (frames once per track; int16 codes against float16 values)
    real_mb = REAL_MUSIC_OLD_MB_PER_MIN * m["raw_frames_vs_per_segment"] * m["int16_vs_float16_bytes"]
    disk = {
        "mels_gb_measured_rate": minutes * mel_mb / 1e3,
        "mels_gb_real_music_estimate": minutes * real_mb / 1e3,
        "teacher_gb": segs * (512 * 4 + 4) / 1e9,
        "dvc_cache_extra_gb": 0.0,  # linked, not copied (.dvc/config cache.type)
        "audio_gb_assumed": minutes * AUDIO_MB_PER_MIN / 1e3,
    }
    disk["outputs_gb"] = max(disk["mels_gb_measured_rate"], disk["mels_gb_real_music_estimate"]) + disk["teacher_gb"]
    return {"corpus": {"songs": a.songs, "minutes_per_song": a.minutes, "audio_minutes": minutes, "segments": segs,
                       "train_segments": train_segs, "val_segments": val, "val_segments_per_epoch": val_epoch,
                       "epochs": epochs, "strategy": a.strategy, "segments_per_track": a.segments_per_track,
                       "epoch_items": epoch["items"], "epoch_segments": train, "epoch_track_rows": epoch["track_rows"]},
            "this_machine": here, "one_gpu": one_gpu, "disk": disk, "real_music_mb_per_minute_estimate": real_mb}


def _h(seconds: float) -> str:
    return f"{seconds / 3600:8.1f} h" if seconds >= 360 else f"{seconds:8.0f} s"


def report(units: dict, proj: dict, gpu: dict, cores: int) -> None:
    m, t, s, ld = units["mels"], units["teacher"], units["student"], units["loader"]
    c = proj["corpus"]
    print("unit costs on this machine (one core each, CPU seconds):")
    print(f"  mels     {m['cpu_s_per_audio_minute']:.3f} CPU-s per audio-minute, {m['mb_per_audio_minute']:.2f} MB per "
          f"audio-minute ({m['audio_minutes']:.1f} min of synthesised {'/'.join(m['formats'])}; frames stored "
          f"{m['raw_frames_vs_per_segment']:.2f}x the per-segment layout; int16 codes "
          f"{m['int16_vs_float16_bytes']:.2f}x the bytes of the same cache in float16: {m['int16_bytes']} / "
          f"{m['float16_bytes']} B)")
    print(f"  teacher  {t['cpu_s_per_segment']:.3f} CPU-s per segment (random HTSAT-base, batch {t['batch']})")
    print(f"  student  {s['train_cpu_s_per_segment']:.3f} CPU-s per training segment, "
          f"{s['forward_cpu_s_per_segment']:.3f} per forward ({s['model']}, batch {s['batch']})")
    print(f"  loader   {ld['track_segments_per_cpu_s']:.0f} segments/CPU-s by whole tracks, "
          f"{ld['random_segments_per_cpu_s']:.0f} by random single segments (student + teacher mels)")
    print(f"corpus: {c['songs']} songs x {c['minutes_per_song']:g} min = {c['audio_minutes']:.0f} audio-minutes, "
          f"{c['segments']} segments ({c['train_segments']} train, {c['val_segments']} validation, "
          f"{c['val_segments_per_epoch']} validated per epoch), {c['epochs']} epochs")
    print(f"an epoch (strategy {c['strategy']}, segments_per_track {c['segments_per_track']}): {c['epoch_items']} "
          f"items, {c['epoch_segments']} segments through the student"
          + (f" + {c['epoch_track_rows']} track rows in the loss" if c["epoch_track_rows"] else ""))
    print(f"GPU rates: {gpu['source']}: {gpu['gpu']} {gpu['date']}; teacher {gpu['teacher']:.0f} seg/s, "
          f"train {gpu['train']:.0f} seg/s, forward {gpu['forward']:.0f} seg/s, loader {gpu['loader']:.0f} seg/s "
          f"({gpu['loader_note']}), {gpu['cores']} CPU cores for the mels stage")
    print(f"{'projected wall time':22} {'this machine (' + str(cores) + ' cores)':>24} {'one GPU machine':>18}")
    h, g = proj["this_machine"], proj["one_gpu"]
    for key, label in (("mels_s", "mels stage"), ("teacher_s", "teacher stage"), ("train_s", "train, per epoch"),
                       ("val_s", "validation, per epoch"), ("final_val_s", "full validation (once)"),
                       ("training_s", "training, all epochs"), ("total_s", "TOTAL")):
        print(f"  {label:22} {_h(h[key]):>22} {_h(g[key]):>18}")
    print(f"  {'validation share':22} {100 * h['val_share']:21.1f}% {100 * g['val_share']:17.1f}%   (target <= 10 %)")
    d = proj["disk"]
    print(f"disk: mel cache {d['mels_gb_measured_rate']:.1f} GB at the rate measured here, "
          f"{d['mels_gb_real_music_estimate']:.1f} GB on real music (ESTIMATE, "
          f"{proj['real_music_mb_per_minute_estimate']:.2f} MB/min = {REAL_MUSIC_OLD_MB_PER_MIN} MB/min measured on "
          f"real music for the per-segment float16 layout x frame ratio {m['raw_frames_vs_per_segment']:.2f} "
          f"x int16/float16 bytes {m['int16_vs_float16_bytes']:.2f}, both ratios measured here); teacher.h5 "
          f"{d['teacher_gb']:.1f} GB; DVC cache +{d['dvc_cache_extra_gb']:.0f} GB (linked); pipeline outputs "
          f"{d['outputs_gb']:.1f} GB (target <= 100 GB); the audio itself ~{d['audio_gb_assumed']:.0f} GB "
          f"(ASSUMED {AUDIO_MB_PER_MIN} MB/min)")
    print(f"one GPU machine: {g['total_s'] / 3600:.1f} h (target <= 24 h)")


def main() -> int:
    from pipeline.params import load_params

    defaults = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=11_000)
    ap.add_argument("--minutes", type=float, default=4.0, help="minutes per song")
    # With strategy segments an epoch trains on every training segment (~388 000 for 11 000 songs),
    # so 10 epochs see about as many segments as 100 epochs of 4 segments per track; the fidelity
    # benchmark's student was still improving after 12 epochs of its 3 300 (docs/fidelity.md).
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--stage2-epochs", type=int, default=1)
    ap.add_argument("--val-ratio", type=float, default=defaults.ingest.val_ratio)
    ap.add_argument("--val-max-segments", type=int,
                    default=defaults.distill_audio.val_max_segments,
                    help="distill_audio.val_max_segments: segments validated per epoch")
    ap.add_argument("--strategy", choices=("segments", "tracks", "both"),
                    default=defaults.distill_audio.strategy,
                    help="distill_audio.strategy: what an epoch trains on")
    ap.add_argument("--segments-per-track", type=int,
                    default=defaults.distill_audio.segments_per_track,
                    help="distill_audio.segments_per_track: segments a track item draws per epoch (0: all)")
    ap.add_argument("--model", default="mn10_as", help="audio student backbone")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores of this machine to project with")
    ap.add_argument("--song-seconds", type=float, default=None,
                    help="length of each benchmark song (default: --minutes, so tail windows and chunk padding weigh "
                         "as they will in the corpus)")
    ap.add_argument("--gpu-json", default=None, help="rates measured by benchmarks/gpu.py on a GPU")
    ap.add_argument("--json", default=None, help="write every figure here too")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        units = {"mels": measure_mels(Path(tmp), a.song_seconds or a.minutes * 60.0)}
        units["loader"] = measure_loader(units["mels"].pop("cache"))
    units["teacher"] = measure_teacher()
    units["student"] = measure_student(a.model)
    gpu = gpu_rates(a.gpu_json, a.model, units["loader"]["random_segments_per_cpu_s"])
    proj = project(units, a, gpu)
    report(units, proj, gpu, a.cores)
    print(f"(measured in {time.perf_counter() - t0:.0f} s wall)")
    if a.json:
        Path(a.json).write_text(json.dumps({"units": units, "gpu": gpu, "projection": proj}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
