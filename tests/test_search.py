"""embed / index / search with exported ONNX students (student_clap), in a process that never imports torch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from student_clap import embed as E
from student_clap import index as I
from student_clap import library as L
from student_clap.audio import (
    cut,
    decode,
    decode_int16,
    int16_to_float,
    map_starts,
    resample_int16,
    segment_starts,
    segments,
)
from student_clap.cli import index_main
from student_clap.song import SongEmbedder
from student_clap.spec import SearchError, audio_identity

torch.set_num_threads(1)
SR, SEG_S, HOP_S = 16000, 1.0, 0.5
CORPUS = [f"{a} {b}" for a in ("calm", "energetic", "sad") for b in ("piano", "guitar", "drums")] * 3
DECODE_SR = 24000  # like the pipeline: decode (and find segment times) at one rate, run the student at another
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_export_builder):
    """A models/export-like folder with 1-s segments at 16 kHz, and the PyTorch models behind it."""
    built = tiny_export_builder(tmp_path_factory.mktemp("export"), rate=SR, segment_seconds=SEG_S, hop_seconds=HOP_S,
                                decode_rate=DECODE_SR, corpus=CORPUS, max_length=8)
    return built["export"], built["audio"], built["frontend"]


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """Three readable songs (mixed rates, mono/stereo, one shorter than a segment), a corrupt one, a text file."""
    root = tmp_path_factory.mktemp("songs")
    rng = np.random.default_rng(0)
    (root / "album").mkdir()
    for name, rate, seconds, channels, freq in (
        ("short.wav", 22050, 0.6, 1, 220.0), ("album/mid.flac", 44100, 2.3, 2, 440.0), ("long.wav", 16000, 3.0, 1, 880.0),
    ):
        t = np.arange(int(rate * seconds)) / rate
        x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(root / name, np.stack([x] * channels, axis=1) if channels == 2 else x, rate)
    (root / "broken.mp3").write_bytes(b"ID3" + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    (root / "notes.txt").write_text("not audio")
    return root


def real(path: Path | str) -> str:
    """The index keys songs by resolved path."""
    return os.path.realpath(path)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter and fail if torch got imported on the way."""
    code = (
        "import sys\nfrom pipeline.cli import main\nrc = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=REPO)


def _expected_vector(path: Path, audio, frontend) -> np.ndarray:
    """The mel cache's rule in PyTorch: int16 decode at DECODE_SR, segment times there, int16
    resample to SR, cut; raw embeddings, mean, L2."""
    wave = decode_int16(path, DECODE_SR)
    starts = segment_starts(len(wave), DECODE_SR, SEG_S, HOP_S)
    windows = int16_to_float(cut(resample_int16(wave, DECODE_SR, SR), map_starts(starts, DECODE_SR, SR), int(SR * SEG_S)))
    with torch.no_grad():
        raw = audio.embed_raw(frontend(torch.from_numpy(windows))).numpy()
    v = raw.mean(0)
    return v / np.linalg.norm(v)


def test_embed_without_torch_matches_the_training_rule(exported, songs, tmp_path):
    models, audio, frontend = exported
    files = [songs / "short.wav", songs / "album/mid.flac", songs / "broken.mp3"]
    out = tmp_path / "emb.npz"
    proc = _cli("embed", *map(str, files), "--out", str(out), "--models", str(models), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "broken.mp3" in proc.stderr and "skipped" in proc.stderr
    data = np.load(out)
    assert list(data["paths"]) == [str(files[0]), str(files[1])]
    assert list(data["n_segments"]) == [1, 4]  # 0.6 s -> one padded window; 2.3 s -> 0, .5, 1, 1.3
    assert str(data["audio_model"]) == audio_identity(models)
    for path, vec in zip(files[:2], data["vectors"]):
        assert np.dot(vec, _expected_vector(path, audio, frontend)) > 0.9999
        # decoding straight at the student rate gives nearly, not exactly, the same vector
        direct = segments(decode(path, SR), SR, SEG_S, HOP_S)
        with torch.no_grad():
            raw = audio.embed_raw(frontend(torch.from_numpy(direct))).numpy().mean(0)
        assert np.dot(vec, raw / np.linalg.norm(raw)) > 0.99


def test_embed_jsonl_and_npy_outputs(exported, songs, tmp_path):
    models, _, _ = exported
    proc = _cli("embed", str(songs / "long.wav"), "--out", str(tmp_path / "e.jsonl"), "--models", str(models))
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert row["path"].endswith("long.wav") and row["n_segments"] == 5 and len(row["embedding"]) == 512
    embedder = E.open_audio_embedder(models)
    result = E.embed_files(embedder, [songs / "long.wav", songs / "notes.txt"], progress=False)
    assert len(result.failed) == 1 and "notes.txt" in result.failed[0][0]
    L.write_export(tmp_path / "e.npy", result)
    assert np.load(tmp_path / "e.npy").shape == (1, 512)
    (rec,) = [json.loads(line) for line in (tmp_path / "e.paths.jsonl").read_text().splitlines()]
    assert rec["row"] == 0 and rec["path"].endswith("long.wav") and rec["n_segments"] == 5
    with pytest.raises(SearchError, match="npz"):
        L.write_export(tmp_path / "e.csv", result)


def test_index_then_search(exported, songs, tmp_path):
    models, _, _ = exported
    index = tmp_path / "songs.db"
    proc = _cli("index", str(songs), "--out", str(index), "--models", str(models))
    assert proc.returncode == 0, proc.stderr
    assert "broken.mp3" in proc.stderr  # reported, not fatal
    assert "1 file(s) not audio by their name: 1 .txt" in proc.stderr  # notes.txt: counted, not tried
    idx = I.read_index(index)
    assert idx.paths == sorted(real(songs / n) for n in ("album/mid.flac", "long.wav", "short.wav"))
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, atol=1e-5)
    assert idx.failed == [(real(songs / "broken.mp3"), idx.failed[0][1])]

    proc = _cli("search", "calm piano", "--index", str(index), "-k", "2", "--models", str(models))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    q = E.TextEmbedder(models).embed(["calm piano"])[0]
    scores = idx.vectors @ q
    expected = [idx.paths[i] for i in np.argsort(-scores)[:2]]
    assert [line.split()[2] for line in lines] == expected
    got_scores = [float(line.split()[1]) for line in lines]
    assert got_scores == sorted(got_scores, reverse=True)
    assert got_scores[0] == pytest.approx(float(scores.max()), abs=1e-4)
    # float16 storage: the stored vectors are the embedder's up to float16 rounding
    fresh = E.open_audio_embedder(models).embed_track(songs / "long.wav").vector
    assert float(fresh @ idx.vectors[idx.paths.index(real(songs / "long.wav"))]) > 0.9999


def test_index_exports_npz_and_search_reads_it(exported, songs, tmp_path):
    models, _, _ = exported
    out = tmp_path / "lib.npz"
    proc = _cli("index", str(songs), "--out", str(out), "--models", str(models))
    assert proc.returncode == 0, proc.stderr
    assert I.is_index_file(tmp_path / "lib.db")  # the index itself, beside its export
    db, npz = I.read_index(tmp_path / "lib.db"), I.read_index(out)
    assert npz.paths == db.paths and npz.audio_model == db.audio_model == audio_identity(models)
    np.testing.assert_array_equal(npz.vectors, db.vectors)
    proc = _cli("search", "calm piano", "--index", str(out), "-k", "1", "--models", str(models))
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stderr


def test_clear_errors(exported, tmp_path):
    models, _, _ = exported
    proc = _cli("search", "piano", "--index", str(tmp_path / "none.db"), "--models", str(models))
    assert proc.returncode == 2 and "index not found" in proc.stderr
    proc = _cli("embed", "x.wav", "--out", str(tmp_path / "o.npz"), "--models", str(tmp_path))
    assert proc.returncode == 2 and "student_clap.json" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _cli("index", str(tmp_path / "empty"), "--out", str(tmp_path / "i.db"), "--models", str(models))
    assert proc.returncode == 2 and "no audio files" in proc.stderr
    (tmp_path / "bad.npz").write_text("not an index")
    with pytest.raises(SearchError, match="not a student-clap index"):
        I.read_index(tmp_path / "bad.npz")
    with pytest.raises(SearchError, match="empty query"):
        E.TextEmbedder(models).embed(["  "])
    for argv in (("embed", "x.wav", "--out", "o.npz", "--jobs", "-3"), ("index", ".", "--out", "i.db", "--threads", "-1"),
                 ("search", "x", "--index", "i.db", "-k", "0"), ("index", ".", "--out", "i.db", "--jobs", "two")):
        proc = _cli(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert ("must be at least 1" in proc.stderr) or ("not a whole number" in proc.stderr), proc.stderr


# --------------------------------------------------------------------------- robustness


def _index_args(root: Path, out: Path, models: Path) -> argparse.Namespace:
    return argparse.Namespace(dir=str(root), out=str(out), models=str(models), batch_size=8, threads=1, jobs=1)


@pytest.fixture
def counting(monkeypatch):
    """Records every file the audio embedder decodes."""
    seen: list[str] = []
    real_track = SongEmbedder.embed_track

    def embed_track(self, path):
        seen.append(Path(path).name)
        return real_track(self, path)

    monkeypatch.setattr(SongEmbedder, "embed_track", embed_track)
    return seen


def test_reindexing_embeds_only_new_and_changed_files(exported, songs, tmp_path, counting, caplog):
    models, _, _ = exported
    lib, out = tmp_path / "lib", tmp_path / "lib.db"
    shutil.copytree(songs, lib)
    assert index_main(_index_args(lib, out, models)) == 0
    assert sorted(counting) == ["broken.mp3", "long.wav", "mid.flac", "short.wav"]
    first = I.read_index(out)

    shutil.copy(lib / "long.wav", lib / "album" / "added.wav")  # one new song
    counting.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="student_clap"):
        assert index_main(_index_args(lib, out, models)) == 0
    assert counting == ["added.wav"]  # the broken file, unchanged, is not tried again
    assert "reused 3, embedded 1, removed 0; 1 file(s) skipped" in caplog.text
    second = I.read_index(out)
    assert len(second.paths) == 4 and second.failed == first.failed
    for path, vec in zip(first.paths, first.vectors):
        np.testing.assert_array_equal(second.vectors[second.paths.index(path)], vec)
    np.testing.assert_allclose(second.vectors[second.paths.index(real(lib / "album" / "added.wav"))],
                               first.vectors[first.paths.index(real(lib / "long.wav"))], atol=1e-6)

    (lib / "short.wav").unlink()  # one deleted, one rewritten, one only touched
    sf.write(lib / "long.wav", 0.3 * np.sin(np.arange(16000 * 2) / 7.0), 16000)
    st = os.stat(lib / "album" / "mid.flac")
    os.utime(lib / "album" / "mid.flac", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    counting.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="student_clap"):
        assert index_main(_index_args(lib, out, models)) == 0
    assert sorted(counting) == ["long.wav", "mid.flac"]
    assert "reused 1, embedded 2, removed 1" in caplog.text
    third = I.read_index(out)
    assert sorted(Path(p).name for p in third.paths) == ["added.wav", "long.wav", "mid.flac"]
    assert not np.allclose(third.vectors[third.paths.index(real(lib / "long.wav"))],
                           first.vectors[first.paths.index(real(lib / "long.wav"))], atol=1e-3)


def test_reindexing_with_another_model_embeds_everything(exported, songs, tmp_path, counting, caplog):
    models, _, _ = exported
    out = tmp_path / "i.db"
    assert index_main(_index_args(songs, out, models)) == 0
    _set_meta(out, audio_model="0" * 64)
    counting.clear()
    assert index_main(_index_args(songs, out, models)) == 0
    assert len(counting) == 4 and "built with another audio model" in caplog.text
    assert len(I.read_index(out).paths) == 3


def _set_meta(path: Path, **values: str) -> None:
    con = sqlite3.connect(path)
    with con:
        con.executemany("UPDATE meta SET value = ? WHERE key = ?", [(v, k) for k, v in values.items()])
    con.close()


def test_index_records_model_and_search_refuses_another_unless_forced(exported, songs, tmp_path):
    models, _, _ = exported
    out = tmp_path / "i.db"
    assert _cli("index", str(songs), "--out", str(out), "--models", str(models)).returncode == 0
    idx = I.read_index(out)
    assert idx.dim == 512 and idx.vectors.shape == (3, 512) and idx.audio_model == audio_identity(models)

    _set_meta(out, audio_model="ab" * 32)
    proc = _cli("search", "calm piano", "--index", str(out), "--models", str(models))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "was built by another audio model" in proc.stderr and "--force" in proc.stderr
    proc = _cli("search", "calm piano", "--index", str(out), "--models", str(models), "--force", "-k", "2")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert "searching anyway (--force)" in proc.stderr


def test_an_index_of_another_dimension_is_a_clear_error(exported, tmp_path):
    models, _, _ = exported
    out = tmp_path / "small.npz"
    small = I.Index(["a.wav", "b.wav", "c.wav"], np.eye(3, 256, dtype=np.float32), audio_identity(models), n_segments=[1] * 3,
                    notes=[[]] * 3)
    L.write_export(out, small, small.audio_model)
    for extra in ((), ("--force",)):
        proc = _cli("search", "calm piano", "--index", str(out), "--models", str(models), *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "holds 256-d vectors but the text model" in proc.stderr and "gives 512-d ones" in proc.stderr
    with pytest.raises(SearchError, match="256-d vectors, the query is 512-d"):
        I.search(I.read_index(out), np.ones((1, 512), np.float32), 1)


def test_npy_rows_stay_aligned_with_odd_file_names(exported, songs, tmp_path):
    models, _, _ = exported
    odd = [tmp_path / "new\nline.wav", tmp_path / "tab\tand \u00e9.flac", Path(os.fsdecode(bytes(tmp_path) + b"/latin1-\xe9.wav"))]
    shutil.copy(songs / "long.wav", odd[0])
    shutil.copy(songs / "album/mid.flac", odd[1])
    shutil.copy(songs / "short.wav", odd[2])
    files = [odd[0], songs / "broken.mp3", odd[1], odd[2]]
    assert _cli("embed", *map(str, files), "--out", str(tmp_path / "x.npy"), "--models", str(models)).returncode == 0
    assert _cli("embed", *map(str, files), "--out", str(tmp_path / "x.npz"), "--models", str(models)).returncode == 0
    vectors = np.load(tmp_path / "x.npy")
    lines = (tmp_path / "x.paths.jsonl").read_bytes().decode("ascii").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(vectors) == 3
    assert [r["path"] for r in records] == [str(odd[0]), str(odd[1]), str(odd[2])]
    assert [r["row"] for r in records] == [0, 1, 2] and [r["n_segments"] for r in records] == [5, 4, 1]
    npz = np.load(tmp_path / "x.npz")
    assert list(npz["paths"]) == [r["path"] for r in records]
    np.testing.assert_array_equal(npz["vectors"], vectors)
    # the index stores any name (as the file system's bytes)
    lib = tmp_path / "odd"
    lib.mkdir()
    for p in odd:
        shutil.move(p, lib / p.name)
    assert _cli("index", str(lib), "--out", str(tmp_path / "odd.db"), "--models", str(models)).returncode == 0
    assert sorted(I.read_index(tmp_path / "odd.db").paths) == sorted(real(lib / p.name) for p in odd)


def test_out_is_checked_before_any_work(exported, songs, tmp_path):
    models, _, _ = exported
    (tmp_path / "file").write_text("a file, not a folder")
    bad = tmp_path / "file" / "out.npz"
    # the models folder does not even exist: the --out check comes first
    for cmd in (("embed", str(songs / "long.wav")), ("index", str(songs))):
        proc = _cli(*cmd, "--out", str(bad), "--models", str(tmp_path / "no-models"))
        assert proc.returncode == 2 and "--out" in proc.stderr and f"cannot write in {bad.parent}" in proc.stderr
    (tmp_path / "dir.npz").mkdir()
    proc = _cli("embed", str(songs / "long.wav"), "--out", str(tmp_path / "dir.npz"), "--models", str(models))
    assert proc.returncode == 2 and "is a folder, give a file name" in proc.stderr
    assert not list(tmp_path.glob(".*probe"))


def test_out_never_replaces_what_is_not_an_index(exported, songs, tmp_path):
    """An audio file, a playlist or another program's database named by --out is refused and left
    byte for byte as it was; an export name refuses a file that is not an export."""
    models, _, _ = exported
    keep = {tmp_path / "song.ogg": (songs / "long.wav").read_bytes(), tmp_path / "list.m3u": b"#EXTM3U\nsong.ogg\n",
            tmp_path / "data.npz": (songs / "album/mid.flac").read_bytes()}
    other = tmp_path / "library.db"
    con = sqlite3.connect(other)
    with con:
        con.execute("CREATE TABLE items (path TEXT)")
    con.close()
    keep[other] = other.read_bytes()
    for path, data in keep.items():
        path.write_bytes(data)
        proc = _cli("index", str(songs), "--out", str(path), "--models", str(models))
        assert proc.returncode == 2 and "refusing to replace it" in proc.stderr and "Traceback" not in proc.stderr
        assert path.read_bytes() == data
    proc = _cli("embed", str(songs / "long.wav"), "--out", str(tmp_path / "data.npz"), "--models", str(models))
    assert proc.returncode == 2 and "refusing to replace it" in proc.stderr
    assert not (tmp_path / "song.db").exists() and not (tmp_path / "data.db").exists()


def test_os_errors_on_one_file_are_reported_and_skipped(exported, songs, tmp_path, monkeypatch):
    from student_clap import audio

    models, _, _ = exported
    locked = songs / "album/mid.flac"
    real_open = open

    def guarded(file, *a, **kw):  # what a file without read permission gives a non-root user
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(audio, "open", guarded, raising=False)
    embedder = E.open_audio_embedder(models)
    result = E.embed_files(embedder, [songs / "short.wav", locked, songs / "long.wav"], progress=False)
    assert [Path(p).name for p in result.paths] == ["short.wav", "long.wav"]
    assert result.failed == [(str(locked), "cannot read the file (Permission denied)")]
    (outcome,) = E.iter_embed(embedder, [locked])
    assert outcome.retry  # not remembered by the index: tried again on the next run


def test_songs_embedded_in_parallel_keep_their_order_vectors_and_failures(exported, songs):
    models, _, _ = exported
    files = [songs / "short.wav", songs / "broken.mp3", songs / "album/mid.flac", songs / "long.wav"] * 2
    embedder = E.open_audio_embedder(models, threads=1)
    one = E.embed_files(embedder, files, progress=False, jobs=1)
    many = E.embed_files(embedder, files, progress=False, jobs=3)
    assert [Path(p).name for p in many.paths] == ["short.wav", "mid.flac", "long.wav"] * 2
    assert many.paths == one.paths and many.failed == one.failed and many.n_segments == one.n_segments
    assert [Path(f).name for f, _ in many.failed] == ["broken.mp3"] * 2
    np.testing.assert_array_equal(many.vectors, one.vectors)


def test_song_jobs_default_to_the_cores_and_never_exceed_the_files():
    assert E.song_jobs(None, 1) == 1 and E.song_jobs(8, 3) == 3 and E.song_jobs(2, 10) == 2
    assert E.song_jobs(None, 1000) == (os.cpu_count() or 1)
    assert E.song_jobs(None, 0) == 1


def _permissions_bind(folder: Path) -> bool:
    """Whether a mode-0000 file is unreadable here (not for root with CAP_DAC_OVERRIDE)."""
    probe = folder / "probe"
    probe.write_text("x")
    os.chmod(probe, 0)
    try:
        probe.read_text()
        return False
    except PermissionError:
        return True
    finally:
        probe.unlink()


def test_unreadable_file_and_folder_in_a_library(exported, songs, tmp_path):
    if os.name != "posix" or not _permissions_bind(tmp_path):
        pytest.skip("file permissions do not bind this user (root); the test above covers the same path")
    models, _, _ = exported
    lib = tmp_path / "lib"
    shutil.copytree(songs, lib)
    (lib / "sub").mkdir()
    shutil.copy(lib / "long.wav", lib / "sub" / "hidden.wav")
    (tmp_path / "locked").mkdir()
    os.chmod(lib / "short.wav", 0)
    os.chmod(lib / "sub", 0)
    os.chmod(tmp_path / "locked", 0o300)  # writable, not listable
    try:
        proc = _cli("index", str(lib), "--out", str(tmp_path / "i.db"), "--models", str(models))
        locked = _cli("index", str(lib), "--out", str(tmp_path / "locked" / "sub" / "i.db"), "--models", str(models))
    finally:
        os.chmod(lib / "short.wav", 0o644)
        os.chmod(lib / "sub", 0o755)
        os.chmod(tmp_path / "locked", 0o755)
    assert proc.returncode == 0
    assert "short.wav: cannot read the file (Permission denied)" in proc.stderr
    assert "cannot be listed" in proc.stderr and "sub" in proc.stderr
    assert sorted(Path(p).name for p in I.read_index(tmp_path / "i.db").paths) == ["long.wav", "mid.flac"]
    assert locked.returncode == 2 and "Traceback" not in locked.stderr and "--out" in locked.stderr


def test_files_refused_by_the_mel_cache_are_refused_by_embed_and_index_alike(exported, tmp_path):
    from student_clap.audio import AudioDecodeError, decode_track

    models, _, _ = exported
    lib = tmp_path / "lib"
    lib.mkdir()
    sf.write(lib / "one.wav", np.array([0.5], np.float32), 22050, subtype="PCM_16")
    sf.write(lib / "silence.wav", np.zeros(44100, np.float32), 22050, subtype="PCM_16")
    sf.write(lib / "nan.wav", np.full(44100, np.nan, np.float32), 22050, subtype="FLOAT")
    sf.write(lib / "ok.wav", 0.3 * np.sin(np.arange(22050) / 5.0), 22050)
    expected = {}
    for name in ("one.wav", "silence.wav", "nan.wav"):
        with pytest.raises(AudioDecodeError) as err:
            decode_track(lib / name, 48000)  # what the mels stage calls
        expected[name] = err.value.reason
    assert len(set(expected.values())) == 3
    for proc, shown in ((_cli("index", str(lib), "--out", str(tmp_path / "i.db"), "--models", str(models)), real),
                        (_cli("embed", *sorted(map(str, lib.iterdir())), "--out", str(tmp_path / "e.npz"), "--models",
                              str(models)), str)):
        assert proc.returncode == 0, proc.stderr
        for name, reason in expected.items():
            assert f"{shown(lib / name)}: {reason}" in proc.stderr
    assert [Path(p).name for p in I.read_index(tmp_path / "i.db").paths] == ["ok.wav"]


def test_partial_decode_is_kept_and_noted_in_the_index(exported, tmp_path):
    models, _, _ = exported
    lib = tmp_path / "lib"
    lib.mkdir()
    sf.write(tmp_path / "whole.mp3", 0.3 * np.sin(np.arange(22050 * 6) / 5.0), 22050, format="MP3")
    data = (tmp_path / "whole.mp3").read_bytes()
    (lib / "cut.mp3").write_bytes(data[: len(data) // 2])
    proc = _cli("index", str(lib), "--out", str(tmp_path / "i.db"), "--models", str(models))
    assert proc.returncode == 0 and "kept with notes" in proc.stderr
    idx = I.read_index(tmp_path / "i.db")
    (note,) = idx.notes[0]
    assert note.startswith("partial decode: decoded") and "of 6.0 s" in note and note in proc.stderr


@pytest.mark.parametrize("query,ok,message", [
    (b"caf\xe9 music", False, "the query is not valid UTF-8 text (byte(s) e9 at character 3)"),
    (b"", False, "empty query text"),
    (b"   \t ", False, "empty query text"),
    ("caf\u00e9 \u266b \U0001f3b9 \u97f3\u697d".encode(), True, ""),
    (b"piano " * 2000, True, ""),
    (b"-- !?", True, ""),
])
def test_any_query_is_accepted_or_refused_clearly(exported, songs, tmp_path, query, ok, message):
    models, _, _ = exported
    out = tmp_path / "i.db"
    assert _cli("index", str(songs), "--out", str(out), "--models", str(models)).returncode == 0
    proc = _cli("search", "--index", str(out), "--models", str(models), "-k", "1", "--", query)
    assert "Traceback" not in proc.stderr
    if ok:
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stderr
    else:
        assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_out_in_a_folder_this_user_cannot_write_is_a_clear_error(exported, songs, tmp_path, monkeypatch, caplog):
    """What a read-only or unlistable folder gives a non-root user (simulated: root passes every
    permission check), for the command and the API alike."""
    import tempfile

    from student_clap import StudentClap

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    models, _, _ = exported
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with caplog.at_level(logging.ERROR, logger="student_clap"):
        assert index_main(_index_args(songs, tmp_path / "ro" / "i.db", models)) == 2
    assert f"--out {tmp_path / 'ro' / 'i.db'}: cannot write in {tmp_path / 'ro'} (Permission denied)" in caplog.text
    with pytest.raises(SearchError, match="Permission denied"):
        StudentClap(models, threads=1).build_index(songs, tmp_path / "ro" / "i.db")
