"""Search at library size: exact below ANN_MIN_SONGS songs, an approximate index above.

Below the threshold a search reads the stored matrix and ranks every song (exact; at 10k songs a
cold search costs about what loading the text model does). From ANN_MIN_SONGS songs up, reading
every vector out of SQLite costs more time and memory than a small machine should spend per query,
so an HNSW index (USearch, int8 vectors, cosine) is kept beside the database as `DB.usearch` and
opened memory-mapped (`view`): a query touches only the graph nodes it visits. Its candidates are
rescored with their stored vectors, so printed scores are exact cosines.

The approximate index is brought up to date by `index` at the end of each run that changed the
database, and by a search that finds it older than the database (the `updated` time and song count
in `DB.usearch.json` differ from the index's); a search that cannot write it falls back to exact.
Up to date means patched: the songs added, re-embedded or removed since it was written are removed
from and added to the graph (building 1M songs anew takes half an hour on a small machine, patching
a few takes seconds); it is built anew when the model changed or more than REBUILD_SHARE of the
songs did.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from student_clap.index import FORMAT, _connect_ro, _str, song_count
from student_clap.spec import SearchError

log = logging.getLogger(__name__)

ANN_MIN_SONGS = int(os.environ.get("STUDENT_CLAP_ANN_MIN_SONGS", "20000"))  # exact below this
ANN_DTYPE = "i8"  # a quarter of float32's size; candidates are rescored with the stored vectors
# The graph's settings: USearch's defaults for degree and build expansion. A denser graph or a
# wider build expansion raises recall at the price of file size and build time, which on a small
# machine is already the cost that counts (100k songs: minutes; docs/library.md).
CONNECTIVITY = 16  # HNSW graph degree
EXPANSION_ADD = 128  # candidates kept while linking a new song into the graph
# The search's settings (no rebuild needed to change them): many more candidates than USearch's
# default 64, then exact rescoring, because int8 distances alone misorder close neighbours. At 1M
# songs recall@10 was 0.77 with 96 candidates, 0.96 with 384 and 0.98 with 768, each costing
# 2 to 4 ms of CPU a query once the view is open (benchmarks/library.py, docs/library.md).
RESCORE = 4  # candidates fetched per result asked for
EXPANSION_SEARCH = 768  # candidates kept while searching
# Past this share of changed songs a fresh graph costs little more than patching and links the new
# songs better (removed songs leave holes that HNSW repairs only in part).
REBUILD_SHARE = 0.2


def ann_path(db: str | Path) -> Path:
    db = Path(db)
    return db.with_name(db.name + ".usearch")


def _state_path(db: str | Path) -> Path:
    return ann_path(db).with_name(ann_path(db).name + ".json")


def db_state(con: sqlite3.Connection) -> dict:
    """What an approximate index must match: the database's last update, song count and model."""
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        raise SearchError("not a student-clap index")
    count = song_count(con, meta)  # kept in meta: counting 'ok' tracks scans the whole table
    return {"updated": meta.get("updated", ""), "count": int(count), "model_identity": meta.get("model_identity", ""),
            "audio_model": meta.get("audio_model", ""), "dim": int(meta.get("dim", 0))}


def _stored_state(db: Path) -> dict | None:
    try:
        return json.loads(_state_path(db).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_ann(db: str | Path, dtype: str = ANN_DTYPE, batch: int = 100_000) -> Path:
    """(Re)build DB.usearch from the database's vectors; written beside it, then renamed into place."""
    from usearch.index import Index as UIndex

    db = Path(db)
    con = _connect_ro(db)
    try:
        state = db_state(con)
        index = UIndex(ndim=state["dim"], metric="cos", dtype=dtype, connectivity=CONNECTIVITY,
                       expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)
        cur = con.execute("SELECT track_id, vector FROM vectors ORDER BY track_id")
        while rows := cur.fetchmany(batch):
            keys = np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), -1)
            index.add(keys, vecs.astype(np.float32))
    finally:
        con.close()
    _save(index, db, state, dtype)
    return ann_path(db)


def _stale(stored: dict | None, state: dict, db: Path) -> bool:
    return stored is None or any(stored.get(k) != v for k, v in state.items()) or not ann_path(db).is_file()


def _patch_ann(db: Path, state: dict, stored: dict | None, batch: int = 10_000) -> bool:
    """Apply the songs changed since DB.usearch was written to it; False (nothing written) when it
    must be built anew instead: another model or precision, or too many changes."""
    from usearch.index import Index as UIndex

    if stored is None or not ann_path(db).is_file() or stored.get("dtype") != ANN_DTYPE or any(
            stored.get(k) != state[k] for k in ("model_identity", "audio_model", "dim")):
        return False
    con = _connect_ro(db)
    try:
        ids = np.fromiter((r[0] for r in con.execute("SELECT track_id FROM vectors")), dtype=np.uint64)
        try:
            since = float(stored.get("updated") or "")
        except ValueError:
            return False
        # rows written after the index: re-embedded songs keep their id but not their vector
        touched = np.fromiter((r[0] for r in con.execute("SELECT id FROM tracks WHERE updated > ?", (since,))),
                              dtype=np.uint64)
        index = UIndex.restore(str(ann_path(db)))  # into memory: a memory-mapped view cannot change
        if index is None:
            return False
        keys = np.asarray(index.keys, dtype=np.uint64)
        drop = np.union1d(np.setdiff1d(keys, ids), np.intersect1d(touched, keys))
        add = np.union1d(np.setdiff1d(ids, keys), np.intersect1d(touched, ids))
        if len(drop) + len(add) > REBUILD_SHARE * max(len(ids), 1):
            return False
        if len(drop):
            index.remove(drop)
        for start in range(0, len(add), batch):
            part = [int(x) for x in add[start:start + batch]]
            rows = con.execute(f"SELECT track_id, vector FROM vectors WHERE track_id IN ({','.join('?' * len(part))})",
                               part).fetchall()
            index.add(np.array([r[0] for r in rows], dtype=np.uint64),
                      np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), -1).astype(np.float32))
    finally:
        con.close()
    if len(drop) or len(add):
        _save(index, db, state, ANN_DTYPE)
    else:  # only the database's stamp moved (a writer opened and closed): the graph is current
        _write_state(db, state, ANN_DTYPE)
    log.info("approximate search index patched: %d song(s) removed, %d added (%s)", len(drop), len(add), ann_path(db))
    return True


def _save(index: Any, db: Path, state: dict, dtype: str) -> None:
    out, tmp = ann_path(db), ann_path(db).with_name(ann_path(db).name + ".tmp")
    index.save(str(tmp))
    os.replace(tmp, out)
    _write_state(db, state, dtype)


def _write_state(db: Path, state: dict, dtype: str) -> None:
    _state_path(db).write_text(json.dumps({**state, "dtype": dtype}), encoding="utf-8")


def _refresh(db: Path, state: dict) -> None:
    """Bring DB.usearch up to date with the database (`state`, read by the caller): patched when
    that is enough, else built anew."""
    stored = _stored_state(db)
    if _stale(stored, state, db) and not _patch_ann(db, state, stored):
        log.info("building the approximate search index for %d songs (%s)", state["count"], ann_path(db))
        build_ann(db)


def update_ann(db: str | Path) -> bool:
    """After `index`: build the approximate index when the library is big enough and it is stale;
    remove it when the library has shrunk below the threshold. Returns whether one is in place."""
    db = Path(db)
    con = _connect_ro(db)
    try:
        state = db_state(con)
    finally:
        con.close()
    if state["count"] < ANN_MIN_SONGS:
        for p in (ann_path(db), _state_path(db)):
            p.unlink(missing_ok=True)
        return False
    _refresh(db, state)
    return True


def search_ann(db: str | Path, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]] | None:
    """Top-k (path, cosine) per query from DB.usearch, or None when the exact search should run
    (a small library, no usearch, or a stale index that cannot be rebuilt here)."""
    db = Path(db)
    try:
        con = _connect_ro(db)
    except sqlite3.Error:
        return None
    try:
        try:
            state = db_state(con)
        except (sqlite3.Error, SearchError):
            return None
        if state["count"] < ANN_MIN_SONGS:
            return None
        try:
            from usearch.index import Index as UIndex
        except ImportError:
            log.warning("usearch is not installed: searching %d songs exactly (slower)", state["count"])
            return None
        try:
            _refresh(db, state)  # nothing to do while the index matches the database
        except OSError as exc:
            log.warning("%s is out of date and cannot be rebuilt here (%s): searching exactly", ann_path(db), exc)
            return None
        index = UIndex.restore(str(ann_path(db)), view=True)
        index.expansion_search = max(EXPANSION_SEARCH, 2 * k)
        out = []
        for q in np.atleast_2d(np.asarray(queries, np.float32)):
            # more candidates than asked for, rescored with the stored vectors: recall beyond the
            # int8 graph's own (its distances are approximate)
            keys = [int(x) for x in index.search(q, count=min(max(RESCORE * k, k), len(index))).keys]
            marks = ",".join("?" * len(keys))
            rows = con.execute(f"SELECT t.id, t.path, v.vector FROM tracks t JOIN vectors v ON v.track_id = t.id "
                               f"WHERE t.id IN ({marks})", keys).fetchall()
            vecs = np.frombuffer(b"".join(r[2] for r in rows), np.float16).reshape(len(rows), -1).astype(np.float32)
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            scores = vecs @ q
            order = np.argsort(-scores, kind="stable")
            out.append([(_str(rows[i][1]), float(scores[i])) for i in order[:k]])
        return out
    finally:
        con.close()
