"""Song-level inference: each second of audio through the convolutional trunk once, not twice.

The exported audio student is cut in three ONNX files (see pipeline.models.song_export):

- front-end: waveform [batch, samples] at the student rate -> log-mel [batch, mels, frames], any length;
- trunk: log-mel -> feature map [batch, channels, mel/stride, frames/stride], any length: the
  EfficientAT blocks before the first squeeze-excitation, which are convolutions only (local);
- head: one window's feature map -> (embedding, embedding_raw): the remaining blocks, whose
  squeeze-excitation gates average over the whole window, global pooling and the projection.

Windows overlap by half (10 s every 5 s). Run window by window (student_clap.reference), every
second of audio goes through the whole network twice. Here a run of consecutive windows (up to
`span_windows`) is one excerpt: front-end and trunk run over it once and each window's columns
are cut from the trunk's feature map (the hop is a whole number of columns: 5 s = 500 mel frames
= 125 columns at the trunk's stride 4). Only the head runs per window. The head cannot be shared:
its gates depend on the whole window.

Inside an excerpt a window's edge columns see the real neighbouring audio where the window alone
sees reflect (STFT) and zero (convolution) padding: the first 3 and last 2 columns for mn04. Those
columns are recomputed from short excerpts cut at the window's edge (0.2 s each, all of a song in
one batch; their count and length are measured once per model by `_probe_edges`), so every
window's feature map equals the segment-wise one up to float rounding. Excerpt ends are window
ends; windows off the hop grid (the tail window aligned to the song's end, a short repeat-padded
song) run as excerpts of one window: exactly the segment-wise computation. Files are decoded to
the same int16 samples as the segment-wise path (student_clap.decode), so the song vector is
that path's up to float rounding. Heads run in batches that mix windows of several songs (`embed_waves`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from student_clap.audio import AudioDecodeError, check_usable, cut, int16_to_float
from student_clap.decode import decode_student_track, window_starts
from student_clap.logmel import LogMel
from student_clap.onnxrt import onnx_session
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

# Windows per excerpt: (k + 1) / (2k) of the segment-wise trunk work (0.56 at 8, 0.53 at 16); at 8
# a 45-s excerpt's feature maps stay nearer the caches, which measured ~8 % less CPU per song than 16.
SPAN_WINDOWS = 8
EDGE_TOLERANCE = 1e-4  # |shared - alone| <= tol * (1 + |alone|): a column equal up to float rounding
LOGMEL_TOLERANCE = 1e-3  # numpy vs ONNX front-end, normalised log-mel units (measured ~4e-5: float rounding)


@dataclass
class Window:
    """One window's trunk feature map: its columns of the shared excerpt map, and the exact
    columns at its start (`left`) and end (`right`) where the excerpt's neighbouring audio made
    the shared ones differ from the window computed alone."""

    shared: np.ndarray  # [C, F, window_columns], a view into the excerpt's map
    left: np.ndarray | None = None
    right: np.ndarray | None = None


@dataclass(frozen=True)
class SongGeometry:
    """How windows map onto the trunk's feature map (student_clap.json, audio.song)."""

    sample_rate: int
    segment_seconds: float
    hop_seconds: float
    window_columns: int  # trunk feature-map columns of one window
    hop_columns: int  # columns between consecutive windows; 0: windows cannot share the trunk
    decode_sample_rate: int = 0  # the rate the segment-wise path decodes at (0: the student's)

    @classmethod
    def from_spec(cls, audio: dict) -> SongGeometry:
        song = audio["song"]
        return cls(int(audio["sample_rate"]), float(audio["segment_seconds"]), float(audio["hop_seconds"]),
                   int(song["window_columns"]), int(song["hop_columns"]), int(audio.get("decode_sample_rate") or 0))


def _runs(starts: list[int], n_samples: int, seg_len: int, hop: int, shared: bool, span: int) -> list[list[int]]:
    """Group window starts into excerpts: consecutive on-grid windows inside the song share one."""
    runs: list[list[int]] = []
    for s in starts:
        inside = shared and s + seg_len <= n_samples
        last = runs[-1] if runs else None
        if (last is not None and inside and last[-1] + seg_len <= n_samples and s - last[-1] == hop
                and len(last) < span):
            last.append(s)
        else:
            runs.append([s])
    return runs


@dataclass
class SongEmbedding:
    vector: np.ndarray  # [dim] float32, unit norm
    n_segments: int
    notes: list[str] = field(default_factory=list)  # e.g. a partial decode, NaN samples replaced
    seconds: float = 0.0  # the audio's length as decoded


class SongEmbedder:
    """Songs -> 512-d vectors through front-end + shared trunk + per-window head (onnxruntime only)."""

    def __init__(self, frontend: str | Path, trunk: str | Path, head: str | Path, geometry: SongGeometry, *,
                 batch_size: int = 16, threads: int | None = None, span_windows: int = SPAN_WINDOWS, exact_edges: bool = True,
                 logmel: Mapping[str, Any] | None = None) -> None:
        self.geometry = geometry
        self.model_paths = [Path(frontend), Path(trunk), Path(head)]
        # Three sessions take turns; a pool spinning after its turn would only burn the others' cores.
        self.frontend, self.trunk, self.head = (onnx_session(p, threads, spinning=False) for p in self.model_paths)
        self.session = self.head  # its outputs are the embeddings (callers read their width here)
        self.sample_rate = geometry.sample_rate
        self.decode_sample_rate = geometry.sample_rate  # waves for embed_wave come at the student rate
        # Files are decoded through int16 at the mel cache's rate (its samples exactly; see decode.py).
        self.decode_via = geometry.decode_sample_rate or None
        self.model_id = ""  # set by student_clap.embed.open_audio_embedder
        self.model_identity = ""  # likewise (student_clap.identity)
        self.batch_size = max(1, int(batch_size))
        self.span_windows = max(1, int(span_windows))
        outputs = [o.name for o in self.head.get_outputs()]
        if "embedding_raw" not in outputs:
            raise ValueError(f"{self.model_paths[2]}: output 'embedding_raw' missing (outputs: {outputs})")
        self._raw_index = outputs.index("embedding_raw")
        width = self.head.get_outputs()[self._raw_index].shape[-1]
        self.dim = int(width) if isinstance(width, int) else EMBED_DIM
        # The log-mel in numpy + scipy.fft where the export describes its front-end (faster than
        # the ONNX one; checked against it here), else the ONNX front-end.
        self.logmel = self._numpy_logmel(logmel) if logmel else None
        # Columns at window edges inside an excerpt are recomputed from short excerpts cut at the
        # edge, so every window's map equals the segment-wise one (exact_edges=False: skip that).
        left, right, self.edge_samples = self._probe_edges() if exact_edges and geometry.hop_columns else (0, 0, 0)
        self.edge_columns = (left, right)

    # ---- windows -> feature maps
    def _fmap(self, excerpts: np.ndarray) -> np.ndarray:
        """int16 excerpts [n, samples] -> trunk feature maps [n, C, F, columns]."""
        waves = int16_to_float(excerpts)
        mel = self.logmel(waves) if self.logmel is not None else self.frontend.run(None, {"waveform": waves})[0]
        (fmap,) = self.trunk.run(None, {"mel": mel})
        return fmap

    def _numpy_logmel(self, spec: Mapping[str, Any]) -> LogMel | None:
        """LogMel from audio.song.frontend when it gives the ONNX front-end's values on a probe of
        noise (up to float rounding); else None (the ONNX front-end runs)."""
        try:
            mel = LogMel.from_spec(spec)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: front-end description unusable (%s); using the ONNX front-end", self.model_paths[0], exc)
            return None
        probe = np.random.default_rng(1).uniform(-0.5, 0.5, (1, round(1.5 * self.geometry.sample_rate)))
        probe = probe.astype(np.float32)
        (want,) = self.frontend.run(None, {"waveform": probe})
        got = mel(probe)
        if got.shape != want.shape or not np.allclose(got, want, rtol=0.0, atol=LOGMEL_TOLERANCE):
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else f"shape {got.shape} vs {want.shape}"
            log.warning("%s: the numpy front-end differs from it (%s); using the ONNX front-end", self.model_paths[0], diff)
            return None
        return mel

    def _probe_edges(self) -> tuple[int, int, int]:
        """(left, right, edge_samples): how many feature-map columns at a window's start and end
        differ between the shared excerpt and the window alone (there the window alone sees
        reflect and zero padding, the excerpt real audio), and the shortest excerpt, cut at the
        window's edge, whose columns there equal the window alone's. Measured on noise, so the
        front-end's and the trunk's receptive fields need not be known here."""
        g = self.geometry
        seg = round(g.sample_rate * g.segment_seconds)
        hop = round(g.sample_rate * g.hop_seconds)
        noise = np.random.default_rng(0).integers(-8000, 8000, seg + hop).astype(np.int16)
        shared, alone = self._fmap(noise[None]), self._fmap(np.stack([noise[:seg], noise[hop:]]))

        def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # per column
            return np.all(np.abs(a - b) <= EDGE_TOLERANCE * (1.0 + np.abs(b)), axis=(0, 1, 2))

        first = same(shared[..., : g.window_columns], alone[:1])
        second = same(shared[..., g.hop_columns : g.hop_columns + g.window_columns], alone[1:])
        left = int(np.argmax(second)) if second.any() else g.window_columns
        right = int(np.argmax(first[::-1])) if first.any() else g.window_columns
        if left == right == 0:
            return 0, 0, 0  # nothing to recompute
        if not second[left:].all() or not first[: g.window_columns - right].all():
            log.warning("%s: shared feature maps differ away from window edges; kept as they are", self.model_paths[1])
            return 0, 0, 0
        col_samples = hop // g.hop_columns  # an edge excerpt is whole columns long, so it stays aligned
        for cols in range(max(left, right) + 1, g.window_columns // 2):
            n = cols * col_samples
            ends = self._fmap(np.stack([noise[hop : hop + n], noise[hop + seg - n : hop + seg]]))
            if (same(ends[:1, ..., :left], alone[1:, ..., :left]).all()
                    and same(ends[1:, ..., ends.shape[-1] - right :], alone[1:, ..., g.window_columns - right :]).all()):
                return left, right, n
        log.warning("%s: no short excerpt reproduces a window's edge columns; kept as shared", self.model_paths[1])
        return 0, 0, 0

    def _maps(self, wave: np.ndarray) -> tuple[list[Window], int]:
        """Each window: its columns of the per-excerpt trunk map, and the exact columns at its edges
        where the excerpt's neighbouring audio made them differ from the window computed alone."""
        g = self.geometry
        starts, seg_len, hop = window_starts(len(wave), g.sample_rate, g.segment_seconds, g.hop_seconds)
        windows: list[Window] = []
        edges: list[tuple[int, str, int]] = []  # (window, side, first sample of the edge excerpt)
        for run in _runs(starts, len(wave), seg_len, hop, g.hop_columns > 0, self.span_windows):
            if len(run) == 1:
                excerpt = cut(wave, run, seg_len)  # repeat-pads a short song, as the segment path does
            else:
                excerpt = wave[None, run[0] : run[-1] + seg_len]
            fmap = self._fmap(excerpt)
            need = (len(run) - 1) * g.hop_columns + g.window_columns
            if fmap.shape[-1] < need:
                raise ValueError(f"trunk gave {fmap.shape[-1]} columns for {len(run)} windows, expected {need}")
            for i, s in enumerate(run):
                windows.append(Window(fmap[0, ..., i * g.hop_columns : i * g.hop_columns + g.window_columns]))
                if self.edge_samples and i > 0:
                    edges.append((len(windows) - 1, "left", s))
                if self.edge_samples and i < len(run) - 1:
                    edges.append((len(windows) - 1, "right", s + seg_len - self.edge_samples))
        if edges:
            n = self.edge_samples
            ends = self._fmap(np.stack([wave[s : s + n] for _, _, s in edges]))
            for (w, side, _), cols in zip(edges, ends):
                if side == "left":
                    windows[w].left = cols[..., : self.edge_columns[0]]
                else:
                    windows[w].right = cols[..., cols.shape[-1] - self.edge_columns[1] :]
        return windows, len(starts)

    def _heads(self, windows: list[Window]) -> np.ndarray:
        first = windows[0].shared
        fmap = np.empty((len(windows), *first.shape), dtype=first.dtype)
        for k, w in enumerate(windows):
            fmap[k] = w.shared
            if w.left is not None:
                fmap[k, ..., : w.left.shape[-1]] = w.left
            if w.right is not None:
                fmap[k, ..., fmap.shape[-1] - w.right.shape[-1] :] = w.right
        (raw,) = self.head.run(["embedding_raw"], {"fmap": fmap})
        return raw.astype(np.float64)

    # ---- songs
    def embed_waves(self, waves: Iterable[np.ndarray | BaseException]) -> Iterator[tuple[np.ndarray, int] | BaseException]:
        """int16 mono waves at the student rate -> (unit song vector, windows), in order.

        Head batches mix windows of consecutive songs, so short songs still fill a batch. An
        exception in the input stream (a file that did not decode) is passed through in its place."""
        pending: list[tuple[int, Window]] = []  # (song, window map) not yet through the head
        sums: dict[int, np.ndarray] = {}
        left: dict[int, int] = {}
        counts: dict[int, int] = {}
        done: dict[int, tuple[np.ndarray, int] | BaseException] = {}
        next_out = 0

        def flush(all_rows: bool) -> None:
            while len(pending) >= self.batch_size or (all_rows and pending):
                batch = pending[: self.batch_size]
                del pending[: self.batch_size]
                raw = self._heads([m for _, m in batch])
                for (song, _), row in zip(batch, raw):
                    sums[song] = sums[song] + row if song in sums else row.copy()
                    left[song] -= 1
                    if left[song] == 0:
                        vec = sums.pop(song) / counts[song]
                        done[song] = ((vec / max(np.linalg.norm(vec), 1e-12)).astype(np.float32), counts[song])

        for song, wave in enumerate(waves):
            if isinstance(wave, BaseException):
                done[song] = wave
            elif len(wave) == 0:
                done[song] = AudioDecodeError("<waveform>", "no audio samples", kind="empty")
            else:
                maps, n = self._maps(wave)
                counts[song], left[song] = n, n
                pending += [(song, m) for m in maps]
                flush(False)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        flush(True)
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    def embed_wave(self, wave_int16: np.ndarray) -> tuple[np.ndarray, int]:
        """One int16 mono wave at the student rate -> (unit song vector, number of windows).
        AudioDecodeError for a wave the usability rule refuses (too short, silent)."""
        check_usable(wave_int16, self.sample_rate)
        (out,) = list(self.embed_waves([wave_int16]))
        if isinstance(out, BaseException):
            raise out
        return out

    def embed_track(self, path: str | Path):
        """Decode (to the student rate, the usability rule applied) and embed one file,
        with its decode notes and length: a SongEmbedding."""
        track = decode_student_track(path, self.sample_rate, via_rate=self.decode_via)
        (out,) = list(self.embed_waves([track.wave]))  # the rule was applied to the file's own samples
        if isinstance(out, BaseException):
            raise out
        return SongEmbedding(out[0], out[1], track.notes, track.report.decoded_seconds)

    def embed_file(self, path: str | Path) -> tuple[np.ndarray, int]:
        """Decode (to the student rate) and embed one file; AudioDecodeError when unreadable."""
        song = self.embed_track(path)
        return song.vector, song.n_segments

    def embed_paths(self, paths: Iterable[str | Path]) -> Iterator[tuple[str, tuple[np.ndarray, int] | AudioDecodeError]]:
        """(path, (vector, windows)) or (path, AudioDecodeError) per file, heads batched across songs."""
        paths = [str(p) for p in paths]

        def decoded() -> Iterator[np.ndarray | AudioDecodeError]:
            for p in paths:
                try:
                    yield decode_student_track(p, self.sample_rate, via_rate=self.decode_via).wave
                except AudioDecodeError as exc:
                    yield exc

        yield from zip(paths, self.embed_waves(decoded()))
