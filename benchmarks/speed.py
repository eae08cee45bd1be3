"""CPU cost of the runtime's one audio path, per format, against an earlier version's default.

    nice python benchmarks/speed.py [--baseline REV] [--student mn04_as] [--song-seconds 120]
                                    [--repeats 3] [--rounds 2] [--threads 1] [--json out.json]

A random-weight student (BatchNorm statistics set on the benchmark song, so activations have
realistic scales) is exported by the export stage's own functions; the same synthesised stereo
song is written in every common library format: MP3, Ogg Vorbis, Opus, FLAC, WAV (libsndfile) and
M4A with AAC and with ALAC (written and read through PyAV's FFmpeg). Each contender runs in its own
child process, and the contenders alternate --rounds times so they share the machine's load:

- `student_clap`: this checkout's runtime (`student_clap.embed.open_audio_embedder(...).embed_track`),
  the path `embed`, `index`, `compare` and the API all take;
- `baseline` (with --baseline REV, e.g. a commit before student_clap existed): that revision's
  `pipeline.runtime.search.open_audio_embedder(...).embed_track`, its default path, from `git
  archive REV pipeline` in a temporary folder; on the same export folder and files;
- `reference`: the segment-wise computation the tests hold the song path to (student_clap.reference).

Per format: CPU-seconds (user + system of the child, `resource.getrusage`) of decoding and
embedding one song, median over --repeats, then the median over rounds; per audio-minute; the
ratio to the baseline; and the cosine of each song vector to this checkout's. The machine may be
shared: CPU-seconds and ratios from one run are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEGMENT_SECONDS, HOP_SECONDS = 10.0, 5.0
# name -> (writer, container/codec, subtype, rate)
FORMATS = {"mp3": ("sf", "MP3", None, 44100), "ogg": ("sf", "OGG", "VORBIS", 44100), "opus": ("sf", "OGG", "OPUS", 48000),
           "flac": ("sf", "FLAC", None, 44100), "wav": ("sf", "WAV", "PCM_16", 44100),
           "m4a-aac": ("av", "aac", None, 44100), "m4a-alac": ("av", "alac", None, 44100)}


def song_signal(seconds: float, sr: int) -> np.ndarray:
    """A deterministic stereo song: chords, a stepping bass line and noise bursts."""
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(0)
    x = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
    x += 0.2 * np.sin(2 * np.pi * 55.0 * (1 + (t // 2) % 4 / 4) * t)
    x += 0.1 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2 * t) > 0.9)
    return np.stack([x, 0.9 * x], axis=1).astype(np.float32)


def make_song(path: Path, seconds: float, fmt: str = "mp3") -> Path:
    """The benchmark song in `fmt` (a FORMATS key) at `path`."""
    writer, container, subtype, sr = FORMATS[fmt]
    x = song_signal(seconds, sr)
    if writer == "av":
        import av

        with av.open(str(path), "w", format="ipod") as out:
            stream = out.add_stream(container, rate=sr, layout="stereo")
            if container == "aac":
                stream.bit_rate = 256000
            frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate, frame.pts = sr, 0
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                out.mux(packet)
        return path
    import soundfile as sf

    # in blocks: libsndfile's Vorbis encoder crashes on one large write
    with sf.SoundFile(path, "w", sr, 2, format=container, subtype=subtype) as f:
        for i in range(0, len(x), 1 << 16):
            f.write(x[i : i + (1 << 16)])
    return path


def export_student(backbone: str, out_dir: Path, song: Path) -> dict:
    """Export a random-weight student (the export stage's audio files and student_clap.json), with
    BatchNorm statistics set on `song`'s mels."""
    import torch

    from pipeline.data.frontends import StudentMel
    from pipeline.models import audio_export, song_export
    from pipeline.stages import export as export_stage
    from pipeline.models.audio_student import build_audio_student
    from pipeline.params import load_params
    from student_clap.audio import decode_int16, int16_to_float, segments

    torch.manual_seed(0)
    student = build_audio_student({"backbone": backbone, "dropout": 0.1}).eval()
    fe = StudentMel(load_params(REPO / "params.yaml").frontend.student).eval()
    sr = fe.params.sample_rate
    seg, hop = int(sr * SEGMENT_SECONDS), int(sr * HOP_SECONDS)
    with torch.no_grad():
        mels = fe(torch.from_numpy(int16_to_float(segments(decode_int16(song, sr), sr, SEGMENT_SECONDS, HOP_SECONDS))))
    student.recalibrate_batchnorm([mels[i : i + 8] for i in range(0, len(mels), 8)])
    info = audio_export.export_audio(student, fe, out_dir, segment_samples=seg, sample_rate=sr, opset=17,
                                     min_cosine=0.9999, quantize=False)
    song_info = song_export.export_song(student, fe, out_dir, segment_samples=seg, hop_samples=hop, sample_rate=sr,
                                        opset=17, min_cosine=0.9999, quantize=False)
    audio = audio_export.audio_spec(info, sample_rate=sr, segment_seconds=SEGMENT_SECONDS, hop_seconds=HOP_SECONDS,
                                    segment_samples=seg, quantized=False, decode_sample_rate=48000)
    audio["song"] = song_export.song_spec(song_info, False)
    (out_dir / export_stage.SPEC).write_text(json.dumps({"version": export_stage.SPEC_VERSION, "embedding_dim": 512,
                                                          "skipped": {}, "audio": audio}))
    return {"params": sum(p.numel() for p in student.parameters()), "fidelity": audio["song"]["fidelity"]}


# --------------------------------------------------------------------------- contenders (child processes)

OPENERS = {
    "student_clap": "from student_clap.embed import open_audio_embedder as o\nembedder = o(models, threads=threads)",
    "baseline": "from pipeline.runtime.search import open_audio_embedder as o\nembedder = o(models, threads=threads)",
    "reference": "from student_clap.reference import SegmentEmbedder\nembedder = SegmentEmbedder(models, threads=threads)",
}

CHILD = """
import json, resource, sys, time
import numpy as np
models, threads, repeats, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
{opener}
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = {{}}
for fmt, path in files.items():
    try:
        embedder.embed_track(path)  # warm-up: first-call allocations, graph preparation
    except Exception as exc:  # a format this version cannot read
        out[fmt] = {{"error": f"{{type(exc).__name__}}: {{exc}}"}}
        continue
    times = []
    for _ in range(repeats):
        c = cpu()
        song = embedder.embed_track(path)
        times.append(cpu() - c)
    out[fmt] = {{"cpu_s": float(np.median(times)), "vector": [float(v) for v in song.vector]}}
print(json.dumps(out))
"""


def run_child(name: str, pythonpath: Path, models: Path, files: dict, threads: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(opener=OPENERS[name]), str(models), str(threads),
                           str(repeats), json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, env=env, cwd=pythonpath)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_tree(rev: str, dest: Path) -> Path:
    """`git archive REV pipeline` unpacked in `dest`: that revision's package, importable from there."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pipeline"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="a git revision whose default path to time beside this one")
    ap.add_argument("--student", default="mn04_as")
    ap.add_argument("--song-seconds", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per song (default: %(default)s)")
    ap.add_argument("--no-reference", action="store_true", help="leave out the segment-wise reference")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        models = tmp_dir / "export"
        models.mkdir()
        files = {fmt: make_song(tmp_dir / f"song-{fmt}.{fmt.split('-')[0]}", args.song_seconds, fmt) for fmt in FORMATS}
        student = export_student(args.student, models, files["flac"])
        contenders = {"student_clap": REPO}
        if args.baseline:
            contenders["baseline"] = baseline_tree(args.baseline, Path(tempfile.mkdtemp(dir=tmp)))
        if not args.no_reference:
            contenders["reference"] = REPO
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, path in contenders.items():
                runs[name].append(run_child(name, path, models, files, args.threads, args.repeats))
    results = {"args": vars(args), "student": student, "formats": {}}
    for fmt in FORMATS:
        row = {}
        mine = runs["student_clap"][0][fmt]["vector"]
        for name, rounds in runs.items():
            if "error" in rounds[0][fmt]:
                row[name] = {"error": rounds[0][fmt]["error"]}
                continue
            cpu = float(np.median([r[fmt]["cpu_s"] for r in rounds]))
            row[name] = {"cpu_s": cpu, "cpu_s_per_audio_minute": cpu / (args.song_seconds / 60.0),
                         "cosine": float(np.dot(rounds[0][fmt]["vector"], mine))}
        if "cpu_s" in row.get("baseline", {}):
            row["ratio_to_baseline"] = row["student_clap"]["cpu_s"] / row["baseline"]["cpu_s"]
        results["formats"][fmt] = row
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict, args: argparse.Namespace) -> None:
    names = [n for n in ("student_clap", "baseline", "reference") if n in next(iter(results["formats"].values()))]
    print(f"{args.student}, one {args.song_seconds:.0f}-s stereo song per format, {args.threads} onnxruntime thread(s); "
          f"CPU-s per song (decode + embed), median of {args.repeats} x {args.rounds} rounds")
    head = "| format | " + " | ".join(names) + (" | / baseline" if "baseline" in names else "") + " | cosine to student_clap |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for fmt, row in results["formats"].items():
        cells = [f"{row[n]['cpu_s']:.3f}" if "cpu_s" in row[n] else "cannot read" for n in names]
        ratio = [f"{row['ratio_to_baseline']:.2f}" if "ratio_to_baseline" in row else "-"] if "baseline" in names else []
        cos = ", ".join(f"{n} {row[n]['cosine']:.6f}" for n in names[1:] if "cosine" in row[n]) or "-"
        print(f"| {fmt} | " + " | ".join(cells + ratio) + f" | {cos} |")


if __name__ == "__main__":
    main()
