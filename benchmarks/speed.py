"""CPU speed of the teacher audio tower against the exported ONNX students.

    python benchmarks/speed.py [--threads 2] [--song-seconds 240] [--repeats 5] [--json out.json]

In one run, each contender is measured in its own subprocess (so peak memory is its own):
- teacher: the LAION-CLAP HTSAT-base audio tower (transformers ClapAudioModelWithProjection,
  random weights, PyTorch fp32) with the CLAP log-mel front-end at 48 kHz;
- mn10 / mn04 (and their int8 variants): the waveform-input student ONNX files (random weights,
  exported by pipeline.stages.export, EfficientAT mel front-end inside) on onnxruntime at 32 kHz.
Per 10-s segment: median of --repeats single-segment calls after a warm-up. Whole song: decode an
MP3 of --song-seconds, segment by the one rule, embed in batches of 8, average (one timed run).
Reported: ms, speed-up over the teacher, parameters, model file size, peak RSS.
Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEGMENT_SECONDS, HOP_SECONDS, BATCH = 10.0, 5.0, 8


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, ORT graph preparation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def make_song(path: Path, seconds: float) -> Path:
    """A deterministic stereo 44.1-kHz MP3: chords, a bass line and noise bursts."""
    import soundfile as sf

    sr = 44100
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(0)
    x = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
    x += 0.2 * np.sin(2 * np.pi * 55.0 * (1 + (t // 2) % 4 / 4) * t)
    x += 0.1 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2 * t) > 0.9)
    sf.write(path, np.stack([x, 0.9 * x], axis=1).astype(np.float32), sr, format="MP3")
    return path


# --------------------------------------------------------------------------- contenders (child processes)


def bench_teacher(song: Path, threads: int, repeats: int) -> dict:
    import torch
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    from pipeline.data.audio import decode, segments
    from pipeline.data.frontends import TeacherMel
    from pipeline.params import TeacherFrontendParams
    from pipeline.teacher.model import htsat_base_audio_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ClapAudioConfig(**htsat_base_audio_config(), projection_dim=512)
    model = ClapAudioModelWithProjection(cfg).eval()
    frontend = TeacherMel(TeacherFrontendParams()).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "w.pt")
        size = (Path(tmp) / "w.pt").stat().st_size

    def embed(wave: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            mels = frontend(torch.from_numpy(wave)).unsqueeze(1)  # [B, 1, 1001, 64]
            is_longer = torch.zeros(mels.shape[0], 1, dtype=torch.bool)
            return model(input_features=mels, is_longer=is_longer).audio_embeds.numpy()

    segment = np.random.default_rng(1).uniform(-0.5, 0.5, (1, int(48000 * SEGMENT_SECONDS))).astype(np.float32)
    seg_ms = _median_ms(lambda: embed(segment), repeats)
    t0 = time.perf_counter()
    wave = decode(song, 48000)
    decode_ms = (time.perf_counter() - t0) * 1000.0
    windows = segments(wave, 48000, SEGMENT_SECONDS, HOP_SECONDS)
    out = np.concatenate([embed(windows[i : i + BATCH]) for i in range(0, len(windows), BATCH)])
    song_ms = (time.perf_counter() - t0) * 1000.0
    assert out.shape == (len(windows), 512)
    return {"name": "teacher HTSAT-base (PyTorch fp32)", "segment_ms": seg_ms, "song_ms": song_ms, "decode_ms": decode_ms,
            "segments": len(windows), "parameters": params, "file_mb": size / 1e6, "peak_mb": _peak_mb()}


def export_student(backbone: str, out_dir: Path, int8: bool) -> tuple[Path, int]:
    import torch

    from pipeline.data.frontends import StudentMel
    from pipeline.models.audio_student import build_audio_student
    from pipeline.params import StudentFrontendParams
    from pipeline.stages import export as ex

    torch.manual_seed(0)
    student = build_audio_student({"backbone": backbone}).eval()
    fe = StudentFrontendParams()
    segment_samples = int(fe.sample_rate * SEGMENT_SECONDS)
    info = ex.export_audio(student, StudentMel(fe), out_dir, segment_samples=segment_samples,
                           sample_rate=fe.sample_rate, opset=17, min_cosine=0.9999, quantize=int8)
    spec = {"version": ex.SPEC_VERSION, "embedding_dim": 512, "skipped": {},
            "audio": ex.audio_spec(info, sample_rate=fe.sample_rate, segment_seconds=SEGMENT_SECONDS,
                                   hop_seconds=HOP_SECONDS, segment_samples=segment_samples, quantized=int8,
                                   decode_sample_rate=48000)}
    (out_dir / ex.SPEC).write_text(json.dumps(spec))
    path = out_dir / (ex.AUDIO_INT8_ONNX if int8 else ex.AUDIO_ONNX)
    return path, sum(p.numel() for p in student.parameters())


def bench_student(onnx_path: Path, params: int, label: str, song: Path, threads: int, repeats: int) -> dict:
    # onnxruntime only, the code path of `student-clap embed` (no torch in this process)
    from pipeline.data.audio import decode_int16
    from pipeline.runtime.search import AudioEmbedder

    embedder = AudioEmbedder(onnx_path.parent, int8="int8" in onnx_path.name, batch_size=BATCH, threads=threads)
    assert embedder.model_path == onnx_path
    segment = np.random.default_rng(1).uniform(-0.5, 0.5, (1, embedder.sample_rate * int(SEGMENT_SECONDS)))
    segment = segment.astype(np.float32)
    seg_ms = _median_ms(lambda: embedder.embed_segments(segment), repeats)
    t0 = time.perf_counter()
    decode_int16(song, embedder.decode_sample_rate)
    decode_ms = (time.perf_counter() - t0) * 1000.0
    t0 = time.perf_counter()
    vec, n_segments = embedder.embed_file(song)  # decode 48 kHz, segment, resample to 32 kHz, embed, average
    song_ms = (time.perf_counter() - t0) * 1000.0
    assert "torch" not in sys.modules
    return {"name": label, "segment_ms": seg_ms, "song_ms": song_ms, "decode_ms": decode_ms, "segments": n_segments,
            "parameters": params, "file_mb": onnx_path.stat().st_size / 1e6, "peak_mb": _peak_mb()}


def _child(args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.one == "teacher":
        result = bench_teacher(Path(args.song), args.threads, args.repeats)
    else:
        meta = json.loads(args.one)
        result = bench_student(Path(meta["path"]), meta["params"], meta["label"], Path(args.song), args.threads, args.repeats)
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver


def _run_child(one: str, song: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--one", one, "--song", str(song), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark child {one!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--song-seconds", type=float, default=240.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--students", default="mn10_as,mn04_as")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 student variants")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--song", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        song = make_song(tmp / "song.mp3", args.song_seconds)
        print(f"song: {args.song_seconds:.0f} s MP3; CPU threads: {args.threads}; repeats: {args.repeats}", flush=True)
        results = [_run_child("teacher", song, args)]
        print(f"  measured {results[-1]['name']}", flush=True)
        for backbone in args.students.split(","):
            for int8 in (False,) if args.no_int8 else (False, True):
                out = tmp / f"{backbone}{'_int8' if int8 else ''}"
                path, params = export_student(backbone, out, int8)
                label = f"student {backbone.split('_')[0]} (ONNX {'int8' if int8 else 'fp32'})"
                results.append(_run_child(json.dumps({"path": str(path), "params": params, "label": label}), song, args))
                print(f"  measured {label}", flush=True)

    teacher = results[0]
    header = (f"{'model':<34} {'ms/segment':>10} {'x':>6} {'ms/song':>9} {'x':>6} {'decode ms':>9} "
              f"{'params':>11} {'file MB':>8} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        r["segment_speedup"] = teacher["segment_ms"] / r["segment_ms"]
        r["song_speedup"] = teacher["song_ms"] / r["song_ms"]
        print(f"{r['name']:<34} {r['segment_ms']:>10.1f} {r['segment_speedup']:>6.1f} {r['song_ms']:>9.0f} "
              f"{r['song_speedup']:>6.1f} {r['decode_ms']:>9.0f} {r['parameters']:>11,} {r['file_mb']:>8.1f} "
              f"{r['peak_mb']:>8.0f}")
    print(f"(song: {teacher['segments']} segments of {SEGMENT_SECONDS:g} s, hop {HOP_SECONDS:g} s; "
          "'x' = speed-up over the teacher; song time includes the MP3 decode (also shown alone) and resampling)")
    print(f"load average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
