"""Training data of the audio student: splits, mel sources (in memory or streamed from data/mels.h5),
items and batches, and the validation monitor subset. docs/students.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from pipeline.data.cache_files import contiguous_runs
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE

log = logging.getLogger(__name__)

def open_mels(path: Path) -> Any:
    """The mel cache reader (a module-level hook so tests can hand in an in-memory stand-in)."""
    from pipeline.data.mel_cache import MelCache

    return MelCache(path)


def available_memory_bytes() -> int:
    """Memory the system can give without swapping (Linux MemAvailable; total RAM elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def in_memory_limit(value: float | str, world: int = 1) -> int:
    """Byte budget for holding mels in memory: `auto` = half the available memory shared by the
    ranks of this machine; a number = that many GiB; 0 = always stream from disk."""
    if value == "auto":
        return available_memory_bytes() // 2 // max(1, world)
    if isinstance(value, str) or value < 0:
        raise ValueError(f"in_memory_gb must be a number >= 0 or 'auto', got {value!r}")
    return int(float(value) * (1 << 30))


def read_runs(read: Any, segs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`read(slice)` over every run of consecutive segments of `segs` -> rows in `segs` order,
    written into `out` when given (cast to its dtype on the way), else a new float32 array."""
    segs = np.asarray(segs, dtype=np.int64)
    uniq = np.unique(segs)
    for a, b in contiguous_runs(uniq):
        block = read(slice(a, b))
        if out is None:
            out = np.empty((len(segs), *block.shape[1:]), dtype=np.float32)
        for r in np.flatnonzero((segs >= a) & (segs < b)):  # row by row: no temporary copies
            out[r] = block[segs[r] - a]
    return out if out is not None else np.zeros((0,), dtype=np.float32)


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """An uninitialised batch tensor. In a DataLoader worker it is allocated in shared memory,
    as torch's own default_collate does, so handing it to the training process costs no copy
    (`share_memory_()` on a finished tensor would copy it: ~2x the CPU per segment)."""
    if get_worker_info() is None or not hasattr(torch.UntypedStorage, "_new_shared"):
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def loader_workers(requested: int | str, source: MelSource) -> int | str:
    """`auto` means no worker process when the mels are held in memory: gathering rows there costs
    ~0.03 CPU-ms per segment, handing a batch over from a worker ~0.4 (benchmarks/train.py)."""
    return 0 if requested == "auto" and source.in_memory else requested


class MelSource:
    """Student (and optionally teacher) mels of given segments: held in memory as float16 when they fit
    in `memory_limit` bytes, else streamed (the same values either way). Picklable for DataLoader workers."""

    def __init__(self, path: Path, segments: np.ndarray, with_teacher: bool, memory_limit: int = 1 << 30) -> None:
        self.path = path
        self.with_teacher = with_teacher
        self._pid: int | None = None
        self._cache = None
        self._row_of: np.ndarray | None = None  # segment index -> row of the in-memory arrays
        self._student_arr: np.ndarray | None = None
        self._teacher_arr: np.ndarray | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}  # per-segment shape of "student" / "teacher" mels
        segments = np.asarray(segments, dtype=np.int64)
        if not len(segments):
            return
        cache = self._handle()
        self.shapes["student"] = tuple(cache.student_mels(segments[:1]).shape[1:])
        per_row = int(np.prod(self.shapes["student"])) * 2
        if with_teacher:
            self.shapes["teacher"] = tuple(cache.teacher_mels(segments[:1]).shape[1:])
            per_row += int(np.prod(self.shapes["teacher"])) * 2
        if len(segments) * per_row <= memory_limit:
            order = np.unique(segments)
            self._row_of = np.full(int(order[-1]) + 1, -1, dtype=np.int64)
            self._row_of[order] = np.arange(len(order))
            self._student_arr = read_runs(cache.student_mels, order).astype(np.float16)
            if with_teacher:
                self._teacher_arr = read_runs(cache.teacher_mels, order).astype(np.float16)
            log.info("holding %d segments in memory (%.0f MB)", len(order), len(order) * per_row / 1e6)
            self.close()
        else:
            log.info("streaming %d segments from %s (%.0f MB > in-memory limit %.0f MB)", len(segments), path,
                     len(segments) * per_row / 1e6, memory_limit / 1e6)

    @classmethod
    def from_arrays(cls, student: np.ndarray, teacher: np.ndarray | None = None) -> MelSource:
        """A source over mels already in memory (row i = segment i), e.g. synthetic benchmark data."""
        src = cls(Path("<memory>"), np.zeros(0, dtype=np.int64), with_teacher=teacher is not None)
        src._row_of = np.arange(len(student), dtype=np.int64)
        src._student_arr = np.asarray(student, dtype=np.float16)
        src.shapes["student"] = tuple(student.shape[1:])
        if teacher is not None:
            src._teacher_arr = np.asarray(teacher, dtype=np.float16)
            src.shapes["teacher"] = tuple(teacher.shape[1:])
        return src

    @property
    def in_memory(self) -> bool:
        return self._row_of is not None

    def _handle(self) -> Any:
        if self._cache is None or self._pid != os.getpid():
            self._cache = open_mels(self.path)
            self._pid = os.getpid()
        return self._cache

    def close(self) -> None:
        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()
        self._cache = None

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the file themselves
        return {**self.__dict__, "_cache": None, "_pid": None}

    def _read(self, segs: np.ndarray, teacher: bool, out: np.ndarray | None) -> np.ndarray:
        segs = np.asarray(segs, dtype=np.int64)
        if self._row_of is not None:
            arr = self._teacher_arr if teacher else self._student_arr
            if out is None:
                return arr[self._row_of[segs]].astype(np.float32)
            return np.take(arr, self._row_of[segs], axis=0, out=out)
        cache = self._handle()
        got = read_runs(cache.teacher_mels if teacher else cache.student_mels, segs, out)
        if got.dtype != np.float16:
            # the float16 rounding of the in-memory copy: streamed or held, the same values (and the
            # same validation figures, best epoch and student)
            np.copyto(got, got.astype(np.float16))
        return got

    def student(self, segs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [n, 128, frames], or written into `out` (e.g. a float16 batch buffer)."""
        return self._read(segs, teacher=False, out=out)

    def teacher(self, segs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._read(segs, teacher=True, out=out)

    def batch(self, segs: np.ndarray, teacher: bool = False) -> torch.Tensor:
        """float16 tensor of the segments' mels (the values the cache reads back, in float16),
        in shared memory when built in a DataLoader worker."""
        out = batch_buffer((len(segs), *self.shapes["teacher" if teacher else "student"]))
        self._read(segs, teacher, out.numpy())
        return out


@dataclass
class Split:
    """Segment and track indices of one split, with the teacher targets."""

    tracks: np.ndarray  # mel-cache track indices
    track_ids: list[str]
    track_segments: list[np.ndarray]  # per track, its global segment indices
    segments: np.ndarray  # all segments of these tracks
    teacher_tracks: np.ndarray  # [n_tracks, 512]


def load_splits(mels: Any, teacher: Any, manifest: list[dict]) -> tuple[Split, Split]:
    """Train/val from the manifest's `split`; tracks missing from either cache are left out (logged)."""
    split_of = {r["track_id"]: r.get("split") for r in manifest}
    t_row = {tid: i for i, tid in enumerate(teacher.track_ids)}
    t_emb = np.asarray(teacher.track_embeddings, dtype=np.float32)
    parts: dict[str, list[int]] = {"train": [], "val": []}
    missing = 0
    for i, tid in enumerate(mels.track_ids):
        s = split_of.get(tid)
        if s not in parts or tid not in t_row:
            missing += 1
            continue
        parts[s].append(i)
    if missing:
        log.warning("%d tracks of the mel cache are not in the manifest or the teacher cache; left out", missing)

    def build(idx: list[int]) -> Split:
        ids = [mels.track_ids[i] for i in idx]
        segs = [np.asarray(mels.track_segments(t), dtype=np.int64) for t in ids]
        flat = np.concatenate(segs) if segs else np.zeros(0, dtype=np.int64)
        teach = t_emb[[t_row[t] for t in ids]] if ids else np.zeros((0, t_emb.shape[1]), dtype=np.float32)
        return Split(np.asarray(idx, dtype=np.int64), ids, segs, flat, teach)

    train, val = build(parts["train"]), build(parts["val"])
    if not len(train.tracks):
        raise ValueError(f"{MANIFEST}: no track with split 'train' is in {MELS} and {TEACHER_CACHE}")
    if not len(val.tracks):
        raise ValueError(f"{MANIFEST}: no track with split 'val' is in {MELS} and {TEACHER_CACHE}")
    return train, val


def monitor_subset(split: Split, max_segments: int, seg_emb: np.ndarray, seg_norm: np.ndarray) -> Split:
    """The fixed part of `split` watched every epoch: every track, each with evenly spaced
    segments, at most `max_segments` in all (but at least one per track); the whole split when
    it fits. A track with fewer segments than its own gets as target the teacher's L2(mean of the
    raw segment projections) over the kept segments; a complete track keeps its cached vector."""
    if max_segments <= 0:
        raise ValueError(f"val_max_segments must be >= 1, got {max_segments}")
    if len(split.segments) <= max_segments:
        return split
    per_track = max(1, max_segments // len(split.track_ids))
    kept, targets = [], []
    for segs, cached in zip(split.track_segments, split.teacher_tracks):
        if len(segs) <= per_track:
            kept.append(segs)
            targets.append(cached)
            continue
        pick = segs[np.linspace(0, len(segs) - 1, per_track).round().astype(np.int64)]
        raw = (seg_emb[pick].astype(np.float64) * seg_norm[pick, None]).mean(axis=0)
        kept.append(pick)
        targets.append((raw / np.linalg.norm(raw)).astype(np.float32))
    return Split(split.tracks, split.track_ids, kept, np.concatenate(kept), np.stack(targets))


class TrainItems(Dataset):
    """"segments": item i is train segment i; "tracks" / "both": item i is train track i.

    The training loop hands it (epoch, i) keys (`keyed_by_epoch`); the key passes to `Collate`."""

    keyed_by_epoch = True

    def __init__(self, split: Split, strategy: str) -> None:
        self.split = split
        self.by_track = strategy in ("tracks", "both")

    def __len__(self) -> int:
        return len(self.split.tracks) if self.by_track else len(self.split.segments)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, int]:
        return key if isinstance(key, tuple) else (0, int(key))


class Collate:
    """Item keys -> one batch: the mel rows, the item of each row, and the cached raw teacher
    projection of each row (embedding x its stored norm), from which any average is rebuilt."""

    def __init__(self, split: Split, source: MelSource, seg_emb: np.ndarray, seg_norm: np.ndarray,
                 by_track: bool, segments_per_track: int, seed: int = 0) -> None:
        self.split = split
        self.source = source
        self.seg_emb = seg_emb
        self.seg_norm = seg_norm
        self.by_track = by_track
        self.per_track = segments_per_track
        self.seed = seed

    def _track_rows(self, epoch: int, t: int) -> np.ndarray:
        segs = self.split.track_segments[t]
        if self.per_track and len(segs) > self.per_track:
            rng = np.random.default_rng((self.seed, epoch, t))
            segs = segs[np.sort(rng.permutation(len(segs))[: self.per_track])]
        return segs

    def __call__(self, items: list[int | tuple[int, int]]) -> dict[str, torch.Tensor]:
        keys = [k if isinstance(k, tuple) else (0, int(k)) for k in items]
        rows = [self._track_rows(e, i) if self.by_track else self.split.segments[i : i + 1] for e, i in keys]
        segs = np.concatenate(rows)
        item_of_row = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, r in enumerate(rows)])
        batch = {
            "mels": self.source.batch(segs),
            "row_item": torch.from_numpy(item_of_row),
            "teacher_raw_rows": torch.from_numpy((self.seg_emb[segs] * self.seg_norm[segs, None]).astype(np.float32)),
        }
        if self.source.with_teacher:
            batch["teacher_mels"] = self.source.batch(segs, teacher=True)
        return batch


def average_rows(rows: torch.Tensor, row_item: torch.Tensor, n_items: int) -> torch.Tensor:
    """Mean of the rows of each item -> [n_items, D]."""
    sums = torch.zeros(n_items, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, row_item, rows)
    counts = torch.bincount(row_item, minlength=n_items).clamp_min(1).to(rows.dtype)
    return sums / counts[:, None]
