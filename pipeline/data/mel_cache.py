"""The mel cache (data/mels.h5): layout, crash-safe resumable writing, merging and reading.

Layout (every array row-aligned with the segment index i = 0 .. N-1):

    /teacher              float16 [N, 1001, 64]   CLAP log-mel dB, one segment per chunk
    /student              float16 [N, 128, 1000]  EfficientAT normalised log-mel, one segment per chunk
    /segments/track       int32   [N]             row of /tracks that segment i belongs to
    /segments/start       float64 [N]             segment start in seconds
    /tracks/track_id      utf-8   [T]             manifest track ids, manifest order
    /tracks/first_segment int64   [T]             segments of track t are first .. first + count - 1
    /tracks/n_segments    int32   [T]
    /tracks/duration      float64 [T]             decoded seconds
    /tracks/sha256        ascii   [T]             sha256 of the audio file
    /tracks/audio_path    utf-8   [T]
    /tracks/manifest_index int64  [T]             row in the manifest (orders shard merges)
    attrs: format_version, params (JSON of audio + frontend + max_track_minutes), params_hash,
           teacher_frontend_hash, student_frontend_hash, compression

Crash safety: workers write *part files* (same layout) under `<cache>.parts/` to a temporary name
and publish each with an atomic rename once its tracks are complete. A SIGKILL at any moment leaves
only complete parts (plus a temporary file the next run deletes); the final cache is built by
merging the parts into `<cache>.tmp` and renaming it over `<cache>`, so an existing cache is never
half-written. The next run reuses every published track whose audio sha256 still matches.
Merging copies compressed chunks verbatim (no decompression) when the filters agree.
"""

from __future__ import annotations

import argparse
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

from pipeline.data.cache_files import unreadable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CacheMismatchError(ValueError):
    """A cache was built with other parameters than the ones asked for."""


# --------------------------------------------------------------------------- parameters


def cache_params(audio: Any, frontend: Any, max_track_minutes: float = 0.0) -> dict:
    """Everything that changes the cache's contents (compression does not)."""
    def plain(x: Any) -> Any:
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    return {"audio": plain(audio), "frontend": plain(frontend), "max_track_minutes": float(max_track_minutes)}


def mel_shapes(params: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-segment (teacher [frames, mels], student [mels, frames]) shapes implied by cache params:
    (1001, 64) and (128, 1000) for the defaults."""
    seg = params["audio"]["segment_seconds"]
    t, s = params["frontend"]["teacher"], params["frontend"]["student"]
    t_len = int(round(seg * t["sample_rate"]))
    s_len = int(round(seg * s["sample_rate"])) - 1  # pre-emphasis drops one sample
    return (1 + t_len // t["hop_length"], t["n_mels"]), (s["n_mels"], 1 + s_len // s["hop_length"])


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


# --------------------------------------------------------------------------- writing


@dataclass
class TrackRecord:
    track_id: str
    n_segments: int
    duration: float
    sha256: str
    audio_path: str
    manifest_index: int


def _create_layout(f: h5py.File, params: dict, compression: Compression) -> None:
    t_shape, s_shape = mel_shapes(params)
    f.create_dataset("teacher", shape=(0, *t_shape), maxshape=(None, *t_shape), dtype=np.float16,
                     chunks=(1, *t_shape), **compression.kwargs())
    f.create_dataset("student", shape=(0, *s_shape), maxshape=(None, *s_shape), dtype=np.float16,
                     chunks=(1, *s_shape), **compression.kwargs())
    for name, dtype in (("segments/track", np.int32), ("segments/start", np.float64)):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
    str_t = h5py.string_dtype()
    for name, dtype in (
        ("tracks/track_id", str_t), ("tracks/first_segment", np.int64), ("tracks/n_segments", np.int32),
        ("tracks/duration", np.float64), ("tracks/sha256", h5py.string_dtype("ascii", 64)),
        ("tracks/audio_path", str_t), ("tracks/manifest_index", np.int64),
    ):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
    from pipeline.data.frontends import frontend_hash  # torch import only where caches are written

    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["params"] = json.dumps(params, sort_keys=True)
    f.attrs["params_hash"] = params_hash(params)
    f.attrs["teacher_frontend_hash"] = frontend_hash(params["frontend"]["teacher"])
    f.attrs["student_frontend_hash"] = frontend_hash(params["frontend"]["student"])
    f.attrs["compression"] = compression.describe()


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


class PartWriter:
    """One part file: segments are appended as they are computed, tracks committed when complete,
    and the file becomes visible (atomic rename) only in publish()."""

    def __init__(self, parts_dir: Path, params: dict, compression: Compression, tag: str = "") -> None:
        self.parts_dir = Path(parts_dir)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{tag or 'w'}-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        self.tmp_path = self.parts_dir / f"{name}.h5.tmp"
        self.path = self.parts_dir / f"{name}.h5"
        self.file = h5py.File(self.tmp_path, "w")
        _create_layout(self.file, params, compression)
        self.committed_segments = 0
        self.n_tracks = 0
        self.opened = time.monotonic()

    def add_segments(self, teacher: np.ndarray, student: np.ndarray, starts_seconds: np.ndarray) -> None:
        """Append a batch of segments of the track being written (not visible until commit)."""
        if len(teacher) != len(student) or len(teacher) != len(starts_seconds):
            raise ValueError("teacher, student and starts must have the same number of segments")
        _append(self.file["teacher"], teacher.astype(np.float16, copy=False))
        _append(self.file["student"], student.astype(np.float16, copy=False))
        _append(self.file["segments/start"], np.asarray(starts_seconds, dtype=np.float64))
        _append(self.file["segments/track"], np.full(len(teacher), self.n_tracks, dtype=np.int32))

    def pending_segments(self) -> int:
        return self.file["teacher"].shape[0] - self.committed_segments

    def rollback_track(self) -> None:
        """Forget the segments of a track that failed half-way."""
        n = self.committed_segments
        for name in ("teacher", "student", "segments/start", "segments/track"):
            self.file[name].resize(n, axis=0)

    def commit_track(self, rec: TrackRecord) -> None:
        if self.pending_segments() != rec.n_segments:
            raise ValueError(f"{rec.track_id}: {self.pending_segments()} segments written, record says {rec.n_segments}")
        f = self.file
        _append(f["tracks/track_id"], np.array([rec.track_id], dtype=object))
        _append(f["tracks/first_segment"], np.array([self.committed_segments]))
        _append(f["tracks/n_segments"], np.array([rec.n_segments]))
        _append(f["tracks/duration"], np.array([rec.duration]))
        _append(f["tracks/sha256"], np.array([rec.sha256.encode("ascii")]))
        _append(f["tracks/audio_path"], np.array([rec.audio_path], dtype=object))
        _append(f["tracks/manifest_index"], np.array([rec.manifest_index]))
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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def parts_dir_for(cache: str | Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".parts")


def clean_temporaries(parts_dir: Path) -> int:
    """Delete parts a killed run left half-written; returns how many."""
    n = 0
    for tmp in Path(parts_dir).glob("*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


# --------------------------------------------------------------------------- reading


@dataclass
class _Source:
    path: Path
    row: int  # row in /tracks of that file
    first: int
    count: int


def read_index(path: str | Path) -> dict[str, Any]:
    """Track index and params of a cache or part file (small; no mel data)."""
    with h5py.File(path, "r") as f:
        t = f["tracks"]
        return {
            "params": json.loads(f.attrs["params"]),
            "track_id": [s.decode() if isinstance(s, bytes) else s for s in t["track_id"][:]],
            "first_segment": t["first_segment"][:],
            "n_segments": t["n_segments"][:],
            "duration": t["duration"][:],
            "sha256": [s.decode() if isinstance(s, bytes) else s for s in t["sha256"][:]],
            "audio_path": [s.decode() if isinstance(s, bytes) else s for s in t["audio_path"][:]],
            "manifest_index": t["manifest_index"][:],
        }


def completed_tracks(sources: Iterable[Path], params: dict) -> dict[str, tuple[str, _Source, TrackRecord]]:
    """track_id -> (sha256, where it lives, record) over readable sources built with `params`.

    Unreadable files (a crash during an fsync-less copy, a foreign file) and files built with other
    parameters are skipped with a warning; they are never merged."""
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
            rec = TrackRecord(tid, int(idx["n_segments"][row]), float(idx["duration"][row]), idx["sha256"][row],
                              idx["audio_path"][row], int(idx["manifest_index"][row]))
            done.setdefault(tid, (rec.sha256, _Source(Path(path), row, int(idx["first_segment"][row]), rec.n_segments), rec))
    return done


def write_cache(out: str | Path, params: dict, compression: Compression,
                entries: Sequence[tuple[_Source, TrackRecord]]) -> Path:
    """Build a cache from track entries (in the order given) at `<out>.tmp`, then rename to out."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    files: dict[Path, h5py.File] = {}
    try:
        with h5py.File(tmp, "w") as f:
            _create_layout(f, params, compression)
            total = sum(rec.n_segments for _, rec in entries)
            for name in ("teacher", "student", "segments/track", "segments/start"):
                f[name].resize(total, axis=0)
            for name in ("tracks/track_id", "tracks/first_segment", "tracks/n_segments", "tracks/duration",
                         "tracks/sha256", "tracks/audio_path", "tracks/manifest_index"):
                f[name].resize(len(entries), axis=0)
            pos = 0
            for t, (src, rec) in enumerate(entries):
                g = files.get(src.path)
                if g is None:
                    g = files[src.path] = h5py.File(src.path, "r")
                _copy_segments(g, f, src.first, pos, src.count)
                f["segments/track"][pos : pos + src.count] = t
                f["segments/start"][pos : pos + src.count] = g["segments/start"][src.first : src.first + src.count]
                f["tracks/track_id"][t] = rec.track_id
                f["tracks/first_segment"][t] = pos
                f["tracks/n_segments"][t] = rec.n_segments
                f["tracks/duration"][t] = rec.duration
                f["tracks/sha256"][t] = rec.sha256.encode("ascii")
                f["tracks/audio_path"][t] = rec.audio_path
                f["tracks/manifest_index"][t] = rec.manifest_index
                pos += src.count
    finally:
        for g in files.values():
            g.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


def _same_filters(a: h5py.Dataset, b: h5py.Dataset) -> bool:
    return (a.chunks == b.chunks and a.dtype == b.dtype and a.compression == b.compression
            and a.compression_opts == b.compression_opts and a.shuffle == b.shuffle)


def _copy_segments(src: h5py.File, dst: h5py.File, first: int, pos: int, count: int) -> None:
    for name in ("teacher", "student"):
        a, b = src[name], dst[name]
        if _same_filters(a, b):
            for i in range(count):  # compressed chunk bytes copied as they are
                mask, data = a.id.read_direct_chunk((first + i, 0, 0))
                b.id.write_direct_chunk((pos + i, 0, 0), data, mask)
        else:
            for i in range(0, count, 64):
                n = min(64, count - i)
                b[pos + i : pos + i + n] = a[first + i : first + i + n]


class MelCache:
    """Read-only view of data/mels.h5 (safe to use from DataLoader workers: reopens after fork).

    `expect` (a cache_params dict) makes the constructor refuse a cache built with other params."""

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
            t = f["tracks"]
            self.track_ids: list[str] = [s.decode() if isinstance(s, bytes) else s for s in t["track_id"][:]]
            self.first_segment = t["first_segment"][:].astype(np.int64)
            self.segment_counts = t["n_segments"][:].astype(np.int64)
            self.durations = t["duration"][:].astype(np.float64)
            self.sha256 = [s.decode() if isinstance(s, bytes) else s for s in t["sha256"][:]]
            self.audio_paths = [s.decode() if isinstance(s, bytes) else s for s in t["audio_path"][:]]
            self.segment_track = f["segments/track"][:].astype(np.int64)
            self.segment_start = f["segments/start"][:]
            self.attrs: dict[str, Any] = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        except KeyError as exc:
            raise ValueError(f"{self.path}: not a mel cache (missing {exc})") from None
        except OSError as exc:  # the index opened but its data is cut off
            raise unreadable(self.path, "mel cache", "student-clap run mels", exc) from None
        self.params = json.loads(self.attrs["params"])
        self.n_segments = int(len(self.segment_track))
        self._row = {tid: i for i, tid in enumerate(self.track_ids)}
        if expect is not None:
            check_params(self.path, self.params, expect)

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
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
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return self.n_segments

    def track_segments(self, track_id: str) -> range:
        row = self._row[track_id]
        first = int(self.first_segment[row])
        return range(first, first + int(self.segment_counts[row]))

    def _read(self, name: str, idx: Any) -> np.ndarray:
        ds = self._h5()[name]
        if isinstance(idx, (int, np.integer)):
            return ds[int(idx)][None].astype(np.float32)
        if isinstance(idx, slice):
            return ds[idx].astype(np.float32)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return np.zeros((0, *ds.shape[1:]), np.float32)
        if len(idx) > 1 and np.all(np.diff(idx) == 1):  # contiguous: one slice read
            return ds[int(idx[0]) : int(idx[-1]) + 1].astype(np.float32)
        order = np.unique(idx)  # h5py wants increasing, unique indices
        data = ds[order]
        return data[np.searchsorted(order, idx)].astype(np.float32)

    def teacher_mels(self, idx: Any) -> np.ndarray:
        """float32 [n, 1001, 64] for segment index/indices/slice idx."""
        return self._read("teacher", idx)

    def student_mels(self, idx: Any) -> np.ndarray:
        """float32 [n, 128, 1000] for segment index/indices/slice idx."""
        return self._read("student", idx)


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
            rec = TrackRecord(tid, int(idx["n_segments"][row]), float(idx["duration"][row]), idx["sha256"][row],
                              idx["audio_path"][row], int(idx["manifest_index"][row]))
            entries.append((_Source(p, row, int(idx["first_segment"][row]), rec.n_segments), rec))
    entries.sort(key=lambda e: (e[1].manifest_index, e[1].track_id))
    if compression is None:
        with h5py.File(inputs[0], "r") as f:
            compression = _compression_of(f["teacher"])
    log.info("merging %d tracks from %d caches into %s", len(entries), len(inputs), out)
    return write_cache(out, first, compression, entries)


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
