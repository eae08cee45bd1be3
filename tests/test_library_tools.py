"""The model identity an export writes and every command checks, "more like this song", and
duplicates at a threshold calibrated on copies of the library's own songs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf

from student_clap import StudentClap
from student_clap.cli import main as runtime_main
from student_clap.identity import METADATA_KEY
from student_clap.index import read_index
from student_clap.spec import SearchError
from student_clap.tools import index_key

SR = 44100


def _song(seed: int, seconds: float = 3.0, lead_silence: float = 0.0) -> np.ndarray:
    """Distinct recordings: each its own chord, tremolo, noise colour and level, some with silence
    at the ends (for the trimmed copies). Steady over a window (a fast tremolo), so a copy that
    starts a fraction of a window later is the same music to an untrained student too."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    x = np.zeros_like(t)
    for f in 110 * 2 ** (rng.integers(0, 36, size=3) / 12):
        x += np.sin(2 * np.pi * f * t + rng.uniform(0, 6))
    x *= (1 + np.sin(2 * np.pi * rng.uniform(8, 16) * t)) / 2
    noise = np.cumsum(rng.standard_normal(t.size)) if seed % 2 else rng.standard_normal(t.size)
    x = 0.2 * x / 3 + rng.uniform(0.005, 0.05) * noise / np.abs(noise).max()
    pad = np.zeros(int(SR * lead_silence))
    return np.concatenate([pad, x, pad]).astype(np.float32)


def _index(models: Path, folder: Path, db: Path) -> int:
    return runtime_main(["index", str(folder), "--out", str(db), "--models", str(models), "--jobs", "1"])


@pytest.fixture(scope="module")
def other_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory, another_identity) -> Path:
    """The same student files, distilled (say) from the LAION checkpoint: another identity."""
    return another_identity(tiny_export, tmp_path_factory.mktemp("other") / "export")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lib")
    for i in range(5):
        sf.write(root / f"song{i}.flac", _song(i, lead_silence=0.6 if i % 2 else 0.0), SR)
    return root


def test_export_writes_one_identity_to_json_onnx_metadata_and_card(tiny_export: Path, other_export: Path) -> None:
    spec = json.loads((tiny_export / "student_clap.json").read_text())
    identity = spec["model_identity"]
    for part in ("teacher=demo:053134b89e71b4bb", "audio=", "text=", "frontend=", "segment=1s", "hop=0.5s",
                 "pooling=mean-l2", "precision=fp32"):
        assert part in identity
    assert spec["teacher"]["demo"] is True and "demo teacher" in spec["teacher"]["note"]
    for name in ("audio_student_head.onnx", "text_student.onnx", "audio_student_frontend.onnx"):
        meta = ort.InferenceSession(str(tiny_export / name)).get_modelmeta().custom_metadata_map
        assert meta[METADATA_KEY] == identity
    other = json.loads((other_export / "student_clap.json").read_text())
    assert other["model_identity"] != identity and "teacher=checkpoint:abababab" in other["model_identity"]
    assert other["teacher"]["demo"] is False
    # the student part of the identity is over the files as exported: the same students give the same hashes
    assert identity.split()[2:] == other["model_identity"].split()[2:]

    from pipeline.models import model_card

    card = model_card.render(spec=spec, metrics={}, students={}, licences={}, licence_files=[], params={},
                             file_sizes={})
    assert identity in card and "Demo teacher (teacher.model.source demo)" in card


def test_a_folder_mixing_two_exports_is_refused(tiny_export: Path, other_export: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(other_export, mixed)
    shutil.copyfile(tiny_export / "student_clap.json", mixed / "student_clap.json")
    with pytest.raises(SearchError, match="mixes two exports"):
        StudentClap(mixed).embed_text("calm piano")


def test_every_command_refuses_an_index_of_another_identity_and_index_reembeds(
        tiny_export: Path, other_export: Path, library: Path, tmp_path: Path, capsys, caplog) -> None:
    db = tmp_path / "music.db"
    assert _index(tiny_export, library, db) == 0
    first = read_index(db)
    assert first.model_identity == StudentClap(tiny_export).model_identity and len(first.paths) == 5
    capsys.readouterr()
    assert runtime_main(["search", "calm piano", "--index", str(db), "--models", str(tiny_export)]) == 0
    err = capsys.readouterr().err
    assert err.count("offline demo teacher") == 1  # said once, not per hit

    song = str(library / "song0.flac")
    for argv in (["search", "calm piano"], ["similar", song], ["duplicates", "--threshold", "0.99"],
                 ["duplicates", "calibrate"]):
        caplog.clear()
        assert runtime_main([*argv, "--index", str(db), "--models", str(other_export)]) == 2, argv
        assert "was built with model" in caplog.text and "teacher=checkpoint" in caplog.text, argv
    with pytest.raises(SearchError, match="was built with model"):
        StudentClap(other_export).similar(song, db)
    with pytest.raises(SearchError, match="was built with model"):
        StudentClap(other_export).search("calm piano", db)

    report = StudentClap(other_export).build_index(library, db)
    assert report.embedded == 5 and report.reused == 0 and "dropped" in report.reset
    assert read_index(db).model_identity == StudentClap(other_export).model_identity
    capsys.readouterr()
    assert runtime_main(["search", "calm piano", "--index", str(db), "--models", str(other_export)]) == 0
    assert "demo teacher" not in capsys.readouterr().err


def test_similar_lists_the_song_first_from_its_stored_vector(tiny_export: Path, library: Path, tmp_path: Path,
                                                            capsys, monkeypatch) -> None:
    db = tmp_path / "music.db"
    assert _index(tiny_export, library, db) == 0
    index = read_index(db)
    clap = StudentClap(tiny_export)

    def no_decode(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(clap, "embed_file", no_decode)  # an indexed song is never decoded again
    for i in range(5):
        hits = clap.similar(library / f"song{i}.flac", index, k=5)
        assert hits[0] == (index_key(library / f"song{i}.flac"), 1.0)
        assert len(hits) == 5 and len({p for p, _ in hits}) == 5
        assert [s for _, s in hits[1:]] == sorted((s for _, s in hits[1:]), reverse=True)
    monkeypatch.undo()

    # a file outside the index is embedded first; its indexed twin is then its nearest song
    outside = tmp_path / "elsewhere" / "copy.flac"
    outside.parent.mkdir()
    shutil.copyfile(library / "song3.flac", outside)
    hits = clap.similar(outside, db, k=3)
    assert hits[0][0] == index_key(outside) and hits[1][0] == index_key(library / "song3.flac")
    assert hits[1][1] > 0.999

    capsys.readouterr()
    assert runtime_main(["similar", str(library / "song2.flac"), "--index", str(db), "--models", str(tiny_export),
                         "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[-1] == index_key(library / "song2.flac")
    assert runtime_main(["similar", str(tmp_path / "nope.flac"), "--index", str(db), "--models", str(tiny_export)]) == 2


@pytest.fixture(scope="module")
def level_export(tiny_export_builder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny export whose front-end ignores the level, as a trained student nearly does."""
    return tiny_export_builder(tmp_path_factory.mktemp("level") / "export", rate=16000, segment_seconds=1.0,
                               hop_seconds=0.5, decode_rate=24000, corpus=["calm piano", "loud drums"] * 5, max_length=8,
                               level_invariant=True)["export"]


def test_duplicates_at_the_calibrated_threshold_find_every_planted_copy_and_no_distinct_pair(
        level_export: Path, tmp_path: Path, capsys, caplog) -> None:
    from student_clap.tools import make_copies

    # The untrained test student is not shift-robust as a trained one is: the silence the trimmed
    # copies lose is a whole hop (0.5 s), so their windows stay aligned with the original's.
    tiny_export = level_export
    lib = tmp_path / "lib"
    lib.mkdir()
    planted = {}
    for i in range(8):
        sf.write(lib / f"s{i}.flac", _song(100 + i, seconds=6.0, lead_silence=0.5 if i % 2 else 0.0), SR)
    for i in (0, 3, 6):  # copies a library picks up: a transcode, a quieter one, one trimmed or padded
        made = make_copies(lib / f"s{i}.flac", tmp_path)
        group = {index_key(lib / f"s{i}.flac")}
        for variant, src in made.items():
            if variant in ("ogg-vorbis-low", "gain-6dB", "trim-silence"):
                dest = lib / f"copy{i}-{variant}{src.suffix}"
                shutil.move(src, dest)
                group.add(index_key(dest))
        planted[i] = group
    db = tmp_path / "music.db"
    assert _index(tiny_export, lib, db) == 0
    args = ["--index", str(db), "--models", str(tiny_export)]
    assert runtime_main(["duplicates", *args]) == 2  # no threshold yet: says how to get one
    assert "duplicates calibrate" in caplog.text
    assert runtime_main(["duplicates", "calibrate", *args, "--songs", "4"]) == 0
    out = capsys.readouterr().out
    assert "false-positive rate" in out and "false-negative rate" in out
    threshold = float(read_index(db).meta["duplicate_threshold"])
    assert 0 < threshold < 1

    assert runtime_main(["duplicates", *args]) == 0
    groups, current = [], None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("group"):
            current = set()
            groups.append(current)
        else:
            current.add(line.split(maxsplit=1)[1])
    assert sorted(map(sorted, groups)) == sorted(map(sorted, planted.values()))


def _synthetic_index(db: Path, models: Path, n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """An index of n clustered unit vectors under the export's identity (no audio needed to search)."""
    from student_clap.index import IndexWriter
    from student_clap.spec import audio_identity

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, 512))
    vecs = centres[rng.integers(0, 8, n)] + 0.8 * rng.standard_normal((n, 512))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    with IndexWriter(db, audio_model=audio_identity(models), text_model="", dim=512,
                     model_identity=StudentClap(models).model_identity) as w:
        for i, v in enumerate(vecs):
            w.put_song(f"/music/{start + i:05d}.flac", (1, 1), v, duration=1.0, n_segments=1, notes=[])
        w.touch()
    return vecs


def test_a_large_library_is_searched_through_the_approximate_index_kept_with_the_database(
        tiny_export: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import student_clap.ann as ann
    from student_clap.index import search

    monkeypatch.setattr(ann, "ANN_MIN_SONGS", 200)
    db = tmp_path / "big.db"
    _synthetic_index(db, tiny_export, 150)
    assert ann.update_ann(db) is False and not ann.ann_path(db).exists()  # small: exact search only
    _synthetic_index(db, tiny_export, 150, seed=1, start=150)
    assert ann.update_ann(db) is True and ann.ann_path(db).is_file()

    clap = StudentClap(tiny_export)
    q = clap.embed_text(["calm piano"])
    exact = search(read_index(db), q, 10)[0]
    approx = ann.search_ann(db, q, 10)[0]
    assert len({p for p, _ in exact} & {p for p, _ in approx}) >= 9
    assert approx[0] == pytest.approx(exact[0], abs=1e-5)  # rescored: exact cosines
    capsys.readouterr()
    assert runtime_main(["search", "calm piano", "--index", str(db), "--models", str(tiny_export), "-k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines] == [p for p, _ in approx[:5]]
    assert clap.search("calm piano", db, k=5) == approx[:5]  # the API takes the same path

    # the database changes: a search rebuilds the stale approximate index before using it
    before = ann.ann_path(db).stat().st_mtime_ns
    new = _synthetic_index(db, tiny_export, 20, seed=2, start=300)
    assert ann.search_ann(db, new[:1], 1)[0][0][0] == "/music/00300.flac"
    assert ann.ann_path(db).stat().st_mtime_ns != before
    assert json.loads(ann.ann_path(db).with_name("big.db.usearch.json").read_text())["count"] == 320



def test_the_approximate_index_is_patched_with_the_songs_that_changed_not_rebuilt(
        tiny_export: Path, tmp_path: Path, monkeypatch) -> None:
    import student_clap.ann as ann
    from student_clap.index import IndexWriter, read_index_head
    from usearch.index import Index as UIndex

    monkeypatch.setattr(ann, "ANN_MIN_SONGS", 200)
    db = tmp_path / "lib.db"
    _synthetic_index(db, tiny_export, 300)
    assert ann.update_ann(db) is True

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("built anew where a patch would do")

    monkeypatch.setattr(ann, "build_ann", no_rebuild)
    identity = read_index_head(db)[0]
    moved = np.random.default_rng(7).standard_normal(512).astype(np.float32)
    moved /= np.linalg.norm(moved)
    new = _synthetic_index(db, tiny_export, 10, seed=3, start=300)  # 10 songs added
    with IndexWriter(db, audio_model=identity.audio_model, text_model="", dim=512,
                     model_identity=identity.model_identity) as w:
        w.put_song("/music/00005.flac", (2, 2), moved, duration=1.0, n_segments=1, notes=[])  # re-embedded
        w.forget(["/music/00007.flac"])  # gone from the library
        w.touch()
    assert ann.update_ann(db) is True
    con = sqlite3.connect(db)
    ids = {r[0] for r in con.execute("SELECT track_id FROM vectors")}
    con.close()
    assert {int(k) for k in UIndex.restore(str(ann.ann_path(db))).keys} == ids  # the graph holds exactly the library
    assert ann.search_ann(db, moved[None], 1)[0][0] == ("/music/00005.flac", pytest.approx(1.0, abs=1e-3))
    assert ann.search_ann(db, new[3:4], 1)[0][0][0] == "/music/00303.flac"
    assert all(p != "/music/00007.flac" for p, _ in ann.search_ann(db, new[:1], 50)[0])

    # a writer that changed nothing: the state is brought up to date, the graph file left as it is
    graph = ann.ann_path(db).stat().st_mtime_ns
    with IndexWriter(db, audio_model=identity.audio_model, text_model="", dim=512,
                     model_identity=identity.model_identity) as w:
        w.touch()
    assert ann.update_ann(db) is True and ann.ann_path(db).stat().st_mtime_ns == graph
    con = sqlite3.connect(db)
    assert ann._stored_state(db)["updated"] == ann.db_state(con)["updated"]  # not stale: no rebuild on search
    con.close()

    # more than REBUILD_SHARE of the songs changed: built anew
    built = []
    monkeypatch.setattr(ann, "build_ann", lambda d: built.append(d))
    _synthetic_index(db, tiny_export, 100, seed=4, start=400)
    ann.update_ann(db)
    assert built == [db]


def test_the_song_count_kept_in_the_index_follows_every_change(tiny_export: Path, tmp_path: Path) -> None:
    import sqlite3

    from student_clap.index import IndexWriter, read_index_head

    db = tmp_path / "count.db"
    _synthetic_index(db, tiny_export, 30)

    def stored_and_counted() -> tuple[int, int]:
        con = sqlite3.connect(db)
        try:
            stored = int(con.execute("SELECT value FROM meta WHERE key = 'songs'").fetchone()[0])
            return stored, con.execute("SELECT COUNT(*) FROM tracks WHERE status = 'ok'").fetchone()[0]
        finally:
            con.close()

    assert stored_and_counted() == (30, 30)
    identity = read_index_head(db)[0]
    with IndexWriter(db, audio_model=identity.audio_model, text_model="", dim=512,
                     model_identity=identity.model_identity) as w:
        w.put_failure("/music/00003.flac", (2, 2), "silent")  # ok -> failed
        w.put_failure("/music/new.flac", (1, 1), "too short")  # a new failure: not a song
        w.forget(["/music/00004.flac", "/music/00005.flac", "/music/new.flac"])
        w.put_song("/music/00003.flac", (3, 3), np.ones(512, np.float32) / np.sqrt(512), duration=1.0,
                   n_segments=1, notes=[])  # failed -> ok
        w.put_song("/music/00006.flac", (3, 3), np.ones(512, np.float32) / np.sqrt(512), duration=1.0,
                   n_segments=1, notes=[])  # replaced: still one song
        assert stored_and_counted() == (28, 28)
        w.con.execute("UPDATE meta SET value = '5' WHERE key = 'songs'")  # a count gone wrong ...
    assert read_index_head(db)[1] == 5
    with IndexWriter(db, audio_model=identity.audio_model, text_model="", dim=512,
                     model_identity=identity.model_identity):
        pass
    assert stored_and_counted() == (28, 28) and read_index_head(db)[1] == 28  # ... is recounted by the next writer
    with IndexWriter(db, audio_model="another", text_model="", dim=512, model_identity="another"):
        assert stored_and_counted() == (0, 0)  # another model: every row dropped


def test_a_text_search_loads_nothing_of_the_audio_path(tiny_export: Path, tmp_path: Path) -> None:
    """`student-clap search` imports what a query needs (onnxruntime, tokenizers, numpy, SQLite):
    no decoders, resamplers or log-mel code, which cost a cold search time and memory."""
    import subprocess
    import sys

    from student_clap.query import TextEmbedder

    db = tmp_path / "lib.db"
    _synthetic_index(db, tiny_export, 20)
    code = ("import sys\nfrom student_clap.cli import main\n"
            f"assert main(['search', 'calm piano', '--index', {str(db)!r}, '--models', {str(tiny_export)!r}, '-k', '3']) == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('soundfile', 'soxr', 'av', 'scipy') or m in "
            "('student_clap.audio', 'student_clap.decode', 'student_clap.song', 'student_clap.embed', 'student_clap.logmel')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4 and proc.stdout.splitlines()[-1] == "[]"
    # the search's quick-start session (no graph optimisation) embeds as the optimised one does
    quick = TextEmbedder(tiny_export, threads=1, optimize=False).embed(["calm piano", "drums"])
    np.testing.assert_allclose(quick, TextEmbedder(tiny_export, threads=1).embed(["calm piano", "drums"]), atol=1e-5)


def test_a_moved_or_copied_file_keeps_its_vector_under_the_new_path(tiny_export: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import student_clap.ann as ann
    from student_clap.index import IndexWriter, read_index_head

    monkeypatch.setattr(ann, "ANN_MIN_SONGS", 200)
    db = tmp_path / "lib.db"
    vecs = _synthetic_index(db, tiny_export, 250)
    assert ann.update_ann(db) is True
    before = read_index(db)
    identity = read_index_head(db)[0]
    with IndexWriter(db, audio_model=identity.audio_model, text_model="", dim=512,
                     model_identity=identity.model_identity) as w:
        assert w.move("/music/00001.flac", "/moved/a.flac", (5, 6))
        assert w.move("/music/00002.flac", "/copies/b.flac", (7, 8), keep_old=True)
        assert w.move("/music/00003.flac", "/music/00004.flac", (1, 1))  # onto another song's path: replaces it
        assert not w.move("/music/missing.flac", "/moved/c.flac", (1, 1))

    def stamp(path: str) -> tuple[int, int]:
        con = sqlite3.connect(db)
        try:
            return con.execute("SELECT size, mtime_ns FROM tracks WHERE path = ?", (path.encode(),)).fetchone()
        finally:
            con.close()

    after = read_index(db)
    old = dict(zip(before.paths, before.vectors))
    new = dict(zip(after.paths, after.vectors))
    assert len(after.paths) == 250 and read_index_head(db)[1] == 250  # +1 copy, -1 replaced
    assert set(after.paths) == set(before.paths) - {"/music/00001.flac", "/music/00003.flac"} | {
        "/moved/a.flac", "/copies/b.flac"}
    np.testing.assert_array_equal(new["/moved/a.flac"], old["/music/00001.flac"])
    np.testing.assert_array_equal(new["/copies/b.flac"], old["/music/00002.flac"])
    np.testing.assert_array_equal(new["/music/00002.flac"], old["/music/00002.flac"])
    np.testing.assert_array_equal(new["/music/00004.flac"], old["/music/00003.flac"])
    assert stamp("/moved/a.flac") == (5, 6) and stamp("/copies/b.flac") == (7, 8)
    assert float(after.meta["updated"]) > float(before.meta["updated"])  # dependants see the change

    monkeypatch.setattr(ann, "build_ann", lambda *_a: pytest.fail("built anew where a patch would do"))
    assert ann.update_ann(db) is True
    assert ann.search_ann(db, vecs[1:2], 1)[0][0] == ("/moved/a.flac", pytest.approx(1.0, abs=1e-3))
    assert {p for p, _ in ann.search_ann(db, vecs[2:3], 2)[0]} == {"/music/00002.flac", "/copies/b.flac"}
    assert ann.search_ann(db, vecs[3:4], 1)[0][0][0] == "/music/00004.flac"
