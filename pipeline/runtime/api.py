"""A small Python API over the exported students (onnxruntime only; the runtime-only install has it).

    from pipeline.runtime.api import StudentClap

    clap = StudentClap("models/export")              # reads the export folder once
    vec = clap.embed_file("song.flac")               # [512] float32, unit length
    vecs = clap.embed_files(["a.mp3", "b.ogg"])      # EmbedResult: paths, vectors, failures
    vec = clap.embed_waveform(samples, 44100)        # mono or [n, channels] float/int16 array
    q = clap.embed_text(["calm piano", "drums"])     # [2, 512]
    clap.build_index("~/Music", "music.npz")         # the same index `student-clap index` writes
    hits = clap.search("calm piano", "music.npz", k=10)   # [(path, cosine), ...] best first

Song vectors follow the training rule exactly (pipeline.runtime.search): int16 mono at the decode rate,
10-s windows with a 5-s hop, the L2-normalised mean of the windows' raw embeddings. The ONNX
sessions are created on first use, so a text-only user never loads the audio model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.data.audio import AudioDecodeError, resample_int16, to_int16
from pipeline.runtime.search import (
    AudioEmbedder,
    EmbedResult,
    Index,
    SearchError,
    TextEmbedder,
    embed_files,
    find_audio,
    load_index,
    open_audio_embedder,
    save_index,
    search,
)

__all__ = ["AudioDecodeError", "EmbedResult", "Index", "SearchError", "StudentClap"]


def _as_int16_mono(samples: np.ndarray) -> np.ndarray:
    """A waveform as int16 mono: float arrays are taken as [-1, 1]; [n, channels] is averaged."""
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.astype(np.float32) / (32767.0 if x.dtype == np.int16 else 1.0)
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise ValueError(f"waveform must be [samples] or [samples, channels], got shape {x.shape}")
    if x.dtype == np.int16:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"waveform dtype {x.dtype}: use float samples in [-1, 1] or int16")
    return to_int16(np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0))


class StudentClap:
    """The exported audio and text students of one export folder (models/export)."""

    def __init__(self, models_dir: str | Path = "models/export", *, int8: bool = False, batch_size: int = 8,
                 threads: int | None = None, segment_wise: bool = False) -> None:
        self.models_dir = Path(models_dir)
        self._int8, self._batch_size, self._threads = int8, batch_size, threads
        self._segment_wise = segment_wise
        self._audio: AudioEmbedder | None = None
        self._text: TextEmbedder | None = None

    @property
    def audio(self) -> AudioEmbedder:
        """The audio student (loaded on first use). Raises SearchError when the export has none."""
        if self._audio is None:
            # the path `student-clap index` takes: song-level when exported, else segment-wise
            self._audio = open_audio_embedder(self.models_dir, int8=self._int8, batch_size=self._batch_size,
                                              threads=self._threads, segment_wise=self._segment_wise)
        return self._audio

    @property
    def text(self) -> TextEmbedder:
        """The text student and its tokenizer (loaded on first use)."""
        if self._text is None:
            self._text = TextEmbedder(self.models_dir, threads=self._threads)
        return self._text

    # ------------------------------------------------------------------ audio

    def embed_file(self, path: str | Path) -> np.ndarray:
        """One song -> unit vector [dim]. Raises AudioDecodeError for an unreadable file."""
        return self.audio.embed_file(path)[0]

    def embed_files(self, paths: Iterable[str | Path], progress: bool = False, jobs: int = 1) -> EmbedResult:
        """Many songs, `jobs` at a time; unreadable ones are listed in `.failed` and skipped, the rest
        embedded. For throughput on several cores: StudentClap(..., threads=1) and jobs=os.cpu_count()."""
        return embed_files(self.audio, paths, progress=progress, jobs=jobs)

    def embed_waveform(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """A waveform already in memory -> unit vector [dim].

        `samples`: mono [n] or [n, channels], float in [-1, 1] or int16, at `sample_rate` Hz. It is
        resampled to the export's decode rate and cut exactly as a decoded file would be."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        wave = _as_int16_mono(samples)
        wave = resample_int16(wave, int(sample_rate), self.audio.decode_sample_rate)
        return self.audio.embed_wave(wave)[0]

    # ------------------------------------------------------------------ text

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """One text -> [dim]; a list of texts -> [n, dim]. Unit vectors in the audio space."""
        if isinstance(texts, str):
            return self.text.embed([texts])[0]
        return self.text.embed(list(texts))

    # ------------------------------------------------------------------ index and search

    def build_index(self, folder: str | Path, out: str | Path, progress: bool = True, jobs: int = 1) -> EmbedResult:
        """Embed every audio file under `folder` into the index file `out` (.npz), as `student-clap index`
        (`jobs` songs at a time, see embed_files)."""
        folder = Path(folder).expanduser()
        files = find_audio(folder)
        if not files:
            raise SearchError(f"{folder}: no audio files")
        result = embed_files(self.audio, files, progress=progress, jobs=jobs)
        save_index(out, result, self.audio.model_sha256, str(folder))
        return result

    @staticmethod
    def load_index(path: str | Path) -> Index:
        return load_index(path)

    def search(self, query: str | np.ndarray, index: str | Path | Index, k: int = 10) -> list[tuple[str, float]]:
        """Top-k (path, cosine) for a text query or a query vector (e.g. a song's, for "more like this")."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        idx = index if isinstance(index, Index) else load_index(index)
        vec = self.embed_text([query]) if isinstance(query, str) else np.asarray(query, np.float32).reshape(1, -1)
        if vec.shape[1] != idx.vectors.shape[1]:
            raise SearchError(f"query has {vec.shape[1]} dimensions, the index {idx.vectors.shape[1]}")
        return search(idx, vec, k)[0]
