"""student_clap.api: the documented Python API over the exported students."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from student_clap.audio import decode_int16
from student_clap.api import SearchError, StudentClap
from student_clap.search import AudioEmbedder, TextEmbedder

REPO = Path(__file__).resolve().parents[1]


def test_file_waveform_and_cli_rule_agree(tiny_export: Path, tiny_songs: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    song = tiny_songs / "album" / "mid.flac"
    reference, _ = AudioEmbedder(tiny_export, threads=1).embed_file(song)
    vec = clap.embed_file(song)
    assert vec.shape == (512,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    np.testing.assert_allclose(vec, reference, atol=1e-6)
    # the same audio handed over in memory (stereo float at its own rate) gives the same vector
    samples, rate = sf.read(song, dtype="float32")
    from_memory = clap.embed_waveform(samples, rate)
    assert float(np.dot(from_memory, vec)) > 0.9999
    # int16 mono already at the decode rate goes through untouched
    wave = decode_int16(song, clap.audio.decode_sample_rate)
    np.testing.assert_allclose(clap.embed_waveform(wave, clap.audio.decode_sample_rate), vec, atol=1e-6)


def test_embed_files_reports_bad_files_and_keeps_the_rest(tiny_export: Path, tiny_songs: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    result = clap.embed_files([tiny_songs / "low.wav", tiny_songs / "notes.mp3", tiny_songs / "high.wav"])
    assert result.paths == [str(tiny_songs / "low.wav"), str(tiny_songs / "high.wav")]
    assert result.vectors.shape == (2, 512)
    assert [p for p, _ in result.failed] == [str(tiny_songs / "notes.mp3")]
    # several songs at a time: the same rows in the same order
    parallel = clap.embed_files([tiny_songs / "low.wav", tiny_songs / "notes.mp3", tiny_songs / "high.wav"], jobs=2)
    assert parallel.paths == result.paths and parallel.failed == result.failed
    np.testing.assert_array_equal(parallel.vectors, result.vectors)


def test_text_index_and_search(tiny_export: Path, tiny_songs: Path, tmp_path: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    one = clap.embed_text("calm piano")
    many = clap.embed_text(["calm piano", "sad drums"])
    assert one.shape == (512,) and many.shape == (2, 512)
    np.testing.assert_allclose(one, TextEmbedder(tiny_export, threads=1).embed(["calm piano"])[0], atol=1e-6)
    np.testing.assert_allclose(many[0], one, atol=1e-6)

    built = clap.build_index(tiny_songs, tmp_path / "music.npz", progress=False)
    assert len(built.paths) == 3 and len(built.failed) == 1
    hits = clap.search("calm piano", tmp_path / "music.npz", k=2)
    scores = built.vectors @ one
    best = np.argsort(-scores)[:2]
    assert [h[0] for h in hits] == [built.paths[i] for i in best]
    np.testing.assert_allclose([h[1] for h in hits], scores[best], atol=1e-5)
    # "more like this": a song's own vector finds itself first
    index = clap.load_index(tmp_path / "music.npz")
    assert clap.search(index.vectors[1], index, k=1)[0][0] == index.paths[1]
    with pytest.raises(SearchError, match="dimensions"):
        clap.search(np.ones(3, np.float32), index)


def test_bad_inputs_are_named(tiny_export: Path, tmp_path: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    with pytest.raises(ValueError, match="shape"):
        clap.embed_waveform(np.zeros((2, 2, 2), np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        clap.embed_waveform(np.zeros(100, np.float32), 0)
    with pytest.raises(SearchError, match="student_clap.json"):
        StudentClap(tmp_path).embed_text("x")


def test_api_never_imports_torch(tiny_export: Path, tiny_songs: Path) -> None:
    code = (
        "import sys\nfrom student_clap.api import StudentClap\n"
        f"c = StudentClap({str(tiny_export)!r}, threads=1)\n"
        f"c.embed_file({str(tiny_songs / 'low.wav')!r}); c.embed_text('piano')\n"
        "bad = [m for m in ('torch', 'transformers', 'dvc', 'yaml', 'h5py', 'librosa') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
