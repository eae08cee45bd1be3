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
cache uses for track embeddings. Files are kept or refused by the same usability rule as the mel
cache (pipeline.data.audio.decode_track); partial decodes are kept and their notes travel along.

`index` is incremental: an index records each file's size and modification time (and those of
the files it could not read), so re-indexing a library embeds only new or changed files, drops
deleted ones and reuses the rest. It also records the audio model's sha256 and the embedding
dimension, which `search` checks before comparing vectors.

That is AudioEmbedder here, the `--segment-wise` path. By default `embed` and `index` use the
song-level path of pipeline.runtime.song (the overlap of windows computed once, the same decoded
samples), which gives the same vectors up to float rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.data.audio import (
    AudioDecodeError,
    check_usable,
    cut,
    decode_track,
    int16_to_float,
    map_starts,
    resample_int16,
    segment_length,
    segment_starts,
)
from pipeline.hashing import sha256_file
from pipeline.runtime.song import (
    SongEmbedder,
    SongEmbedding,
    SongGeometry,
    onnx_session,
)
from pipeline.space import EMBED_DIM

log = logging.getLogger(__name__)

SPEC_FILE = "student_clap.json"
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".wav", ".aif", ".aiff")
INDEX_VERSION = 2  # 2 adds file stamps, notes, failures and the dimension; version 1 is still searchable


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
    try:
        return onnx_session(path, threads)
    except FileNotFoundError as exc:
        raise SearchError(str(exc)) from None




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
        width = self.session.get_outputs()[self._raw_index].shape[-1]
        self.dim = int(width) if isinstance(width, int) else int(spec.get("embedding_dim") or EMBED_DIM)

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
        float windows at once (an hour would be ~0.9 GB of them). The wave must pass the mel
        cache's usability rule (not empty, too short or silent): AudioDecodeError otherwise.
        """
        check_usable(wave_int16, self.decode_sample_rate)
        return self._embed_usable(wave_int16)

    def _embed_usable(self, wave_int16: np.ndarray) -> tuple[np.ndarray, int]:
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

    def embed_track(self, path: str | Path) -> SongEmbedding:
        """Decode and embed one file, with its decode notes; raises AudioDecodeError for a file the
        usability rule refuses (unreadable, corrupt, too short, silent, all NaN)."""
        track = decode_track(path, self.decode_sample_rate)  # the rule, judged on the file's own samples
        vector, n = self._embed_usable(track.wave)
        return SongEmbedding(vector, n, track.notes)

    def embed_file(self, path: str | Path) -> tuple[np.ndarray, int]:
        """Decode and embed one file -> (unit vector, number of segments); see embed_track."""
        song = self.embed_track(path)
        return song.vector, song.n_segments


def check_query(text: str) -> str:
    """The query stripped, or SearchError saying why it cannot be embedded. Arguments that were not
    valid UTF-8 on the command line reach Python as lone surrogates; they are refused here rather
    than guessed at (the tokenizer would fail on them)."""
    if not isinstance(text, str):
        raise SearchError(f"the query must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = os.fsencode(text[exc.start : exc.end])
        raise SearchError(f"the query is not valid UTF-8 text (byte(s) {raw.hex(' ')} at character {exc.start}); "
                          "check the terminal's character encoding") from None
    text = text.strip()
    if not text:
        raise SearchError('empty query text: give some words to search for, e.g. "calm piano"')
    return text


class TextEmbedder:
    """Texts -> 512-d vectors with the text ONNX student and its tokenizer."""

    def __init__(self, models_dir: str | Path, threads: int | None = None):
        from pipeline.data.text_tokenizer import load_tokenizer

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
        from pipeline.data.text_tokenizer import encode

        texts = [check_query(t) for t in texts]
        ids, mask = encode(self.tokenizer, texts, self.max_length)
        (emb,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return _unit(emb)


# --------------------------------------------------------------------------- embedding many files

Stamp = tuple[int, int]  # (size in bytes, modification time in ns)

# Failures that say nothing about the file's contents: retried on the next `index`, not remembered.
_RETRY_KINDS = ("missing", "unreadable")


def file_stamp(path: str | Path) -> Stamp:
    """What marks a file as unchanged between two runs of `index`: its size and modification time."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@dataclass
class EmbedResult:
    """Rows for the files that embedded, `failed` for the others. `notes` and `stamps` run parallel
    to `paths`, `failed_stamps` to `failed`; a stamp is taken just before the file is read (None
    when it could not be, or for a failure worth retrying)."""

    paths: list[str]
    vectors: np.ndarray  # [n, dim] float32, unit rows
    n_segments: list[int]
    failed: list[tuple[str, str]]  # (path, reason)
    notes: list[list[str]] = field(default_factory=list)
    stamps: list[Stamp | None] = field(default_factory=list)
    failed_stamps: list[Stamp | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.notes = self.notes or [[] for _ in self.paths]
        self.stamps = self.stamps or [None] * len(self.paths)
        self.failed_stamps = self.failed_stamps or [None] * len(self.failed)


def embed_files(embedder: AudioEmbedder, files: Iterable[str | Path], progress: bool = True, jobs: int = 1) -> EmbedResult:
    """Embed files, `jobs` at a time (threads sharing the embedder's sessions), results in the
    files' order; a file that cannot be read or is refused by the usability rule is reported and
    skipped (permission errors included), the rest go on."""
    files = [str(f) for f in files]
    paths, vectors, counts, notes, stamps = [], [], [], [], []
    failed, failed_stamps = [], []
    jobs = max(1, min(int(jobs), len(files)))
    with ThreadPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        # decoding (libsndfile, soxr), the numpy front-end and onnxruntime release the GIL
        one = functools.partial(_embed_one, embedder)
        done = pool.map(one, files) if pool else map(one, files)
        for f, stamp, song, error in tqdm(done, total=len(files), desc="embedding", unit="song", disable=not progress):
            if song is not None:
                paths.append(f)
                vectors.append(song.vector)
                counts.append(song.n_segments)
                notes.append(song.notes)
                stamps.append(stamp)
                continue
            reason, retry = error
            log.warning("skipped %s: %s", printable(f), reason)
            failed.append((f, reason))
            failed_stamps.append(None if retry else stamp)
    matrix = np.stack(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    return EmbedResult(paths, matrix, counts, failed, notes, stamps, failed_stamps)


def _embed_one(embedder, f: str) -> tuple[str, Stamp | None, SongEmbedding | None, tuple[str, bool] | None]:
    """(file, stamp, song or None, (reason, worth retrying) or None) for one file."""
    try:
        stamp: Stamp | None = file_stamp(f)
    except OSError:
        stamp = None  # decoding says what is wrong with it
    try:
        return f, stamp, embedder.embed_track(f), None
    except AudioDecodeError as exc:
        return f, stamp, None, (exc.reason, exc.kind in _RETRY_KINDS)
    except OSError as exc:
        return f, stamp, None, (f"cannot read the file ({exc.strerror or exc})", True)


def song_jobs(requested: int | None, n_files: int) -> int:
    """Songs embedded at once: `requested`, or one per CPU core (never more than the files)."""
    jobs = requested if requested else (os.cpu_count() or 1)
    return max(1, min(int(jobs), max(n_files, 1)))


def find_audio(root: str | Path) -> list[Path]:
    """Audio files under root (by extension), sorted; a sub-folder that cannot be listed is
    reported and left out, not fatal."""
    root = Path(root)
    if not root.is_dir():
        raise SearchError(f"{root}: not a folder")

    def unlisted(exc: OSError) -> None:
        log.warning("cannot list %s (%s): its files are left out", exc.filename, exc.strerror)

    found = []
    for folder, _dirs, names in os.walk(root, onerror=unlisted):
        for name in names:
            path = Path(folder) / name
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                found.append(path)
    return sorted(found)


# --------------------------------------------------------------------------- output files


def check_writable(out: str | Path) -> None:
    """Fail now, before any embedding, if `out` cannot be written (folder missing and not
    creatable, not writable, or `out` is a folder)."""
    out = Path(out)
    if out.is_dir():
        raise SearchError(f"--out {out}: is a folder, give a file name")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise SearchError(f"--out {out}: cannot write in {folder or '.'} ({exc.strerror or exc})") from None


def _atomic_save(path: Path, write) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        write(fh)


def _stamp_columns(stamps: Sequence[Stamp | None]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([s[0] if s else -1 for s in stamps], dtype=np.int64)
    mtimes = np.array([s[1] if s else -1 for s in stamps], dtype=np.int64)
    return sizes, mtimes


def _stamps_from(sizes: np.ndarray, mtimes: np.ndarray) -> list[Stamp | None]:
    return [(int(s), int(m)) if s >= 0 else None for s, m in zip(sizes, mtimes)]


def _text_column(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.zeros(0, dtype="<U1")


def save_index(path: str | Path, result: EmbedResult, model_sha256: str, root: str) -> Path:
    """Write an index (.npz, no pickles) atomically: vectors, paths, the audio model's sha256 and
    dimension, and per file its size/mtime stamp and notes, plus the files that failed."""
    path = Path(path)
    sizes, mtimes = _stamp_columns(result.stamps)
    failed_sizes, failed_mtimes = _stamp_columns(result.failed_stamps)
    _atomic_save(path, lambda fh: np.savez(
        fh,
        version=np.array(INDEX_VERSION),
        paths=_text_column(result.paths),
        vectors=result.vectors.astype(np.float32),
        embedding_dim=np.array(result.vectors.shape[1]),
        n_segments=np.array(result.n_segments, dtype=np.int64),
        notes=_text_column([json.dumps(n) for n in result.notes]),
        sizes=sizes,
        mtimes_ns=mtimes,
        failed_paths=_text_column([p for p, _ in result.failed]),
        failed_reasons=_text_column([r for _, r in result.failed]),
        failed_sizes=failed_sizes,
        failed_mtimes_ns=failed_mtimes,
        audio_model_sha256=np.array(model_sha256),
        root=np.array(str(root)),
    ))
    return path


@dataclass
class Index:
    paths: list[str]
    vectors: np.ndarray
    audio_model_sha256: str
    embedding_dim: int = 0
    n_segments: list[int] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    stamps: list[Stamp | None] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    failed_stamps: list[Stamp | None] = field(default_factory=list)
    root: str = ""
    version: int = INDEX_VERSION

    def __post_init__(self) -> None:
        self.embedding_dim = self.embedding_dim or (self.vectors.shape[1] if self.vectors.ndim == 2 else 0)
        self.n_segments = self.n_segments or [0] * len(self.paths)
        self.notes = self.notes or [[] for _ in self.paths]
        self.stamps = self.stamps or [None] * len(self.paths)
        self.failed_stamps = self.failed_stamps or [None] * len(self.failed)


def _read_index(path: Path, data) -> Index:
    version = int(data["version"])
    if version not in (1, INDEX_VERSION):
        raise SearchError(f"{path}: index version {version}, this program reads 1 to {INDEX_VERSION}")
    paths = [str(p) for p in data["paths"]]
    vectors = data["vectors"]
    if vectors.ndim != 2 or len(vectors) != len(paths):
        raise SearchError(f"{path}: not a valid index: {len(paths)} paths but vectors of shape {vectors.shape}")
    index = Index(paths, vectors.astype(np.float32), str(data["audio_model_sha256"]), version=version,
                  n_segments=[int(n) for n in data["n_segments"]], root=str(data["root"]))
    if version == 1:
        return index
    if int(data["embedding_dim"]) != vectors.shape[1]:
        raise SearchError(f"{path}: records dimension {int(data['embedding_dim'])} but holds {vectors.shape[1]}-d vectors")
    index.notes = [json.loads(str(n)) for n in data["notes"]]
    index.stamps = _stamps_from(data["sizes"], data["mtimes_ns"])
    index.failed = [(str(p), str(r)) for p, r in zip(data["failed_paths"], data["failed_reasons"])]
    index.failed_stamps = _stamps_from(data["failed_sizes"], data["failed_mtimes_ns"])
    if not len(index.notes) == len(index.stamps) == len(paths) or len(index.failed_stamps) != len(index.failed):
        raise SearchError(f"{path}: not a valid index: its per-file columns have different lengths")
    return index


def load_index(path: str | Path) -> Index:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return _read_index(path, data)
    except FileNotFoundError:
        raise SearchError(f"{path}: index not found (build it with `student-clap index DIR --out {path}`)") from None
    except SearchError:
        raise
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SearchError(f"{path}: not a student-clap index: {exc}") from exc


def search(index: Index, query_vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Top-k (path, cosine) per query vector, best first."""
    if query_vectors.ndim != 2 or query_vectors.shape[1] != index.vectors.shape[1]:
        raise SearchError(f"the index holds {index.vectors.shape[1]}-d vectors, the query is "
                          f"{query_vectors.shape[-1]}-d: the index was built for other models")
    scores = query_vectors @ index.vectors.T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(index.paths[i], float(row[i])) for i in order])
    return out


# --------------------------------------------------------------------------- incremental index


@dataclass
class IndexUpdate:
    """What re-indexing a folder does, given the previous index: files found now (sorted), those
    unchanged since the previous index (row there) and those to embed, and indexed files now gone."""

    files: list[str]
    stamps: dict[str, Stamp | None] = field(default_factory=dict)  # taken at the scan, before any decoding
    reuse: dict[str, int] = field(default_factory=dict)  # path -> row of the previous index
    reuse_failed: dict[str, int] = field(default_factory=dict)  # path -> previous failure, not retried
    todo: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def plan_update(previous: Index | None, files: Sequence[str]) -> IndexUpdate:
    """Match files to the previous index by path + size + modification time."""
    plan = IndexUpdate(list(files))
    for f in files:
        try:
            plan.stamps[f] = file_stamp(f)
        except OSError:
            plan.stamps[f] = None  # never matches: embedding it reports what is wrong
    if previous is None:
        plan.todo = list(files)
        return plan
    rows = {p: i for i, p in enumerate(previous.paths)}
    failed_rows = {p: i for i, (p, _) in enumerate(previous.failed)}
    for f in files:
        stamp = plan.stamps[f]
        if stamp is not None and f in rows and previous.stamps[rows[f]] == stamp:
            plan.reuse[f] = rows[f]
        elif stamp is not None and f in failed_rows and previous.failed_stamps[failed_rows[f]] == stamp:
            plan.reuse_failed[f] = failed_rows[f]
        else:
            plan.todo.append(f)
    current = set(files)
    plan.removed = [p for p in previous.paths if p not in current]
    return plan


def previous_index(out: Path, model_sha256: str) -> tuple[Index | None, str]:
    """The index at `out` if its vectors can be reused with this model, else (None, why not)."""
    if not out.exists():
        return None, ""
    try:
        index = load_index(out)
    except SearchError as exc:
        return None, f"{exc}; building a new index"
    if index.version < 2:
        return None, f"{out}: an index without file stamps (version {index.version}); embedding every file again"
    if index.audio_model_sha256 != model_sha256:
        return None, f"{out}: built with another audio model; embedding every file again"
    return index, ""


def merge_update(previous: Index | None, plan: IndexUpdate, fresh: EmbedResult) -> EmbedResult:
    """The new index's rows, in `plan.files` order: reused rows of the previous index and fresh
    ones. Fresh rows get the stamps of the scan (whatever embedded them); a fresh failure keeps
    its stamp only when embed_files marked it as not worth retrying."""
    fresh_rows = {p: i for i, p in enumerate(fresh.paths)}
    fresh_failed = {p: i for i, (p, _) in enumerate(fresh.failed)}
    paths, vectors, counts, notes, stamps, failed, failed_stamps = [], [], [], [], [], [], []
    for f in plan.files:
        if f in plan.reuse and previous is not None:
            i = plan.reuse[f]
            row = (previous.vectors[i], previous.n_segments[i], previous.notes[i], previous.stamps[i])
        elif f in fresh_rows:
            i = fresh_rows[f]
            row = (fresh.vectors[i], fresh.n_segments[i], fresh.notes[i], plan.stamps.get(f, fresh.stamps[i]))
        elif f in plan.reuse_failed and previous is not None:
            failed.append(previous.failed[plan.reuse_failed[f]])
            failed_stamps.append(previous.failed_stamps[plan.reuse_failed[f]])
            continue
        elif f in fresh_failed:
            failed.append(fresh.failed[fresh_failed[f]])
            keep = fresh.failed_stamps[fresh_failed[f]] is not None
            failed_stamps.append(plan.stamps.get(f) if keep else None)
            continue
        else:  # neither embedded nor reported: tried again next time
            continue
        paths.append(f)
        vectors.append(row[0])
        counts.append(row[1])
        notes.append(row[2])
        stamps.append(row[3])
    dim = fresh.vectors.shape[1]
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    return EmbedResult(paths, matrix, counts, failed, notes, stamps, failed_stamps)


# --------------------------------------------------------------------------- commands

OUT_SUFFIXES = (".npz", ".npy", ".jsonl")


def printable(path: str) -> str:
    """A path on one line of text: control characters (a newline in a name) and bytes that were
    not valid UTF-8 are shown escaped."""
    if path.isprintable():
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else repr(c)[1:-1] for c in path)


def sidecar_path(out: Path) -> Path:
    """The JSONL file that names the rows of a .npy output (x.npy -> x.paths.jsonl)."""
    return out.with_suffix(".paths.jsonl")


def _jsonl(records: Iterable[dict]) -> bytes:
    # json escapes newlines and undecodable bytes in names, so one record is always one line
    return "".join(json.dumps(r) + "\n" for r in records).encode("ascii")


def _write_embeddings(out: Path, result: EmbedResult) -> None:
    suffix = out.suffix.lower()
    if suffix == ".npz":
        _atomic_save(out, lambda fh: np.savez(fh, paths=_text_column(result.paths), vectors=result.vectors,
                                               n_segments=np.array(result.n_segments, dtype=np.int64),
                                               notes=_text_column([json.dumps(n) for n in result.notes])))
    elif suffix == ".npy":
        # row i of the matrix is record i of the sidecar (skipped files have neither)
        records = [{"row": i, "path": p, "n_segments": n, "notes": notes}
                   for i, (p, n, notes) in enumerate(zip(result.paths, result.n_segments, result.notes))]
        _atomic_save(sidecar_path(out), lambda fh: fh.write(_jsonl(records)))
        _atomic_save(out, lambda fh: np.save(fh, result.vectors))
    elif suffix == ".jsonl":
        records = [{"path": p, "n_segments": n, "notes": notes, "embedding": [round(float(x), 7) for x in v]}
                   for p, n, notes, v in zip(result.paths, result.n_segments, result.notes, result.vectors)]
        _atomic_save(out, lambda fh: fh.write(_jsonl(records)))
    else:
        raise SearchError(f"--out {out}: use a .npz, .npy or .jsonl file name")


def _report_failures(result: EmbedResult) -> None:
    if result.failed:
        print(f"{len(result.failed)} file(s) could not be used and were skipped:", file=sys.stderr)
        for path, reason in result.failed:
            print(f"  {printable(path)}: {reason}", file=sys.stderr)
    flagged = [(p, n) for p, n in zip(result.paths, result.notes) if n]
    if flagged:
        print(f"{len(flagged)} file(s) kept with notes:", file=sys.stderr)
        for path, notes in flagged:
            print(f"  {printable(path)}: {'; '.join(notes)}", file=sys.stderr)


def _embedder(args: argparse.Namespace, jobs: int = 1):
    """The song-level path (pipeline.runtime.song) when the export has it, unless --segment-wise.
    With several songs at once each runs on one onnxruntime thread unless --threads says otherwise:
    the cores then work on different songs, which scales better than threads inside one song."""
    threads = getattr(args, "threads", None) or (1 if jobs > 1 else None)
    return open_audio_embedder(args.models, int8=getattr(args, "int8", False), batch_size=getattr(args, "batch_size", 8),
                               threads=threads, segment_wise=getattr(args, "segment_wise", False),
                               one_pass_decode=getattr(args, "one_pass_decode", False))


def embed_main(args: argparse.Namespace) -> int:
    try:
        out = Path(args.out)
        if out.suffix.lower() not in OUT_SUFFIXES:
            raise SearchError(f"--out {out}: use a .npz, .npy or .jsonl file name")
        check_writable(out)
        jobs = song_jobs(getattr(args, "jobs", None), len(args.files))
        result = embed_files(_embedder(args, jobs), args.files, jobs=jobs)
        _write_embeddings(out, result)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    _report_failures(result)
    log.info("wrote %d embeddings to %s", len(result.paths), out)
    return 0 if result.paths else 1


def index_main(args: argparse.Namespace) -> int:
    try:
        out = Path(args.out)
        check_writable(out)
        files = [str(f) for f in find_audio(args.dir)]
        if not files:
            raise SearchError(f"{args.dir}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        jobs = song_jobs(getattr(args, "jobs", None), len(files))
        embedder = _embedder(args, jobs)
        previous, why = previous_index(out, embedder.model_sha256)
        if why:
            log.warning("%s", why)
        plan = plan_update(previous, files)
        log.info("indexing %d files under %s: %d unchanged, %d to embed", len(files), args.dir,
                 len(plan.reuse) + len(plan.reuse_failed), len(plan.todo))
        fresh = embed_files(embedder, plan.todo, jobs=jobs)
        result = merge_update(previous, plan, fresh)
        save_index(out, result, embedder.model_sha256, args.dir)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    _report_failures(result)
    log.info("index %s: %d songs: reused %d, embedded %d, removed %d; %d file(s) skipped", out, len(result.paths),
             len(plan.reuse), len(fresh.paths), len(plan.removed), len(result.failed))
    return 0 if result.paths else 1


def check_index_model(index: Index, index_path: str | Path, models_dir: str | Path, force: bool = False) -> None:
    """Refuse (SearchError) an index built by another audio model than the one in `models_dir`,
    or one that cannot be checked, unless `force`; then only warn."""
    spec_audio = load_spec(models_dir).get("audio") or {}
    files = [Path(models_dir) / n for n in (spec_audio.get("file"), spec_audio.get("int8_file")) if n]
    digests = {sha256_file(f) for f in files if f.is_file()}
    if index.audio_model_sha256 in digests:
        return
    if digests:
        problem = (f"{index_path} was built by another audio model (sha256 {index.audio_model_sha256[:12]}...) "
                   f"than the one in {models_dir}, so its scores would mean nothing; re-index with "
                   f"`student-clap index DIR --out {index_path} --models {models_dir}`")
    else:
        problem = f"{models_dir} holds no audio model, so the model that built {index_path} cannot be checked"
    if not force:
        raise SearchError(problem + ", or pass --force to search anyway")
    log.warning("%s; searching anyway (--force)", problem)


def search_main(args: argparse.Namespace) -> int:
    try:
        if args.k < 1:
            raise SearchError(f"-k must be at least 1, got {args.k}")
        text = check_query(args.query)
        index = load_index(args.index)
        if not index.paths:
            raise SearchError(f"{args.index}: the index is empty")
        query = TextEmbedder(args.models, threads=getattr(args, "threads", None)).embed([text])
        if query.shape[1] != index.vectors.shape[1]:
            raise SearchError(f"{args.index} holds {index.vectors.shape[1]}-d vectors but the text model in "
                              f"{args.models} gives {query.shape[1]}-d ones: it was built for other models "
                              "(--force cannot help); re-index with these models")
        check_index_model(index, args.index, args.models, force=getattr(args, "force", False))
        hits = search(index, query, args.k)[0]
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    for rank, (path, score) in enumerate(hits, start=1):
        print(f"{rank:3d}  {score:+.5f}  {printable(path)}")
    return 0


def open_audio_embedder(models_dir: str | Path, *, int8: bool = False, batch_size: int = 16,
                        threads: int | None = None, segment_wise: bool = False, one_pass_decode: bool = False):
    """The embedder `embed` and `index` use: the song-level path when the export has one (fp32, or
    int8 trunk and head with `int8`), else — or with `segment_wise` — the segment-wise waveform
    model (AudioEmbedder). `one_pass_decode`: see SongEmbedder. Raises SearchError naming a missing file."""
    models_dir = Path(models_dir)
    audio = load_spec(models_dir).get("audio") or {}
    song = audio.get("song") or {}
    names = [song.get("frontend_file"), song.get("trunk_int8_file" if int8 else "trunk_file"),
             song.get("head_int8_file" if int8 else "head_file")]
    if segment_wise or not all(names):
        if not segment_wise and song:
            log.warning("%s: no %s song-level model; using the segment-wise one", models_dir / SPEC_FILE,
                        "int8" if int8 else "fp32")
        return AudioEmbedder(models_dir, int8=int8, batch_size=batch_size, threads=threads)
    try:
        embedder = SongEmbedder(*(models_dir / n for n in names), SongGeometry.from_spec(audio),
                                batch_size=batch_size, threads=threads, one_pass_decode=one_pass_decode,
                                logmel=song.get("frontend"))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise SearchError(f"{models_dir / SPEC_FILE}: song-level model unusable: {exc}") from exc
    # The index records which student built it; the song path runs the same student as audio["file"].
    embedder.model_path = models_dir / audio["file"]
    embedder.model_sha256 = sha256_file(embedder.model_path) if embedder.model_path.is_file() else sha256_file(
        embedder.model_paths[2])
    return embedder
