"""The runtime's embedders and the library scan: songs through the song-level path, queries
through the text student (student_clap.query, importable from here too), folders walked once
(symlinks followed, loops detected).

Nothing here imports torch or the pipeline: it is what users run on small machines with only the
ONNX files of an export folder (models/export). A song is embedded exactly as the mel cache saw it
in training: decoded to mono int16 at the cache's decode rate (48 kHz), resampled through int16 to
the student's rate, 10-s windows every 5 s by the one segmentation rule, and the song vector is the
L2-normalised mean of the windows' raw embeddings (student_clap.song computes the windows' overlap
once; student_clap.reference is the window-by-window computation the tests hold it to). Files are
kept or refused by the one usability rule (student_clap.audio.check_usable).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from student_clap.audio import AudioDecodeError
from student_clap.files import printable
from student_clap.identity import checked_identity
from student_clap.query import TextEmbedder, check_query, unit  # noqa: F401  (also imported from here)
from student_clap.song import SongEmbedder, SongEmbedding, SongGeometry, onnx_session
from student_clap.spec import SPEC_FILE, SearchError, audio_identity, load_spec, song_files

log = logging.getLogger(__name__)

# What the decoders read: libsndfile (WAV/AIFF, FLAC, Ogg Vorbis, Opus, MP3) and, for the rest,
# FFmpeg through PyAV (M4A/MP4 with AAC or ALAC, raw AAC, WMA, WavPack, ...).
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".flac", ".wav", ".aif", ".aiff", ".aifc", ".m4a", ".m4b",
                    ".mp4", ".aac", ".alac", ".caf", ".wma", ".wv")


def _session(path: Path, threads: int | None):
    try:
        return onnx_session(path, threads)
    except FileNotFoundError as exc:
        raise SearchError(str(exc)) from None


# --------------------------------------------------------------------------- audio


def open_audio_embedder(models_dir: str | Path, *, batch_size: int = 16, threads: int | None = None) -> SongEmbedder:
    """The song-level embedder of an export folder (front-end, trunk and head ONNX files), with its
    model identity in `.model_id`. Raises SearchError naming what is missing."""
    models_dir = Path(models_dir)
    spec = load_spec(models_dir)
    audio = spec.get("audio")
    if not audio:
        reason = (spec.get("skipped") or {}).get("audio", "not in the export")
        raise SearchError(f"{models_dir / SPEC_FILE}: no audio student ({reason})")
    names = song_files(audio)
    if not all(names):
        raise SearchError(f"{models_dir / SPEC_FILE}: no song-level audio model (audio.song front-end, trunk and head "
                          "files); re-export the models with this version (`dvc repro export`)")
    try:
        embedder = SongEmbedder(*(models_dir / n for n in names), SongGeometry.from_spec(audio),
                                batch_size=batch_size, threads=threads, logmel=(audio.get("song") or {}).get("frontend"))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise SearchError(f"{models_dir / SPEC_FILE}: song-level model unusable: {exc}") from exc
    embedder.model_id = audio_identity(models_dir)
    embedder.model_identity = checked_identity(models_dir, embedder.head)
    return embedder


Stamp = tuple[int, int]  # (size in bytes, modification time in ns)

# Failures that say nothing about the file's contents: retried on the next `index`, not remembered.
RETRY_KINDS = ("missing", "unreadable")


def file_stamp(path: str | Path) -> Stamp:
    """What marks a file as unchanged between two runs of `index`: its size and modification time."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@dataclass
class Outcome:
    """One file's embedding or the reason it was refused; `stamp` is taken just before reading."""

    path: str
    stamp: Stamp | None
    song: SongEmbedding | None = None
    reason: str = ""
    retry: bool = False  # a failure that says nothing about the file (missing, unreadable)


@dataclass
class EmbedResult:
    """Rows for the files that embedded, `failed` (path, reason) for the others."""

    paths: list[str]
    vectors: np.ndarray  # [n, dim] float32, unit rows
    n_segments: list[int]
    failed: list[tuple[str, str]]
    notes: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.notes = self.notes or [[] for _ in self.paths]


def _embed_one(embedder: SongEmbedder, f: str) -> Outcome:
    try:
        stamp: Stamp | None = file_stamp(f)
    except OSError:
        stamp = None  # decoding says what is wrong with it
    try:
        return Outcome(f, stamp, embedder.embed_track(f))
    except AudioDecodeError as exc:
        return Outcome(f, stamp, reason=exc.reason, retry=exc.kind in RETRY_KINDS)
    except OSError as exc:
        return Outcome(f, stamp, reason=f"cannot read the file ({exc.strerror or exc})", retry=True)


def iter_embed(embedder: SongEmbedder, files: Sequence[str | Path], jobs: int = 1) -> Iterator[Outcome]:
    """One Outcome per file, in the files' order, `jobs` files at a time (threads sharing the
    embedder's sessions: decoding, the log-mel and onnxruntime release the GIL)."""
    files = [str(f) for f in files]
    jobs = max(1, min(int(jobs), len(files) or 1))
    one = functools.partial(_embed_one, embedder)
    with ThreadPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        yield from (pool.map(one, files) if pool else map(one, files))


def embed_files(embedder: SongEmbedder, files: Iterable[str | Path], progress: bool = False, jobs: int = 1) -> EmbedResult:
    """Embed files, results in the files' order; a file that cannot be read or is refused by the
    usability rule is reported and skipped (permission errors included), the rest go on."""
    from tqdm import tqdm

    files = [str(f) for f in files]
    paths, vectors, counts, notes, failed = [], [], [], [], []
    for out in tqdm(iter_embed(embedder, files, jobs), total=len(files), desc="embedding", unit="song",
                    disable=not progress):
        if out.song is None:
            log.warning("skipped %s: %s", printable(out.path), out.reason)
            failed.append((out.path, out.reason))
            continue
        paths.append(out.path)
        vectors.append(out.song.vector)
        counts.append(out.song.n_segments)
        notes.append(out.song.notes)
    matrix = np.stack(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    return EmbedResult(paths, matrix, counts, failed, notes)


def song_jobs(requested: int | None, n_files: int) -> int:
    """Songs embedded at once: `requested`, or one per CPU core (never more than the files)."""
    jobs = requested if requested else (os.cpu_count() or 1)
    return max(1, min(int(jobs), max(n_files, 1)))


# --------------------------------------------------------------------------- the library scan


@dataclass
class Scan:
    """Audio files found under a folder (resolved paths, sorted, each once) and what was left out."""

    files: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): links, loops, unlisted folders
    other_extensions: Counter = field(default_factory=Counter)  # files that are not audio by name, per extension

    def summary(self) -> list[str]:
        """Lines for the user: each left-out path with its reason, then the non-audio files by extension."""
        lines = [f"{printable(p)}: {r}" for p, r in self.left_out]
        if self.other_extensions:
            kinds = ", ".join(f"{n} {ext or '(no extension)'}" for ext, n in self.other_extensions.most_common())
            lines.append(f"{sum(self.other_extensions.values())} file(s) not audio by their name: {kinds}")
        return lines


def scan_audio(root: str | Path, resolve: bool = True) -> Scan:
    """Every audio file under `root` by extension. Symlinked folders and files are followed; a folder
    reached twice (a link loop, or two links to one folder) is walked once, and a file reached
    through several names is listed once. Files are named by their folder's resolved path and their
    own name (so `index music` and `index /abs/music` see the same files), or with `resolve=False`
    by the first path they were found at under `root` (compare reads labels from those).
    Everything left out is counted with its reason."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SearchError(f"{root}: not a folder")
    scan = Scan()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def unlisted(exc: OSError) -> None:
        scan.left_out.append((str(exc.filename), f"folder cannot be listed ({exc.strerror}); its files are left out"))

    for folder, dirs, names in os.walk(root, onerror=unlisted, followlinks=True):
        real_folder = os.path.realpath(folder)
        try:
            st = os.stat(folder)
        except OSError as exc:
            scan.left_out.append((folder, f"folder cannot be read ({exc.strerror})"))
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            scan.left_out.append((folder, f"already walked as {os.path.realpath(folder)} (a symlink loop or a second link)"))
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            ext = path.suffix.lower()
            if ext not in AUDIO_EXTENSIONS:
                scan.other_extensions[ext] += 1
                continue
            if not path.exists():
                scan.left_out.append((str(path), "broken symlink (its target does not exist)"))
                continue
            if not path.is_file():
                scan.left_out.append((str(path), "not a regular file"))
                continue
            real = os.path.realpath(path)
            if real in seen_files:
                continue  # the same file through another link: one row
            seen_files.add(real)
            # the folder resolved, the file's own name kept: a library of file links (DVC,
            # git-annex) keeps its song names rather than its store's
            scan.files.append(os.path.join(real_folder, name) if resolve else str(path))
    scan.files.sort()
    return scan


def find_audio(root: str | Path) -> list[Path]:
    """The audio files of scan_audio(root)."""
    return [Path(p) for p in scan_audio(root).files]
