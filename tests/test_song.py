"""Song-level inference (student_clap.song) against the segment-wise reference (student_clap.reference).

The student is an mn04 with random weights whose BatchNorm statistics are set on the mels of the
songs below ("precise BN"), exported by the export stage's own functions. Why not a trained one:
no trained student exists in a fresh checkout (it is a DVC output) and a brief training run needs
the teacher cache. Why not a plain random one: its eval-mode BatchNorm uses the initial running
statistics, activations collapse and every song gets nearly the same vector, so any cosine would
pass. With the statistics set, activations have the scales a trained network sees, and the test
first checks that different songs get clearly different vectors (mean pairwise cosine well
below the bar), so the fidelity bar (0.9999) measures something.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.data.frontends import StudentMel
from pipeline.models import audio_export, song_export
from pipeline.stages import export as export_stage
from pipeline.models.audio_student import build_audio_student
from student_clap import song as song_rt
from student_clap.audio import (
    AudioDecodeError,
    decode_int16,
    int16_to_float,
    resample_int16,
    segments,
)
from student_clap.cli import index_main
from student_clap.decode import decode_student
from student_clap.embed import AUDIO_EXTENSIONS, open_audio_embedder
from student_clap.index import read_index
from student_clap.reference import SegmentEmbedder
from student_clap.spec import load_spec
from repo_params import section

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "audio"
SR, SEG_S, HOP_S = 32000, 10.0, 5.0


def _recording(seconds: float, sr: int, seed: int, channels: int = 2) -> np.ndarray:
    """A recording-like signal: plucked notes with harmonics and decay, a kick on the beat, room
    noise, a slow level change."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = 0.003 * rng.standard_normal(n)
    beat = 60.0 / rng.uniform(80, 140)
    for start in np.arange(0.0, seconds, beat / 2):
        f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
        i = int(start * sr)
        tt = t[: min(n - i, int(1.5 * sr))]
        note = sum(np.sin(2 * np.pi * f0 * h * tt) / h for h in range(1, 6)) * np.exp(-3.0 * tt)
        x[i : i + len(tt)] += 0.15 * note
    for start in np.arange(0.0, seconds, beat):
        i = int(start * sr)
        tt = t[: min(n - i, int(0.2 * sr))]
        x[i : i + len(tt)] += 0.4 * np.sin(2 * np.pi * 60 * tt * np.exp(-8 * tt)) * np.exp(-15 * tt)
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * t / max(seconds, 1.0))
    x = np.clip(x, -1, 1)
    return np.stack([x, np.roll(x, 7) * 0.9], axis=1)[:, :channels].astype(np.float32)


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> list[Path]:
    """The demo songs (all formats) and recordings made here: a 47-s stereo MP3 at 44.1 kHz (off the
    hop grid, so a tail window), a 7-s mono OGG (repeat-padded), a 33-s FLAC at 48 kHz."""
    root = tmp_path_factory.mktemp("recordings")
    made = []
    for name, seconds, sr, fmt, sub, ch in (("take1.mp3", 47.3, 44100, "MP3", None, 2),
                                            ("short.ogg", 7.0, 22050, "OGG", "VORBIS", 1),
                                            ("live.flac", 33.0, 48000, "FLAC", None, 2)):
        x = _recording(seconds, sr, seed=len(made), channels=ch)
        with sf.SoundFile(root / name, "w", sr, ch, format=fmt, subtype=sub) as f:
            for i in range(0, len(x), 1 << 16):  # libsndfile's Vorbis encoder crashes on one large write
                f.write(x[i : i + (1 << 16)])
        made.append(root / name)
    demo = []
    for p in sorted(DEMO.rglob("*")) if DEMO.is_dir() else []:
        if p.suffix.lower() in AUDIO_EXTENSIONS:
            try:
                decode_int16(p, SR, max_seconds=1.0)
                demo.append(p)
            except AudioDecodeError:
                pass  # the demo deliberately holds a broken file
    return made + demo


@pytest.fixture(scope="module")
def exported(tmp_path_factory, songs) -> Path:
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    student = build_audio_student({"backbone": "mn04_as", "dropout": 0.1}).eval()
    fe = StudentMel(section("frontend.student")).eval()
    with torch.no_grad():
        mels = torch.cat([fe(torch.from_numpy(int16_to_float(segments(decode_int16(p, SR), SR, SEG_S, HOP_S))))
                          for p in songs])
    student.recalibrate_batchnorm([mels[i : i + 8] for i in range(0, len(mels), 8)])
    seg, hop = int(SR * SEG_S), int(SR * HOP_S)
    info = audio_export.export_audio(student, fe, out, segment_samples=seg, sample_rate=SR, opset=17, min_cosine=0.9999,
                                     quantize=False)
    song_info = song_export.export_song(student, fe, out, segment_samples=seg, hop_samples=hop, sample_rate=SR, opset=17,
                                        min_cosine=0.9999, quantize=True, calibration_mels=mels[::3].numpy(),
                                        eval_mels=mels[1::3].numpy())
    audio = audio_export.audio_spec(info, sample_rate=SR, segment_seconds=SEG_S, hop_seconds=HOP_S, segment_samples=seg,
                                    quantized=False, decode_sample_rate=48000)
    audio["song"] = song_export.song_spec(song_info, True)
    (out / export_stage.SPEC).write_text(__import__("json").dumps({"version": export_stage.SPEC_VERSION, "embedding_dim": 512,
                                                                    "skipped": {}, "audio": audio}))
    return out


def _vectors(embedder, songs: list[Path]) -> np.ndarray:
    return np.stack([embedder.embed_file(p)[0] for p in songs]).astype(np.float64)


@pytest.mark.slow
def test_geometry_and_split_of_the_exported_student(exported):
    song = load_spec(exported)["audio"]["song"]
    # mn04: stem + 3 blocks before the first squeeze-excitation, stride 4; 5 s = 500 frames = 125 columns
    assert (song["split_block"], song["trunk_stride"], song["window_columns"], song["hop_columns"]) == (4, 4, 250, 125)
    assert song["fidelity"]["synthetic_song_cosine_fp32"] >= 0.999
    assert {song["frontend_file"], song["head_file"], song["head_int8_file"]} <= {p.name for p in exported.iterdir()}


@pytest.mark.slow
def test_song_path_matches_the_segment_wise_path(exported, songs):
    assert len(songs) >= 10, "the demo songs should be in data/demo/audio"
    old = SegmentEmbedder(exported)
    new = open_audio_embedder(exported)
    assert isinstance(new, song_rt.SongEmbedder)
    # the export describes its front-end, so the numpy log-mel runs
    assert new.logmel is not None
    ref, fp32 = _vectors(old, songs), _vectors(new, songs)
    # the bar means something only if songs differ: different songs are far below it
    pairwise = ref @ ref.T
    assert pairwise[np.triu_indices(len(songs), 1)].mean() < 0.9
    names = [p.name for p in songs]
    cos32 = np.sum(ref * fp32, axis=1)
    # The decoded samples are the segment-wise path's and window edges are recomputed, so the song
    # path differs by float rounding only.
    assert cos32.min() >= 0.9999, dict(zip(names, cos32.round(6)))
    # The edges matter: with the shared excerpt's edge columns kept, the worst song moves (on these
    # short songs with fades, measured 0.9985), and the recomputed edges bring it back.
    shared_edges = song_rt.SongEmbedder(*new.model_paths, new.geometry, exact_edges=False)
    assert new.edge_columns == (3, 2) and shared_edges.edge_columns == (0, 0)
    cos_shared = np.sum(ref * _vectors(shared_edges, songs), axis=1)
    assert cos_shared.min() < cos32.min() - 1e-4, dict(zip(names, cos_shared.round(6)))
    for p in songs[:3]:  # same windows: tail window and repeat padding kept
        assert new.embed_file(p)[1] == old.embed_file(p)[1]


@pytest.mark.slow
def test_numpy_front_end_only_where_it_equals_the_onnx_one(exported, songs, caplog):
    spec = load_spec(exported)["audio"]["song"]["frontend"]
    new = open_audio_embedder(exported)
    onnx_fe = song_rt.SongEmbedder(*new.model_paths, new.geometry)  # no front-end description: ONNX
    assert onnx_fe.logmel is None and new.logmel is not None
    wave = decode_student(songs[0], SR, via_rate=48000)
    np.testing.assert_allclose(new.embed_wave(wave)[0], onnx_fe.embed_wave(wave)[0], atol=1e-5)
    # a description that does not match the exported front-end is caught by the probe at load
    with caplog.at_level("WARNING", logger="student_clap.song"):
        wrong = song_rt.SongEmbedder(*new.model_paths, new.geometry, logmel={**spec, "preemphasis": 0.9})
    assert wrong.logmel is None
    assert "audio_student_frontend.onnx" in caplog.text and "differs" in caplog.text


@pytest.mark.slow
def test_heads_batched_across_songs_give_the_same_vectors(exported, songs):
    one = open_audio_embedder(exported, batch_size=16)
    waves = [decode_student(p, SR, via_rate=48000) for p in songs[:4]]
    alone = [one.embed_wave(w) for w in waves]
    broken = AudioDecodeError("x.mp3", "cannot decode")
    mixed = list(one.embed_waves([waves[0], broken, *waves[1:]]))
    assert mixed[1] is broken
    for (vec, n), (got, m) in zip(alone, [mixed[0], *mixed[2:]]):
        assert n == m and np.allclose(vec, got, atol=1e-5)
    # embed_paths: an unreadable file is reported in its place, the others embedded
    bad = songs[0].parent / "not_audio.mp3"
    bad.write_text("<html>not found</html>")
    out = dict(one.embed_paths([songs[1], bad, songs[2]]))
    assert isinstance(out[str(bad)], AudioDecodeError)
    assert np.allclose(out[str(songs[1])][0], alone[1][0], atol=1e-5)


def test_windows_grouped_into_excerpts():
    seg, hop = 10, 5
    # on-grid windows share excerpts of at most `span`; the tail window (off the grid) is alone
    starts = [0, 5, 10, 15, 20, 23]
    assert song_rt._runs(starts, 33, seg, hop, True, 3) == [[0, 5, 10], [15, 20], [23]]
    assert song_rt._runs(starts, 33, seg, hop, False, 3) == [[s] for s in starts]
    assert song_rt._runs([0], 7, seg, hop, True, 3) == [[0]]  # a short, repeat-padded song


@pytest.mark.slow
def test_index_runs_the_song_path(exported, songs, tmp_path, monkeypatch):
    folder = tmp_path / "lib"
    folder.mkdir()
    for p in songs[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    calls = []
    embed_track = song_rt.SongEmbedder.embed_track
    monkeypatch.setattr(song_rt.SongEmbedder, "embed_track", lambda self, path: calls.append(self) or embed_track(self, path))
    args = argparse.Namespace(dir=str(folder), out=str(tmp_path / "i.db"), models=str(exported), batch_size=8, threads=1,
                              jobs=1)
    assert index_main(args) == 0
    assert len(calls) == 3 and all(e.decode_via == 48000 for e in calls)
    index = read_index(tmp_path / "i.db")
    ref = SegmentEmbedder(exported)
    for path, vec in zip(index.paths, index.vectors):  # float16 storage: cosine, not equality
        assert float(vec @ ref.embed_file(path)[0]) > 0.9995


@pytest.mark.parametrize("fmt,sub,rate", [("MP3", None, 44100), ("OGG", "VORBIS", 22050), ("OGG", "OPUS", 48000),
                                          ("FLAC", None, 44100), ("WAV", "PCM_16", 44100)])
def test_decode_at_the_student_rate_gives_the_mel_cache_samples(tmp_path, fmt, sub, rate):
    path = tmp_path / f"take.{'opus' if sub == 'OPUS' else fmt.lower()}"
    sf.write(path, _recording(12.0, rate, seed=5), rate, format=fmt, subtype=sub)
    old = resample_int16(decode_int16(path, 48000), 48000, SR)
    # through int16 at 48 kHz, streamed: the samples the mel cache's decode gives, exactly
    assert np.array_equal(decode_student(path, SR, via_rate=48000), old)


def test_int8_calibration_takes_training_mels_and_holds_out_validation_mels(tmp_path):
    from pipeline.data import mel_cache as store
    from pipeline.data.manifest import write_manifest

    params = store.cache_params(section("audio", segment_seconds=0.1, hop_seconds=0.05), section("frontend"), 0.0)
    (tf, tm), (sm, sf_) = store.mel_shapes(params)
    w = store.PartWriter(tmp_path / "parts", params, store.Compression())
    rows = []
    for i, (tid, split, n) in enumerate((("t:1", "train", 5), ("v:1", "val", 3), ("t:2", "train", 4))):
        student = np.full((n, sm, sf_), i, np.float32)  # every segment carries its track's number
        w.add_segments(np.zeros((n, tf, tm), np.float32), student, np.arange(n) * 0.05)
        w.commit_track(store.TrackRecord(tid, n, 1.0, f"{i:064x}", f"audio/{tid}.mp3", i))
        rows.append({"track_id": tid, "source": "fma", "artist": f"a{i}", "title": "t", "audio_path": f"audio/{tid}.mp3",
                     "license": "CC0-1.0", "license_url": "", "url": "", "split": split, "tags": [], "duration": 1.0})
    done = store.completed_tracks([w.publish()], params)
    cache = store.write_cache(tmp_path / "mels.h5", params, store.Compression(), [done[r["track_id"]][1:] for r in rows])
    write_manifest(tmp_path / "manifest.jsonl", rows)
    calib, held, tracks = song_export.calibration_mels(cache, tmp_path / "manifest.jsonl", 6)
    assert len(calib) == 6 and set(np.unique(calib)) <= {0.0, 2.0}  # training tracks only, spread over both
    assert {0.0, 2.0} <= set(np.unique(calib))
    assert len(held) == 3 and set(np.unique(held)) == {1.0} and set(tracks) == {1}
    assert song_export.calibration_mels(tmp_path / "missing.h5", tmp_path / "manifest.jsonl", 6) == (None, None, None)
