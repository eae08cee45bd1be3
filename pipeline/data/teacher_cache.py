"""data/teacher.h5: the teacher's embeddings, written resumably (partial and shard files) and read by
the students. Layout and life cycle: docs/teacher-embeddings.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from pipeline.data.cache_files import contiguous_runs, strings, unreadable
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Identity keys: a partial/shard file is only continued or merged when these attrs agree.
IDENTITY_ATTRS = ("format_version", "teacher_sha256", "frontend_hash", "mels", "dtype")
_STR = h5py.string_dtype("utf-8")


class EmbeddingStoreError(RuntimeError):
    """teacher.h5 (or a partial/shard file) is missing, incomplete or from another run; names the file."""


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def shard_path(out: str | Path, k: int, n: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{k}-of-{n}")


def _json_attr(value: object) -> str:
    """Attribute encoding: strings as they are, anything else as sorted JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------- writing


class EmbeddingWriter:
    """An open partial (or shard) file: rows are written as they are computed and flushed per batch."""

    def __init__(self, path: Path, n_segments: int, identity: Mapping[str, object], extra_attrs: Mapping[str, object]):
        self.path = Path(path)
        self.n_segments = n_segments
        want = {k: _json_attr(v) for k, v in identity.items()}
        self.file = self._open_or_create(want, extra_attrs)
        self.embedding = self.file["segments/embedding"]
        self.raw_norm = self.file["segments/raw_norm"]
        self.done = self.file["segments/done"]

    def _open_or_create(self, want: dict[str, str], extra: Mapping[str, object]) -> h5py.File:
        if self.path.exists():
            try:
                f = h5py.File(self.path, "r+")
            except OSError as exc:  # a write cut off by a crash can leave an unreadable file
                log.warning("%s: unreadable (%s); starting over", self.path, exc)
            else:
                have = {k: f.attrs.get(k) for k in want}
                if have == want and f["segments/done"].shape == (self.n_segments,):
                    n_done = int(np.count_nonzero(f["segments/done"][:]))
                    log.info("%s: continuing an earlier run (%d of %d segments done)", self.path, n_done, self.n_segments)
                    return f
                f.close()
                changed = sorted(k for k in want if have.get(k) != want[k])
                log.info("%s: from another teacher/mel cache (%s differ); starting over", self.path, ", ".join(changed) or "size")
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w")
        chunk_rows = max(1, min(self.n_segments, 256))
        f.create_dataset("segments/embedding", (self.n_segments, EMBED_DIM), "f4", chunks=(chunk_rows, EMBED_DIM))
        f.create_dataset("segments/raw_norm", (self.n_segments,), "f4")
        f.create_dataset("segments/done", (self.n_segments,), "bool")
        for k, v in want.items():
            f.attrs[k] = v
        for k, v in extra.items():
            f.attrs[k] = _json_attr(v)
        f.flush()
        return f

    def pending(self, rows: np.ndarray) -> np.ndarray:
        """The subset of `rows` (sorted segment indices) not yet computed."""
        return rows[~self.done[:][rows]]

    def write(self, start: int, embedding: np.ndarray, raw_norm: np.ndarray) -> None:
        """Rows start .. start+len(embedding); flushed so an interruption loses at most this batch."""
        stop = start + len(embedding)
        self.embedding[start:stop] = embedding
        self.raw_norm[start:stop] = raw_norm
        self.done[start:stop] = True
        self.file.flush()

    def write_text(self, sets: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> None:
        _write_text(self.file, sets)
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _write_text(f: h5py.File, sets: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> None:
    if "text" in f:
        del f["text"]
    group = f.create_group("text")
    for name, (queries, embedding) in sets.items():
        if len(queries) != len(embedding):
            raise ValueError(f"text set {name}: {len(queries)} queries but {len(embedding)} embeddings")
        g = group.create_group(name)
        g.create_dataset("query", data=np.array(list(queries), dtype=object), dtype=_STR, track_times=False)
        g.create_dataset("embedding", data=np.asarray(embedding, dtype="f4").reshape(len(queries), EMBED_DIM),
                         track_times=False)


def _read_text(f: h5py.File) -> dict[str, tuple[list[str], np.ndarray]]:
    return {name: (strings(g["query"]), g["embedding"][:]) for name, g in f["text"].items()}


def track_embeddings(
    embedding: np.ndarray, raw_norm: np.ndarray, track_ranges: Sequence[range]
) -> tuple[np.ndarray, np.ndarray]:
    """Per track: L2(mean of raw segment projections); raw = normalised row * its norm."""
    out = np.zeros((len(track_ranges), EMBED_DIM), dtype=np.float64)
    counts = np.zeros(len(track_ranges), dtype=np.int64)
    for i, r in enumerate(track_ranges):
        if len(r) == 0:
            raise EmbeddingStoreError(f"track {i} has no segments in the mel cache")
        raw = embedding[r.start : r.stop].astype(np.float64) * raw_norm[r.start : r.stop, None]
        out[i] = raw.mean(axis=0)
        counts[i] = len(r)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32), counts


def finalize(
    writer: EmbeddingWriter, out: str | Path, track_ids: Sequence[str], track_ranges: Sequence[range]
) -> Path:
    """Check every row is done, add the per-track embeddings and move into place.

    The finished file is written afresh (not the partial file with its mask removed), datasets and
    attributes in a fixed order and without timestamps, so the same embeddings give the same bytes
    however many interruptions or shards the run went through."""
    out = Path(out)
    f = writer.file
    done = f["segments/done"][:]
    if not done.all():
        missing = np.flatnonzero(~done)
        raise EmbeddingStoreError(f"{writer.path}: {len(missing)} segments not embedded (first: {missing[0]})")
    if "text" not in f:
        raise EmbeddingStoreError(f"{writer.path}: no text embeddings")
    segments, raw_norm = f["segments/embedding"][:], f["segments/raw_norm"][:]
    emb, counts = track_embeddings(segments, raw_norm, track_ranges)
    text = _read_text(f)
    attrs = {k: v for k, v in f.attrs.items()}
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as g:
        chunk_rows = max(1, min(len(segments), 256))
        g.create_dataset("segments/embedding", data=segments, chunks=(chunk_rows, EMBED_DIM), track_times=False)
        g.create_dataset("segments/raw_norm", data=raw_norm, track_times=False)
        _write_text(g, {name: text[name] for name in sorted(text)})
        g.create_dataset("tracks/track_id", data=np.array(list(track_ids), dtype=object), dtype=_STR,
                         track_times=False)
        g.create_dataset("tracks/embedding", data=emb, track_times=False)
        g.create_dataset("tracks/n_segments", data=counts, track_times=False)
        for key in sorted(attrs):
            g.attrs[key] = attrs[key]
    writer.close()
    os.replace(tmp, out)
    writer.path.unlink(missing_ok=True)
    log.info("wrote %s: %d segments, %d tracks", out, len(done), len(track_ids))
    return out


def merge_shards(inputs: Sequence[str | Path], out: str | Path, track_ids: Sequence[str], track_ranges: Sequence[range]) -> Path:
    """Join `--shard k/n` files (same teacher, same mel cache) into one finished teacher.h5."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise EmbeddingStoreError("merge: no shard files given")
    files = []
    try:
        for p in inputs:
            try:
                files.append(h5py.File(p, "r"))
            except OSError as exc:
                raise EmbeddingStoreError(f"{p}: cannot open shard file: {exc}") from exc
        first = files[0]
        identity = {k: first.attrs.get(k) for k in IDENTITY_ATTRS}
        for p, f in zip(inputs[1:], files[1:]):
            other = {k: f.attrs.get(k) for k in IDENTITY_ATTRS}
            if other != identity:
                changed = sorted(k for k in identity if identity[k] != other[k])
                raise EmbeddingStoreError(f"{p}: made with a different {', '.join(changed)} than {inputs[0]}")
        n = first["segments/done"].shape[0]
        if n != sum(len(r) for r in track_ranges):
            raise EmbeddingStoreError(f"{inputs[0]}: {n} segments but the mel cache has {sum(len(r) for r in track_ranges)}")
        extra = {k: v for k, v in first.attrs.items() if k not in IDENTITY_ATTRS}
        tmp = partial_path(out).with_name(Path(out).name + ".merging")
        tmp.unlink(missing_ok=True)
        writer = EmbeddingWriter(tmp, n, identity, extra)  # attrs are already encoded
        text_done = False
        for p, f in zip(inputs, files):
            done = f["segments/done"][:]
            rows = np.flatnonzero(done)
            log.info("merge: %s holds %d segments", p, len(rows))
            for start, stop in contiguous_runs(rows):
                writer.write(start, f["segments/embedding"][start:stop], f["segments/raw_norm"][start:stop])
            if "text" in f and not text_done:
                writer.write_text(_read_text(f))
                text_done = True
        return finalize(writer, out, track_ids, track_ranges)
    finally:
        for f in files:
            f.close()


# --------------------------------------------------------------------------- reading


class TeacherCache:
    """Read-only view of a finished teacher.h5; arrays are loaded on first access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise EmbeddingStoreError(f"{self.path}: not found (run `student-clap run teacher`)") from None
        except OSError as exc:
            raise unreadable(self.path, "teacher cache", "student-clap run teacher", exc) from None
        for name in ("segments/embedding", "tracks/track_id", "tracks/embedding", "text"):
            if name not in self._file:
                self._file.close()
                raise EmbeddingStoreError(f"{self.path}: no /{name} (an unfinished or foreign file)")
        self._cache: dict[str, object] = {}

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _get(self, key: str, load):
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    @property
    def attrs(self) -> dict[str, object]:
        return dict(self._file.attrs)

    @property
    def teacher_sha256(self) -> str:
        return str(self._file.attrs["teacher_sha256"])

    @property
    def segment_embeddings(self) -> np.ndarray:
        return self._get("seg", lambda: self._file["segments/embedding"][:])

    @property
    def segment_raw_norms(self) -> np.ndarray:
        return self._get("seg_norm", lambda: self._file["segments/raw_norm"][:])

    @property
    def track_ids(self) -> list[str]:
        return self._get("ids", lambda: strings(self._file["tracks/track_id"]))

    @property
    def track_embeddings(self) -> np.ndarray:
        return self._get("tracks", lambda: self._file["tracks/embedding"][:])

    def text_sets(self) -> dict[str, tuple[list[str], np.ndarray]]:
        return self._get("text", lambda: _read_text(self._file))
