"""CPU cost of embedding songs: the teacher, today's segment-wise students and the song-level path.

    OMP_NUM_THREADS=2 python benchmarks/speed.py [--threads 2] [--song-seconds 240] [--repeats 5]
                                                 [--students mn10_as,mn04_as] [--no-teacher] [--json out.json]

One run measures everything side by side; each contender runs in its own subprocess (its own
peak memory), and inside a student's process the old and new paths alternate run by run, so they
share the machine's load. The machine is shared: the figures that count are CPU-seconds
(user + system of the process, `resource.getrusage`) and ratios from the same run; wall times are
shown for reference only.

- teacher: LAION-CLAP HTSAT-base audio tower (random weights, PyTorch fp32), CLAP log-mel at 48 kHz.
- per student (random weights exported by pipeline.models.audio_export and song_export, BatchNorm
  statistics set on the benchmark song's own mels so activations have realistic scales):
  * old: `student-clap embed --segment-wise`: decode at 48 kHz, resample the int16 audio to 32 kHz,
    every 10-s window through the waveform model (student_clap.search.AudioEmbedder);
  * new: the default: the same decoded samples (both resamplings streamed, no 48-kHz copy), front-end
    (the numpy log-mel, student_clap.logmel) and trunk once per run of windows, the edge columns
    of each window recomputed, head per window (student_clap.song); fp32, fp32 with the exported
    ONNX front-end instead (what runs without scipy), fp32 with the one-pass decode
    (--one-pass-decode), int8 head, and the int8 head after a static int8 trunk (QDQ, calibrated
    like the head; measured here only, the export keeps the trunk in fp32).
  Per part of the new path (fp32 and int8): MP3 decode, each resampling, front-end, trunk and head
  (their onnxruntime calls) and the Python around them, CPU-s median over --repeats.
  Per song: the song's decode alone, then decode + embed, CPU-s median over --repeats; the network
  share is the difference. Per segment: the old model on one window (median of --repeats); for the
  new path the song's network CPU-s divided by its windows. GFLOP/s: the network's floating-point
  operations (counted with torch's FlopCounterMode on the export-path graphs, multiply-add = 2)
  per network CPU-second, against the machine's own float32 GEMM rate (numpy and onnxruntime
  MatMul, 1024^3, per CPU-second). Cosine: the new song vector against the old one.
- decode per format (mp3, ogg, opus, flac, wav of the same song): old (48 kHz, then int16 resampled
  to 32 kHz), new (the same, streamed; whether its samples equal old's) and one pass (one resampling
  to 32 kHz), CPU-s, and the one-pass difference to old in int16 steps (max) and as a
  signal-to-difference ratio.
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
INT8_TRUNK = "trunk.int8.bench.onnx"  # written beside the export by export_student, for the int8-trunk row
PATH_LABELS = {"old": "old (segment-wise)", "new": "new fp32", "new_onnx_fe": "new fp32 ONNX front-end",
               "new_1pass": "new fp32 1-pass decode", "new_int8": "new int8", "new_int8_trunk": "new int8 head+trunk"}
SPLIT_LABELS = {"read": "MP3 decode", "to48": "downmix + resample to 48 kHz", "to32": "resample to 32 kHz",
                "frontend": "front-end", "trunk": "trunk", "head": "head", "glue": "Python glue"}
FORMATS = {"mp3": ("MP3", None, 44100), "ogg": ("OGG", "VORBIS", 44100), "opus": ("OGG", "OPUS", 48000),
           "flac": ("FLAC", None, 44100), "wav": ("WAV", "PCM_16", 44100)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


SETTLE_S = 0.05  # onnxruntime pool threads may spin-wait this long after a call


def _timed(fn, settle: bool = True) -> tuple[float, float, object]:
    """(CPU-s, wall-s, result) of one call. With `settle` the CPU-seconds include what the call's
    thread pools burn spin-waiting after it returns (else the next measurement is billed for them)."""
    c, t = _cpu(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    if settle:
        time.sleep(SETTLE_S)
    return _cpu() - c, wall, out


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, ORT graph preparation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def song_signal(seconds: float, sr: int) -> np.ndarray:
    """A deterministic stereo song: chords, a stepping bass line and noise bursts."""
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(0)
    x = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
    x += 0.2 * np.sin(2 * np.pi * 55.0 * (1 + (t // 2) % 4 / 4) * t)
    x += 0.1 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2 * t) > 0.9)
    return np.stack([x, 0.9 * x], axis=1).astype(np.float32)


def make_song(path: Path, seconds: float, fmt: str = "mp3") -> Path:
    import soundfile as sf

    container, subtype, sr = FORMATS[fmt]
    x = song_signal(seconds, sr)
    # in blocks: libsndfile's Vorbis encoder crashes on one large write
    with sf.SoundFile(path, "w", sr, 2, format=container, subtype=subtype) as f:
        for i in range(0, len(x), 1 << 16):
            f.write(x[i : i + (1 << 16)])
    return path


# --------------------------------------------------------------------------- machine GEMM rate


def gemm_rates(n: int = 1024, repeats: int = 5) -> dict:
    """float32 [n, n] @ [n, n]: GFLOP per CPU-second and per wall-second, numpy and onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n ** 3
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = {}
    for name, fn in (("numpy", lambda: a @ b), ("onnxruntime", lambda: sess.run(None, {"a": a, "b": b}))):
        fn()
        runs = [_timed(fn, settle=False)[:2] for _ in range(repeats)]  # back-to-back: the rate itself
        cpu, wall = np.median([r[0] for r in runs]), np.median([r[1] for r in runs])
        out[name] = {"gflops_per_cpu_s": flop / cpu / 1e9, "gflops_per_wall_s": flop / wall / 1e9}
    return out


# --------------------------------------------------------------------------- contenders (child processes)


def bench_teacher(song: Path, threads: int, repeats: int) -> dict:
    import torch
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    from student_clap.audio import decode, segments
    from pipeline.data.frontends import TeacherMel
    from pipeline.params import TeacherFrontendParams
    from pipeline.teacher.model import htsat_base_audio_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ClapAudioConfig(**htsat_base_audio_config(), projection_dim=512)
    model = ClapAudioModelWithProjection(cfg).eval()
    frontend = TeacherMel(TeacherFrontendParams()).eval()
    params = sum(p.numel() for p in model.parameters())

    def embed(wave: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            mels = frontend(torch.from_numpy(wave)).unsqueeze(1)  # [B, 1, 1001, 64]
            is_longer = torch.zeros(mels.shape[0], 1, dtype=torch.bool)
            return model(input_features=mels, is_longer=is_longer).audio_embeds.numpy()

    segment = np.random.default_rng(1).uniform(-0.5, 0.5, (1, int(48000 * SEGMENT_SECONDS))).astype(np.float32)
    seg_ms = _median_ms(lambda: embed(segment), repeats)
    dec_cpu, _, wave = _timed(lambda: decode(song, 48000))
    windows = segments(wave, 48000, SEGMENT_SECONDS, HOP_SECONDS)
    net_cpu, _, out = _timed(lambda: np.concatenate([embed(windows[i : i + BATCH]) for i in range(0, len(windows), BATCH)]))
    assert out.shape == (len(windows), 512)
    return {"name": "teacher HTSAT-base (PyTorch fp32)", "segment_ms": seg_ms, "decode_cpu": dec_cpu,
            "song_cpu": dec_cpu + net_cpu, "segments": len(windows), "parameters": params, "peak_mb": _peak_mb()}


def export_student(backbone: str, out_dir: Path, song: Path) -> dict:
    """Export a random-weight student (all files of the export stage) and count its FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from student_clap.audio import decode_int16, int16_to_float, segments
    from pipeline.data.frontends import StudentMel, set_export_stft
    from pipeline.models import audio_export, export_bundle, onnx_export, song_export
    from pipeline.models.audio_student import build_audio_student
    from pipeline.params import StudentFrontendParams
    from student_clap.search import open_audio_embedder
    from student_clap.song import SPAN_WINDOWS, _runs

    torch.manual_seed(0)
    student = build_audio_student({"backbone": backbone}).eval()
    fe = StudentMel(StudentFrontendParams()).eval()
    sr = fe.params.sample_rate
    seg, hop = int(sr * SEGMENT_SECONDS), int(sr * HOP_SECONDS)
    wave = decode_int16(song, sr)
    with torch.no_grad():
        mels = fe(torch.from_numpy(int16_to_float(segments(wave, sr, SEGMENT_SECONDS, HOP_SECONDS))))
    student.recalibrate_batchnorm([mels[i : i + 8] for i in range(0, len(mels), 8)])
    info = audio_export.export_audio(student, fe, out_dir, segment_samples=seg, sample_rate=sr, opset=17, min_cosine=0.9999,
                                     quantize=True)
    song_info = song_export.export_song(student, fe, out_dir, segment_samples=seg, hop_samples=hop, sample_rate=sr, opset=17,
                                        min_cosine=0.9999, quantize=True, calibration_mels=mels[::2].numpy(),
                                        eval_mels=mels[1::2].numpy())
    audio = audio_export.audio_spec(info, sample_rate=sr, segment_seconds=SEGMENT_SECONDS, hop_seconds=HOP_SECONDS,
                                    segment_samples=seg, quantized=True, decode_sample_rate=48000)
    audio["song"] = song_export.song_spec(song_info, True)
    # The trunk in static int8 as well (QDQ convolutions, per-channel weights, calibrated on the same
    # mels as the head): measured here beside fp32, not exported (see the README's Indexing speed).
    calib = mels[::2].numpy()
    onnx_export.quantize_static_int8(out_dir / song_export.AUDIO_TRUNK_ONNX, out_dir / INT8_TRUNK,
                                     [{"mel": calib[i : i + 4]} for i in range(0, len(calib), 4)], ("Conv",))
    (out_dir / export_bundle.SPEC).write_text(json.dumps({"version": export_bundle.SPEC_VERSION, "embedding_dim": 512,
                                                          "skipped": {}, "audio": audio}))

    # FLOPs on the graphs onnxruntime runs (the matmul STFT, not torch's FFT)
    set_export_stft(fe, True)
    split = song_export.trunk_split(student.encoder)
    trunk, head = song_export.SongTrunk(student, split), song_export.SongHead(student, split)
    g = audio["song"]

    def flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    old_window = flops(lambda: student.embed_raw(fe(torch.zeros(1, seg))))
    starts = list(range(0, len(wave) - seg + 1, hop))
    if starts[-1] + seg < len(wave):
        starts.append(len(wave) - seg)
    new_song = net_song = 0.0  # all of the new path's graphs; the trunk and head alone
    song_fe = song_export.song_frontend(fe)
    edge_samples = open_audio_embedder(out_dir).edge_samples  # the edge excerpts the runtime recomputes
    for run in _runs(starts, len(wave), seg, hop, g["hop_columns"] > 0, SPAN_WINDOWS):
        excerpts = [(1, run[-1] - run[0] + seg)]
        edges = 2 * (len(run) - 1)  # each window's start and end inside the run
        if edge_samples and edges:
            excerpts.append((edges, edge_samples))
        for k, n in excerpts:
            with torch.no_grad():
                mel = song_fe(torch.zeros(k, n))
            front, body = flops(lambda k=k, n=n: song_fe(torch.zeros(k, n))), flops(lambda m=mel: trunk(m))
            new_song += front + body
            net_song += body
    with torch.no_grad():
        fmap = torch.zeros(1, *trunk(fe(torch.zeros(1, seg))).shape[1:])
    head_one = flops(lambda: head(fmap))
    new_song += head_one * len(starts)
    net_song += head_one * len(starts)
    return {"params": sum(p.numel() for p in student.parameters()), "old_flops_per_window": old_window,
            "new_flops_per_song": new_song, "network_flops_per_song": net_song, "windows": len(starts),
            "fidelity": g["fidelity"]}


class _TimedSession:
    """An onnxruntime session (or the numpy log-mel) that adds up the CPU-seconds of its calls."""

    def __init__(self, session) -> None:
        self.session, self.cpu = session, 0.0

    def _billed(self, fn, *args, **kwargs):
        c = _cpu()
        out = fn(*args, **kwargs)
        self.cpu += _cpu() - c
        return out

    def run(self, *args, **kwargs):
        return self._billed(self.session.run, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._billed(self.session, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def split_new_path(embedder, song: Path, repeats: int) -> dict:
    """CPU-s of each part of the new path on the song: MP3 decode (libsndfile to float32), the
    resampling and int16 rounding to 48 and to 32 kHz (as the segment-wise path), front-end, trunk
    and head (their onnxruntime calls, or the numpy log-mel, edge excerpts included) and the Python
    around them."""
    import soundfile as sf

    from student_clap.audio import decode_int16
    from student_clap.decode import decode_student

    parts: dict[str, list[float]] = {k: [] for k in ("read", "to48", "to32", "frontend", "trunk", "head", "glue")}
    # the front-end is the numpy log-mel where the embedder uses it, else its onnxruntime session
    attrs = {"frontend": "logmel" if embedder.logmel is not None else "frontend", "trunk": "trunk", "head": "head"}
    sessions = {k: _TimedSession(getattr(embedder, a)) for k, a in attrs.items()}
    plain = {k: getattr(embedder, a) for k, a in attrs.items()}
    wave = decode_student(song, embedder.sample_rate, via_rate=embedder.decode_via)
    try:
        for k, v in sessions.items():
            setattr(embedder, attrs[k], v)
        embedder.embed_wave(wave)
        for _ in range(repeats):
            read = _timed(lambda: sf.read(song, dtype="float32", always_2d=True))[0]
            at48 = _timed(lambda: decode_int16(song, embedder.decode_via or embedder.sample_rate))[0]
            full = _timed(lambda: decode_student(song, embedder.sample_rate, via_rate=embedder.decode_via))[0]
            for v in sessions.values():
                v.cpu = 0.0
            net = _timed(lambda: embedder.embed_wave(wave))[0]
            parts["read"].append(read)
            parts["to48"].append(at48 - read)
            parts["to32"].append(full - at48)
            for k, v in sessions.items():
                parts[k].append(v.cpu)
            parts["glue"].append(net - sum(v.cpu for v in sessions.values()))
    finally:
        for k, v in plain.items():
            setattr(embedder, attrs[k], v)
    return {k: float(np.median(v)) for k, v in parts.items()}


def bench_student(models: Path, label: str, song: Path, threads: int, repeats: int) -> dict:
    # onnxruntime only, the code path of `student-clap embed` (no torch in this process)
    from student_clap.audio import decode_int16, resample_int16
    from student_clap.decode import decode_student
    from student_clap.search import AudioEmbedder, load_spec, open_audio_embedder
    from student_clap.song import SongEmbedder

    old = open_audio_embedder(models, batch_size=BATCH, threads=threads, segment_wise=True)
    new = open_audio_embedder(models, batch_size=BATCH, threads=threads)
    new1 = open_audio_embedder(models, batch_size=BATCH, threads=threads, one_pass_decode=True)
    new8 = open_audio_embedder(models, batch_size=BATCH, threads=threads, int8=True)
    # the same song path with the exported ONNX front-end instead of the numpy log-mel
    onnx_fe = SongEmbedder(*new.model_paths, new.geometry, batch_size=BATCH, threads=threads)
    # the int8 head with the int8 trunk as well (not exported: see INT8_TRUNK)
    trunk8 = SongEmbedder(new8.model_paths[0], models / INT8_TRUNK, new8.model_paths[2], new.geometry, batch_size=BATCH,
                          threads=threads, logmel=load_spec(models)["audio"]["song"].get("frontend"))
    assert isinstance(old, AudioEmbedder) and all(isinstance(e, SongEmbedder) for e in (new, new1, new8))
    assert new.logmel is not None and onnx_fe.logmel is None, "the numpy front-end needs scipy"
    segment = np.random.default_rng(1).uniform(-0.5, 0.5, (1, old.sample_rate * int(SEGMENT_SECONDS)))
    seg_ms = _median_ms(lambda: old.embed_segments(segment.astype(np.float32)), repeats)

    paths = {
        "old": (lambda: resample_int16(decode_int16(song, old.decode_sample_rate), old.decode_sample_rate, old.sample_rate),
                lambda: old.embed_file(song)),
        **{name: (lambda e=e: decode_student(song, e.sample_rate, via_rate=e.decode_via), lambda e=e: e.embed_file(song))
           for name, e in (("new", new), ("new_onnx_fe", onnx_fe), ("new_1pass", new1), ("new_int8", new8),
                           ("new_int8_trunk", trunk8))},
    }
    runs: dict[str, dict[str, list]] = {k: {"decode": [], "song": [], "song_wall": []} for k in paths}
    vectors = {}
    for _, embed in paths.values():
        embed()  # warm-up
    for _ in range(repeats):
        for name, (decode, embed) in paths.items():
            runs[name]["decode"].append(_timed(decode)[0])
            cpu, wall, (vec, n) = _timed(embed)
            runs[name]["song"].append(cpu)
            runs[name]["song_wall"].append(wall)
            vectors[name] = vec
    library = bench_library(models, song, threads, repeats)
    split = {"fp32": split_new_path(new, song, repeats), "fp32 ONNX front-end": split_new_path(onnx_fe, song, repeats),
             "int8": split_new_path(new8, song, repeats), "int8 head+trunk": split_new_path(trunk8, song, repeats)}
    assert "torch" not in sys.modules
    out = {"name": label, "segment_ms": seg_ms, "segments": int(n), "peak_mb": _peak_mb(), "paths": {}, "split": split,
           "library": library}
    for name, r in runs.items():
        dec, total = float(np.median(r["decode"])), float(np.median(r["song"]))
        out["paths"][name] = {"decode_cpu": dec, "song_cpu": total, "network_cpu": max(total - dec, 1e-9),
                              "song_wall": float(np.median(r["song_wall"])),
                              "cosine_to_old": float(vectors[name] @ vectors["old"])}
    return out


def bench_library(models: Path, song: Path, threads: int, repeats: int) -> dict:
    """What `student-clap index` does with a folder: 2 songs per core through embed_files. old:
    segment-wise, one song at a time on `threads` onnxruntime threads; new: the default, one song
    per core at once (--jobs), one onnxruntime thread each. Wall and CPU-seconds per song, median."""
    from student_clap.search import embed_files, open_audio_embedder, song_jobs

    cores = os.cpu_count() or 1
    files = [song] * (2 * cores)
    setups = {"old": (open_audio_embedder(models, batch_size=BATCH, threads=threads, segment_wise=True), 1),
              "new": (open_audio_embedder(models, batch_size=BATCH, threads=1), song_jobs(None, len(files)))}
    out: dict[str, dict] = {}
    for name, (embedder, jobs) in setups.items():
        embed_files(embedder, files[:jobs], progress=False, jobs=jobs)  # warm-up
        runs = [_timed(lambda e=embedder, j=jobs: embed_files(e, files, progress=False, jobs=j))[:2] for _ in range(repeats)]
        out[name] = {"jobs": jobs, "threads": threads if name == "old" else 1, "songs": len(files),
                     "cpu_per_song": float(np.median([r[0] for r in runs])) / len(files),
                     "wall_per_song": float(np.median([r[1] for r in runs])) / len(files)}
    return out


def bench_decode(folder: Path, repeats: int) -> dict:
    from student_clap.audio import decode_int16, resample_int16
    from student_clap.decode import decode_student

    out = {}
    for fmt in FORMATS:
        path = folder / f"song.{fmt}"
        fns = {"old": lambda path=path: resample_int16(decode_int16(path, 48000), 48000, 32000),
               "new": lambda path=path: decode_student(path, 32000, via_rate=48000),
               "one_pass": lambda path=path: decode_student(path, 32000)}
        for fn in fns.values():
            fn()
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        waves = {}
        for _ in range(repeats):
            for k, fn in fns.items():
                c, _, waves[k] = _timed(fn)
                cpu[k].append(c)
        a, b = waves["old"], waves["one_pass"]
        n = min(len(a), len(b))
        diff = a[:n].astype(np.float64) - b[:n]
        power = float(np.mean(a[:n].astype(np.float64) ** 2))
        out[fmt] = {**{f"{k}_cpu": float(np.median(v)) for k, v in cpu.items()},
                    "new_equal": bool(np.array_equal(a, waves["new"])),
                    "max_diff_steps": int(np.abs(diff).max()), "snr_db": 10 * np.log10(power / max(np.mean(diff ** 2), 1e-12)),
                    "length_diff": int(len(a) - len(b))}
    return out


def _child(args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    meta = json.loads(args.one)
    if meta["kind"] == "teacher":
        result = bench_teacher(Path(args.song), args.threads, args.repeats)
    elif meta["kind"] == "decode":
        result = bench_decode(Path(meta["folder"]), args.repeats)
    elif meta["kind"] == "gemm":
        result = gemm_rates()
    else:
        result = bench_student(Path(meta["models"]), meta["label"], Path(args.song), args.threads, args.repeats)
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------- driver


def _run_child(meta: dict, song: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--one", json.dumps(meta), "--song", str(song), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark child {meta!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--song-seconds", type=float, default=240.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--students", default="mn10_as,mn04_as")
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher (slow)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--song", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args)
        return

    results: dict = {"students": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in FORMATS:
            make_song(tmp / f"song.{fmt}", args.song_seconds, fmt)
        song = tmp / "song.mp3"
        print(f"song: {args.song_seconds:.0f} s; CPU threads: {args.threads}; repeats: {args.repeats}", flush=True)
        results["gemm"] = _run_child({"kind": "gemm"}, song, args)
        results["decode"] = _run_child({"kind": "decode", "folder": str(tmp)}, song, args)
        print("  measured decoding", flush=True)
        if not args.no_teacher:
            results["teacher"] = _run_child({"kind": "teacher"}, song, args)
            print(f"  measured {results['teacher']['name']}", flush=True)
        for backbone in args.students.split(","):
            out = tmp / backbone
            out.mkdir()
            exported = export_student(backbone, out, song)
            label = f"student {backbone.split('_')[0]}"
            r = _run_child({"kind": "student", "models": str(out), "label": label}, song, args)
            r.update(exported)
            results["students"].append(r)
            print(f"  measured {label}", flush=True)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict, args: argparse.Namespace) -> None:
    gemm = results["gemm"]
    rate = max(gemm["numpy"]["gflops_per_cpu_s"], gemm["onnxruntime"]["gflops_per_cpu_s"])
    print(f"\nmachine float32 GEMM 1024^3 (GFLOP per CPU-s / per wall-s): "
          f"numpy {gemm['numpy']['gflops_per_cpu_s']:.1f} / {gemm['numpy']['gflops_per_wall_s']:.1f}, "
          f"onnxruntime {gemm['onnxruntime']['gflops_per_cpu_s']:.1f} / {gemm['onnxruntime']['gflops_per_wall_s']:.1f}")

    print(f"\ndecode of the {args.song_seconds:.0f}-s song to int16 at 32 kHz, CPU-s (old: 48 kHz, then the int16 "
          "resampled; new: the same two passes streamed; 1-pass: one resampling, its difference to old)")
    header = (f"{'format':<6} {'old':>7} {'new':>7} {'equal':>6} {'1-pass':>7} {'1p/old':>7} {'max diff':>9} "
              f"{'SNR dB':>7}")
    print(header + "\n" + "-" * len(header))
    for fmt, d in results["decode"].items():
        print(f"{fmt:<6} {d['old_cpu']:>7.3f} {d['new_cpu']:>7.3f} {d['new_equal']!s:>6} {d['one_pass_cpu']:>7.3f} "
              f"{d['one_pass_cpu'] / d['old_cpu']:>7.2f} {d['max_diff_steps']:>9d} {d['snr_db']:>7.1f}")

    print(f"\nper {args.song_seconds:.0f}-s MP3, CPU-s (median of {args.repeats}); network = song - decode")
    header = (f"{'model / path':<36} {'decode':>7} {'network':>8} {'song':>7} {'/old':>6} {'wall s':>7} "
              f"{'ms/seg':>7} {'GFLOP/s':>8} {'% GEMM':>7} {'cos old':>9}")
    print(header + "\n" + "-" * len(header))
    teacher = results.get("teacher")
    if teacher:
        net = teacher["song_cpu"] - teacher["decode_cpu"]
        print(f"{teacher['name']:<36} {teacher['decode_cpu']:>7.3f} {net:>8.3f} {teacher['song_cpu']:>7.3f} {'':>6} "
              f"{'':>7} {1000.0 * net / teacher['segments']:>7.1f}")
    for r in results["students"]:
        old = r["paths"]["old"]
        for name, p in r["paths"].items():
            windows = r["segments"]
            flop = r["old_flops_per_window"] * windows if name == "old" else r["new_flops_per_song"]
            gflops = flop / p["network_cpu"] / 1e9
            per_seg = 1000.0 * p["network_cpu"] / windows
            label = f"{r['name']} {PATH_LABELS[name]}"
            print(f"{label:<36} {p['decode_cpu']:>7.3f} {p['network_cpu']:>8.3f} {p['song_cpu']:>7.3f} "
                  f"{p['song_cpu'] / old['song_cpu']:>6.2f} {p['song_wall']:>7.3f} {per_seg:>7.1f} {gflops:>8.1f} "
                  f"{100 * gflops / rate:>6.1f}% {p['cosine_to_old']:>9.6f}")
        lib = r.get("library")
        if lib:
            print(f"  {r['name']} indexing a folder ({lib['old']['songs']} copies of the song, embed_files as "
                  "`student-clap index`), per song: " + "; ".join(
                      f"{k} ({v['jobs']} at once x {v['threads']} thread{'s' if v['threads'] > 1 else ''}) "
                      f"{v['cpu_per_song']:.3f} CPU-s, {v['wall_per_song']:.3f} wall-s"
                      f" ({v['wall_per_song'] / lib['old']['wall_per_song']:.2f} of old's wall)"
                      for k, v in lib.items()))
        # A lower bound for the new path: its decode as measured, plus the trunk and head FLOPs run at
        # the machine's best GEMM rate (depthwise convolutions run far below it; the front-end is left out)
        net_floor = r["network_flops_per_song"] / (rate * 1e9)
        exact = min(r["paths"][k]["decode_cpu"] for k in ("new", "new_onnx_fe", "new_int8"))  # the same decode
        for label, dec in (("exact decode", exact), ("one-pass decode", r["paths"]["new_1pass"]["decode_cpu"])):
            print(f"  {r['name']} new path, lower bound with the {label}: {dec:.3f} decode + {net_floor:.3f} trunk and "
                  f"head ({r['network_flops_per_song'] / 1e9:.2f} GFLOP) at the GEMM rate = "
                  f"{(dec + net_floor) / old['song_cpu']:.2f} of old (decode alone {dec / old['song_cpu']:.2f})")
        for kind, sp in r.get("split", {}).items():
            print(f"  {r['name']} new {kind}, CPU-s per part: " + ", ".join(f"{SPLIT_LABELS[k]} {v:.3f}" for k, v in sp.items())
                  + f" (sum {sum(sp.values()):.3f})")
        print(f"  {r['name']}: {r['params']:,} parameters, {r['windows']} windows, "
              f"{r['old_flops_per_window'] / 1e9:.3f} GFLOP per window (old), "
              f"{r['new_flops_per_song'] / r['windows'] / 1e9:.3f} per window (new); export-time fidelity "
              + ", ".join(f"{k} {v:.6f}" for k, v in r["fidelity"].items() if isinstance(v, float)))
    print("(ms/seg: network CPU-ms per window within the song; old model on one window alone, wall: "
          + ", ".join(f"{r['name']} {r['segment_ms']:.1f} ms" for r in ([teacher] if teacher else []) + results["students"])
          + ". "
          "% GEMM: share of the machine's best GEMM rate per CPU-s; new paths: FLOPs of the ONNX graphs, matmul STFT "
          "included, also where the numpy FFT does that work. Weights are random, BatchNorm set on the song.)")
    print(f"load average during the run: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
