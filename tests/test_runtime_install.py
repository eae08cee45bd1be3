"""The runtime-only install: a fresh venv with the base dependencies runs embed, index and search.

pip installs this checkout (no extras) into a new virtual environment that does not see the test
interpreter's packages, so anything the runtime path needs but the base install lacks fails here.
pip reaches the package index (its cache keeps repeat runs quick).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.install, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = ("torch", "transformers", "dvc", "dvclive", "h5py", "librosa", "matplotlib", "onnx")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("runtime_install")
    src = base / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for package in ("pipeline", "student_clap"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], base)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)], base)
    return venv


def test_base_install_has_no_pipeline_dependencies(runtime_venv: Path) -> None:
    listed = _run([str(runtime_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], runtime_venv)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"onnxruntime", "numpy", "soundfile", "av", "scipy", "soxr", "tokenizers", "tqdm", "student-clap"} <= names
    assert not names & set(PIPELINE_ONLY), sorted(names & set(PIPELINE_ONLY))


def test_embed_index_search_run_on_the_base_install(runtime_venv: Path, tiny_export: Path, tiny_songs: Path,
                                                    tmp_path: Path) -> None:
    cli = str(runtime_venv / "bin" / "student-clap")
    models = ["--models", str(tiny_export), "--threads", "1"]
    _run([cli, "embed", str(tiny_songs / "low.wav"), str(tiny_songs / "high.wav"), "--out", str(tmp_path / "v.npz"),
          *models], tmp_path)
    vectors = np.load(tmp_path / "v.npz")["vectors"]
    assert vectors.shape == (2, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    index = _run([cli, "index", str(tiny_songs), "--out", str(tmp_path / "music.db"), *models], tmp_path)
    assert "notes.mp3" in index.stderr  # the non-audio file is reported and skipped
    found = _run([cli, "search", "calm piano", "--index", str(tmp_path / "music.db"), "-k", "3", *models], tmp_path)
    lines = found.stdout.strip().splitlines()
    assert len(lines) == 3 and {line.split()[-1] for line in lines} == {
        os.path.realpath(p) for p in (tiny_songs / "low.wav", tiny_songs / "high.wav", tiny_songs / "album" / "mid.flac")}
    # the other commands: not listed, and each names the extra it needs
    listed = _run([cli, "--help"], tmp_path)
    assert "{embed,index,search,similar,duplicates,publish}" in listed.stdout and "[pipeline]" in listed.stdout
    other = subprocess.run([cli, "run", "mels"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert other.returncode == 3 and "pip install 'student-clap[pipeline]'" in other.stderr
    assert "Traceback" not in other.stderr

    # the same vectors as the full install computes, through the Python API of the runtime install
    api = _run([str(runtime_venv / "bin" / "python"), "-c",
                "import sys, numpy as np\nfrom student_clap import StudentClap\n"
                f"c = StudentClap({str(tiny_export)!r}, threads=1)\n"
                f"np.save(sys.argv[1], c.embed_file({str(tiny_songs / 'low.wav')!r}))\n"
                f"assert not [m for m in {PIPELINE_ONLY!r} if m in sys.modules]\n",
                str(tmp_path / "api.npy")], tmp_path)
    assert api.returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "api.npy"), vectors[0], atol=1e-6)


def test_library_formats_decode_on_the_base_install(runtime_venv: Path, tmp_path: Path) -> None:
    """M4A (AAC, ALAC) through the FFmpeg that PyAV's wheel ships, next to libsndfile's formats."""
    code = ("import sys, numpy as np, av, soundfile as sf\nfrom student_clap.audio import decode_track\n"
            "sr = 44100; x = (0.3 * np.sin(np.arange(sr * 2) / 9.0)).astype(np.float32)\n"
            "sf.write(sys.argv[1] + '/a.flac', x, sr)\n"
            "for codec in ('aac', 'alac'):\n"
            "    with av.open(f'{sys.argv[1]}/{codec}.m4a', 'w', format='ipod') as out:\n"
            "        s = out.add_stream(codec, rate=sr, layout='mono')\n"
            "        f = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16)[None], format='s16', layout='mono')\n"
            "        f.sample_rate, f.pts = sr, 0\n"
            "        [out.mux(p) for p in [*s.encode(f), *s.encode(None)]]\n"
            "    assert len(decode_track(f'{sys.argv[1]}/{codec}.m4a', 48000).wave) >= 96000\n")
    _run([str(runtime_venv / "bin" / "python"), "-c", code, str(tmp_path)], tmp_path)
