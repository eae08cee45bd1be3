"""The segment-wise computation of a song vector: the reference the song path is held to.

No command uses it. It runs every 10-s window through the whole exported waveform model
(audio_student.onnx), as the mel cache cut the windows in training: decode to int16 at the
cache's rate, find the windows there, resample the int16 audio to the student's rate and cut
it at the same times. tests/test_song.py checks the song path (student_clap.song) against it,
and benchmarks/speed.py times the two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from student_clap.audio import check_usable, cut, decode_track, int16_to_float, map_starts, resample_int16, segment_length, segment_starts
from student_clap.song import SongEmbedding, onnx_session
from student_clap.spec import EMBED_DIM, SPEC_FILE, SearchError, load_spec


class SegmentEmbedder:
    """Songs -> 512-d vectors with the waveform ONNX audio student, one window at a time."""

    def __init__(self, models_dir: str | Path, *, batch_size: int = 8, threads: int | None = None):
        spec = load_spec(models_dir)
        audio = spec.get("audio")
        if not audio:
            raise SearchError(f"{Path(models_dir) / SPEC_FILE}: no audio student")
        self.model_path = Path(models_dir) / audio["file"]
        try:
            self.session = onnx_session(self.model_path, threads)
        except FileNotFoundError as exc:
            raise SearchError(str(exc)) from None
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
        """int16 mono waveform at `decode_sample_rate` -> (unit song vector, number of segments)."""
        check_usable(wave_int16, self.decode_sample_rate)
        return self._embed_usable(wave_int16)

    def _embed_usable(self, wave_int16: np.ndarray) -> tuple[np.ndarray, int]:
        rate, out_rate = self.decode_sample_rate, self.sample_rate
        starts = map_starts(segment_starts(len(wave_int16), rate, self.segment_seconds, self.hop_seconds), rate, out_rate)
        wave = resample_int16(wave_int16, rate, out_rate)
        seg_len = segment_length(out_rate, self.segment_seconds)
        total = None
        for i in range(0, len(starts), self.batch_size):  # a batch of windows at a time: bounded memory
            windows = int16_to_float(cut(wave, starts[i : i + self.batch_size], seg_len))
            raw = self.session.run(None, {"waveform": windows})[self._raw_index].astype(np.float64).sum(axis=0)
            total = raw if total is None else total + raw
        vec = total / len(starts)
        return (vec / max(np.linalg.norm(vec), 1e-12)).astype(np.float32), len(starts)

    def embed_track(self, path: str | Path) -> SongEmbedding:
        track = decode_track(path, self.decode_sample_rate)
        vector, n = self._embed_usable(track.wave)
        return SongEmbedding(vector, n, track.notes, track.report.decoded_seconds)

    def embed_file(self, path: str | Path) -> tuple[np.ndarray, int]:
        song = self.embed_track(path)
        return song.vector, song.n_segments
