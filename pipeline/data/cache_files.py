"""Opening the HDF5 caches (data/mels.h5, data/teacher.h5) with an error that names the file.

h5py reports a truncated or damaged file as a bare OSError ("truncated file: eof = ...") that
names no path; the cache readers turn it into `UnreadableCacheError` so the user learns which file
is broken and how to get it back.
"""

from __future__ import annotations

from pathlib import Path


class UnreadableCacheError(OSError):
    """A cache file exists but cannot be read (truncated, damaged, not HDF5). Names the file."""


def unreadable(path: Path, what: str, rebuild: str, exc: BaseException) -> UnreadableCacheError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UnreadableCacheError(
        f"{path}: the {what} cannot be read ({reason}); it is truncated or damaged. "
        f"Restore it with `dvc checkout {path}` or rebuild it with `{rebuild}`."
    )

