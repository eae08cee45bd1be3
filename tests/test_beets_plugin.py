"""The beets plugin `studentclap` (beetsplug/studentclap.py), run in-process on a throw-away beets
library: `beet clap index/search/similar/duplicates` and the import listener, against a tiny export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import beets
import beets.plugins
import beets.ui
import numpy as np
import pytest
import soundfile as sf
from beets.library import Item, Library

from student_clap import StudentClap
from student_clap.index import read_index

SR = 44100


def _song(seed: int, seconds: float = 6.0, lead_silence: float = 0.0) -> np.ndarray:
    """A distinct recording: its own chord, fast tremolo and noise colour (steady over a window, so
    a copy is the same music to an untrained student too)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in 110 * 2 ** (rng.integers(0, 36, size=3) / 12))
    x *= (1 + np.sin(2 * np.pi * rng.uniform(8, 16) * t)) / 2
    noise = np.cumsum(rng.standard_normal(t.size)) if seed % 2 else rng.standard_normal(t.size)
    x = 0.2 * x / 3 + rng.uniform(0.005, 0.05) * noise / np.abs(noise).max()
    pad = np.zeros(int(SR * lead_silence))
    return np.concatenate([pad, x, pad]).astype(np.float32)


@pytest.fixture(scope="module")
def export(tiny_export_builder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny export whose front-end ignores the level, as a trained student nearly does (so the
    calibrated threshold separates copies from distinct songs)."""
    return tiny_export_builder(tmp_path_factory.mktemp("beets_export") / "export", rate=16000, segment_seconds=1.0,
                               hop_seconds=0.5, decode_rate=24000, corpus=["calm piano", "loud drums"] * 5,
                               max_length=8, level_invariant=True)["export"]


@pytest.fixture(scope="module")
def other_export(export: Path, tmp_path_factory: pytest.TempPathFactory, another_identity) -> Path:
    """The same student files under another identity (distilled, say, from the LAION checkpoint)."""
    return another_identity(export, tmp_path_factory.mktemp("beets_other") / "export")


def _reset_beets() -> None:
    """Forget the global config and loaded plugins, so the next run reads config.yaml afresh."""
    beets.config.clear()
    beets.config._materialized = False
    beets.plugins._instances.clear()
    beets.plugins.BeetsPlugin.listeners.clear()
    beets.plugins.BeetsPlugin._raw_listeners.clear()


@pytest.fixture
def beet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export: Path):
    """A beets home in tmp_path (BEETSDIR) with the plugin enabled; `.run(*argv)` runs `beet ARGV`."""
    home = tmp_path / "beetsdir"
    home.mkdir()
    monkeypatch.setenv("BEETSDIR", str(home))
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = {"library": str(home / "library.db"), "directory": str(tmp_path / "music"),
                "plugins": ["studentclap"], "threaded": False, "ui": {"color": False},
                "create_backup_before_migrations": False,
                "studentclap": {"models": str(export), "auto": False, "jobs": 1}}

    def configure(**plugin: object) -> None:
        settings["studentclap"].update(plugin)
        (home / "config.yaml").write_text(json.dumps(settings))  # JSON is YAML

    def run(*argv: str) -> None:
        _reset_beets()
        beets.ui._raw_main(list(argv))

    def add(path: Path, title: str) -> Item:
        _reset_beets()
        beets.config.read()
        lib = Library(settings["library"], settings["directory"])
        try:
            item = Item.from_path(str(path)) if title != "broken" else Item(path=str(path))
            item.title = title
            lib.add(item)
            return item
        finally:
            lib._close()

    def move(item: Item, dest: Path) -> None:
        """What `beet move` does to an item: the file renamed, the item's path updated."""
        _reset_beets()
        beets.config.read()
        lib = Library(settings["library"], settings["directory"])
        try:
            stored = lib.get_item(item.id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            Path(stored.path.decode()).rename(dest)
            stored.path = str(dest)
            stored.store()
            item.path = stored.path
        finally:
            lib._close()

    def remove(item: Item) -> None:
        """`beet remove`: the item leaves the library, its file stays."""
        _reset_beets()
        beets.config.read()
        lib = Library(settings["library"], settings["directory"])
        try:
            lib.get_item(item.id).remove()
        finally:
            lib._close()

    configure()
    yield SimpleNamespace(run=run, configure=configure, add=add, move=move, remove=remove, home=home, db=home / "studentclap.db")
    _reset_beets()


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def _titled(line: str) -> tuple[float, str]:
    score, title = line.strip().split(maxsplit=1)
    return float(score), title


def test_index_search_similar_duplicates_print_beets_items(beet, export: Path, other_export: Path, tmp_path: Path,
                                                           capsys) -> None:
    from beetsplug.studentclap import item_key, read_item_map

    music = tmp_path / "songs"
    music.mkdir()
    items = {}
    for i in range(6):
        sf.write(music / f"s{i}.flac", _song(100 + i, lead_silence=0.5 if i % 2 else 0.0), SR)
        items[f"song{i}"] = beet.add(music / f"s{i}.flac", f"song{i}")
    # a planted transcode: the same recording as low-bitrate Ogg Vorbis
    sf.write(music / "s0-copy.ogg", sf.read(music / "s0.flac")[0], SR, format="OGG", subtype="VORBIS",
             compression_level=0.9)
    items["song0 transcode"] = beet.add(music / "s0-copy.ogg", "song0 transcode")
    (music / "broken.flac").write_bytes(b"not audio at all")
    items["broken"] = beet.add(music / "broken.flac", "broken")

    beet.run("clap", "index")
    out = capsys.readouterr().out
    assert "1 file(s) could not be used" in out and "broken.flac" in out
    assert "8 item(s): embedded 7, unchanged 0, skipped 1" in out
    index = read_index(beet.db)  # the default place: studentclap.db in beets' config folder
    assert sorted(index.paths) == sorted(item_key(it) for t, it in items.items() if t != "broken")
    assert index.model_identity == StudentClap(export).model_identity
    assert read_item_map(beet.db) == {it.id: item_key(it) for it in items.values()}

    beet.run("clap", "index", "title:song")  # resumable: nothing changed, nothing embedded
    assert "7 item(s): embedded 0, unchanged 7, skipped 0" in capsys.readouterr().out
    assert [Path(p).name for p, _ in read_index(beet.db).failed] == ["broken.flac"]  # other rows kept

    beet.move(items["song4"], music / "moved" / "s4.flac")  # found at its new path, the old row dropped
    beet.run("clap", "index", "title:song4")
    assert "1 item(s): embedded 1, unchanged 0" in capsys.readouterr().out
    assert sorted(read_index(beet.db).paths) == sorted(item_key(it) for t, it in items.items() if t != "broken")
    assert read_item_map(beet.db)[items["song4"].id] == item_key(items["song4"])

    beet.run("clap", "search", "calm piano", "-k", "3", "-f", "$title")
    hits = [_titled(line) for line in _lines(capsys)]
    by_path = {item_key(it): t for t, it in items.items()}
    expected = StudentClap(export).search("calm piano", beet.db, k=3)
    assert [t for _, t in hits] == [by_path[p] for p, _ in expected]
    assert [s for s, _ in hits] == pytest.approx([s for _, s in expected], abs=1e-4)

    beet.run("clap", "similar", "title:song2", "-k", "3", "-f", "$title")
    hits = [_titled(line) for line in _lines(capsys)]
    assert len(hits) == 3 and hits[0] == (1.0, "song2")
    beet.run("clap", "similar", "title:song0", "-k", "2", "-f", "$title")
    assert [t for _, t in map(_titled, _lines(capsys))] == ["song0", "song0 transcode"]

    with pytest.raises(beets.ui.UserError, match="duplicates calibrate"):
        beet.run("clap", "duplicates")
    beet.run("clap", "duplicates", "calibrate", "--songs", "3")
    assert "false-positive rate" in capsys.readouterr().out
    beet.run("clap", "duplicates", "-f", "$title")
    lines = _lines(capsys)
    assert lines[0].startswith("group 1 (2 items)") and lines[-1].startswith("1 group(s)")
    assert sorted(_titled(line)[1] for line in lines[1:-1]) == ["song0", "song0 transcode"]

    beet.remove(items["song5"])  # items no longer in the library are not listed
    beet.run("clap", "search", "calm piano", "-k", "10", "-f", "$title")
    assert sorted(_titled(line)[1] for line in _lines(capsys)) == sorted(set(items) - {"song5", "broken"})

    # an index built by another model is refused by every command, the index left as it was
    beet.configure(models=str(other_export))
    for argv in (["index"], ["search", "calm piano"], ["similar", "title:song1"], ["duplicates"],
                 ["duplicates", "calibrate"]):
        with pytest.raises(beets.ui.UserError, match="(?s)was built with model.*teacher=checkpoint.*beet clap index --rebuild"):
            beet.run("clap", *argv)
    assert read_index(beet.db).model_identity == StudentClap(export).model_identity
    beet.run("clap", "index", "--rebuild", "title:song1")  # drops the old rows, embeds what was asked
    assert "embedded 1, unchanged 0" in capsys.readouterr().out
    assert read_index(beet.db).paths == [item_key(items["song1"])]
    assert read_item_map(beet.db) == {items["song1"].id: item_key(items["song1"])}


def test_the_import_listener_embeds_new_items(beet, export: Path, tmp_path: Path, capsys) -> None:
    from beetsplug.studentclap import item_key, read_item_map

    album = tmp_path / "album"
    album.mkdir()
    for i in range(2):
        sf.write(album / f"{i + 1:02d}.flac", _song(200 + i, seconds=3.0), SR)
    beet.configure(models=None)
    with pytest.raises(beets.ui.UserError, match="studentclap.models is not set"):
        beet.run("clap", "search", "calm piano")
    beet.configure(models=str(export))
    with pytest.raises(beets.ui.UserError, match="no index yet; run `beet clap index`"):
        beet.run("clap", "search", "calm piano")
    beet.configure(auto=True)
    beet.run("import", "-A", "-C", "-W", "-q", str(album))  # as-is, files left in place

    _reset_beets()
    beets.config.read()
    lib = Library(str(beet.home / "library.db"), str(tmp_path / "music"))
    try:
        imported = {it.id: item_key(it) for it in lib.items()}
    finally:
        lib._close()
    assert len(imported) == 2
    assert read_item_map(beet.db) == imported
    assert sorted(read_index(beet.db).paths) == sorted(imported.values())

    beet.run("clap", "search", "loud drums", "-k", "5", "-f", "$path")
    assert sorted(_titled(line)[1] for line in _lines(capsys)) == sorted(imported.values())


def test_search_takes_the_approximate_index_and_follows_removes_and_moves(beet, export: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys) -> None:
    from beetsplug.studentclap import item_key, read_item_map
    from student_clap import ann
    from student_clap.index import read_index_head
    from student_clap.song import SongEmbedder

    monkeypatch.setattr(ann, "ANN_MIN_SONGS", 3)  # the approximate path from 3 songs on
    embedded = []  # every song embedded goes through the front-end's windows
    maps = SongEmbedder._maps
    monkeypatch.setattr(SongEmbedder, "_maps", lambda self, wave: embedded.append(1) or maps(self, wave))
    searched = []
    search_ann = ann.search_ann
    monkeypatch.setattr(ann, "search_ann", lambda *a: searched.append(a) or search_ann(*a))

    music = tmp_path / "songs"
    music.mkdir()
    items = {}
    for i in range(5):
        sf.write(music / f"s{i}.flac", _song(300 + i, seconds=3.0), SR)
        items[f"song{i}"] = beet.add(music / f"s{i}.flac", f"song{i}")
    beet.run("clap", "index")
    assert "embedded 5, unchanged 0" in capsys.readouterr().out and len(embedded) >= 5
    assert ann.ann_path(beet.db).is_file()

    def current() -> dict[str, str]:
        """indexed path -> title of the library's items now (beets may have moved their files)."""
        _reset_beets()
        beets.config.read()
        lib = Library(str(beet.home / "library.db"), str(tmp_path / "music"))
        try:
            return {item_key(it): it.title for it in lib.items()}
        finally:
            lib._close()

    def search() -> list[tuple[float, str]]:
        n = len(searched)
        beet.run("clap", "search", "calm piano", "-k", "10", "-f", "$title")
        assert len(searched) == n + 1  # through the approximate index
        hits = [_titled(line) for line in _lines(capsys)]
        # the same items and scores as the runtime's exact search over every stored vector, kept to
        # the library's items (a copied file's source keeps its row but is no item)
        titles = current()
        exact = [(p, s) for p, s in StudentClap(export).search("calm piano", read_index(beet.db), k=10) if p in titles]
        assert [t for _, t in hits] == [titles[p] for p, _ in exact]
        assert [s for s, _ in hits] == pytest.approx([s for _, s in exact], abs=1e-4)
        return hits

    assert len(search()) == 5

    beet.run("remove", "-f", "title:song1")  # out of the library, the file left in place
    assert (music / "s1.flac").exists()
    assert read_index_head(beet.db)[1] == 4
    assert items["song1"].id not in read_item_map(beet.db)
    assert item_key(items["song1"]) not in read_index(beet.db).paths
    assert json.loads(ann._state_path(beet.db).read_text())["count"] == 4  # patched when the command ended
    before = dict((t, s) for s, t in search())
    assert "song1" not in before and len(before) == 4

    n = len(embedded)
    beet.run("move", "title:song3")  # beets moves the file into its library folder
    moved = next(p for p, t in current().items() if t == "song3")
    assert Path(moved).is_file() and Path(moved).is_relative_to(tmp_path / "music") and not (music / "s3.flac").exists()
    assert moved in read_index(beet.db).paths and item_key(items["song3"]) not in read_index(beet.db).paths
    assert read_item_map(beet.db)[items["song3"].id] == moved
    after = dict((t, s) for s, t in search())
    assert after == pytest.approx(before, abs=1e-6)  # the same vector, found at its new path
    beet.run("clap", "index")
    assert "4 item(s): embedded 0, unchanged 4" in capsys.readouterr().out  # its stamp is the new file's
    assert len(embedded) == n  # nothing was embedded again

    beet.run("move", "-c", "title:song2")  # a copy: the item names the copy, the source file keeps its row
    copied = next(p for p, t in current().items() if t == "song2")
    assert copied != item_key(items["song2"]) and (music / "s2.flac").exists()
    assert {copied, item_key(items["song2"])} <= set(read_index(beet.db).paths)
    assert read_item_map(beet.db)[items["song2"].id] == copied
    assert dict((t, s) for s, t in search()) == pytest.approx(before, abs=1e-6)
    assert len(embedded) == n
