"""The runtime as a music library uses it: a SQLite index that survives a kill and a second
writer, paths that mean one file however they are typed, every common format, symlinked folders,
and a runtime that needs nothing from the pipeline."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from student_clap import StudentClap
from student_clap.cli import main as runtime_main
from student_clap.index import read_index
from student_clap.song import SongEmbedder

REPO = Path(__file__).resolve().parents[1]
SR = 44100


def _song(seed: int, seconds: float = 3.0) -> np.ndarray:
    """A stereo recording-like signal [n, 2]: a note with a tremolo over some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    f0 = 110 * 2 ** (rng.integers(0, 24) / 12)
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)) / 2
    x += 0.02 * rng.standard_normal(t.size)
    return np.stack([x, 0.7 * x], axis=1).astype(np.float32)


def _library(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sf.write(root / f"song{i:02d}.flac", _song(i, 1.5), SR)
        paths.append(root / f"song{i:02d}.flac")
    return paths


# A writer held mid-way: after `hold_after` songs, each song waits until the file `gate` exists, so
# the writer holds the index, part-built, for as long as a test needs (a kill, a second writer).
SLOW_INDEX = """
import os, sys, time
from student_clap.song import SongEmbedder
from student_clap.cli import main
real, done, gate = SongEmbedder.embed_track, [], {gate!r}
def slow(self, path):
    while len(done) >= {hold_after} and not os.path.exists(gate):
        time.sleep(0.02)
    done.append(path)
    return real(self, path)
SongEmbedder.embed_track = slow
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _slow_index(lib: Path, db: Path, models: Path, hold_after: int, gate: Path) -> subprocess.Popen:
    code = SLOW_INDEX.format(hold_after=hold_after, gate=str(gate))
    return subprocess.Popen([sys.executable, "-c", code, "index", str(lib), "--out", str(db),
                             "--models", str(models), "--jobs", "1", "--threads", "1"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_songs(proc: subprocess.Popen, db: Path, n: int, timeout: float = 120) -> int:
    """Poll the index (as a reader, while the writer runs) until it holds at least n songs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the writer ended before the test could act: " + proc.stderr.read()
        if db.exists() and db.stat().st_size:
            try:
                count = len(read_index(db).paths)
            except Exception:  # the writer may be creating the tables right now
                count = 0
            if count >= n:
                return count
        time.sleep(0.05)
    raise AssertionError(f"{db}: fewer than {n} songs after {timeout} s")


@pytest.fixture
def counting(monkeypatch):
    seen: list[str] = []
    real = SongEmbedder.embed_track

    def embed_track(self, path):
        seen.append(os.path.realpath(path))
        return real(self, path)

    monkeypatch.setattr(SongEmbedder, "embed_track", embed_track)
    return seen


def test_kill_during_index_then_rerun_reuses_every_finished_song(tiny_export, tmp_path, counting):
    files = _library(tmp_path / "lib", 10)
    db = tmp_path / "music.db"
    proc = _slow_index(tmp_path / "lib", db, tiny_export, hold_after=3, gate=tmp_path / "never")
    try:
        _wait_for_songs(proc, db, 3)
        # search works while the index is being built (WAL: the last committed songs)
        hits = StudentClap(tiny_export, threads=1).search("calm piano", db, k=2)
        assert len(hits) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    before = read_index(db)
    assert len(before.paths) == 3  # the songs finished before the kill, nothing of the one in flight
    assert runtime_main(["index", str(tmp_path / "lib"), "--out", str(db), "--models", str(tiny_export), "--jobs", "1",
                         "--threads", "1"]) == 0
    after = read_index(db)
    # every song once; the finished ones were not embedded again, and kept their vectors
    assert after.paths == sorted(os.path.realpath(f) for f in files)
    assert sorted(counting) == sorted(set(after.paths) - set(before.paths))
    for path, vec in zip(before.paths, before.vectors):
        np.testing.assert_array_equal(after.vectors[after.paths.index(path)], vec)


def test_a_second_writer_is_refused_and_the_index_stays_valid(tiny_export, tmp_path):
    files = _library(tmp_path / "lib", 6)
    db = tmp_path / "music.db"
    gate = tmp_path / "go"
    first = _slow_index(tmp_path / "lib", db, tiny_export, hold_after=1, gate=gate)
    try:
        _wait_for_songs(first, db, 1)  # the first writer holds the index until the gate opens
        second = subprocess.run([sys.executable, "-m", "student_clap", "index", str(tmp_path / "lib"), "--out", str(db),
                                 "--models", str(tiny_export), "--threads", "1"], env=_env(), capture_output=True, text=True)
        gate.touch()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2 and "another `student-clap index` is writing this index" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err
    assert read_index(db).paths == sorted(os.path.realpath(f) for f in files)


def test_relative_absolute_and_linked_paths_to_one_folder_embed_nothing_again(tiny_export, tmp_path, counting):
    files = _library(tmp_path / "lib", 3)
    os.symlink(tmp_path / "lib", tmp_path / "alias")
    db = tmp_path / "music.db"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert runtime_main(["index", "lib", "--out", "music.db", "--models", str(tiny_export), "--threads", "1"]) == 0
    finally:
        os.chdir(cwd)
    assert len(counting) == 3
    counting.clear()
    for folder in (tmp_path / "lib", tmp_path / "alias"):
        assert runtime_main(["index", str(folder), "--out", str(db), "--models", str(tiny_export), "--threads", "1"]) == 0
    assert counting == []
    # stored paths are resolved: they name the files from any folder
    assert read_index(db).paths == sorted(os.path.realpath(f) for f in files)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in read_index(db).paths)


def _write_m4a(path: Path, samples: np.ndarray, codec: str) -> None:
    import av

    with av.open(str(path), "w", format="ipod") as out:
        stream = out.add_stream(codec, rate=SR, layout="stereo")
        if codec == "aac":
            stream.bit_rate = 256000
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate, frame.pts = SR, 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_m4a_aac_and_alac_are_indexed_like_the_flac_of_the_same_audio(tiny_export, tmp_path, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    audio = _song(7, 4.0)
    sf.write(lib / "take.flac", audio, SR)
    _write_m4a(lib / "take_aac.m4a", audio, "aac")
    _write_m4a(lib / "take_alac.m4a", audio, "alac")
    for seed in (8, 9):  # other songs: how far apart different audio is for this student
        sf.write(lib / f"other{seed}.flac", _song(seed, 4.0), SR)
    db = tmp_path / "music.db"
    assert runtime_main(["index", str(lib), "--out", str(db), "--models", str(tiny_export), "--threads", "1"]) == 0
    assert "skipped" not in capsys.readouterr().err
    index = read_index(db)
    vec = {Path(p).name: v for p, v in zip(index.paths, index.vectors.astype(np.float64))}
    assert len(vec) == 5 and not any(index.notes)
    flac = vec["take.flac"]
    aac, alac = float(vec["take_aac.m4a"] @ flac), float(vec["take_alac.m4a"] @ flac)
    others = max(float(vec[f"other{s}.flac"] @ flac) for s in (8, 9))
    assert aac >= 0.999 and alac >= 0.999, (aac, alac)
    # closer than different songs are: the same audio, not merely the student's common direction
    assert 1 - aac < (1 - others) / 3 and 1 - alac < (1 - others) / 100, (aac, alac, others)


def test_symlinked_folders_are_followed_once_and_what_is_left_out_is_counted(tiny_export, tmp_path, capsys):
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    _library(lib / "album", 2)
    _library(outside, 1)
    os.symlink(outside, lib / "linked")  # an album elsewhere, linked in: followed
    os.symlink(lib / "album", lib / "again")  # the same album twice: walked once
    os.symlink(lib, lib / "album" / "loop")  # a loop: detected, not followed forever
    os.symlink(tmp_path / "gone.mp3", lib / "dangling.mp3")
    (lib / "cover.jpg").write_bytes(b"\xff\xd8\xff")
    db = tmp_path / "music.db"
    assert runtime_main(["index", str(lib), "--out", str(db), "--models", str(tiny_export), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert read_index(db).paths == sorted(os.path.realpath(p) for p in [*(lib / "album").glob("*.flac"),
                                                                        *outside.glob("*.flac")])
    assert "dangling.mp3: broken symlink" in err
    assert err.count("already walked as") == 2  # `again` and `album/loop`
    assert "1 file(s) not audio by their name: 1 .jpg" in err


def test_runtime_imports_nothing_from_the_pipeline():
    offenders = []
    for path in sorted((REPO / "student_clap").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n == "pipeline" or n.startswith("pipeline.")]
    assert not offenders, offenders


BLOCKED = ("torch", "pipeline", "h5py", "transformers", "yaml", "librosa", "dvc")


def _blocked(code: str, blocked: tuple[str, ...] = BLOCKED) -> str:
    """`code` run with `blocked` packages unimportable, as in an install without them: an import
    finder ahead of all others answers ModuleNotFoundError for them."""
    return ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.partition('.')[0] in {blocked!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n" + code)


def test_runtime_works_with_the_pipeline_and_torch_unimportable(tiny_export, tiny_songs, tmp_path):
    code = _blocked(
        "from student_clap.cli import main\nfrom student_clap import StudentClap\n"
        "args = ['--models', sys.argv[1], '--threads', '1']\n"
        "assert main(['index', sys.argv[2], '--out', sys.argv[3], *args]) == 0\n"
        "assert main(['embed', sys.argv[4], '--out', sys.argv[5], *args]) == 0\n"
        "assert main(['search', 'calm piano', '--index', sys.argv[3], '-k', '2', *args]) == 0\n"
        "c = StudentClap(sys.argv[1], threads=1)\n"
        "assert c.search(c.embed_file(sys.argv[4]), sys.argv[3], k=1)[0][0].endswith('low.wav')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_export), str(tiny_songs), str(tmp_path / "i.db"),
                           str(tiny_songs / "low.wav"), str(tmp_path / "e.npz")], env=_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2


def test_pipeline_commands_say_which_extra_they_need(tmp_path):
    """The one console script (pipeline.cli) in an install without the pipeline extra: every
    command either works or names the extra, never a traceback."""
    code = _blocked("from pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n",
                    ("torch", "h5py", "transformers", "yaml", "librosa", "dvc", "dvclive", "onnx", "matplotlib",
                     "safetensors", "huggingface_hub", "requests", "ruamel"))
    x = str(tmp_path / "x")
    commands = [["run", "mels"], ["check"], ["demo", "teacher"], ["licenses", "audit"],
                ["mels", "merge", x, x], ["teacher", "fetch"], ["teacher", "convert", x, "--tokenizer", x, "--out", x], ["teacher", "merge", x, x],
                ["weights", "fetch", "mn04_as"], ["ckpt", "ls", x], ["ckpt", "show", x], ["ckpt", "reset", x],
                ["compare", x], ["deps"], ["results"]]
    for argv in commands:
        proc = subprocess.run([sys.executable, "-c", code, *argv], env=_env(), capture_output=True, text=True,
                              cwd=tmp_path)
        assert "Traceback" not in proc.stderr, (argv, proc.stderr[-2000:])
        assert proc.returncode == 3 and "pip install 'student-clap[pipeline]'" in proc.stderr, (argv, proc.stderr)
    # --help lists what this install runs, and says what the rest needs
    proc = subprocess.run([sys.executable, "-c", code, "--help"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "{embed,index,search,similar,duplicates,publish}" in proc.stdout
    assert "pipeline commands" in proc.stdout and "[pipeline]" in proc.stdout
    from pipeline.cli import build_parser, pipeline_installed

    assert pipeline_installed() and "compare" in build_parser().format_usage()  # this (full) install lists all
