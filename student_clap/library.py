"""Building an index from a folder, writing exports, and checking an index against the models:
what `student-clap index`, `embed`, `search` and the API's build_index/search share."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from student_clap.embed import EmbedResult, Scan, file_stamp, iter_embed, printable, scan_audio
from student_clap.files import atomic_path
from student_clap.identity import check_index_model  # noqa: F401  (still importable from here)
from student_clap.index import Index, IndexWriter, read_index
from student_clap.song import SongEmbedder
from student_clap.spec import SearchError

log = logging.getLogger(__name__)

EXPORT_SUFFIXES = (".npz", ".npy", ".jsonl")


# --------------------------------------------------------------------------- output files


def check_writable(out: str | Path) -> None:
    """Fail now, before any embedding, if `out` cannot be written (folder missing and not
    creatable, not writable or not readable, or `out` is a folder)."""
    out = Path(out)
    folder = out.parent
    try:
        if out.is_dir():
            raise SearchError(f"--out {out}: is a folder, give a file name")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.name}.", suffix=".probe"):
            pass
        out.exists()  # a folder that can be written but not searched (no x bit) fails here
    except OSError as exc:
        raise SearchError(f"--out {out}: cannot write in {folder or '.'} ({exc.strerror or exc})") from None


def sidecar_path(out: Path) -> Path:
    """The JSONL file that names the rows of a .npy output (x.npy -> x.paths.jsonl)."""
    return out.with_suffix(".paths.jsonl")


def _is_export(out: Path) -> bool:
    """Whether `out` is a file this program exported (so replacing it loses nothing of the user's)."""
    suffix = out.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(out, allow_pickle=False) as data:
                return {"paths", "vectors"} <= set(data.files)
        if suffix == ".jsonl":
            with open(out, encoding="utf-8") as fh:
                first = fh.readline()
            return not first or {"path", "embedding"} <= set(json.loads(first))
        if suffix == ".npy":
            np.load(out, allow_pickle=False)
            return sidecar_path(out).is_file()
    except Exception:  # anything unreadable as an export is not one
        return False
    return False


def check_export_target(out: str | Path) -> None:
    """Refuse an export name of another type, or one that holds something other than an export."""
    out = Path(out)
    if out.suffix.lower() not in EXPORT_SUFFIXES:
        raise SearchError(f"--out {out}: use a .npz, .npy or .jsonl file name")
    check_writable(out)
    try:
        exists = out.exists() and out.stat().st_size > 0
    except OSError as exc:
        raise SearchError(f"--out {out}: cannot read it ({exc.strerror or exc})") from None
    if exists and not _is_export(out):
        raise SearchError(f"--out {out}: exists and is not a student-clap export; refusing to replace it "
                          "(choose another file name)")


def _atomic_save(path: Path, write: Callable) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        write(fh)


def _text_column(values: list[str]) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.zeros(0, dtype="<U1")


def _jsonl(records) -> bytes:
    # json escapes newlines and undecodable bytes in names, so one record is always one line
    return "".join(json.dumps(r) + "\n" for r in records).encode("ascii")


def write_export(out: Path, result: EmbedResult | Index, audio_model: str = "", model_identity: str = "") -> None:
    """Vectors and paths as .npz (with the audio model's identity: `search` reads it), .npy (+ a
    .paths.jsonl naming its rows) or .jsonl, written atomically."""
    suffix = out.suffix.lower()
    if suffix == ".npz":
        _atomic_save(out, lambda fh: np.savez(fh, paths=_text_column(result.paths), vectors=result.vectors,
                                               n_segments=np.array(result.n_segments, dtype=np.int64),
                                               notes=_text_column([json.dumps(n) for n in result.notes]),
                                               audio_model=np.array(audio_model),
                                               model_identity=np.array(model_identity)))
    elif suffix == ".npy":
        records = [{"row": i, "path": p, "n_segments": n, "notes": notes}
                   for i, (p, n, notes) in enumerate(zip(result.paths, result.n_segments, result.notes))]
        _atomic_save(sidecar_path(out), lambda fh: fh.write(_jsonl(records)))
        _atomic_save(out, lambda fh: np.save(fh, result.vectors))
    elif suffix == ".jsonl":
        records = [{"path": p, "n_segments": n, "notes": notes, "embedding": [round(float(x), 7) for x in v]}
                   for p, n, notes, v in zip(result.paths, result.n_segments, result.notes, result.vectors)]
        _atomic_save(out, lambda fh: fh.write(_jsonl(records)))
    else:
        raise SearchError(f"--out {out}: use a .npz, .npy or .jsonl file name")


def index_paths(out: str | Path) -> tuple[Path, Path | None]:
    """(the SQLite index, the export to write from it or None) for `index --out`: an export name
    (x.npz, x.npy, x.jsonl) keeps its index beside it as x.db."""
    out = Path(out).expanduser()
    if out.suffix.lower() in EXPORT_SUFFIXES:
        return out.with_suffix(".db"), out
    return out, None


# --------------------------------------------------------------------------- building


@dataclass
class BuildReport:
    """What one `index` run did."""

    index: Path
    scan: Scan
    reused: int = 0
    embedded: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # this run's and remembered refusals
    notes: list[tuple[str, list[str]]] = field(default_factory=list)  # kept songs embedded now with notes
    reset: str = ""  # why earlier rows were dropped (another model), if they were
    ann: bool = False  # whether the approximate search index (student_clap.ann) is in place

    @property
    def songs(self) -> int:
        return self.reused + self.embedded


def build_index(embedder: SongEmbedder, folder: str | Path | None, db: str | Path, *, text_model: str = "",
                jobs: int = 1, progress: bool = False, files: Sequence[str | Path] | None = None) -> BuildReport:
    """Make the index `db` hold every audio file under `folder`, one commit per song: unchanged
    files (same path, size and mtime) are reused, rows of files not under `folder` now are removed,
    and refusals are remembered until the file changes (missing or unreadable ones are retried).

    `files` instead of a folder: add exactly these files (e.g. the items of a beets query), named
    as a folder scan names them, and keep the rows of every other file."""
    from tqdm import tqdm

    from student_clap.tools import index_key

    if files is None:
        scan = scan_audio(folder)
        if not scan.files:
            raise SearchError(f"{folder}: no audio files" + (f" ({'; '.join(scan.summary())})" if scan.summary() else ""))
    else:
        scan = Scan(files=sorted({index_key(f) for f in files}))
    with IndexWriter(db, audio_model=embedder.model_id, text_model=text_model, dim=embedder.dim,
                     model_identity=getattr(embedder, "model_identity", "")) as writer:
        report = BuildReport(Path(db), scan, reset=writer.reset_reason)
        if writer.reset_reason:
            log.warning("%s", writer.reset_reason)
        rows = writer.rows()
        todo = []
        for f in scan.files:
            row = rows.get(f)
            try:
                stamp = file_stamp(f)
            except OSError:
                stamp = None
            if row is not None and stamp == (row.size, row.mtime_ns):
                report.reused += row.status == "ok"
                continue
            todo.append(f)
        found = set(scan.files)
        # the index mirrors the folder it was last given; a list of files only adds
        gone = [p for p in rows if p not in found] if files is None else []
        report.removed = writer.forget(gone)
        log.info("indexing %d files under %s: %d unchanged, %d to embed, %d removed", len(scan.files),
                 folder if files is None else "the given list",
                 len(scan.files) - len(todo), len(todo), report.removed)
        retry = []
        for out in tqdm(iter_embed(embedder, todo, jobs), total=len(todo), desc="embedding", unit="song",
                        disable=not progress):
            if out.song is not None and out.stamp is not None:
                writer.put_song(out.path, out.stamp, out.song.vector, duration=out.song.seconds,
                                n_segments=out.song.n_segments, notes=out.song.notes)
                report.embedded += 1
                if out.song.notes:
                    report.notes.append((out.path, out.song.notes))
            elif out.retry or out.stamp is None:
                retry.append(out.path)
                report.failed.append((out.path, out.reason or "cannot read the file"))
            else:
                writer.put_failure(out.path, out.stamp, out.reason)
                report.failed.append((out.path, out.reason))
        writer.forget(retry)  # not remembered: tried again next time
        writer.touch()
    try:
        from student_clap.ann import update_ann

        report.ann = update_ann(db)
    except ImportError:  # usearch missing: search stays exact
        pass
    fresh = {p for p, _ in report.failed}
    report.failed += [(p, r) for p, r in read_index(db).failed if p in found and p not in fresh]
    report.failed.sort()
    return report


# --------------------------------------------------------------------------- checking


def report_lines(failed: list[tuple[str, str]], notes: list[tuple[str, list[str]]]) -> list[str]:
    lines = []
    if failed:
        lines.append(f"{len(failed)} file(s) could not be used and were skipped:")
        lines += [f"  {printable(p)}: {r}" for p, r in failed]
    if notes:
        lines.append(f"{len(notes)} file(s) kept with notes:")
        lines += [f"  {printable(p)}: {'; '.join(n)}" for p, n in notes]
    return lines
