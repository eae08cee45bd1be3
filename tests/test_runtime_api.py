"""student_clap.api: the documented Python API over the exported students."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from student_clap import StudentClap
from student_clap.api import AudioDecodeError, SearchError
from student_clap.audio import decode_int16
from student_clap.embed import TextEmbedder
from student_clap.reference import SegmentEmbedder

REPO = Path(__file__).resolve().parents[1]


def test_file_waveform_and_cli_rule_agree(tiny_export: Path, tiny_songs: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    song = tiny_songs / "album" / "mid.flac"
    reference, _ = SegmentEmbedder(tiny_export, threads=1).embed_file(song)
    vec = clap.embed_file(song)
    assert vec.shape == (512,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    np.testing.assert_allclose(vec, reference, atol=1e-5)
    # the same audio handed over in memory (stereo float at its own rate) gives the same vector,
    # in the [n, channels] layout and in the [channels, n] one (librosa's)
    samples, rate = sf.read(song, dtype="float32")
    from_memory = clap.embed_waveform(samples, rate)
    assert float(np.dot(from_memory, vec)) > 0.9999
    np.testing.assert_allclose(clap.embed_waveform(samples.T.copy(), rate), from_memory, atol=1e-6)
    # int16 mono already at the decode rate goes through untouched
    wave = decode_int16(song, clap.audio.decode_via)
    np.testing.assert_allclose(clap.embed_waveform(wave, clap.audio.decode_via), vec, atol=1e-6)


def _file_answer(clap: StudentClap, path: Path) -> tuple[str, str]:
    with pytest.raises(AudioDecodeError) as err:
        clap.embed_file(path)
    return err.value.kind, err.value.reason


def _wave_answer(clap: StudentClap, samples: np.ndarray, rate: int) -> tuple[str, str]:
    with pytest.raises(AudioDecodeError) as err:
        clap.embed_waveform(samples, rate)
    return err.value.kind, err.value.reason


@pytest.mark.parametrize("name,samples,subtype", [
    ("silent", np.zeros((22050, 2), np.float32), "PCM_16"),
    ("short", 0.5 * np.ones((100, 1), np.float32), "PCM_16"),
    ("nan", np.full((22050, 2), np.nan, np.float32), "FLOAT"),
])
def test_waveforms_get_the_file_paths_answers(tiny_export: Path, tmp_path: Path, name, samples, subtype) -> None:
    clap = StudentClap(tiny_export, threads=1)
    sf.write(tmp_path / f"{name}.wav", samples, 22050, subtype=subtype)
    from_file = _file_answer(clap, tmp_path / f"{name}.wav")
    assert from_file[0] == {"silent": "silent", "short": "too-short", "nan": "non-finite"}[name]
    assert _wave_answer(clap, samples, 22050) == from_file
    assert _wave_answer(clap, samples.T.copy(), 22050) == from_file  # channels first
    assert _wave_answer(clap, samples.mean(axis=1), 22050) == from_file or name == "nan"  # mono


def test_channels_first_is_never_misread(tiny_export: Path, tiny_songs: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    samples, rate = sf.read(tiny_songs / "album" / "mid.flac", dtype="float32")  # [n, 2]
    want = clap.embed_waveform(samples, rate)
    # (2, n): two channels, not n channels of two samples (that was averaged to 2 samples before)
    assert float(clap.embed_waveform(np.ascontiguousarray(samples.T), rate) @ want) > 0.99999
    with pytest.raises(ValueError, match="channel"):
        clap.embed_waveform(np.zeros((100, 100), np.float32), rate)  # neither axis is a channel count
    with pytest.raises(ValueError, match="shape"):
        clap.embed_waveform(np.zeros((2, 2, 2), np.float32), rate)
    with pytest.raises(ValueError, match="dtype"):
        clap.embed_waveform(np.zeros(100000, np.int32), rate)


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
    with pytest.raises(ValueError, match="jobs"):
        clap.embed_files([tiny_songs / "low.wav"], jobs=0)


def test_text_index_and_search(tiny_export: Path, tiny_songs: Path, tmp_path: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    one = clap.embed_text("calm piano")
    many = clap.embed_text(["calm piano", "sad drums"])
    assert one.shape == (512,) and many.shape == (2, 512)
    np.testing.assert_allclose(one, TextEmbedder(tiny_export, threads=1).embed(["calm piano"])[0], atol=1e-6)
    np.testing.assert_allclose(many[0], one, atol=1e-6)

    built = clap.build_index(tiny_songs, tmp_path / "music.db")
    assert built.songs == 3 and len(built.failed) == 1
    index = clap.load_index(tmp_path / "music.db")
    hits = clap.search("calm piano", tmp_path / "music.db", k=2)
    scores = index.vectors @ one
    best = np.argsort(-scores)[:2]
    assert [h[0] for h in hits] == [index.paths[i] for i in best]
    np.testing.assert_allclose([h[1] for h in hits], scores[best], atol=1e-5)
    # "more like this": a song's own vector finds itself first
    assert clap.search(index.vectors[1], index, k=1)[0][0] == index.paths[1]
    with pytest.raises(SearchError, match="dimensions"):
        clap.search(np.ones(3, np.float32), index)
    # the API's build_index is incremental like the command: nothing changed, nothing embedded
    again = clap.build_index(tiny_songs, tmp_path / "music.db")
    assert (again.reused, again.embedded) == (3, 0)


def test_search_checks_the_index_model(tiny_export: Path, tiny_songs: Path, tmp_path: Path) -> None:
    import sqlite3

    clap = StudentClap(tiny_export, threads=1)
    clap.build_index(tiny_songs, tmp_path / "music.db")
    con = sqlite3.connect(tmp_path / "music.db")
    with con:
        con.execute("UPDATE meta SET value = 'another' WHERE key = 'audio_model'")
    con.close()
    with pytest.raises(SearchError, match="another audio model"):
        clap.search("calm piano", tmp_path / "music.db")
    assert len(clap.search("calm piano", tmp_path / "music.db", k=2, force=True)) == 2


def test_bad_inputs_are_named(tiny_export: Path, tmp_path: Path) -> None:
    clap = StudentClap(tiny_export, threads=1)
    with pytest.raises(ValueError, match="sample_rate"):
        clap.embed_waveform(np.zeros(100, np.float32), 0)
    with pytest.raises(SearchError, match="student_clap.json"):
        StudentClap(tmp_path).embed_text("x")
    with pytest.raises(ValueError, match="positive"):
        StudentClap(tiny_export, threads=-1)
    (tmp_path / "song.ogg").write_bytes(b"OggS not really")
    with pytest.raises(SearchError, match="refusing to replace it"):
        clap.build_index(tmp_path, tmp_path / "song.ogg")
    assert (tmp_path / "song.ogg").read_bytes() == b"OggS not really"


def test_api_never_imports_torch(tiny_export: Path, tiny_songs: Path) -> None:
    code = (
        "import sys\nfrom student_clap import StudentClap\n"
        f"c = StudentClap({str(tiny_export)!r}, threads=1)\n"
        f"c.embed_file({str(tiny_songs / 'low.wav')!r}); c.embed_text('piano')\n"
        "bad = [m for m in ('torch', 'transformers', 'dvc', 'yaml', 'h5py', 'librosa', 'pipeline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
