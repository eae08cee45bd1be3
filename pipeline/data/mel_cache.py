"""The mel cache (data/mels.h5): layout, crash-safe resumable writing, merging and reading.
Layout, formats and the measurements behind them: docs/mel-cache.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.data.cache_files import contiguous_runs, strings, unreadable

log = logging.getLogger(__name__)

# format 1 stored every segment whole, format 2 full float16 frames only; both are refused rather than read
FORMAT_VERSION = 3
FRONT_ENDS = ("teacher", "student")
DEFAULT_CHUNK_FRAMES = 1024
# Fixed file-format bounds and no link-creation order tracking: nothing in the file depends on when
# or with which library build it was written (h5py writes no timestamps with track_times=False).
_H5_OPTS = {"libver": ("earliest", "v110"), "track_order": False}


class CacheMismatchError(ValueError):
    """A cache was built with other parameters than the ones asked for."""


class CacheFormatError(ValueError):
    """A file that is not a mel cache of this format (names the file)."""


# --------------------------------------------------------------------------- parameters


def cache_params(audio: Any, frontend: Any, max_track_minutes: float = 0.0, precision: Any = None) -> dict:
    """Everything that changes the cache's contents (compression does not). `precision`: the
    mels.precision section or mapping (teacher_db, student); None = full float16 for both."""
    def plain(x: Any) -> Any:
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    prec = plain(precision) if precision is not None else {"teacher_db": 0.0, "student": 0.0}
    return {"audio": plain(audio), "frontend": plain(frontend), "max_track_minutes": float(max_track_minutes),
            "precision": {"teacher_db": float(prec["teacher_db"]), "student": float(prec["student"])}}


def precision_steps(params: dict) -> dict[str, float]:
    """Front-end name -> quantisation step of its stored values (0 = float16) for cache params."""
    prec = params.get("precision") or {}
    return {"teacher": float(prec.get("teacher_db", 0.0)), "student": float(prec.get("student", 0.0))}


_CODE_MAX = np.iinfo(np.int16).max


def quantise(values: np.ndarray, step: float, what: str = "mel") -> np.ndarray:
    """Stored form of mel values: int16 codes round(x / step) (error <= step / 2), or float16 when
    step is 0. Raises ValueError on non-finite values or codes outside int16 (a step too fine)."""
    if step <= 0:
        return np.asarray(values).astype(np.float16, copy=False)
    codes = np.rint(np.asarray(values, dtype=np.float64) / step)
    lo, hi = (float(codes.min()), float(codes.max())) if codes.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{what} values are not finite; they cannot be stored")
    if max(-lo, hi) > _CODE_MAX:
        raise ValueError(f"{what} values reach {max(-lo, hi) * step:g}, beyond int16 codes of step {step:g} "
                         f"(+-{_CODE_MAX * step:g}); use a coarser mels.precision step")
    return codes.astype(np.int16)


def dequantise(stored: np.ndarray, step: float) -> np.ndarray:
    """float32 values of stored codes (code x step) or float16 values (step 0); what MelCache reads."""
    out = np.asarray(stored).astype(np.float32)
    if step > 0:
        out *= np.float32(step)
    return out


def mel_shapes(params: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-segment (teacher [frames, mels], student [mels, frames]) shapes implied by cache params:
    (1001, 64) and (128, 1000) for the defaults."""
    t, s = frame_layouts(params)
    return t.segment_shape(), s.segment_shape()


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def params_differences(cached: dict, wanted: dict) -> list[str]:
    """Human-readable 'field: cache has X, params say Y' lines."""
    a, b = _flatten(cached), _flatten(wanted)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: cache has {a.get(key, '<absent>')!r}, params say {b.get(key, '<absent>')!r}")
    return lines


def check_params(path: str | Path, cached: dict, wanted: dict) -> None:
    diff = params_differences(cached, wanted)
    if diff:
        raise CacheMismatchError(
            f"{path} was built with other parameters ({'; '.join(diff)}); rebuild it with `student-clap run mels`"
        )


@dataclass(frozen=True)
class Compression:
    """HDF5 filter settings for the mel datasets."""

    kind: str = "lzf"  # lzf | gzip | none
    level: int = 4  # gzip only
    shuffle: bool = True

    def kwargs(self) -> dict:
        if self.kind == "none":
            return {}
        if self.kind == "gzip":
            return {"compression": "gzip", "compression_opts": int(self.level), "shuffle": self.shuffle}
        if self.kind == "lzf":
            return {"compression": "lzf", "shuffle": self.shuffle}
        raise ValueError(f"unknown compression {self.kind!r} (lzf, gzip or none)")

    def describe(self) -> str:
        return f"{self.kind}{'-' + str(self.level) if self.kind == 'gzip' else ''}{'+shuffle' if self.shuffle and self.kind != 'none' else ''}"


# --------------------------------------------------------------------------- frame layout


@dataclass(frozen=True)
class FrameLayout:
    """How one front-end's segments sit in its frame dataset."""

    name: str  # "teacher" | "student"
    n_frames: int  # frames per segment
    n_mels: int
    time_axis: int  # 0: a segment is [frames, mels] (teacher); 1: [mels, frames] (student)
    head: int  # leading frames of a segment whose window reaches its start (kept per segment)
    tail: int  # trailing frames whose window reaches its end (kept per segment)
    rate: int  # front-end sample rate
    hop: int  # samples per frame

    def segment_shape(self) -> tuple[int, int]:
        return (self.n_frames, self.n_mels) if self.time_axis == 0 else (self.n_mels, self.n_frames)

    def patch_shape(self, k: int) -> tuple[int, int]:
        return (k, self.n_mels) if self.time_axis == 0 else (self.n_mels, k)

    def sel(self, start: int, stop: int) -> tuple[slice, ...]:
        """Index of frames start .. stop in a batch of segments [k, *segment_shape]."""
        return (slice(None),) * (self.time_axis + 1) + (slice(start, stop),)


def _edge_frames(n_fft: int, hop: int, signal: int, n_frames: int) -> tuple[int, int]:
    """(head, tail): frames whose centred window reaches past the start / end of a `signal`-sample
    segment (the frames segment_mels recomputes per segment). At least one each."""
    half = n_fft // 2
    head = min(n_frames - 1, max(1, -(-half // hop)))
    first_bad_tail = (signal - half) // hop + 1
    tail = max(1, n_frames - max(head, min(n_frames, first_bad_tail)))
    return head, min(tail, n_frames - head)


def frame_layouts(params: dict) -> tuple[FrameLayout, FrameLayout]:
    """(teacher, student) layouts implied by cache params."""
    seg = params["audio"]["segment_seconds"]
    t, s = params["frontend"]["teacher"], params["frontend"]["student"]
    t_sig = int(round(seg * t["sample_rate"]))
    s_sig = int(round(seg * s["sample_rate"])) - 1  # pre-emphasis drops one sample
    t_frames, s_frames = 1 + t_sig // t["hop_length"], 1 + s_sig // s["hop_length"]
    if min(t_frames, s_frames) < 2:
        raise ValueError("a segment must span at least two STFT frames of each front-end")
    th, tt = _edge_frames(t["n_fft"], t["hop_length"], t_sig, t_frames)
    sh, st = _edge_frames(s["n_fft"], s["hop_length"], s_sig, s_frames)
    return (FrameLayout("teacher", t_frames, t["n_mels"], 0, th, tt, int(t["sample_rate"]), int(t["hop_length"])),
            FrameLayout("student", s_frames, s["n_mels"], 1, sh, st, int(s["sample_rate"]), int(s["hop_length"])))


# --------------------------------------------------------------------------- writing


@dataclass
class TrackRecord:
    track_id: str
    n_segments: int
    duration: float
    sha256: str
    audio_path: str
    manifest_index: int


_SEGMENT_DATASETS = ("segments/track", "segments/start", "segments/teacher_frame", "segments/student_frame")
_TRACK_DATASETS = ("tracks/track_id", "tracks/first_segment", "tracks/n_segments", "tracks/duration",
                   "tracks/sha256", "tracks/audio_path", "tracks/manifest_index", "tracks/teacher_frames",
                   "tracks/student_frames")
PATCH_CHUNK = 64  # segments per chunk of the head/tail datasets


def _create_layout(f: h5py.File, params: dict, compression: Compression, chunk_frames: int) -> None:
    """Datasets and attributes, always created in this order (deterministic files)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
    kw = {**compression.kwargs(), "track_times": False}
    steps = precision_steps(params)
    layouts = frame_layouts(params)
    for lay in layouts:
        step = steps[lay.name]
        dtype = np.int16 if step > 0 else np.float16
        # mel-major: each band's run over time is contiguous, which compresses ~4 % better
        sets = [f.create_dataset(f"{lay.name}/frames", shape=(lay.n_mels, 0), maxshape=(lay.n_mels, None),
                                 dtype=dtype, chunks=(lay.n_mels, chunk_frames), **kw)]
        for part, k in (("head", lay.head), ("tail", lay.tail)):
            sets.append(f.create_dataset(f"{lay.name}/{part}", shape=(0, *lay.patch_shape(k)),
                                         maxshape=(None, *lay.patch_shape(k)), dtype=dtype,
                                         chunks=(PATCH_CHUNK, *lay.patch_shape(k)), **kw))
        if step > 0:
            for ds in sets:
                ds.attrs["step"] = step
    for name, dtype in zip(_SEGMENT_DATASETS, (np.int32, np.float64, np.int64, np.int64)):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,), track_times=False)
    str_t = h5py.string_dtype()
    for name, dtype in zip(_TRACK_DATASETS, (str_t, np.int64, np.int32, np.float64, h5py.string_dtype("ascii", 64),
                                             str_t, np.int64, np.int64, np.int64)):
        extra = (2,) if name.endswith("_frames") else ()
        f.create_dataset(name, shape=(0, *extra), maxshape=(None, *extra), dtype=dtype, chunks=(1024, *extra),
                         track_times=False)
    from pipeline.data.frontends import frontend_hash  # torch import only where caches are written

    attrs = {
        "chunk_frames": int(chunk_frames),
        "compression": compression.describe(),
        "edges": json.dumps({lay.name: [lay.head, lay.tail] for lay in layouts}, sort_keys=True),
        "format_version": FORMAT_VERSION,
        "params": json.dumps(params, sort_keys=True),
        "params_hash": params_hash(params),
        "student_frontend_hash": frontend_hash(params["frontend"]["student"]),
        "teacher_frontend_hash": frontend_hash(params["frontend"]["teacher"]),
    }
    for key in sorted(attrs):
        f.attrs[key] = attrs[key]


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def _write_frames(ds: h5py.Dataset, start: int, frames_tm: np.ndarray) -> None:
    """Write time-major frames [k, mels] at frame position start of a [mels, F] dataset (growing it)."""
    stop = start + len(frames_tm)
    if ds.shape[1] < stop:
        ds.resize(stop, axis=1)
    ds[:, start:stop] = frames_tm.T


class _TrackFrames:
    """One front-end's frames of the track being written, as runs; only whole chunks reach the file.

    Rows are absolute frame positions in the dataset. A segment placed at row r covers rows
    r .. r + n - 1; its rows r + head .. r + n - tail - 1 are *interior* (the same for every
    segment covering them). Rows before the newest segment's start can never change again and are
    written out in whole chunks."""

    def __init__(self, ds: h5py.Dataset, lay: FrameLayout, chunk: int) -> None:
        self.ds, self.lay, self.chunk = ds, lay, chunk
        self.reset(ds.shape[1])

    def reset(self, base: int) -> None:
        self.base = self.written = base  # track's first row (chunk aligned) / rows on disk
        self.buf = np.zeros((0, self.lay.n_mels), self.ds.dtype)  # rows written .. end, time-major
        self.interior = np.zeros(0, bool)
        self.origin: int | None = None  # sample (front-end rate) of the current run's row run_start
        self.run_start = self.last_row = base
        self.runs = 0

    @property
    def end(self) -> int:
        return self.written + len(self.buf)

    def _continues_at(self, start: int, seg: np.ndarray) -> int | None:
        """Row where `seg` (starting at sample `start`) continues the current run, or None."""
        lay = self.lay
        if self.origin is None or (start - self.origin) % lay.hop:
            return None
        row = self.run_start + (start - self.origin) // lay.hop
        if row < self.last_row or row > self.end:
            return None
        lo, hi = row + lay.head, min(self.end, row + lay.n_frames - lay.tail)
        if lo < hi:  # interior rows already held must agree bit for bit
            known = self.interior[lo - self.written : hi - self.written]
            have = self.buf[lo - self.written : hi - self.written][known].view(np.uint16)
            if not np.array_equal(have, seg[lo - row : hi - row][known].view(np.uint16)):
                return None
        return row

    def place(self, start: int, seg: np.ndarray) -> int:
        """Add a time-major stored segment [n, mels] (codes or float16) at sample `start`; returns its first row."""
        lay = self.lay
        row = self._continues_at(start, seg)
        if row is None:  # a new run after everything held so far
            row = self.end
            self.origin, self.run_start, self.runs = start, row, self.runs + 1
        interior = np.zeros(lay.n_frames, bool)
        interior[lay.head : lay.n_frames - lay.tail] = True
        held = self.end - row  # rows of seg already in buf
        if held > 0:
            b = row - self.written
            fill = interior[:held] & ~self.interior[b : b + held]  # edge-only rows learn their interior value
            self.buf[b : b + held][fill] = seg[:held][fill]
            self.interior[b : b + held] |= fill
        self.buf = np.concatenate([self.buf, seg[held:]])
        self.interior = np.concatenate([self.interior, interior[held:]])
        self.last_row = row
        self._write_upto(row)
        return row

    def _write_upto(self, limit: int) -> None:
        n = (limit - self.written) // self.chunk * self.chunk
        if n > 0:
            _write_frames(self.ds, self.written, self.buf[:n])
            self.buf, self.interior = self.buf[n:], self.interior[n:]
            self.written += n

    def finish(self) -> tuple[int, int]:
        """Write the rest, zero-padded to whole chunks; returns the track's (first row, row count)."""
        rest = np.concatenate([self.buf, np.zeros((-len(self.buf) % self.chunk, self.lay.n_mels), self.buf.dtype)])
        if len(rest):
            _write_frames(self.ds, self.written, rest)
            self.written += len(rest)
        first, count = self.base, self.written - self.base
        self.reset(self.written)
        return first, count


class PartWriter:
    """One part file: segments are appended as they are computed, tracks committed when complete,
    and the file becomes visible (atomic rename) only in publish()."""

    def __init__(self, parts_dir: Path, params: dict, compression: Compression, tag: str = "",
                 chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> None:
        self.parts_dir = Path(parts_dir)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{tag or 'w'}-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        self.tmp_path = self.parts_dir / f"{name}.h5.tmp"
        self.path = self.parts_dir / f"{name}.h5"
        self.file = h5py.File(self.tmp_path, "w", **_H5_OPTS)
        _create_layout(self.file, params, compression, chunk_frames)
        self.layouts = frame_layouts(params)
        self.steps = precision_steps(params)
        self.frames = {lay.name: _TrackFrames(self.file[f"{lay.name}/frames"], lay, chunk_frames)
                       for lay in self.layouts}
        self.committed_segments = 0
        self.n_tracks = 0

    def add_segments(self, teacher: np.ndarray, student: np.ndarray, starts_seconds: np.ndarray,
                     teacher_starts: Sequence[int] | None = None, student_starts: Sequence[int] | None = None) -> None:
        """Append a batch of segments of the track being written (not visible until commit).

        `teacher_starts` / `student_starts` are the segment starts in samples at each front-end's
        rate (derived from the seconds when omitted); they decide which segments share frames.
        Values are stored at the cache's precision (quantise): pass them as computed (float32)."""
        if len(teacher) != len(student) or len(teacher) != len(starts_seconds):
            raise ValueError("teacher, student and starts must have the same number of segments")
        secs = np.asarray(starts_seconds, dtype=np.float64)
        f = self.file
        rows = {}
        for lay, segs, given in zip(self.layouts, (teacher, student), (teacher_starts, student_starts)):
            segs = quantise(segs, self.steps[lay.name], f"{lay.name} mel")
            if segs.shape[1:] != lay.segment_shape():
                raise ValueError(f"{lay.name} segments have shape {segs.shape[1:]}, expected {lay.segment_shape()}")
            starts = [int(round(s * lay.rate)) for s in secs] if given is None else [int(s) for s in given]
            tm = segs if lay.time_axis == 0 else segs.transpose(0, 2, 1)  # time-major
            rows[lay.name] = np.array([self.frames[lay.name].place(s, tm[i]) for i, s in enumerate(starts)],
                                      dtype=np.int64)
            _append(f[f"{lay.name}/head"], np.ascontiguousarray(segs[lay.sel(0, lay.head)]))
            _append(f[f"{lay.name}/tail"], np.ascontiguousarray(segs[lay.sel(lay.n_frames - lay.tail, lay.n_frames)]))
        _append(f["segments/track"], np.full(len(teacher), self.n_tracks, dtype=np.int32))
        _append(f["segments/start"], secs)
        _append(f["segments/teacher_frame"], rows["teacher"])
        _append(f["segments/student_frame"], rows["student"])

    def pending_segments(self) -> int:
        return self.file["segments/track"].shape[0] - self.committed_segments

    def rollback_track(self) -> None:
        """Forget the segments of a track that failed half-way."""
        n = self.committed_segments
        for lay in self.layouts:
            for part in ("head", "tail"):
                self.file[f"{lay.name}/{part}"].resize(n, axis=0)
            frames = self.frames[lay.name]
            self.file[f"{lay.name}/frames"].resize(frames.base, axis=1)
            frames.reset(frames.base)
        for name in _SEGMENT_DATASETS:
            self.file[name].resize(n, axis=0)

    def commit_track(self, rec: TrackRecord) -> None:
        if self.pending_segments() != rec.n_segments:
            raise ValueError(f"{rec.track_id}: {self.pending_segments()} segments written, record says {rec.n_segments}")
        f = self.file
        extents = {name: fr.finish() for name, fr in self.frames.items()}
        _append(f["tracks/track_id"], np.array([rec.track_id], dtype=object))
        _append(f["tracks/first_segment"], np.array([self.committed_segments]))
        _append(f["tracks/n_segments"], np.array([rec.n_segments]))
        _append(f["tracks/duration"], np.array([rec.duration]))
        _append(f["tracks/sha256"], np.array([rec.sha256.encode("ascii")]))
        _append(f["tracks/audio_path"], np.array([rec.audio_path], dtype=object))
        _append(f["tracks/manifest_index"], np.array([rec.manifest_index]))
        _append(f["tracks/teacher_frames"], np.array([extents["teacher"]], dtype=np.int64))
        _append(f["tracks/student_frames"], np.array([extents["student"]], dtype=np.int64))
        self.committed_segments += rec.n_segments
        self.n_tracks += 1

    def publish(self) -> Path | None:
        """Close, fsync and atomically rename; an empty part is discarded."""
        self.rollback_track()
        self.file.close()
        if self.n_tracks == 0:
            self.tmp_path.unlink(missing_ok=True)
            return None
        with open(self.tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.parts_dir)
        return self.path

    def discard(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def parts_dir_for(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".parts")


def clean_temporaries(parts_dir: Path) -> int:
    """Delete parts a killed run left half-written; returns how many."""
    stale = list(Path(parts_dir).glob("*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


# --------------------------------------------------------------------------- index, merging


@dataclass
class _Source:
    path: Path
    row: int  # row in /tracks of that file
    first: int
    count: int
    frames: dict[str, tuple[int, int]]  # front-end -> (first frame, frame count) of the track in that file


def _entry(path: Path, idx: dict[str, Any], row: int) -> tuple[_Source, TrackRecord]:
    """Where row `row` of a read_index() lives, and its track record."""
    frames = {name: (int(idx[f"{name}_frames"][row][0]), int(idx[f"{name}_frames"][row][1])) for name in FRONT_ENDS}
    src = _Source(path, row, int(idx["first_segment"][row]), int(idx["n_segments"][row]), frames)
    return src, TrackRecord(idx["track_id"][row], int(idx["n_segments"][row]), float(idx["duration"][row]),
                            idx["sha256"][row], idx["audio_path"][row], int(idx["manifest_index"][row]))


def check_format(path: str | Path, f: h5py.File) -> None:
    """Refuse anything but a mel cache of this format, naming the file."""
    version = f.attrs.get("format_version")
    if version is None or "params" not in f.attrs:
        raise CacheFormatError(f"{path}: not a mel cache (no format_version/params attributes)")
    if int(version) != FORMAT_VERSION:
        raise CacheFormatError(
            f"{path}: mel cache format {int(version)}, this code reads format {FORMAT_VERSION} "
            "(frames stored once per track at mels.precision); rebuild it with `student-clap run mels` "
            "or `dvc repro mels`"
        )


def read_index(path: str | Path) -> dict[str, Any]:
    """Track index and params of a cache or part file (small; no mel data)."""
    with h5py.File(path, "r") as f:
        check_format(path, f)
        t = f["tracks"]
        return {
            "params": json.loads(f.attrs["params"]),
            "chunk_frames": int(f.attrs["chunk_frames"]),
            "track_id": strings(t["track_id"]),
            "first_segment": t["first_segment"][:],
            "n_segments": t["n_segments"][:],
            "duration": t["duration"][:],
            "sha256": strings(t["sha256"]),
            "audio_path": strings(t["audio_path"]),
            "manifest_index": t["manifest_index"][:],
            **{f"{name}_frames": t[f"{name}_frames"][:] for name in FRONT_ENDS},
        }


def completed_tracks(sources: Iterable[Path], params: dict) -> dict[str, tuple[str, _Source, TrackRecord]]:
    """track_id -> (sha256, where it lives, record) over readable sources built with `params`.

    Unreadable files (a crash during an fsync-less copy, a foreign file, an older format) and files
    built with other parameters are skipped with a warning; they are never merged."""
    done: dict[str, tuple[str, _Source, TrackRecord]] = {}
    for path in sources:
        try:
            idx = read_index(path)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable cache part %s (%s)", path, exc)
            continue
        diff = params_differences(idx["params"], params)
        if diff:
            log.warning("ignoring %s: built with other parameters (%s)", path, "; ".join(diff))
            continue
        for row, tid in enumerate(idx["track_id"]):
            if tid not in done:
                src, rec = _entry(Path(path), idx, row)
                done[tid] = (rec.sha256, src, rec)
    return done


def _copy_frames(a: h5py.Dataset, b: h5py.Dataset, first: int, count: int, pos: int, chunk: int) -> int:
    """Copy frames first .. first + count of dataset a to frame position pos of b (chunk aligned);
    returns the frame count written to b. Compressed chunks are copied verbatim when the filters agree."""
    if (a.chunks == b.chunks and a.dtype == b.dtype and a.compression == b.compression
            and a.compression_opts == b.compression_opts and a.shuffle == b.shuffle):
        for k in range(0, count, chunk):
            mask, data = a.id.read_direct_chunk((0, first + k))
            b.id.write_direct_chunk((0, pos + k), data, mask)
        return count
    out_count = -(-count // chunk) * chunk
    for k in range(0, out_count, chunk):
        block = np.zeros((a.shape[0], chunk), a.dtype)
        n = max(0, min(chunk, count - k))
        block[:, :n] = a[:, first + k : first + k + n]
        b[:, pos + k : pos + k + chunk] = block
    return out_count


_FLUSH_SEGMENTS = 4096  # segment-level rows gathered before one write per dataset


def write_cache(out: str | Path, params: dict, compression: Compression,
                entries: Sequence[tuple[_Source, TrackRecord]], chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> Path:
    """Build a cache from track entries (in the order given) at `<out>.tmp`, then rename to out.

    The output depends only on the entries' data and order, never on which part file held them.
    One source file is open at a time (a corpus has one part file per track); segment-level rows
    are written in large slices, so each chunk is compressed once."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    layouts = frame_layouts(params)
    frame_sets = [f"{lay.name}/frames" for lay in layouts]
    patch_sets = [f"{lay.name}/{part}" for lay in layouts for part in ("head", "tail")]
    row_sets = patch_sets + list(_SEGMENT_DATASETS)
    totals = {lay.name: sum(-(-src.frames[lay.name][1] // chunk_frames) * chunk_frames for src, _ in entries)
              for lay in layouts}
    n_seg = sum(rec.n_segments for _, rec in entries)
    g: h5py.File | None = None
    try:
        with h5py.File(tmp, "w", **_H5_OPTS) as f:
            _create_layout(f, params, compression, chunk_frames)
            d = {name: f[name] for name in frame_sets + row_sets + list(_TRACK_DATASETS)}
            for lay in layouts:
                d[f"{lay.name}/frames"].resize(totals[lay.name], axis=1)
            for name in row_sets:
                d[name].resize(n_seg, axis=0)
            rows: dict[str, list] = {name: [] for name in row_sets}
            tracks: dict[str, list] = {name: [] for name in _TRACK_DATASETS}
            written = pos = 0
            frame_pos = {lay.name: 0 for lay in layouts}
            current: Path | None = None
            for t, (src, rec) in enumerate(entries):
                if src.path != current:
                    if g is not None:
                        g.close()
                    g, current = h5py.File(src.path, "r"), src.path
                    check_format(src.path, g)
                    gd = {name: g[name] for name in frame_sets + row_sets}
                seg = slice(src.first, src.first + src.count)
                for lay in layouts:
                    first, count = src.frames[lay.name]
                    dst_first = frame_pos[lay.name]
                    dst_count = _copy_frames(gd[f"{lay.name}/frames"], d[f"{lay.name}/frames"], first, count,
                                             dst_first, chunk_frames)
                    frame_pos[lay.name] += dst_count
                    rows[f"segments/{lay.name}_frame"].append(gd[f"segments/{lay.name}_frame"][seg] + (dst_first - first))
                    tracks[f"tracks/{lay.name}_frames"].append((dst_first, dst_count))
                for name in patch_sets + ["segments/start"]:
                    rows[name].append(gd[name][seg])
                rows["segments/track"].append(np.full(src.count, t, dtype=np.int32))
                for name, value in (("track_id", rec.track_id), ("first_segment", pos), ("n_segments", rec.n_segments),
                                    ("duration", rec.duration), ("sha256", rec.sha256.encode("ascii")),
                                    ("audio_path", rec.audio_path), ("manifest_index", rec.manifest_index)):
                    tracks[f"tracks/{name}"].append(value)
                pos += src.count
                if pos - written >= _FLUSH_SEGMENTS or t == len(entries) - 1:
                    for name in row_sets:
                        d[name][written:pos] = np.concatenate(rows[name])
                        rows[name].clear()
                    written = pos
            for name in _TRACK_DATASETS:
                d[name].resize(len(entries), axis=0)
                if entries:
                    values = tracks[name]
                    d[name][:] = np.array(values, dtype=object) if d[name].dtype.kind == "O" else np.array(values)
    finally:
        if g is not None:
            g.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


# --------------------------------------------------------------------------- reading


class MelCache:
    """Read-only view of data/mels.h5 (reopens after fork, for DataLoader workers); `expect` (a
    cache_params dict) refuses a cache built with other params. Reading: docs/mel-cache.md."""

    CHUNK_CACHE_BYTES = 16 << 20  # per dataset: a segment spans two chunks per front-end

    def __init__(self, path: str | Path, expect: dict | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: mel cache not found (run `student-clap run mels`)")
        self._file: h5py.File | None = None
        self._pid = -1
        try:
            f = self._h5()
        except OSError as exc:
            raise unreadable(self.path, "mel cache", "student-clap run mels", exc) from None
        try:
            check_format(self.path, f)
            t = f["tracks"]
            self.track_ids: list[str] = strings(t["track_id"])
            self.first_segment = t["first_segment"][:].astype(np.int64)
            self.segment_counts = t["n_segments"][:].astype(np.int64)
            self.durations = t["duration"][:].astype(np.float64)
            self.sha256 = strings(t["sha256"])
            self.segment_track = f["segments/track"][:].astype(np.int64)
            self.segment_start = f["segments/start"][:]
            self.frame_offset = {name: f[f"segments/{name}_frame"][:].astype(np.int64) for name in FRONT_ENDS}
            self.attrs: dict[str, Any] = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        except KeyError as exc:
            self.close()
            raise CacheFormatError(f"{self.path}: not a mel cache (missing {exc})") from None
        except CacheFormatError:
            self.close()
            raise
        except OSError as exc:  # the index opened but its data is cut off
            self.close()
            raise unreadable(self.path, "mel cache", "student-clap run mels", exc) from None
        self.params = json.loads(self.attrs["params"])
        self.layouts = {lay.name: lay for lay in frame_layouts(self.params)}
        self.steps = precision_steps(self.params)
        self.n_segments = int(len(self.segment_track))
        self._row = {tid: i for i, tid in enumerate(self.track_ids)}
        if expect is not None:
            check_params(self.path, self.params, expect)

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", rdcc_nbytes=self.CHUNK_CACHE_BYTES, rdcc_nslots=10_007)
            self._pid = os.getpid()
        return self._file

    def __enter__(self) -> MelCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: the handle is reopened
        return {**self.__dict__, "_file": None, "_pid": -1}

    def __len__(self) -> int:
        return self.n_segments

    def track_segments(self, track: str | int) -> range:
        row = int(track) if isinstance(track, (int, np.integer)) else self._row[track]
        first = int(self.first_segment[row])
        return range(first, first + int(self.segment_counts[row]))

    def _indices(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            return np.arange(*idx.indices(self.n_segments), dtype=np.int64)
        arr = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(arr) and (arr.min() < -self.n_segments or arr.max() >= self.n_segments):
            raise IndexError(f"{self.path}: segment index out of range (the cache has {self.n_segments} segments)")
        return np.where(arr < 0, arr + self.n_segments, arr)

    def _read(self, name: str, idx: Any) -> np.ndarray:
        rows = self._indices(idx)
        if len(rows) > 1 and np.all(np.diff(rows) > 0):
            return self._read_sorted(name, rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        data = self._read_sorted(name, unique)
        return data if len(unique) == len(rows) and np.array_equal(unique, rows) else data[inverse]

    def _read_sorted(self, name: str, rows: np.ndarray) -> np.ndarray:
        """float32 segments for strictly increasing rows: one frames read per group of segments
        whose frames overlap or touch, one head/tail read per run of consecutive rows; stored codes
        become values (code x step, as dequantise) at the end."""
        lay = self.layouts[name]
        f = self._h5()
        n = lay.n_frames
        out = np.empty((len(rows), *lay.segment_shape()), np.float32)
        if len(rows) == 0:
            return out
        frames = f[f"{name}/frames"]
        offsets = self.frame_offset[name][rows]
        # rows increase, so do offsets; a new block starts where a segment begins past the last one's end
        starts = np.flatnonzero(offsets[1:] > offsets[:-1] + n) + 1
        for b0, b1 in zip([0, *starts.tolist()], [*starts.tolist(), len(rows)]):
            lo, hi = int(offsets[b0]), int(offsets[b1 - 1]) + n
            block = frames[:, lo:hi]  # [mels, frames]
            if lay.time_axis == 0:
                block = block.T
            for j in range(b0, b1):
                o = int(offsets[j]) - lo
                out[j] = block[o : o + n] if lay.time_axis == 0 else block[:, o : o + n]
        head, tail = f[f"{name}/head"], f[f"{name}/tail"]
        p0 = 0
        for r0, r1 in contiguous_runs(rows):
            p1 = p0 + r1 - r0
            out[p0:p1][lay.sel(0, lay.head)] = head[r0:r1]
            out[p0:p1][lay.sel(n - lay.tail, n)] = tail[r0:r1]
            p0 = p1
        step = self.steps[name]
        if step > 0:
            out *= np.float32(step)
        return out

    def teacher_mels(self, idx: Any) -> np.ndarray:
        """float32 [n, 1001, 64] for segment index/indices/slice idx."""
        return self._read("teacher", idx)

    def student_mels(self, idx: Any) -> np.ndarray:
        """float32 [n, 128, 1000] for segment index/indices/slice idx."""
        return self._read("student", idx)

    def teacher_track(self, track: str | int) -> np.ndarray:
        """All of a track's teacher segments, float32 [n_seg, 1001, 64] (one contiguous read)."""
        return self._read("teacher", self.track_segments(track))

    def student_track(self, track: str | int) -> np.ndarray:
        """All of a track's student segments, float32 [n_seg, 128, 1000] (one contiguous read)."""
        return self._read("student", self.track_segments(track))

    def stored_frames(self) -> dict[str, int]:
        """Frames held per front-end (chunk padding included), against n_segments x frames per segment."""
        f = self._h5()
        return {name: int(f[f"{name}/frames"].shape[1]) for name in FRONT_ENDS}


# --------------------------------------------------------------------------- merge tool


def merge_caches(inputs: Sequence[str | Path], out: str | Path, compression: Compression | None = None) -> Path:
    """Merge shard caches (same params) into one, ordered by manifest index; duplicates refused."""
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such mel cache")
    first = read_index(inputs[0])["params"]
    for p in inputs[1:]:
        check_params(p, read_index(p)["params"], first)
    seen: dict[str, Path] = {}
    entries = []
    for p in inputs:
        idx = read_index(p)
        for row, tid in enumerate(idx["track_id"]):
            if tid in seen:
                raise ValueError(f"track {tid} is in both {seen[tid]} and {p}; shards must not overlap")
            seen[tid] = p
            entries.append(_entry(p, idx, row))
    entries.sort(key=lambda e: (e[1].manifest_index, e[1].track_id))
    with h5py.File(inputs[0], "r") as f:
        chunk_frames = int(f.attrs["chunk_frames"])
        if compression is None:
            compression = _compression_of(f["teacher/frames"])
    log.info("merging %d tracks from %d caches into %s", len(entries), len(inputs), out)
    return write_cache(out, first, compression, entries, chunk_frames)


def _compression_of(ds: h5py.Dataset) -> Compression:
    if ds.compression == "gzip":
        return Compression("gzip", int(ds.compression_opts), bool(ds.shuffle))
    if ds.compression == "lzf":
        return Compression("lzf", 0, bool(ds.shuffle))
    return Compression("none", 0, False)


def merge_main(args: argparse.Namespace) -> int:
    """`student-clap mels merge SHARD... --out data/mels.h5`."""
    try:
        out = merge_caches(args.inputs, args.out)
    except (CacheMismatchError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    with MelCache(out) as cache:
        log.info("wrote %s: %d tracks, %d segments", out, len(cache.track_ids), cache.n_segments)
    return 0
