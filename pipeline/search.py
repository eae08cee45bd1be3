"""Use the exported students: `student-clap embed`, `index` and `search` (onnxruntime only).

This module must not import torch (directly or through another module): it is what users run on
small machines with only the ONNX files of models/export. It reads models/export/student_clap.json
for the sample rate, segment and hop and the tokenizer's maximum length.

A song is embedded exactly as the mel cache saw it in training: decoded to mono int16 at the
cache's decode rate (audio.sample_rate, 48 kHz), segment times found there by the one
segmentation rule (10-s windows, 50 % hop, short songs repeat-padded, a tail window only when it
covers new audio), the int16 audio resampled to the student rate (32 kHz) and cut at the same
times; each window goes through the waveform ONNX model, and the song vector is the
L2-normalised mean of the windows' *raw* (pre-normalisation) embeddings — the rule the teacher
cache uses for track embeddings.

That is AudioEmbedder here, the `--segment-wise` path. By default `embed` and `index` use the
song-level path of pipeline.runtime.song (one decode at the student rate, the overlap of windows
computed once), which gives the same vectors within the tolerance stated there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.audio import (
    AudioDecodeError,
    cut,
    decode_int16,
    int16_to_float,
    map_starts,
    resample_int16,
    segment_length,
    segment_starts,
)
from pipeline.hashing import sha256_file

log = logging.getLogger(__name__)

SPEC_FILE = "student_clap.json"
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".wav", ".aif", ".aiff")
INDEX_VERSION = 1


class SearchError(RuntimeError):
    """The exported models, an index or a query cannot be used; the message says which file."""


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def load_spec(models_dir: str | Path) -> dict:
    path = Path(models_dir) / SPEC_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"{path}: not found; export the models first (`dvc repro export`) or pass --models") from None
    except json.JSONDecodeError as exc:
        raise SearchError(f"{path}: not valid JSON: {exc}") from exc


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    if not path.is_file():
        raise SearchError(f"{path}: ONNX model not found")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class AudioEmbedder:
    """Songs -> 512-d vectors with the waveform ONNX audio student."""

    def __init__(self, models_dir: str | Path, *, int8: bool = False, batch_size: int = 8, threads: int | None = None):
        spec = load_spec(models_dir)
        audio = spec.get("audio")
        if not audio:
            reason = (spec.get("skipped") or {}).get("audio", "not in the export")
            raise SearchError(f"{Path(models_dir) / SPEC_FILE}: no audio student ({reason})")
        name = audio.get("int8_file") if int8 else audio["file"]
        if not name:
            raise SearchError(f"{Path(models_dir) / SPEC_FILE}: no int8 audio model was exported")
        self.model_path = Path(models_dir) / name
        self.session = _session(self.model_path, threads)
        self.model_sha256 = sha256_file(self.model_path)
        self.sample_rate = int(audio["sample_rate"])
        self.decode_sample_rate = int(audio.get("decode_sample_rate") or self.sample_rate)
        self.segment_seconds = float(audio["segment_seconds"])
        self.hop_seconds = float(audio["hop_seconds"])
        self.batch_size = max(1, int(batch_size))
        outputs = [o.name for o in self.session.get_outputs()]
        if "embedding_raw" not in outputs:
            raise SearchError(f"{self.model_path}: output 'embedding_raw' missing (outputs: {outputs})")
        self._raw_index = outputs.index("embedding_raw")

    def embed_segments(self, windows: np.ndarray) -> np.ndarray:
        """[n, segment_samples] float32 -> raw embeddings [n, 512], in batches."""
        out = []
        for start in range(0, len(windows), self.batch_size):
            batch = np.ascontiguousarray(windows[start : start + self.batch_size], dtype=np.float32)
            out.append(self.session.run(None, {"waveform": batch})[self._raw_index])
        return np.concatenate(out)

    def embed_wave(self, wave_int16: np.ndarray) -> tuple[np.ndarray, int]:
        """int16 mono waveform at `decode_sample_rate` -> (unit song vector, number of segments).

        Windows are cut batch by batch, so a long recording never holds all of its overlapping
        float windows at once (an hour would be ~0.9 GB of them).
        """
        if len(wave_int16) == 0:
            raise AudioDecodeError("<waveform>", "no audio samples", kind="empty")
        rate, out_rate = self.decode_sample_rate, self.sample_rate
        starts = map_starts(segment_starts(len(wave_int16), rate, self.segment_seconds, self.hop_seconds), rate, out_rate)
        wave = resample_int16(wave_int16, rate, out_rate)
        seg_len = segment_length(out_rate, self.segment_seconds)
        total = None
        for i in range(0, len(starts), self.batch_size):
            windows = int16_to_float(cut(wave, starts[i : i + self.batch_size], seg_len))
            raw = self.session.run(None, {"waveform": windows})[self._raw_index].astype(np.float64).sum(axis=0)
            total = raw if total is None else total + raw
        return _unit(total / len(starts)).astype(np.float32), len(starts)

    def embed_file(self, path: str | Path) -> tuple[np.ndarray, int]:
        """Decode and embed one file; raises AudioDecodeError for unreadable files."""
        wave = decode_int16(path, self.decode_sample_rate)
        if len(wave) == 0:
            raise AudioDecodeError(path, "no audio samples", kind="empty")
        return self.embed_wave(wave)


class TextEmbedder:
    """Texts -> 512-d vectors with the text ONNX student and its tokenizer."""

    def __init__(self, models_dir: str | Path, threads: int | None = None):
        from pipeline.text_tokenizer import load_tokenizer

        spec = load_spec(models_dir)
        text = spec.get("text")
        if not text:
            reason = (spec.get("skipped") or {}).get("text", "not in the export")
            raise SearchError(f"{Path(models_dir) / SPEC_FILE}: no text student ({reason})")
        try:
            self.tokenizer = load_tokenizer(Path(models_dir) / text["tokenizer"])
        except ValueError as exc:  # TokenizerError: missing, malformed or empty vocabulary
            raise SearchError(str(exc)) from exc
        self.max_length = int(text["max_length"])
        # A query is a handful of tokens through a ~1M-parameter model: more threads gain nothing
        # measurable (benchmarks/text.py times both) and would take cores from the host server.
        self.session = _session(Path(models_dir) / text["file"], 1 if threads is None else threads)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from pipeline.text_tokenizer import encode

        texts = [t.strip() for t in texts]
        if not all(texts):
            raise SearchError("empty query text")
        ids, mask = encode(self.tokenizer, texts, self.max_length)
        (emb,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return _unit(emb)


# --------------------------------------------------------------------------- embedding many files


@dataclass
class EmbedResult:
    paths: list[str]
    vectors: np.ndarray  # [n, 512] float32, unit rows
    n_segments: list[int]
    failed: list[tuple[str, str]]  # (path, reason)


def embed_files(embedder: AudioEmbedder, files: Iterable[str | Path], progress: bool = True) -> EmbedResult:
    """Embed files one by one; an unreadable file is reported and skipped, the rest go on."""
    files = [str(f) for f in files]
    paths, vectors, counts, failed = [], [], [], []
    for f in tqdm(files, desc="embedding", unit="song", disable=not progress):
        try:
            vec, n = embedder.embed_file(f)
        except AudioDecodeError as exc:
            log.warning("skipped %s: %s", f, exc.reason)
            failed.append((f, exc.reason))
            continue
        paths.append(f)
        vectors.append(vec)
        counts.append(n)
    dim = embedder.session.get_outputs()[0].shape[-1]
    matrix = np.stack(vectors) if vectors else np.zeros((0, dim if isinstance(dim, int) else 512), np.float32)
    return EmbedResult(paths, matrix, counts, failed)


def find_audio(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise SearchError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def _atomic_save(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        write(fh)
    os.replace(tmp, path)


def save_index(path: str | Path, result: EmbedResult, model_sha256: str, root: str) -> Path:
    path = Path(path)
    _atomic_save(path, lambda fh: np.savez(
        fh,
        version=np.array(INDEX_VERSION),
        paths=np.array(result.paths, dtype=str),
        vectors=result.vectors.astype(np.float32),
        n_segments=np.array(result.n_segments, dtype=np.int64),
        audio_model_sha256=np.array(model_sha256),
        root=np.array(str(root)),
    ))
    return path


@dataclass
class Index:
    paths: list[str]
    vectors: np.ndarray
    audio_model_sha256: str


def load_index(path: str | Path) -> Index:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != INDEX_VERSION:
                raise SearchError(f"{path}: index version {int(data['version'])}, this program reads {INDEX_VERSION}")
            return Index([str(p) for p in data["paths"]], data["vectors"].astype(np.float32), str(data["audio_model_sha256"]))
    except FileNotFoundError:
        raise SearchError(f"{path}: index not found (build it with `student-clap index DIR --out {path}`)") from None
    except (KeyError, ValueError, OSError) as exc:
        raise SearchError(f"{path}: not a student-clap index: {exc}") from exc


def search(index: Index, query_vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Top-k (path, cosine) per query vector, best first."""
    scores = query_vectors @ index.vectors.T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(index.paths[i], float(row[i])) for i in order])
    return out


# --------------------------------------------------------------------------- commands


def _write_embeddings(out: Path, result: EmbedResult) -> None:
    suffix = out.suffix.lower()
    if suffix == ".npz":
        _atomic_save(out, lambda fh: np.savez(fh, paths=np.array(result.paths, dtype=str), vectors=result.vectors,
                                               n_segments=np.array(result.n_segments, dtype=np.int64)))
    elif suffix == ".npy":
        _atomic_save(out, lambda fh: np.save(fh, result.vectors))
        # rows follow this list (skipped files have no row)
        out.with_suffix(".paths.txt").write_text("".join(p + "\n" for p in result.paths), encoding="utf-8")
    elif suffix == ".jsonl":
        lines = [json.dumps({"path": p, "n_segments": n, "embedding": [round(float(x), 7) for x in v]})
                 for p, n, v in zip(result.paths, result.n_segments, result.vectors)]
        _atomic_save(out, lambda fh: fh.write("".join(line + "\n" for line in lines).encode()))
    else:
        raise SearchError(f"--out {out}: use a .npz, .npy or .jsonl file name")


def _report_failures(result: EmbedResult) -> None:
    if result.failed:
        print(f"{len(result.failed)} file(s) could not be read and were skipped:", file=sys.stderr)
        for path, reason in result.failed:
            print(f"  {path}: {reason}", file=sys.stderr)


def _audio_embedder(args: argparse.Namespace):
    """The song-level path (pipeline.runtime.song) when the export has it, unless --segment-wise."""
    from pipeline.runtime.song import open_audio_embedder

    return open_audio_embedder(args.models, int8=getattr(args, "int8", False), batch_size=getattr(args, "batch_size", 8),
                               threads=getattr(args, "threads", None), segment_wise=getattr(args, "segment_wise", False))


def embed_main(args: argparse.Namespace) -> int:
    try:
        embedder = _audio_embedder(args)
        out = Path(args.out)
        if out.suffix.lower() not in (".npz", ".npy", ".jsonl"):
            raise SearchError(f"--out {out}: use a .npz, .npy or .jsonl file name")
        result = embed_files(embedder, args.files)
        _write_embeddings(out, result)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    _report_failures(result)
    log.info("wrote %d embeddings to %s", len(result.paths), out)
    return 0 if result.paths else 1


def index_main(args: argparse.Namespace) -> int:
    try:
        embedder = _audio_embedder(args)
        files = find_audio(args.dir)
        if not files:
            raise SearchError(f"{args.dir}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        log.info("indexing %d files under %s", len(files), args.dir)
        result = embed_files(embedder, files)
        save_index(args.out, result, embedder.model_sha256, args.dir)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    _report_failures(result)
    log.info("index %s: %d songs (%d skipped)", args.out, len(result.paths), len(result.failed))
    return 0 if result.paths else 1


def search_main(args: argparse.Namespace) -> int:
    try:
        if args.k < 1:
            raise SearchError(f"-k must be at least 1, got {args.k}")
        index = load_index(args.index)
        spec_audio = load_spec(args.models).get("audio") or {}
        names = [spec_audio.get("file"), spec_audio.get("int8_file")]
        digests = {sha256_file(Path(args.models) / n) for n in names if n and (Path(args.models) / n).is_file()}
        if digests and index.audio_model_sha256 not in digests:
            log.warning("%s was built with another audio model than %s: scores may be meaningless; re-index",
                        args.index, args.models)
        if not index.paths:
            raise SearchError(f"{args.index}: the index is empty")
        query = TextEmbedder(args.models, threads=getattr(args, "threads", None)).embed([args.query])
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    for rank, (path, score) in enumerate(search(index, query, args.k)[0], start=1):
        print(f"{rank:3d}  {score:+.5f}  {path}")
    return 0
