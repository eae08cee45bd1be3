"""Shared test set-up: no test reaches the network, and every test sees the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from repo_params import deep_update as _deep_update

# Set before anything imports transformers/huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the clone; absent in a user's clone, so tests that need it skip."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: the shared sample data sits beside the clone only in CI")
    return SHARED


@pytest.fixture(scope="session")
def deep_update():
    """Merge a nested params profile into a parsed params.yaml in place (like `dvc exp run -S`)."""
    return _deep_update


def make_tiny_export(out: Path, *, rate: int, segment_seconds: float, hop_seconds: float, decode_rate: int,
                     corpus: list[str], max_length: int, teacher: dict | None = None,
                     level_invariant: bool = False) -> dict:
    """A models/export-like folder with small real ONNX students in `out`; returns the folder and
    the PyTorch models behind it ("export", "audio", "frontend", "text", "tokenizer"). `teacher`:
    evaluate's teacher section the identity names (default: the demo teacher). `level_invariant`:
    the front-end subtracts each frame's mean log-energy, so a gain change leaves the vectors alone
    (as a trained student nearly does; a random one does not)."""
    import json

    import torch

    from pipeline.models import audio_export, song_export
    from pipeline.stages import export as export_stage
    from pipeline.models.audio_student import build_audio_student
    from pipeline.models.text_student import build_text_student
    from pipeline.data.text_tokenizer import save_tokenizer, train_tokenizer

    class ConvMel(torch.nn.Module):
        """A learnt-filterbank stand-in for the student front-end: small, and exports anywhere."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.filters = torch.nn.Conv1d(1, 128, kernel_size=400, stride=160, bias=False)

        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            mel = torch.log(self.filters(wave.unsqueeze(1)) ** 2 + (1e-8 if level_invariant else 1e-5))
            return mel - mel.mean(dim=1, keepdim=True) if level_invariant else mel

    torch.manual_seed(0)
    audio = build_audio_student({"backbone": "mn04_as", "dropout": 0.1}).eval()
    frontend = ConvMel().eval()
    segment_samples = int(rate * segment_seconds)
    info = audio_export.export_audio(audio, frontend, out, segment_samples=segment_samples, sample_rate=rate,
                                     opset=17, min_cosine=0.9999, quantize=False)
    spec = {"version": export_stage.SPEC_VERSION, "embedding_dim": 512, "skipped": {},
            "audio": audio_export.audio_spec(info, sample_rate=rate, segment_seconds=segment_seconds,
                                             hop_seconds=hop_seconds, segment_samples=segment_samples,
                                             quantized=False, decode_sample_rate=decode_rate)}
    # the song-level pieces the runtime runs (front-end, trunk, head)
    song = song_export.export_song(audio, frontend, out, segment_samples=segment_samples,
                                   hop_samples=int(rate * hop_seconds), sample_rate=rate, opset=17, min_cosine=0.9999,
                                   quantize=False)
    spec["audio"]["song"] = song_export.song_spec(song, False)
    tok = train_tokenizer(corpus, vocab_size=300)
    tok_path = save_tokenizer(tok, out / "src_tokenizer.json")
    text = build_text_student({"vocab_size": tok.get_vocab_size(), "dim": 32, "layers": 1, "heads": 2, "ff_dim": 64,
                               "max_length": max_length, "dropout": 0.1}).eval()
    spec["text"] = export_stage.text_spec(export_stage.export_text(text, tok_path, out, opset=17, min_cosine=0.9999))
    export_stage.stamp_identity(out, spec, teacher if teacher is not None else
                                 {"kind": "demo", "weights_sha256": "053134b89e71b4bbd07dbf753bb08d20a79100744109f6c750b608345dbb50d5"})
    (out / export_stage.SPEC).write_text(json.dumps(spec))
    return {"export": out, "audio": audio, "frontend": frontend, "text": text, "tokenizer": tok}


TINY_CORPUS = [f"{a} {b}" for a in ("calm", "energetic", "sad") for b in ("piano", "guitar", "drums")] * 3


@pytest.fixture(scope="session")
def tiny_export_builder():
    """make_tiny_export(out, rate=..., segment_seconds=..., ...) for tests that need their own sizes."""
    return make_tiny_export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/export-like folder with small real ONNX students (1-s segments at 16 kHz, decoded at 24 kHz)."""
    return make_tiny_export(tmp_path_factory.mktemp("tiny_export"), rate=16000, segment_seconds=1.0, hop_seconds=0.5,
                            decode_rate=24000, corpus=TINY_CORPUS, max_length=8)["export"]


def restamp_export(export: Path, out: Path) -> Path:
    """A copy of `export` whose student files are the same but whose model identity is another
    (as if distilled from the LAION checkpoint): what every runtime command must refuse to mix."""
    import json
    import shutil

    from pipeline.stages.export import stamp_identity

    shutil.copytree(export, out)
    spec = json.loads((out / "student_clap.json").read_text())
    stamp_identity(out, spec, {"kind": "checkpoint", "checkpoint_sha256": "ab" * 32, "source": "x.pt"})
    (out / "student_clap.json").write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="session")
def another_identity():
    """restamp_export(export, out) for tests that check an index of another model is refused."""
    return restamp_export


@pytest.fixture(scope="session")
def tiny_songs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short songs at different rates (one stereo FLAC) and one file that is not audio."""
    import numpy as np
    import soundfile as sf

    root = tmp_path_factory.mktemp("tiny_songs")
    rng = np.random.default_rng(0)
    (root / "album").mkdir()
    for name, rate, seconds, channels, freq in (
        ("low.wav", 22050, 1.4, 1, 220.0), ("album/mid.flac", 44100, 2.3, 2, 440.0), ("high.wav", 16000, 3.0, 1, 1760.0),
    ):
        t = np.arange(int(rate * seconds)) / rate
        x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(root / name, np.stack([x, 0.5 * x], axis=1) if channels == 2 else x, rate)
    (root / "notes.mp3").write_bytes(b"this is text, not audio")
    return root


# --------------------------------------------------------------------------- DVC in throw-away clones

TINY_PIPELINE = {
    "mels": {"max_track_minutes": 0.25, "workers": 1},
    "text_queries": {"n_train": 40, "n_val": 10},
}


def _run_cmd(cmd: list[str], cwd: Path, env: dict) -> str:
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def run_cmd():
    """run_cmd(cmd, cwd, env) -> stdout + stderr; fails the test with both when the command fails."""
    return _run_cmd


@pytest.fixture(scope="session")
def dvc_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment for `dvc` in a clone: `student-clap` on PATH runs the checkout dvc runs it in
    (python -m pipeline.cli from the clone's root), offline, with a git identity."""
    import stat
    import sys

    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "student-clap"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pipeline.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = ""
    return env


def copy_project(dest: Path, *, commit: bool = False) -> Path:
    """dest <- a git repo holding this checkout's files as a user's clone has them: tracked and new
    files (`git ls-files -co --exclude-standard`), no outputs and no DVC cache; committed when asked."""
    import shutil
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout

    cwd = REPO_ROOT
    for rel in git("ls-files", "-co", "--exclude-standard").split("\n"):
        if not rel or rel.startswith((".dvc/cache", ".dvc/tmp")) or not (REPO_ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest / rel)
    cwd = dest
    git("init", "-q", "-b", "main")
    if commit:
        git("add", "-A")
        git("commit", "-qm", "project")
    return dest


@pytest.fixture(scope="session")
def project_copy():
    """project_copy(dest, commit=False) -> dest: this checkout as a fresh git repo (see copy_project)."""
    return copy_project


@pytest.fixture(scope="session")
def tiny_repo():
    """tiny_repo(dest) -> dest: a git repo holding this checkout's files with the tiny pipeline profile."""
    import yaml

    def make(dest: Path) -> Path:
        copy_project(dest)
        params = yaml.safe_load((dest / "params.yaml").read_text())
        _deep_update(params, TINY_PIPELINE)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return dest

    return make
