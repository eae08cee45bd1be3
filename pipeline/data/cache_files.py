"""What the HDF5 caches (data/mels.h5, data/teacher.h5) share: an error that names a damaged file
(h5py's bare OSError names no path), string datasets and runs of consecutive indices."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


class UnreadableCacheError(OSError):
    """A cache file exists but cannot be read (truncated, damaged, not HDF5). Names the file."""


def unreadable(path: Path, what: str, rebuild: str, exc: BaseException) -> UnreadableCacheError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UnreadableCacheError(
        f"{path}: the {what} cannot be read ({reason}); it is truncated or damaged. "
        f"Restore it with `dvc checkout {path}` or rebuild it with `{rebuild}`."
    )


def strings(ds: h5py.Dataset) -> list[str]:
    """A string dataset as str values."""
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[:]]


def contiguous_runs(sorted_unique: np.ndarray) -> list[tuple[int, int]]:
    """Increasing unique indices -> [start, stop) ranges of consecutive values."""
    if len(sorted_unique) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_unique)]])
    return [(int(sorted_unique[a]), int(sorted_unique[b - 1]) + 1) for a, b in zip(starts, stops)]
