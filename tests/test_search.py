"""embed / index / search with exported ONNX students, in a process that never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.runtime import search as S
from pipeline.data.audio import (
    cut,
    decode,
    decode_int16,
    int16_to_float,
    map_starts,
    resample_int16,
    segment_starts,
    segments,
)
from pipeline.models.audio_student import build_audio_student
from pipeline.models.text_student import build_text_student
from pipeline.stages import export as ex
from pipeline.models.text_tokenizer import save_tokenizer, train_tokenizer

torch.set_num_threads(1)
SR, SEG_S, HOP_S = 16000, 1.0, 0.5
DECODE_SR = 24000  # like the pipeline: decode (and find segment times) at one rate, run the student at another
REPO = Path(__file__).resolve().parents[1]


class ConvMel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.filters = torch.nn.Conv1d(1, 128, kernel_size=400, stride=160, bias=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.filters(wave.unsqueeze(1)) ** 2 + 1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A models/export-like folder with 1-s segments at 16 kHz, and the PyTorch models behind it."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    audio = build_audio_student({"backbone": "mn04_as"}).eval()
    frontend = ConvMel().eval()
    info = ex.export_audio(audio, frontend, out, segment_samples=int(SR * SEG_S), sample_rate=SR,
                           opset=17, min_cosine=0.9999, quantize=False)
    spec = {"version": ex.SPEC_VERSION, "embedding_dim": 512, "skipped": {},
            "audio": ex.audio_spec(info, sample_rate=SR, segment_seconds=SEG_S, hop_seconds=HOP_S,
                                   segment_samples=int(SR * SEG_S), quantized=False, decode_sample_rate=DECODE_SR)}
    corpus = [f"{a} {b}" for a in ("calm", "energetic", "sad") for b in ("piano", "guitar", "drums")] * 3
    tok = train_tokenizer(corpus, vocab_size=300)
    tok_path = save_tokenizer(tok, out / "src_tokenizer.json")
    text = build_text_student({"vocab_size": tok.get_vocab_size(), "dim": 32, "layers": 1, "heads": 2, "ff_dim": 64, "max_length": 8})
    spec["text"] = ex.text_spec(ex.export_text(text.eval(), tok_path, out, opset=17, min_cosine=0.9999))
    (out / ex.SPEC).write_text(json.dumps(spec))
    return out, audio, frontend


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
    embedder = S.AudioEmbedder(models)
    result = S.embed_files(embedder, [songs / "long.wav", songs / "notes.txt"], progress=False)
    assert len(result.failed) == 1 and "notes.txt" in result.failed[0][0]
    S._write_embeddings(tmp_path / "e.npy", result)
    assert np.load(tmp_path / "e.npy").shape == (1, 512)
    assert (tmp_path / "e.paths.txt").read_text().strip().endswith("long.wav")
    with pytest.raises(S.SearchError, match="npz"):
        S._write_embeddings(tmp_path / "e.csv", result)


def test_index_then_search(exported, songs, tmp_path):
    models, _, _ = exported
    index = tmp_path / "songs.npz"
    proc = _cli("index", str(songs), "--out", str(index), "--models", str(models))
    assert proc.returncode == 0, proc.stderr
    assert "broken.mp3" in proc.stderr  # reported, not fatal; notes.txt is not even tried
    idx = S.load_index(index)
    assert sorted(Path(p).name for p in idx.paths) == ["long.wav", "mid.flac", "short.wav"]
    np.testing.assert_allclose(np.linalg.norm(idx.vectors, axis=1), 1.0, atol=1e-5)

    proc = _cli("search", "calm piano", "--index", str(index), "-k", "2", "--models", str(models))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    q = S.TextEmbedder(models).embed(["calm piano"])[0]
    scores = idx.vectors @ q
    expected = [idx.paths[i] for i in np.argsort(-scores)[:2]]
    assert [line.split()[2] for line in lines] == expected
    got_scores = [float(line.split()[1]) for line in lines]
    assert got_scores == sorted(got_scores, reverse=True)
    assert got_scores[0] == pytest.approx(float(scores.max()), abs=1e-4)


def test_clear_errors(exported, tmp_path):
    models, _, _ = exported
    proc = _cli("search", "piano", "--index", str(tmp_path / "none.npz"), "--models", str(models))
    assert proc.returncode == 2 and "index not found" in proc.stderr
    proc = _cli("embed", "x.wav", "--out", str(tmp_path / "o.npz"), "--models", str(tmp_path))
    assert proc.returncode == 2 and "student_clap.json" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _cli("index", str(tmp_path / "empty"), "--out", str(tmp_path / "i.npz"), "--models", str(models))
    assert proc.returncode == 2 and "no audio files" in proc.stderr
    (tmp_path / "bad.npz").write_text("not an index")
    with pytest.raises(S.SearchError, match="not a student-clap index"):
        S.load_index(tmp_path / "bad.npz")
    with pytest.raises(S.SearchError, match="empty query"):
        S.TextEmbedder(models).embed(["  "])
