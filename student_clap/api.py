"""A small Python API over the exported students (onnxruntime only; the base install has it).

    from student_clap import StudentClap

    clap = StudentClap("models/export")              # reads the export folder once
    clap = StudentClap("hf://OWNER/NAME")            # or one published on the Hub (student_clap.hub)
    vec = clap.embed_file("song.flac")               # [512] float32, unit length
    vecs = clap.embed_files(["a.mp3", "b.m4a"])      # EmbedResult: paths, vectors, failures
    vec = clap.embed_waveform(samples, 44100)        # [n], [n, channels] or [channels, n]; float or int16
    q = clap.embed_text(["calm piano", "drums"])     # [2, 512]
    clap.build_index("~/Music", "music.db")          # the index `student-clap index` writes (SQLite)
    hits = clap.search("calm piano", "music.db", k=10)    # [(path, cosine), ...] best first
    hits = clap.similar("song.flac", "music.db", k=10)    # the song first, then the songs most like it

Files and waveforms take one path: decoded (or resampled) through int16 at the export's decode
rate, then to the student's rate, judged by the one usability rule (too short, silent, nothing
finite: AudioDecodeError, the same answer for a file and for its samples), and embedded by the
song-level path. The ONNX sessions are created on first use, so a text-only user never loads the
audio model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from student_clap.audio import AudioDecodeError, DecodeReport, check_usable, resample_int16, to_int16
from student_clap.embed import EmbedResult, TextEmbedder, embed_files, open_audio_embedder
from student_clap.index import Index, read_index, search
from student_clap.identity import check_index_model
from student_clap.library import BuildReport, check_writable
from student_clap.library import build_index as _build_index
from student_clap.song import SongEmbedder
from student_clap.spec import SearchError, text_identity

__all__ = ["AudioDecodeError", "BuildReport", "EmbedResult", "Index", "SearchError", "StudentClap"]

MAX_CHANNELS = 8  # a 2-D waveform's channel axis is the one no longer than this (7.1 audio)


def waveform_to_mono(samples: np.ndarray, path: str = "<waveform>") -> tuple[np.ndarray, DecodeReport]:
    """A waveform as float32 mono in [-1, 1] and what a decoder would report about it: NaN/inf
    samples counted and replaced (before the downmix, as for a file), the peak for the silence test.

    [n] is mono; [n, channels] and [channels, n] are both accepted where the channel axis is the
    only one of at most MAX_CHANNELS entries and shorter than the other; any other shape is refused
    rather than guessed at (averaging the wrong axis would keep 2 samples of a stereo song)."""
    x = np.asarray(samples)
    if x.ndim == 2:
        rows, cols = x.shape
        if cols <= MAX_CHANNELS and rows > cols:
            pass  # [n, channels]
        elif rows <= MAX_CHANNELS and cols > rows:
            x = x.T  # [channels, n], the librosa / torchaudio layout
        else:
            raise ValueError(f"{path}: waveform of shape {x.shape}: expected [samples], [samples, channels] or "
                             f"[channels, samples] with at most {MAX_CHANNELS} channels and more samples than channels")
    elif x.ndim != 1:
        raise ValueError(f"{path}: waveform must be [samples] or 2-D with a channel axis, got shape {x.shape}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / np.float32(32767.0)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise ValueError(f"{path}: waveform dtype {x.dtype}: use float samples in [-1, 1] or int16")
    report = DecodeReport(source_samples=int(x.size))
    finite = np.isfinite(x)
    if not finite.all():
        report.nonfinite = int(x.size - np.count_nonzero(finite))
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    mono = x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x
    report.peak = float(np.max(np.abs(mono), initial=0.0))
    return np.ascontiguousarray(mono), report


class StudentClap:
    """The exported audio and text students of one export folder (models/export)."""

    def __init__(self, models_dir: str | Path = "models/export", *, batch_size: int = 16,
                 threads: int | None = None) -> None:
        if batch_size < 1 or (threads is not None and threads < 1):
            raise ValueError(f"batch_size and threads must be positive, got {batch_size} and {threads}")
        from student_clap.hub import resolve_models

        # a folder, or hf://OWNER/NAME[@REV]: downloaded into the Hugging Face cache and checked
        self.models_dir = resolve_models(models_dir)
        self._batch_size, self._threads = batch_size, threads
        self._audio: SongEmbedder | None = None
        self._text: TextEmbedder | None = None

    @property
    def audio(self) -> SongEmbedder:
        """The audio student (loaded on first use). Raises SearchError when the export has none."""
        if self._audio is None:
            self._audio = open_audio_embedder(self.models_dir, batch_size=self._batch_size, threads=self._threads)
        return self._audio

    @property
    def text(self) -> TextEmbedder:
        """The text student and its tokenizer (loaded on first use)."""
        if self._text is None:
            self._text = TextEmbedder(self.models_dir, threads=self._threads)
        return self._text

    # ------------------------------------------------------------------ audio

    def embed_file(self, path: str | Path) -> np.ndarray:
        """One song -> unit vector [dim]. Raises AudioDecodeError for a file the decoder or the
        usability rule refuses (the reason and `.kind` say why)."""
        return self.audio.embed_track(path).vector

    def embed_files(self, paths: Iterable[str | Path], progress: bool = False, jobs: int = 1) -> EmbedResult:
        """Many songs, `jobs` at a time; unreadable ones are listed in `.failed` and skipped, the rest
        embedded. For throughput on several cores: StudentClap(..., threads=1) and jobs=os.cpu_count()."""
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        return embed_files(self.audio, paths, progress=progress, jobs=jobs)

    def embed_waveform(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """A waveform already in memory -> unit vector [dim], exactly as the same samples in a file.

        `samples`: [n], [n, channels] or [channels, n] (see waveform_to_mono), float in [-1, 1] or
        int16, at `sample_rate` Hz. AudioDecodeError for what the usability rule refuses (too short,
        silent, nothing finite), as embed_file raises for such a file."""
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        mono, report = waveform_to_mono(samples)
        report.decoded_seconds = len(mono) / int(sample_rate)
        audio = self.audio
        # int16 at the rate the file path decodes at, then on to the student's rate, as a file goes
        via = audio.decode_via or audio.sample_rate
        wave = resample_int16(to_int16(mono), int(sample_rate), via)
        check_usable(wave, via, report)
        wave = resample_int16(wave, via, audio.sample_rate)
        (out,) = list(audio.embed_waves([wave]))
        if isinstance(out, BaseException):
            raise out
        return out[0]

    # ------------------------------------------------------------------ text

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """One text -> [dim]; a list of texts -> [n, dim]. Unit vectors in the audio space."""
        if isinstance(texts, str):
            return self.text.embed([texts])[0]
        return self.text.embed(list(texts))

    # ------------------------------------------------------------------ index and search

    def build_index(self, folder: str | Path, out: str | Path, progress: bool = False, jobs: int = 1) -> BuildReport:
        """Add every audio file under `folder` to the index file `out` (SQLite), as `student-clap
        index`: one commit per song, unchanged files reused, refusals remembered."""
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        check_writable(out)
        try:
            text_model = text_identity(self.models_dir)
        except SearchError:
            text_model = ""
        return _build_index(self.audio, folder, out, text_model=text_model, jobs=jobs, progress=progress)

    @property
    def model_identity(self) -> str:
        """The export's model identity (student_clap.identity): what an index built with it records."""
        from student_clap.identity import model_identity

        return model_identity(self.models_dir)

    def similar(self, song: str | Path, index: str | Path | Index, k: int = 10) -> list[tuple[str, float]]:
        """The song first, then its k-1 nearest other songs (path, cosine), from the song's stored
        vector; a file not in the index is embedded first. An index of another model is refused."""
        from student_clap.tools import similar

        idx = index if isinstance(index, Index) else read_index(index)
        check_index_model(idx, self.models_dir, forceable=False)
        return similar(idx, song, k, embed=self.embed_file)

    @staticmethod
    def load_index(path: str | Path) -> Index:
        return read_index(path)

    def search(self, query: str | np.ndarray, index: str | Path | Index, k: int = 10,
               force: bool = False) -> list[tuple[str, float]]:
        """Top-k (path, cosine) for a text query or a query vector (e.g. a song's, for "more like
        this"). An index built by another audio model is refused (SearchError) unless `force`. A
        library file of at least ANN_MIN_SONGS songs is searched through its approximate index."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not isinstance(index, Index):
            found = self._search_large(query, index, k, force)
            if found is not None:
                return found
        idx = index if isinstance(index, Index) else read_index(index)
        check_index_model(idx, self.models_dir, force=force)
        vec = self.embed_text([query]) if isinstance(query, str) else np.asarray(query, np.float32).reshape(1, -1)
        if vec.shape[1] != idx.dim:
            raise SearchError(f"query has {vec.shape[1]} dimensions, the index {idx.dim}")
        return search(idx, vec, k)[0]

    def _search_large(self, query: str | np.ndarray, index: str | Path, k: int, force: bool) -> list[tuple[str, float]] | None:
        """Through the approximate index (student_clap.ann) when `index` is a library file of at least
        ANN_MIN_SONGS songs, as `student-clap search` does; None: search the stored matrix exactly."""
        from student_clap import ann
        from student_clap.index import read_index_head

        head = read_index_head(index)
        if head is None or head[1] < ann.ANN_MIN_SONGS:
            return None
        check_index_model(head[0], self.models_dir, force=force)
        vec = self.embed_text([query]) if isinstance(query, str) else np.asarray(query, np.float32).reshape(1, -1)
        if vec.shape[1] != head[0].dim:
            return None  # the exact path says what is wrong
        found = ann.search_ann(index, vec, k)
        return None if found is None else found[0]
