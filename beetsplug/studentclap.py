"""beets plugin `studentclap`: text-to-music search, "more like this" and probable duplicates over a
beets library, with the Student CLAP students (the student_clap runtime; onnxruntime only).

    plugins: studentclap
    studentclap:
        models: ~/models/student-clap     # an export folder (models/export), or hf://OWNER/NAME[@REV]
        index: ~/music.db                 # the SQLite index; default: studentclap.db in beets' config folder
        auto: yes                         # embed items as they are imported

Commands: `beet clap index [QUERY]`, `beet clap search TEXT [-k N]`, `beet clap similar QUERY [-k N]`,
`beet clap duplicates [calibrate]`.

The index is the one `student-clap index` writes (same tables, same resumable embedding: a file
with the same path, size and mtime is not embedded again). The plugin adds one table of its own,
`beets_items` (beets item id -> the file's path as the index names it), so hits map back to items;
the index's own tables are left as they are. Searches run over the indexed items of this library;
from student_clap.ann.ANN_MIN_SONGS songs a text search goes through the approximate index, as
`student-clap search` does. The index follows beets' removals (`item_removed`) and its moves and
copies of files (`item_moved`, `item_copied` and the link events): rows dropped or re-keyed, their
vectors kept, nothing embedded again.
"""

from __future__ import annotations

import optparse
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from beets import config as beets_config
from beets import ui
from beets.library import Album, Item, Library
from beets.plugins import BeetsPlugin

if TYPE_CHECKING:
    from student_clap import StudentClap
    from student_clap.index import Index
    from student_clap.library import BuildReport

ITEMS_TABLE = "beets_items"
_ITEMS_DDL = (f"CREATE TABLE IF NOT EXISTS {ITEMS_TABLE} (item_id INTEGER PRIMARY KEY, path BLOB NOT NULL); "
              f"CREATE INDEX IF NOT EXISTS {ITEMS_TABLE}_path ON {ITEMS_TABLE} (path)")
ACTIONS = ("index", "search", "similar", "duplicates")
# beets' events for a file written at a new path while the old one stays (same audio, new name)
COPY_EVENTS = ("item_copied", "item_linked", "item_hardlinked", "item_reflinked")
# A search of a shared index (a folder index the library is part of) over the approximate index asks
# for k plus the songs outside the library, then keeps the library's; past this many such songs the
# library's own vectors are searched exactly instead.
MAX_OTHER_SONGS = 1000


def item_key(item: Item) -> str:
    """The name the index gives an item's file (its folder resolved, as `student-clap index` scans)."""
    from student_clap.tools import index_key

    return index_key(os.fsdecode(item.path))


def _connect_ro(db: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(Path(db).absolute().as_uri() + "?mode=ro", uri=True, timeout=30.0)


def read_item_map(db: str | Path) -> dict[int, str]:
    """item id -> indexed path, from the plugin's table (empty when the index has none yet)."""
    try:
        con = _connect_ro(db)
        try:
            rows = con.execute(f"SELECT item_id, path FROM {ITEMS_TABLE}").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise ui.UserError(f"{db}: cannot read the beets item table ({exc})") from None
    return {int(i): os.fsdecode(bytes(p)) for i, p in rows}


class StudentClapPlugin(BeetsPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.config.add({"models": None, "index": "", "auto": False, "jobs": 1, "threads": None})
        self._clap = None
        self._ann_stale = False  # the index changed during this beets command: update its approximate index
        if self.config["auto"].get(bool):
            self.register_listener("item_imported", self.item_imported)
            self.register_listener("album_imported", self.album_imported)
        # the index follows the library whether or not imports are embedded
        self.register_listener("item_removed", self.item_removed)
        self.register_listener("item_moved", self.item_moved)
        for event in COPY_EVENTS:
            self.register_listener(event, self.item_copied)
        self.register_listener("cli_exit", self.cli_exit)

    # ------------------------------------------------------------------ configuration

    def models(self) -> str:
        value = self.config["models"].get()
        if not value:
            raise ui.UserError("studentclap.models is not set: give the export folder (models/export) or "
                               "hf://OWNER/NAME[@REV] in the studentclap: section of the beets config")
        value = str(value)
        # a hub reference goes to StudentClap as written; a folder is resolved as beets resolves paths
        return value if value.startswith("hf://") else os.fsdecode(self.config["models"].as_filename())

    def index_path(self) -> Path:
        if self.config["index"].get():
            return Path(self.config["index"].as_filename())
        return Path(beets_config.config_dir()) / "studentclap.db"

    def jobs(self) -> int:
        jobs = self.config["jobs"].get(int)
        if jobs < 1:
            raise ui.UserError(f"studentclap.jobs must be at least 1, got {jobs}")
        return jobs

    def clap(self) -> StudentClap:
        """The StudentClap of the configured export (loaded once per beets run)."""
        from student_clap import StudentClap

        if self._clap is None:
            threads = self.config["threads"].get()
            threads = int(threads) if threads else (1 if self.jobs() > 1 else None)
            try:
                self._clap = StudentClap(self.models(), threads=threads)
            except (ValueError, OSError) as exc:
                raise ui.UserError(f"studentclap.models: {exc}") from None
        return self._clap

    # ------------------------------------------------------------------ the index

    def check_model(self, db: Path) -> None:
        """Refuse an existing index of another model identity, as `student-clap` does."""
        from student_clap.index import read_index_head
        from student_clap.library import check_index_model
        from student_clap.spec import SearchError

        head = read_index_head(db)
        if head is None or not head[0].model_identity and not head[1]:
            return  # no index yet (or an empty one): building it is fine
        try:
            check_index_model(head[0], self.clap().models_dir, forceable=False)
        except SearchError as exc:
            raise ui.UserError(f"{exc}; or, for this beets library, `beet clap index --rebuild`") from None

    def index_items(self, items: Iterable[Item], *, rebuild: bool = False, progress: bool = False) -> BuildReport:
        """Embed the items' files into the index (new or changed files only) and record their ids.
        Returns the BuildReport; unreadable files are in its `failed`, not raised."""
        from student_clap.library import build_index, check_writable
        from student_clap.spec import SearchError, text_identity

        items = [i for i in items if i.id is not None]
        if not items:
            raise ui.UserError("no items to index")
        db = self.index_path()
        try:
            check_writable(db)
            if not rebuild:
                self.check_model(db)
            clap = self.clap()
            try:
                text_model = text_identity(clap.models_dir)
            except SearchError:
                text_model = ""
            keys = {item.id: item_key(item) for item in items}
            report = build_index(clap.audio, None, db, text_model=text_model, jobs=self.jobs(), progress=progress,
                                 files=sorted(set(keys.values())))
            self._record_items(db, keys, drop_all=bool(report.reset))
        except SearchError as exc:
            raise ui.UserError(str(exc)) from None
        self.update_ann(db)
        return report

    def update_ann(self, db: Path) -> None:
        """Bring the approximate search index beside `db` up to date (student_clap.ann: built or
        patched from ANN_MIN_SONGS songs, removed below), as `student-clap index` does after a write.
        Without usearch, or where it cannot be written, search stays exact (it is only slower)."""
        from student_clap.ann import update_ann
        from student_clap.spec import SearchError

        try:
            update_ann(db)
        except ImportError:
            pass
        except (OSError, SearchError) as exc:
            self._log.warning("approximate search index not updated: {}", exc)
        self._ann_stale = False

    def _writer(self, db: Path):
        """The index's writer for a change that needs no model (a removal, a move), or None when
        there is no index yet."""
        from student_clap.index import IndexWriter, read_index_head

        head = read_index_head(db)
        if head is None:
            return None
        idx = head[0]
        return IndexWriter(db, audio_model=idx.audio_model, text_model=idx.text_model, dim=idx.dim,
                           model_identity=idx.model_identity)

    def _record_items(self, db: Path, keys: dict[int, str], drop_all: bool) -> None:
        """Store item id -> path under the index's writer lock. The row of a file an item has moved
        away from (a `beet move`) is dropped when nothing is left at that path."""
        writer = self._writer(db)
        if writer is None:
            raise ui.UserError(f"{db}: not a student-clap index")
        with writer:
            con = writer.con
            con.execute("BEGIN IMMEDIATE")
            try:
                for statement in _ITEMS_DDL.split(";"):
                    con.execute(statement)
                if drop_all:  # the rows were dropped for another model: so are the ids
                    con.execute(f"DELETE FROM {ITEMS_TABLE}")
                old = {int(i): os.fsdecode(bytes(p)) for i, p in
                       con.execute(f"SELECT item_id, path FROM {ITEMS_TABLE}").fetchall()}
                con.executemany(f"INSERT OR REPLACE INTO {ITEMS_TABLE} (item_id, path) VALUES (?, ?)",
                                [(i, os.fsencode(p)) for i, p in keys.items()])
                still = {os.fsdecode(bytes(r[0])) for r in con.execute(f"SELECT path FROM {ITEMS_TABLE}")}
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            moved = {p for i, p in old.items() if i in keys and keys[i] != p}
            writer.forget(p for p in moved if p not in still and not os.path.exists(p))

    def items_index(self, lib: Library) -> tuple[Index, dict[str, list[int]]]:
        """The index restricted to this library's indexed items, checked against the models, and
        path -> item ids for its rows."""
        from student_clap.index import read_index
        from student_clap.library import check_index_model
        from student_clap.spec import SearchError

        clap = self.clap()  # a configuration error first, then the index's
        db = self.index_path()
        if not db.exists():
            raise ui.UserError(f"{db}: no index yet; run `beet clap index`")
        try:
            index = read_index(db)
            check_index_model(index, clap.models_dir, forceable=False)
        except SearchError as exc:
            raise ui.UserError(f"{exc}; or, for this beets library, `beet clap index --rebuild`"
                               if "was built" in str(exc) else str(exc)) from None
        by_path = self._library_paths(lib, db)
        rows = [i for i, p in enumerate(index.paths) if p in by_path]
        if not rows:
            raise ui.UserError(f"{db}: no items of this library are indexed yet; run `beet clap index`")
        index = replace(index, paths=[index.paths[i] for i in rows], vectors=index.vectors[rows],
                        n_segments=[], notes=[], failed=[])
        return index, by_path

    # ------------------------------------------------------------------ listeners

    def item_imported(self, lib: Library, item: Item) -> None:
        self._embed_imported([item])

    def album_imported(self, lib: Library, album: Album) -> None:
        self._embed_imported(list(album.items()))

    def item_removed(self, item: Item) -> None:
        """An item left the library (`beet remove`, with or without its file): its row leaves the
        index, unless another item of the map names the same file."""
        self._follow(item, lambda writer, mapped, shared: self._drop(writer, item, mapped, shared))

    def item_moved(self, item: Item, source: bytes, destination: bytes) -> None:
        """beets moved the item's file: its row re-keyed to the new path, nothing embedded again."""
        self._follow(item, lambda writer, mapped, shared: self._rekey(writer, item, mapped, shared,
                                                                      destination, keep_old=False))

    def item_copied(self, item: Item, source: bytes, destination: bytes) -> None:
        """beets copied (or linked) the item's file and the item now names the copy: the copy gets
        the row's vector under its own path; the source's row stays (the file is still there)."""
        self._follow(item, lambda writer, mapped, shared: self._rekey(writer, item, mapped, shared,
                                                                      destination, keep_old=True))

    def _follow(self, item: Item, change) -> None:
        """Apply `change(writer, mapped_path, shared)` to the index under its writer's lock (`shared(path)`:
        whether another item's id maps to that file too); no index (or no row for the item) leaves nothing to do. A failure is a warning: the
        beets command has already done its part, and `beet clap index` repairs the index."""
        from student_clap.spec import SearchError

        db = self.index_path()
        if item.id is None or not db.exists():
            return
        try:
            writer = self._writer(db)
            if writer is None:
                return
            with writer:
                con = writer.con
                con.execute(_ITEMS_DDL.split(";")[0])
                row = con.execute(f"SELECT path FROM {ITEMS_TABLE} WHERE item_id = ?", (item.id,)).fetchone()
                mapped = os.fsdecode(bytes(row[0])) if row else None

                def shared(path: str) -> bool:
                    return con.execute(f"SELECT 1 FROM {ITEMS_TABLE} WHERE path = ? AND item_id <> ? LIMIT 1",
                                       (os.fsencode(path), item.id)).fetchone() is not None

                if change(writer, mapped, shared):
                    self._ann_stale = True
        except (SearchError, OSError, sqlite3.Error) as exc:
            self._log.warning("{}: index not updated for {}: {}", db, os.fsdecode(item.path), exc)

    @staticmethod
    def _drop(writer, item: Item, mapped: str | None, shared) -> bool:
        with writer._transaction():
            writer.con.execute(f"DELETE FROM {ITEMS_TABLE} WHERE item_id = ?", (item.id,))
        paths = {p for p in (mapped, item_key(item)) if p is not None and not shared(p)}
        return writer.forget(paths) > 0 or mapped is not None

    @staticmethod
    def _rekey(writer, item: Item, mapped: str | None, shared, destination: bytes, keep_old: bool) -> bool:
        from student_clap.embed import file_stamp
        from student_clap.tools import index_key

        old = mapped or item_key(item)
        keep_old = keep_old or shared(old)  # another item still names the source
        new = index_key(os.fsdecode(destination))
        stamp = file_stamp(new)
        row = writer.con.execute("SELECT size FROM tracks WHERE path = ?", (os.fsencode(old),)).fetchone()
        if row is None:
            return False
        if row[0] != stamp[0]:  # not the file that was embedded: embedded again by the next `clap index`
            writer.forget([] if keep_old else [old])
            moved = False
        else:
            moved = writer.move(old, new, stamp, keep_old=keep_old)
        if moved or mapped is not None:
            with writer._transaction():
                if moved:
                    writer.con.execute(f"INSERT OR REPLACE INTO {ITEMS_TABLE} (item_id, path) VALUES (?, ?)",
                                       (item.id, os.fsencode(new)))
                else:
                    writer.con.execute(f"DELETE FROM {ITEMS_TABLE} WHERE item_id = ?", (item.id,))
        return True

    def cli_exit(self, lib: Library) -> None:
        """Once per beets command: the approximate index patched for every removal and move of it
        (patching costs a read and a write of the whole HNSW file, so not once per item)."""
        if self._ann_stale:
            self.update_ann(self.index_path())

    def _embed_imported(self, items: Sequence[Item]) -> None:
        try:
            report = self.index_items(items)
        except ui.UserError as exc:  # an import goes on without its embeddings; `beet clap index` adds them
            self._log.warning("not embedded: {}", exc)
            return
        for path, reason in report.failed:
            self._log.warning("not embedded: {}: {}", path, reason)
        self._log.info("embedded {} item(s), {} already indexed", report.embedded, report.reused)

    # ------------------------------------------------------------------ commands

    def commands(self) -> list[ui.Subcommand]:
        cmd = ui.Subcommand("clap", help="music search with Student CLAP: index, search, similar, duplicates",
                            parser=None)
        cmd.parser.usage = ("%prog index [QUERY] [--rebuild]\n       %prog search TEXT [-k N]\n"
                            "       %prog similar QUERY [-k N]\n       %prog duplicates [calibrate] [--threshold T]")
        cmd.parser.add_option("-k", type="int", default=10, help="items listed (default: %default)")
        cmd.parser.add_option("--rebuild", action="store_true",
                              help="index: drop an index of other models and embed the items again")
        cmd.parser.add_option("--threshold", type="float", default=None,
                              help="duplicates: centred cosine at or above which two items are copies "
                                   "(default: the calibrated one)")
        cmd.parser.add_option("--songs", type="int", default=20, help="duplicates calibrate: songs to make copies of")
        cmd.parser.add_format_option(target="item")
        cmd.func = self.run
        return [cmd]

    def run(self, lib: Library, opts: optparse.Values, args: list[str]) -> None:
        if not args or args[0] not in ACTIONS:
            raise ui.UserError(f"beet clap: give one of {', '.join(ACTIONS)}")
        action, rest = args[0], args[1:]
        if opts.k < 1:
            raise ui.UserError(f"-k must be at least 1, got {opts.k}")
        if action == "index":
            self.cmd_index(lib, rest, opts.rebuild)
        elif action == "search":
            if not rest:
                raise ui.UserError("beet clap search: give the text to search for")
            self.cmd_search(lib, " ".join(rest), opts.k)
        elif action == "similar":
            self.cmd_similar(lib, rest, opts.k)
        else:
            self.cmd_duplicates(lib, rest, opts.threshold, opts.songs)

    def cmd_index(self, lib: Library, query: list[str], rebuild: bool) -> None:
        from student_clap.library import report_lines

        items = list(lib.items(query))
        report = self.index_items(items, rebuild=rebuild, progress=True)
        for line in report_lines(report.failed, report.notes):
            ui.print_(line)
        ui.print_(f"{self.index_path()}: {len(items)} item(s): embedded {report.embedded}, unchanged {report.reused}, "
                  f"skipped {len(report.failed)}")

    @staticmethod
    def _items(lib: Library, ids: Iterable[int]) -> list[Item]:
        return [item for item in map(lib.get_item, ids) if item is not None]

    def _print_hits(self, lib: Library, hits: Sequence[tuple[str, float]], by_path: dict[str, list[int]],
                    indent: str = "") -> None:
        for path, score in hits:
            for item in self._items(lib, by_path.get(path, [])):
                ui.print_(f"{indent}{score:+.4f}  {format(item)}")

    def cmd_search(self, lib: Library, text: str, k: int) -> None:
        from student_clap.embed import check_query
        from student_clap.spec import SearchError

        try:
            text = check_query(text)
            found = self._search_large(lib, text, k)
        except SearchError as exc:
            raise ui.UserError(str(exc)) from None
        if found is not None:
            self._print_hits(lib, *found)
            return
        index, by_path = self.items_index(lib)
        try:
            hits = self.clap().search(text, index, k=k)
        except SearchError as exc:
            raise ui.UserError(str(exc)) from None
        self._print_hits(lib, hits, by_path)

    def _search_large(self, lib: Library, text: str, k: int) -> tuple[list[tuple[str, float]], dict[str, list[int]]] | None:
        """A text search the way `student-clap search` takes it for an index of ANN_MIN_SONGS songs and
        more (StudentClap.search on the file: its approximate index, no matrix read), the hits kept to
        this library's items; None when the exact search over the library's vectors is to run instead
        (a smaller index, or one shared with many songs outside the library)."""
        from student_clap import ann
        from student_clap.index import read_index_head
        from student_clap.library import check_index_model
        from student_clap.spec import SearchError

        clap = self.clap()
        db = self.index_path()
        head = read_index_head(db) if db.exists() else None
        if head is None or head[1] < ann.ANN_MIN_SONGS:
            return None
        try:
            check_index_model(head[0], clap.models_dir, forceable=False)
        except SearchError as exc:
            raise ui.UserError(f"{exc}; or, for this beets library, `beet clap index --rebuild`") from None
        by_path = self._library_paths(lib, db)
        try:
            con = _connect_ro(db)
            try:  # the library's songs in the index (the map's paths with a vector)
                ours = con.execute(f"SELECT COUNT(*) FROM tracks WHERE status = 'ok' AND path IN "
                                   f"(SELECT DISTINCT path FROM {ITEMS_TABLE})").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return None  # no item table yet: the exact path says so
        other = head[1] - ours
        if not ours or other > MAX_OTHER_SONGS:
            return None
        hits = [(p, s) for p, s in clap.search(text, db, k=k + other) if p in by_path][:k]
        if len(hits) < min(k, ours):
            return None  # the map names items no longer in the library: ask the exact search
        return hits, by_path

    def _library_paths(self, lib: Library, db: Path) -> dict[str, list[int]]:
        """Indexed path -> ids of this library's items (items the map names but the library no
        longer holds are left out)."""
        with lib.transaction() as tx:  # ids only: items are loaded for the hits alone
            present = {row[0] for row in tx.query("SELECT id FROM items")}
        by_path: dict[str, list[int]] = {}
        for item_id, path in read_item_map(db).items():
            if item_id in present:
                by_path.setdefault(path, []).append(item_id)
        return by_path

    def cmd_similar(self, lib: Library, query: list[str], k: int) -> None:
        from student_clap.spec import SearchError

        item = lib.items(query).get()
        if item is None:
            raise ui.UserError(f"no item matches {' '.join(query) or 'the empty query'}")
        index, by_path = self.items_index(lib)
        # the item's row under the path it was indexed at (it may have moved since); an item not
        # indexed yet is embedded from its file
        path = next((p for p, ids in by_path.items() if item.id in ids), item_key(item))
        try:
            hits = self.clap().similar(path, index, k=k)
        except SearchError as exc:
            raise ui.UserError(str(exc)) from None
        by_path.setdefault(hits[0][0], [item.id])
        self._print_hits(lib, hits, by_path)

    def cmd_duplicates(self, lib: Library, rest: list[str], threshold: float | None, songs: int) -> None:
        from student_clap.spec import SearchError
        from student_clap.tools import calibrate, duplicate_groups, store_calibration, stored_threshold

        if rest not in ([], ["calibrate"]):
            raise ui.UserError(f"beet clap duplicates: unexpected {' '.join(rest)} (only `calibrate`)")
        index, by_path = self.items_index(lib)
        db = self.index_path()
        try:
            if rest:
                cal = calibrate(index, self.clap().embed_file, songs=songs)
                store_calibration(db, cal)
                for line in cal.lines():
                    ui.print_(line)
                ui.print_(f"stored in {db}; `beet clap duplicates` uses it")
                return
            stored = stored_threshold(index)
            if threshold is None and stored is None:
                raise SearchError(f"{db}: no duplicate threshold stored; run `beet clap duplicates calibrate` "
                                  "(or `student-clap duplicates calibrate`) first, or pass --threshold")
            threshold = threshold if threshold is not None else stored[0]
            groups = duplicate_groups(index, threshold, stored[1] if stored else None)
        except SearchError as exc:
            raise ui.UserError(str(exc)) from None
        for n, group in enumerate(groups, start=1):
            ui.print_(f"group {n} ({len(group)} items)")
            self._print_hits(lib, group, by_path, indent="  ")
        ui.print_(f"{len(groups)} group(s) at centred cosine >= {threshold:.5f}")
