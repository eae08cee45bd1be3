"""Mel cache precision: bytes per audio-minute against embedding fidelity, for each quantisation step.

    python benchmarks/mel_precision.py [--audio data/demo/audio] [--song-seconds 120 --songs 12]
        [--steps 0:0,0.05:0.005,0.1:0.005,...] [--teacher models/teacher]
        [--student models/audio/student.pt] [--fidelity-segments 240] [--json out.json]

Three sets of tracks, each decoded and turned into log-mels by the mels stage's own processor
(pipeline decode, int16, resampling, torch front-ends; float32 as computed):

- demo:  the demo songs under --audio (mp3, Ogg Vorbis, Opus, FLAC, WAV);
- synth: --songs demo recipes rendered at --song-seconds (the mixed formats of the demo);
- room:  the same songs made more like produced music before encoding: a second recipe mixed in
         at -6 dB (a dense mix), a 1.2-s reverb tail (30 % wet) and a noise floor 55 dB under the
         peak, written in each song's own format.

For each step pair TEACHER_DB:STUDENT (0:0 = full float16, the storage before int16 codes) every set
is written through part files into a cache (mels.compression from params.yaml), and the printed
figures are: MB of cache per audio-minute, the CPU seconds of that writing per audio-minute, and
over up to --fidelity-segments segments per set (evenly spaced) the cosine between the embedding
of the values as computed (float32) and of the values the cache reads back: the teacher's segment
embedding (models/teacher, e.g. the demo teacher after `dvc checkout`) and the audio student's
(models/audio/student.pt; a fresh mn04 student, seeded, when that file is absent), min and median.

--mechanisms also compares ways of storing the same frames at the configured steps (on the
frames of the last set, as a float16 cache holds them): float16 as computed, float16 of the
rounded values, int16 codes with gzip-1 + shuffle (the cache's choice) or lzf, int16 codes through
HDF5's scale-offset filter (alone and with gzip-1), and float32 through the scale-offset filter's
decimal mode (steps of 10^-D only: 0.1 dB teacher, 0.01 student); MB per audio-minute and the CPU
milliseconds per audio-minute of writing and of reading them back.

The rule for mels.precision's default, applied to every set: the minimum teacher cosine must be
>= 0.9999 with a 10x margin (1 - cosine <= 1e-5: a real HTSAT-base teacher may be more sensitive
than the small demo one), the minimum student cosine >= 0.9995; among the pairs that pass, the one
with the fewest bytes is printed as the choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.mels import Capture, capture, cpu_seconds, find_tracks, write_captured  # noqa: E402
from pipeline.data import mel_cache  # noqa: E402
from pipeline.params import Params, load_params  # noqa: E402

MIN_TEACHER_COSINE = 0.9999
TEACHER_MARGIN = 10.0  # required: 1 - min teacher cosine <= (1 - MIN_TEACHER_COSINE) / TEACHER_MARGIN
MIN_STUDENT_COSINE = 0.9995


def parse_steps(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        t, s = item.split(":")
        out.append((float(t), float(s)))
    return out


# --------------------------------------------------------------------------- track sets


def room_song(song, other, root: Path) -> Path:
    """`song` with `other`'s music mixed in at -6 dB, a reverb tail and a noise floor, peak -1 dBFS."""
    from scipy.signal import fftconvolve

    from pipeline.data.demo_audio import render, synthesize, write_wave

    rng = np.random.default_rng(song.seed + 1000)
    sr = song.sample_rate
    x = synthesize(song)  # [channels, samples]
    x = x + 0.5 * render(other.music, song.seconds, sr, other.seed, channels=song.channels, level_db=song.level_db)
    n_ir = int(1.2 * sr)  # exponentially decaying noise: -60 dB after 1.2 s
    ir = rng.standard_normal(n_ir) * np.exp(-6.9 * np.arange(n_ir) / n_ir)
    ir /= np.sqrt(np.sum(ir**2))
    wet = np.stack([fftconvolve(ch, ir)[: x.shape[1]] for ch in x])
    x = 0.7 * x + 0.3 * wet
    peak = float(np.max(np.abs(x))) or 1.0
    noise = np.cumsum(rng.standard_normal(x.shape), axis=1)  # brownish hiss, high-passed below
    noise = noise - np.convolve(noise.mean(axis=0), np.ones(64) / 64, mode="same")
    noise *= peak * 10 ** (-55 / 20) / (np.std(noise) or 1.0)
    x = x + noise
    x *= 10 ** (-1 / 20) / float(np.max(np.abs(x)))
    return write_wave(song, x.T.astype(np.float32), root)


def track_sets(a: argparse.Namespace, work: Path) -> dict[str, list[Path]]:
    from pipeline.data.demo_audio import SONGS, write_song

    sets: dict[str, list[Path]] = {}
    if Path(a.audio).exists():
        sets["demo"] = find_tracks(Path(a.audio))
    songs = [dataclasses.replace(s, seconds=a.song_seconds) for s in SONGS[: a.songs]]
    sets["synth"] = [write_song(s, work / "synth") for s in songs]
    sets["room"] = [room_song(s, songs[(i + 3) % len(songs)], work / "room") for i, s in enumerate(songs)]
    return sets


# --------------------------------------------------------------------------- models


class Embedders:
    """Teacher and student segment embeddings (L2-normalised, float64 numpy)."""

    def __init__(self, teacher_dir: Path, student_path: Path) -> None:
        import torch

        from pipeline.teacher.model import load_teacher

        self.torch = torch
        self.teacher = load_teacher(teacher_dir)
        if student_path.exists():
            from pipeline.models.audio_student import load_audio_student

            self.student = load_audio_student(student_path)
            self.student_name = str(student_path)
        else:
            from pipeline.models.audio_student import build_audio_student

            torch.manual_seed(0)
            self.student = build_audio_student({"backbone": "mn04_as", "embed_dim": 512, "dropout": 0.0,
                                                "n_mels": 128}).eval()
            self.student_name = "mn04_as, random init (seed 0)"

    def teacher_embed(self, mels: np.ndarray) -> np.ndarray:
        out = [self.teacher.embed_mels(self.torch.from_numpy(mels[i : i + 16])).numpy() for i in range(0, len(mels), 16)]
        return np.concatenate(out).astype(np.float64)

    def student_embed(self, mels: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = [self.student(self.torch.from_numpy(mels[i : i + 16])).numpy() for i in range(0, len(mels), 16)]
        e = np.concatenate(out).astype(np.float64)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


# --------------------------------------------------------------------------- one set


def write_cache(captured: list[Capture], work: Path, params: Params, steps: tuple[float, float]) -> tuple[Path, float]:
    """The captured tracks written as the mels stage writes them; (cache, CPU seconds)."""
    cparams = mel_cache.cache_params(params.audio, params.frontend, 0.0, {"teacher_db": steps[0], "student": steps[1]})
    comp = mel_cache.Compression(params.mels.compression, params.mels.compression_level, True)
    return write_captured(captured, work, cparams, comp, params.mels.chunk_frames)


def measure_set(name: str, captured: list[Capture], work: Path, params: Params, steps: list[tuple[float, float]],
                models: Embedders, n_fidelity: int) -> list[dict]:
    minutes = sum(c.record.duration for c in captured) / 60.0
    full_t = np.concatenate([b[0] for c in captured for b in c.batches]).astype(np.float32)
    full_s = np.concatenate([b[1] for c in captured for b in c.batches]).astype(np.float32)
    pick = np.unique(np.linspace(0, len(full_t) - 1, min(n_fidelity, len(full_t))).round().astype(np.int64))
    ref_t, ref_s = models.teacher_embed(full_t[pick]), models.student_embed(full_s[pick])
    rows = []
    for st in steps:
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            out, cpu = write_cache(captured, Path(scratch), params, st)
            size = out.stat().st_size
            with mel_cache.MelCache(out) as cache:
                got_t, got_s = cache.teacher_mels(pick), cache.student_mels(pick)
        err_t, err_s = float(np.abs(got_t - full_t[pick]).max()), float(np.abs(got_s - full_s[pick]).max())
        cos_t = np.sum(models.teacher_embed(got_t) * ref_t, axis=1)
        cos_s = np.sum(models.student_embed(got_s) * ref_s, axis=1)
        rows.append({"set": name, "teacher_db": st[0], "student": st[1], "audio_minutes": minutes,
                     "segments": len(full_t), "fidelity_segments": len(pick),
                     "mb_per_audio_minute": size / 1e6 / minutes, "write_cpu_s_per_audio_minute": cpu / minutes,
                     "max_error_teacher_db": err_t, "max_error_student": err_s,
                     "teacher_cos_min": float(cos_t.min()), "teacher_cos_median": float(np.median(cos_t)),
                     "student_cos_min": float(cos_s.min()), "student_cos_median": float(np.median(cos_s))})
        r = rows[-1]
        print(f"{name:6} {st[0]:>6g}:{st[1]:<7g} {r['mb_per_audio_minute']:7.3f} {r['write_cpu_s_per_audio_minute']:8.3f} "
              f"{err_t:8.4f} {err_s:8.5f}  {r['teacher_cos_min']:.7f} {r['teacher_cos_median']:.7f}  "
              f"{r['student_cos_min']:.7f} {r['student_cos_median']:.7f}", flush=True)
    return rows


def mechanisms(captured: list[Capture], work: Path, params: Params) -> list[dict]:
    """Bytes and CPU of storing one set's frames by each candidate mechanism (see the docstring)."""
    import io

    import h5py

    minutes = sum(c.record.duration for c in captured) / 60.0
    out, _ = write_cache(captured, work, params, (0.0, 0.0))
    with h5py.File(out) as f:
        frames = {name: f[f"{name}/frames"][:] for name in ("teacher", "student")}
    out.unlink()
    step = {"teacher": params.mels.precision.teacher_db, "student": params.mels.precision.student}
    codes = {k: mel_cache.quantise(v.astype(np.float32), step[k]) for k, v in frames.items()}
    rounded = {k: mel_cache.dequantise(c, step[k]).astype(np.float16) for k, c in codes.items()}
    as_f32 = {k: v.astype(np.float32) for k, v in frames.items()}
    gz = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    candidates = [
        ("float16 as computed, gzip-1+shuffle", frames, {k: gz for k in frames}),
        ("float16 of rounded values, gzip-1+shuffle", rounded, {k: gz for k in frames}),
        ("int16 codes, gzip-1+shuffle (chosen)", codes, {k: gz for k in frames}),
        ("int16 codes, lzf+shuffle", codes, {k: {"compression": "lzf", "shuffle": True} for k in frames}),
        ("int16 codes, scale-offset", codes, {k: {"scaleoffset": 0} for k in frames}),
        ("int16 codes, scale-offset+gzip-1", codes,
         {k: {"scaleoffset": 0, "compression": "gzip", "compression_opts": 1} for k in frames}),
        ("float32 scale-offset D=1/D=2, gzip-1", as_f32,
         {"teacher": {"scaleoffset": 1, "compression": "gzip", "compression_opts": 1},
          "student": {"scaleoffset": 2, "compression": "gzip", "compression_opts": 1}}),
    ]
    rows = []
    for label, arrays, kw in candidates:
        buf = io.BytesIO()
        c0 = cpu_seconds()
        with h5py.File(buf, "w") as f:
            for k, a in arrays.items():
                f.create_dataset(k, data=a, chunks=(a.shape[0], params.mels.chunk_frames), **kw[k])
        write = cpu_seconds() - c0
        c0 = cpu_seconds()
        with h5py.File(buf, "r") as f:
            for k in arrays:
                f[k][:]
        read = cpu_seconds() - c0
        rows.append({"mechanism": label, "mb_per_audio_minute": len(buf.getvalue()) / 1e6 / minutes,
                     "write_cpu_ms_per_audio_minute": 1e3 * write / minutes,
                     "read_cpu_ms_per_audio_minute": 1e3 * read / minutes})
    print(f"frames only, steps {step['teacher']:g} dB / {step['student']:g}, {minutes:.1f} audio-minutes:")
    print(f"{'mechanism':42} {'MB/min':>7} {'write CPU-ms/min':>16} {'read CPU-ms/min':>15}")
    for r in rows:
        print(f"{r['mechanism']:42} {r['mb_per_audio_minute']:7.3f} {r['write_cpu_ms_per_audio_minute']:16.1f} "
              f"{r['read_cpu_ms_per_audio_minute']:15.1f}")
    return rows


def summary(rows: list[dict], steps: list[tuple[float, float]]) -> dict:
    """Bytes ratios against float16 per set, the chosen step and the real-music estimate."""
    out: dict = {"ratio_vs_float16": {}}
    for name in dict.fromkeys(r["set"] for r in rows):
        base = next((r for r in rows if r["set"] == name and r["teacher_db"] == 0 and r["student"] == 0), None)
        if base:
            out["ratio_vs_float16"][name] = {f"{r['teacher_db']:g}:{r['student']:g}": r["mb_per_audio_minute"]
                                             / base["mb_per_audio_minute"] for r in rows if r["set"] == name}
    def passes(st: tuple[float, float]) -> bool:
        mine = [r for r in rows if (r["teacher_db"], r["student"]) == st]
        return all(1 - r["teacher_cos_min"] <= (1 - MIN_TEACHER_COSINE) / TEACHER_MARGIN
                   and r["student_cos_min"] >= MIN_STUDENT_COSINE for r in mine)

    def total_mb(st: tuple[float, float]) -> float:
        return sum(r["mb_per_audio_minute"] for r in rows if (r["teacher_db"], r["student"]) == st)

    ok = [st for st in steps if min(st) > 0 and passes(st)]
    if ok:
        best = min(ok, key=total_mb)
        out["chosen"] = f"{best[0]:g}:{best[1]:g}"
        # real music: format 1 took 3.5 MB/min; format 2 keeps 0.53 of its frames; times our ratio
        for name, ratios in out["ratio_vs_float16"].items():
            out.setdefault("real_music_estimate_mb", {})[name] = 3.5 * 0.53 * ratios[out["chosen"]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", default="data/demo/audio", help="demo songs (left out when absent)")
    ap.add_argument("--song-seconds", type=float, default=120.0, help="length of each synthesised song")
    ap.add_argument("--songs", type=int, default=12, help="how many synthesised songs (demo recipes)")
    ap.add_argument("--steps", default="0:0,0.02:0.002,0.05:0.005,0.1:0.005,0.1:0.01,0.2:0.005,0.2:0.02",
                    help="TEACHER_DB:STUDENT step pairs, comma-separated (0:0 = float16)")
    ap.add_argument("--teacher", default="models/teacher", help="teacher folder")
    ap.add_argument("--student", default="models/audio/student.pt", help="audio student (mn04 at random when absent)")
    ap.add_argument("--fidelity-segments", type=int, default=240, help="segments per set embedded for the cosines")
    ap.add_argument("--mechanisms", action="store_true", help="also compare storage mechanisms at the configured steps")
    ap.add_argument("--json", default=None, help="write the figures here too")
    a = ap.parse_args()

    steps = parse_steps(a.steps)
    params = load_params(ROOT / "params.yaml")
    models = Embedders(Path(a.teacher), Path(a.student))
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = track_sets(a, work)
        print(f"teacher {a.teacher}, student {models.student_name}; compression "
              f"{mel_cache.Compression(params.mels.compression, params.mels.compression_level, True).describe()}")
        print(f"{'set':6} {'step dB:student':>15} {'MB/min':>7} {'CPU-s/min':>8} {'max err':>8} {'max err':>8}  "
              f"{'teacher cos min / median':>24}  {'student cos min / median':>24}")
        captured: list[Capture] = []
        for name, tracks in sets.items():
            captured = capture(tracks, params)
            rows += measure_set(name, captured, work, params, steps, models, a.fidelity_segments)
        mech = mechanisms(captured, work, params) if a.mechanisms else []
    result = {"rows": rows, **summary(rows, steps), "mechanisms": mech, "seconds": time.perf_counter() - t0,
              "student": models.student_name, "teacher": a.teacher}
    for name, ratios in result["ratio_vs_float16"].items():
        print(f"{name}: bytes vs float16 " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    if "chosen" in result:
        print(f"fewest bytes with min teacher cosine >= 1 - {(1 - MIN_TEACHER_COSINE) / TEACHER_MARGIN:g} "
              f"(the {MIN_TEACHER_COSINE} bar with a {TEACHER_MARGIN:g}x margin) and min student cosine >= "
              f"{MIN_STUDENT_COSINE} on every set: {result['chosen']}")
        print("real-music estimate (3.5 MB/min x 0.53 frame ratio x bytes ratio; an estimate, not a measurement): "
              + ", ".join(f"from {k} {v:.2f} MB/min" for k, v in result["real_music_estimate_mb"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
