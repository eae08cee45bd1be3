"""The library index: a SQLite database (stdlib sqlite3, WAL) that survives a kill.

Tables:

- meta(key, value): format, schema version, the model identity (`model_identity`: the export's one
  string, student_clap.identity; `audio_model`/`text_model`: student_clap.spec's sha256 over the
  song path's ONNX files and the export's audio description, the text model's likewise), the
  vector width, created and updated times, and settings commands store (the duplicate threshold);
- tracks(id, path, size, mtime_ns, duration, n_segments, notes, status, reason, updated): one row
  per file, by its path with the folder resolved (stored as the file system's bytes, so any name fits); status
  'ok' (it has a vector) or 'failed' (refused by the usability rule or the decoder, with the
  reason; not tried again until the file changes);
- vectors(track_id, vector): the unit song vector as float16 bytes (cosine error < 1e-3).

Each song is committed as it finishes, so a kill loses only the songs being embedded then, and the
next run reuses every row whose file has the same size and modification time. One writer at a
time: a second `index` on the same file is refused at once (an OS lock on the database file,
released by the kernel however the first one ends). Readers (`search`) never wait for the writer:
WAL lets them read the last committed state while songs are being added.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from student_clap.spec import SearchError

log = logging.getLogger(__name__)

FORMAT = "student-clap-index"
SCHEMA = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
MODEL_SETTINGS = ("duplicate_threshold", "duplicate_calibration", "duplicate_centre")  # meta keys that belong to one model
BUSY_TIMEOUT_S = 30.0  # a reader meeting a checkpoint, or a writer's commit, waits this long at most

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tracks (
    id INTEGER PRIMARY KEY,
    path BLOB NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    duration REAL,
    n_segments INTEGER,
    notes TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (
    track_id INTEGER PRIMARY KEY REFERENCES tracks(id) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
"""

# meta 'songs' counts the 'ok' tracks, kept by these triggers in the transaction that changes
# them: a search reads it instead of counting (a full scan of tracks: ~0.2 s at a million songs).
# Set from a real count whenever a writer opens the file, so a file written without them heals.
_SONG_COUNT_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS songs_added AFTER INSERT ON tracks WHEN NEW.status = 'ok' BEGIN "
    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'songs'; END",
    "CREATE TRIGGER IF NOT EXISTS songs_removed AFTER DELETE ON tracks WHEN OLD.status = 'ok' BEGIN "
    "UPDATE meta SET value = CAST(value AS INTEGER) - 1 WHERE key = 'songs'; END",
    "CREATE TRIGGER IF NOT EXISTS songs_changed AFTER UPDATE OF status ON tracks WHEN OLD.status <> NEW.status BEGIN "
    "UPDATE meta SET value = CAST(value AS INTEGER) + (CASE WHEN NEW.status = 'ok' THEN 1 ELSE -1 END) "
    "WHERE key = 'songs'; END",
)


def _fs(path: str) -> bytes:
    return os.fsencode(path)


def _str(raw: bytes) -> str:
    return os.fsdecode(bytes(raw))


def _sqlite_kind(path: Path, ours: bool = False) -> str:
    """'index' (a student-clap index), 'blank' (a SQLite file with no tables: an index whose
    creation was cut short), 'other' (another program's database) or 'locked' (one being created
    by a writer right now)."""
    try:
        con = _connect_ro(path)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() if "meta" in tables else None
        finally:
            con.close()
    except sqlite3.Error:
        return "locked" if not ours and _locked(path) else "other"
    if row and row[0] == FORMAT:
        return "index"
    if not tables:
        return "locked" if not ours and _locked(path) else "blank"
    return "locked" if not ours and _locked(path) and tables <= {"meta", "tracks", "vectors"} else "other"


def _locked(path: Path) -> bool:
    """Whether another process holds the writer's lock on `path`."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's shared lock


def is_index_file(path: str | Path) -> bool:
    """True when `path` is a SQLite database holding a student-clap index."""
    try:
        with open(path, "rb") as fh:
            if fh.read(16) != SQLITE_MAGIC:
                return False
    except OSError:
        return False
    return _sqlite_kind(Path(path)) == "index"


def _busy(path: Path) -> SearchError:
    return SearchError(f"{path}: another `student-clap index` is writing this index now; wait for it to finish "
                       "(search works meanwhile)")


def check_index_target(path: str | Path, *, ours: bool = False) -> None:
    """Refuse (SearchError) to make `path` an index when it holds anything else: an audio file, a
    playlist, another program's database. A missing or empty file is fine, and so is a SQLite file
    with no tables (an index whose creation was cut short). `ours`: the caller holds the writer's lock."""
    path = Path(path)
    try:
        if path.is_dir():
            raise SearchError(f"--out {path}: is a folder, give a file name (e.g. music.db)")
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise SearchError(f"--out {path}: cannot read it ({exc.strerror or exc})") from None
    if head != SQLITE_MAGIC:
        raise SearchError(f"--out {path}: exists and is not a student-clap index; refusing to replace it "
                          "(choose another file name, e.g. music.db)")
    kind = _sqlite_kind(path, ours)
    if kind == "locked":
        raise _busy(path)
    if kind == "other":
        raise SearchError(f"--out {path}: exists and is another program's SQLite database; refusing to replace it "
                          "(choose another file name, e.g. music.db)")


def _count_songs(con: sqlite3.Connection) -> int:
    return int(con.execute("SELECT COUNT(*) FROM tracks WHERE status = 'ok'").fetchone()[0])


def song_count(con: sqlite3.Connection, meta: dict[str, str]) -> int:
    """The index's songs with a vector: meta 'songs' (kept by triggers), or counted in a file
    written before it was kept."""
    try:
        return int(meta["songs"])
    except (KeyError, ValueError):
        return _count_songs(con)


def _connect_ro(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    return con


@dataclass
class Row:
    size: int
    mtime_ns: int
    status: str


@dataclass
class Index:
    """An index's songs in memory, for search: paths, unit vectors (float32), the model identity."""

    paths: list[str]
    vectors: np.ndarray
    audio_model: str
    text_model: str = ""
    n_segments: list[int] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""
    model_identity: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0


class IndexWriter:
    """The one writer of an index file: created if missing, refused if the file is anything else."""

    def __init__(self, path: str | Path, *, audio_model: str, text_model: str, dim: int,
                 model_identity: str = "") -> None:
        self.model_identity = model_identity
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.con: sqlite3.Connection | None = None
        check_index_target(self.path)
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SearchError(f"--out {self.path}: cannot open it for writing ({exc.strerror or exc})") from None
        try:
            self._lock(fd)
            check_index_target(self.path, ours=True)  # again, now that no other writer can change it
            self.con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.con.execute("PRAGMA journal_mode = WAL")
            self.con.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a kill of the process
            self.con.execute("PRAGMA foreign_keys = ON")
            self.reset_reason = self._set_meta(audio_model, text_model, dim)
        except sqlite3.Error as exc:
            self.close()
            raise SearchError(f"--out {self.path}: cannot write the index ({exc})") from None
        except BaseException:
            self.close()
            if created and self.path.exists() and self.path.stat().st_size == 0:
                self.path.unlink()  # leave nothing behind that was not there
            raise

    def _lock(self, fd: int) -> None:
        """Exclusive OS lock on the database file for this writer's lifetime (fcntl.flock: released
        when the process ends, even by SIGKILL; independent of SQLite's own locks)."""
        try:
            import fcntl
        except ImportError:  # Windows: SQLite's own locking and busy timeout keep writers apart
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(self.path) from None
        self._lock_fd = fd

    def _set_meta(self, audio_model: str, text_model: str, dim: int) -> str:
        """Record the models; when the audio model differs from the one the rows came from, drop
        them all (their vectors would mean nothing next to new ones) and say why."""
        now = str(time.time())
        reason = ""
        with self._transaction():  # tables and meta in one commit: a kill leaves a blank file or an index
            for statement in _TABLES.split(";"):
                if statement.strip():
                    self.con.execute(statement)
            for statement in _SONG_COUNT_TRIGGERS:
                self.con.execute(statement)
            meta = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
            n = self.con.execute("SELECT COUNT(*) FROM tracks").fetchone()[0]
            changed = (meta.get("audio_model") not in (None, audio_model) or meta.get("dim") not in (None, str(dim))
                       or (n and meta.get("model_identity", "") != self.model_identity))
            if changed:
                self.con.execute("DELETE FROM vectors")
                self.con.execute("DELETE FROM tracks")
                for key in MODEL_SETTINGS:  # measured with the old vectors: meaningless now
                    self.con.execute("DELETE FROM meta WHERE key = ?", (key,))
                was = meta.get("model_identity") or "(none recorded)"
                what = (f"model {was}, now {self.model_identity or '(none)'}" if was != self.model_identity else
                        "another audio model (other ONNX files under the same identity)")
                reason = f"{self.path}: built with {what}; its {n} row(s) dropped, embedding every file again"
            values = {"format": FORMAT, "schema": str(SCHEMA), "audio_model": audio_model, "text_model": text_model,
                      "dim": str(dim), "updated": now, "model_identity": self.model_identity}
            if "created" not in meta:
                values["created"] = now
            values["songs"] = str(_count_songs(self.con))
            self.con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())
        return reason

    class _Tx:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def __enter__(self) -> None:
            self.con.execute("BEGIN IMMEDIATE")

        def __exit__(self, kind, exc, tb) -> None:
            self.con.execute("COMMIT" if kind is None else "ROLLBACK")

    def _transaction(self) -> IndexWriter._Tx:
        return IndexWriter._Tx(self.con)

    def rows(self) -> dict[str, Row]:
        """path -> (size, mtime, status) of every track row."""
        return {_str(p): Row(s, m, st) for p, s, m, st in self.con.execute("SELECT path, size, mtime_ns, status FROM tracks")}

    def put_song(self, path: str, stamp: tuple[int, int], vector: np.ndarray, *, duration: float, n_segments: int,
                 notes: list[str]) -> None:
        """One embedded song, committed at once."""
        with self._transaction():
            track = self._upsert(path, stamp, "ok", "", duration, n_segments, notes)
            blob = np.asarray(vector, dtype=np.float16).tobytes()
            self.con.execute("INSERT OR REPLACE INTO vectors (track_id, vector) VALUES (?, ?)", (track, blob))

    def put_failure(self, path: str, stamp: tuple[int, int], reason: str) -> None:
        """A file the decoder or the usability rule refused: remembered until it changes."""
        with self._transaction():
            track = self._upsert(path, stamp, "failed", reason, None, None, [])
            self.con.execute("DELETE FROM vectors WHERE track_id = ?", (track,))

    def _upsert(self, path: str, stamp: tuple[int, int], status: str, reason: str, duration: float | None,
                n_segments: int | None, notes: list[str]) -> int:
        self.con.execute(
            "INSERT INTO tracks (path, size, mtime_ns, duration, n_segments, notes, status, reason, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, duration = excluded.duration, n_segments = excluded.n_segments, "
            "notes = excluded.notes, status = excluded.status, reason = excluded.reason, updated = excluded.updated",
            (_fs(path), stamp[0], stamp[1], duration, n_segments, json.dumps(notes), status, reason, time.time()))
        return self.con.execute("SELECT id FROM tracks WHERE path = ?", (_fs(path),)).fetchone()[0]

    def forget(self, paths: Iterable[str]) -> int:
        """Drop the rows of `paths` (files gone, or failures worth retrying); returns how many went."""
        n = 0
        with self._transaction():
            for p in paths:
                n += self.con.execute("DELETE FROM tracks WHERE path = ?", (_fs(p),)).rowcount
        return n

    def move(self, old: str, new: str, stamp: tuple[int, int], *, keep_old: bool = False) -> bool:
        """The row of `old` given to `new`, the same audio under another name (a file moved, or
        with `keep_old` copied or linked): its vector kept, the stamp of the file at `new`, the row
        at `new` (if any) replaced. Returns False when `old` has no row."""
        now = time.time()
        with self._transaction():
            row = self.con.execute("SELECT id FROM tracks WHERE path = ?", (_fs(old),)).fetchone()
            if row is None or old == new:
                return row is not None
            self.con.execute("DELETE FROM tracks WHERE path = ?", (_fs(new),))
            if keep_old:
                cur = self.con.execute(
                    "INSERT INTO tracks (path, size, mtime_ns, duration, n_segments, notes, status, reason, updated) "
                    "SELECT ?, ?, ?, duration, n_segments, notes, status, reason, ? FROM tracks WHERE id = ?",
                    (_fs(new), stamp[0], stamp[1], now, row[0]))
                self.con.execute("INSERT INTO vectors (track_id, vector) SELECT ?, vector FROM vectors WHERE track_id = ?",
                                 (cur.lastrowid, row[0]))
            else:  # `updated` bumped: the approximate index re-links the row (student_clap.ann)
                self.con.execute("UPDATE tracks SET path = ?, size = ?, mtime_ns = ?, updated = ? WHERE id = ?",
                                 (_fs(new), stamp[0], stamp[1], now, row[0]))
            self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('updated', ?)", (str(now),))
        return True

    def set_meta(self, values: dict[str, str]) -> None:
        """Settings that belong with these vectors (dropped when the model changes: MODEL_SETTINGS)."""
        with self._transaction():
            self.con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    def touch(self) -> None:
        with self._transaction():
            self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('updated', ?)", (str(time.time()),))

    def close(self) -> None:
        # the connection first: closing another descriptor of the file while SQLite holds POSIX
        # locks through its own would drop them
        if self.con is not None:
            try:
                self.con.close()
            except sqlite3.Error:
                pass
            self.con = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_index(path: str | Path, details: bool = True) -> Index:
    """The songs of an index file (SQLite) or of an export (.npz) for search. `details=False`:
    paths and vectors only (no segment counts, notes or failures), all a search reads."""
    path = Path(path)
    try:
        if not path.exists():
            raise SearchError(f"{path}: index not found (build it with `student-clap index DIR --out {path}`)")
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise SearchError(f"{path}: cannot read the index ({exc.strerror or exc})") from None
    if head == SQLITE_MAGIC:
        return _read_sqlite(path, details)
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    raise SearchError(f"{path}: not a student-clap index (a SQLite file written by `student-clap index`, or its .npz export)")


def read_index_head(path: str | Path) -> tuple[Index, int] | None:
    """An SQLite index's model identity and width without its vectors (an Index with none) and its
    song count; None for anything else (an .npz export, a missing or foreign file)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(16) != SQLITE_MAGIC:
                return None
        con = _connect_ro(path)
        try:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            count = song_count(con, meta)
        finally:
            con.close()
        if meta.get("format") != FORMAT or int(meta.get("schema", 0)) > SCHEMA:
            return None
        dim = int(meta["dim"])
    except (OSError, sqlite3.Error, KeyError, ValueError):
        return None
    return Index([], np.zeros((0, dim), np.float32), meta.get("audio_model", ""), meta.get("text_model", ""),
                 source=str(path), model_identity=meta.get("model_identity", ""), meta=meta), int(count)


def _read_sqlite(path: Path, details: bool = True) -> Index:
    try:
        con = _connect_ro(path)
        try:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != FORMAT:
                raise SearchError(f"{path}: a SQLite database, but not a student-clap index")
            if int(meta.get("schema", 0)) > SCHEMA:
                raise SearchError(f"{path}: index schema {meta.get('schema')}, this version reads up to {SCHEMA}; "
                                  "update student-clap")
            dim = int(meta["dim"])
            columns = "t.path, v.vector, t.n_segments, t.notes" if details else "t.path, v.vector"
            rows = con.execute(f"SELECT {columns} FROM tracks t JOIN vectors v "
                               "ON v.track_id = t.id WHERE t.status = 'ok' ORDER BY t.path").fetchall()
            failed = [(_str(p), r) for p, r in
                      con.execute("SELECT path, reason FROM tracks WHERE status = 'failed' ORDER BY path")] if details else []
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise SearchError(f"{path}: cannot read the index ({exc})") from None
    except (KeyError, ValueError) as exc:
        raise SearchError(f"{path}: not a valid student-clap index ({exc})") from None
    width = 2 * dim  # float16 bytes
    bad = next((len(r[1]) // 2 for r in rows if len(r[1]) != width), None)
    if bad is not None:
        raise SearchError(f"{path}: a vector of {bad} values in an index of {dim}-d vectors")
    # one buffer for all rows: a row-by-row copy costs more than the search itself at 10k songs
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), dim).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.maximum(norms, 1e-12)  # float16 storage: renormalised so scores stay cosines
    counts = [int(r[2] or 0) for r in rows] if details else []
    notes = [json.loads(r[3]) for r in rows] if details else []
    return Index([_str(r[0]) for r in rows], vectors, meta.get("audio_model", ""), meta.get("text_model", ""),
                 counts, notes, failed, str(path), meta.get("model_identity", ""), meta)


def _read_npz(path: Path) -> Index:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            paths = [str(p) for p in data["paths"]]
            vectors = np.asarray(data["vectors"], np.float32)
            model = str(data["audio_model"]) if "audio_model" in data.files else str(data.get("audio_model_sha256", ""))
            counts = [int(n) for n in data["n_segments"]] if "n_segments" in data.files else []
            identity = str(data["model_identity"]) if "model_identity" in data.files else ""
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SearchError(f"{path}: not a student-clap index or export ({exc})") from None
    if vectors.ndim != 2 or len(vectors) != len(paths):
        raise SearchError(f"{path}: not a valid export: {len(paths)} paths but vectors of shape {vectors.shape}")
    return Index(paths, vectors, model, n_segments=counts, source=str(path), model_identity=identity)


def search(index: Index, query_vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Top-k (path, cosine) per query vector, best first."""
    if query_vectors.ndim != 2 or query_vectors.shape[1] != index.dim:
        raise SearchError(f"the index holds {index.dim}-d vectors, the query is {query_vectors.shape[-1]}-d: "
                          "the index was built for other models")
    scores = query_vectors @ index.vectors.T
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(index.paths[i], float(row[i])) for i in order])
    return out
