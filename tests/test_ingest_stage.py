"""The ingest stage end to end: the embedded demo, duplicates, the split, downloads, bad input."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from pipeline.stages.ingest import artist_group, download_url, ingest, split_of
from pipeline.data.licenses import normalize_license
from pipeline.data.manifest import read_manifest
from pipeline.data.sources import SOURCES, fma, jamendo, wikimedia
from pipeline.data.sources.base import Entry
from pipeline.params import IngestParams, SourceParams, load_params
from pipeline.stages import ingest as stage
from repo_params import repo_params, section

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "ingest"
ARGS = argparse.Namespace(shard=None, resume=False)
PARSERS = {"fma": fma.parse_list, "jamendo": jamendo.parse_list, "wikimedia": wikimedia.parse_list}


def _audit(path: Path = Path("data/licenses/audit.json")) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["entries"]


@pytest.fixture()
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    audio = REPO / "data" / "demo" / "audio"
    if not audio.is_dir():
        pytest.skip(f"{audio} not generated (student-clap demo synth)")
    shutil.copytree(REPO / "data" / "sources", tmp_path / "data" / "sources")
    shutil.copytree(audio, tmp_path / "data" / "demo" / "audio")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_ingest(demo_dir: Path) -> None:
    params = load_params("params.yaml")
    assert stage.run(params, ARGS) == 0
    rows = read_manifest("data/manifest.jsonl")
    ids = {r["track_id"] for r in rows}
    # every demo entry with a file except the CC BY-NC one; the corrupt file is the mels stage's business
    assert len(rows) == 36
    assert "fma:Neon_Parade/Demo/Cash_Song" not in ids and "wikimedia:Lost_Recording.ogg" not in ids
    assert "jamendo:1006" in ids
    assert all(Path(r["audio_path"]).is_file() for r in rows)
    assert {r["source"] for r in rows} == {"fma", "jamendo", "wikimedia"}

    audit = {(a["track_id"]): a for a in _audit()}
    assert len(audit) == 38
    nc = audit["fma:Neon_Parade/Demo/Cash_Song"]
    assert (nc["status"], nc["reason"], nc["license"]) == ("excluded", "licence not allowed", "CC-BY-NC-4.0")
    lost = audit["wikimedia:Lost_Recording.ogg"]
    assert (lost["status"], lost["reason"]) == ("excluded", "audio missing")
    assert lost["file"].endswith("WIKIMEDIA_SONGS_LICENSE.md") and lost["line"] == 11

    # validation split: non-empty, several sources, no artist on both sides
    val = [r for r in rows if r["split"] == "val"]
    assert 0 < len(val) < len(rows)
    assert len({r["source"] for r in val}) >= 2
    sides: dict[str, set[str]] = {}
    for r in rows:
        sides.setdefault(artist_group(r["artist"], r["track_id"]), set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())

    report = json.loads(Path("models/report/ingest.json").read_text())
    # 38 list entries + 24 rows of the demo's MTG-Jamendo tag TSV, which merge into their list entries
    assert report["included"] == 36 and report["entries"] == 62
    assert report["excluded"]["licence_not_allowed"] == 1 and report["excluded"]["audio_missing"] == 1
    assert report["excluded"]["malformed"] == 0 and report["excluded"]["duplicate"] == 24
    by_id = {r["track_id"]: r for r in rows}
    assert by_id["jamendo:1001"]["tags"] == [
        "instrument---piano", "instrument---drums", "mood/theme---slow", "mood/theme---sad"]
    assert report["included_per_source"] == {"fma": 5, "jamendo": 25, "wikimedia": 6}
    counts = json.loads(Path("data/licenses/audit.json").read_text())["counts"]
    assert counts["sources"]["fma"]["excluded"]["licence not allowed"] == 1
    assert counts["licenses"]["CC-BY-4.0"] == 12
    assert report["train"] + report["val"] == 36

    # attribution files list exactly the included tracks and parse back
    for source, song_source in SOURCES.items():
        parsed = PARSERS[source](Path("data/licenses") / song_source.attribution_file)
        assert parsed.problems == []
        mine = [r for r in rows if r["source"] == source]
        assert [e.track_id for e in parsed.entries] == [r["track_id"] for r in mine]
        assert [normalize_license(e.license_text) for e in parsed.entries] == [r["license"] for r in mine]


def test_second_run_is_identical(demo_dir: Path) -> None:
    params = load_params("params.yaml")
    stage.run(params, ARGS)
    first = Path("data/manifest.jsonl").read_bytes()
    stage.run(params, ARGS)
    assert Path("data/manifest.jsonl").read_bytes() == first


def test_split_is_artist_disjoint_stable_and_near_ratio() -> None:
    groups = [artist_group(f"Artist {i}", f"x:{i}") for i in range(2000)]
    sides = [split_of(g, 0.25, "salt") for g in groups]
    share = sides.count("val") / len(sides)
    assert 0.22 < share < 0.28
    # case/spacing variants of one artist land together
    assert artist_group("  Kettle   LANE ", "a:1") == artist_group("Kettle Lane", "b:2")
    # no artist (or a placeholder such as Commons' "Unknown author"): each track is its own group
    assert artist_group(None, "a:1") != artist_group(None, "a:2")
    assert artist_group("Unknown author", "a:1") != artist_group("unknown  AUTHOR", "a:2")
    # another salt reshuffles
    assert [split_of(g, 0.25, "other") for g in groups] != sides
    # stable: the decision for one artist does not depend on who else is there
    assert [split_of(g, 0.25, "salt") for g in groups[:10]] == sides[:10]


def _params(sources: dict[str, SourceParams], **kw) -> IngestParams:
    return dataclasses.replace(section("ingest"), sources=sources, val_ratio=kw.pop("val_ratio", 0.25), split_salt="t", **kw)


def _touch(path: Path, data: bytes = b"audio") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_duplicates_across_lists_and_metadata_merge(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    for rel in ("82/382.mp3", "48/948.mp3", "50/950.mp3", "39/11839.mp3"):
        _touch(root / rel)
    lic = str(FIX / "native" / "audio_licenses.txt")
    sp = section(
        "ingest.sources.fma", lists=[lic],
        metadata=[str(FIX / "native" / "autotagging_instrument.tsv"), str(FIX / "native" / "autotagging_moodtheme.tsv")],
        licenses_file=lic,
        audio_root=str(root),
    )
    rows, outcomes, report = ingest(_params({"jamendo": sp}, policy=section("ingest.policy", allow_by_sa=True)), progress=False)
    by_id = {r["track_id"]: r for r in rows}
    assert set(by_id) == {"jamendo:948", "jamendo:950"}
    assert by_id["jamendo:948"]["tags"] == ["instrument---synthesizer", "mood/theme---background"]
    assert by_id["jamendo:948"]["duration"] == 212.7 and by_id["jamendo:948"]["artist"] == "Northern Static"
    assert by_id["jamendo:948"]["license"] == "CC-BY-3.0" and by_id["jamendo:950"]["license"] == "CC-BY-SA-3.0"
    assert report["excluded"]["duplicate"] == 5  # 3 in the instrument TSV, 2 in the mood TSV
    assert report["excluded"]["licence not allowed"] == 1  # 382: BY-NC-SA
    assert report["excluded"]["unknown licence"] == 1  # 11839: not in audio_licenses.txt
    dup = next(o for o in outcomes if o.reason == "duplicate")
    assert "audio_licenses.txt" in dup.detail


def test_same_audio_file_under_two_ids_is_a_duplicate(tmp_path: Path) -> None:
    lst = tmp_path / "W.md"
    lst.write_text(
        "| FILENAME | URL | LICENSE |\n| --- | --- | --- |\n"
        "| Tune.opus | https://commons.wikimedia.org/wiki/File:Tune.ogg | [CC0](https://creativecommons.org/publicdomain/zero/1.0/) |\n"
        "| Tune.opus | https://commons.wikimedia.org/wiki/File:Tune_(copy).ogg | [CC0](https://creativecommons.org/publicdomain/zero/1.0/) |\n",
        encoding="utf-8",
    )
    _touch(tmp_path / "audio" / "Tune.opus")
    rows, outcomes, _ = ingest(_params({"wikimedia": section("ingest.sources.fma", lists=[str(lst)], audio_root=str(tmp_path / "audio"))}), progress=False)
    assert [r["track_id"] for r in rows] == ["wikimedia:Tune.ogg"]
    dup = next(o for o in outcomes if o.track_id == "wikimedia:Tune_(copy).ogg")
    assert dup.reason == "duplicate" and "same audio file" in dup.detail


def test_bad_input_is_audited_with_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sources = {
        name: section("ingest.sources.fma", lists=[str(FIX / "odd" / f"{prefix}_SONGS_LICENSE.md")], audio_root=str(tmp_path / name))
        for name, prefix in (("fma", "FMA"), ("jamendo", "MTG_JAMENDO"), ("wikimedia", "WIKIMEDIA"))
    }
    _touch(tmp_path / "fma" / "Cafe_Nights.ogg")  # BY-SA: excluded by default
    _touch(tmp_path / "jamendo" / "14" / "5014.low.mp3")  # public domain, low-bitrate copy
    _touch(tmp_path / "wikimedia" / "Café_Tune.opus")  # BY 2.5 nl port

    assert stage.run(dataclasses.replace(repo_params(), ingest=_params(sources)), ARGS) == 0
    rows = read_manifest("data/manifest.jsonl")
    assert {r["track_id"] for r in rows} == {"jamendo:5014", "wikimedia:Café_Tune.ogg"}
    assert next(r for r in rows if r["track_id"] == "jamendo:5014")["audio_path"].endswith("14/5014.low.mp3")
    audit = _audit()
    malformed = [(Path(a["file"]).name, a["line"]) for a in audit if a["reason"] == "malformed"]
    assert ("FMA_SONGS_LICENSE.md", 7) in malformed and ("WIKIMEDIA_SONGS_LICENSE.md", 8) in malformed
    assert ("MTG_JAMENDO_SONGS_LICENSE.md", 14) in malformed
    reasons = {a["track_id"]: a["reason"] for a in audit if a["track_id"]}
    assert reasons["fma:Ensemble_Zoe/Live/Cafe_Nights"] == "licence not allowed"
    assert reasons["fma:No_License_Line/X/Bare"] == "unknown licence"
    assert reasons["jamendo:5013"] == "audio missing"
    cafe = next(a for a in audit if a["track_id"] == "fma:Ensemble_Zoe/Live/Cafe_Nights")
    assert any("UTF-8" in n for n in cafe["notes"])
    report = json.loads(Path("models/report/ingest.json").read_text())
    assert report["excluded"]["malformed"] == len(malformed) and report["included"] == 2
    counts = json.loads(Path("data/licenses/audit.json").read_text())["counts"]
    assert counts["sources"]["wikimedia"]["excluded"]["unknown licence"] == 1  # GFDL


def test_missing_list_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:

    monkeypatch.chdir(tmp_path)
    p = _params({"fma": section("ingest.sources.fma", lists=["nope/FMA.md"], audio_root="a")})
    assert stage.run(dataclasses.replace(repo_params(), ingest=p), ARGS) == 2
    assert "ingest.sources.fma.lists: nope/FMA.md not found" in caplog.text


def test_unknown_source_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    p = _params({"ccmixter": section("ingest.sources.fma", lists=[], audio_root="a")})
    assert stage.run(dataclasses.replace(repo_params(), ingest=p), ARGS) == 2
    assert "ingest.sources.ccmixter: unknown source (known: fma, jamendo, wikimedia)" in caplog.text


def test_download_url_choice() -> None:
    e = Entry(source="jamendo", track_id="jamendo:1", file="f", line=1, download_path="01/1.mp3")
    assert download_url("jamendo", section("ingest.sources.fma"), e, {"download_base_url": "https://cdn.example/audio"}) == "https://cdn.example/audio/01/1.mp3"
    assert download_url("jamendo", section("ingest.sources.fma", download_base_url="http://127.0.0.1:9/m/"), e, {"download_base_url": "x"}) == "http://127.0.0.1:9/m/01/1.mp3"
    w = Entry(source="wikimedia", track_id="wikimedia:A b.ogg", file="f", line=1, download_path="Café tune.ogg")
    assert download_url("wikimedia", section("ingest.sources.fma"), w, {}) == "https://commons.wikimedia.org/wiki/Special:FilePath/Caf%C3%A9%20tune.ogg"
    w.download_url = "https://upload.wikimedia.org/x/Caf%C3%A9.ogg"
    assert download_url("wikimedia", section("ingest.sources.fma"), w, {}) == w.download_url
    assert download_url("fma", section("ingest.sources.fma"), Entry(source="fma", track_id="fma:x", file="f", line=1, download_path="x.mp3"), {}) is None


class _Files(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = self.server.files.get(unquote(self.path))
        self.send_response(200 if body is not None else 404)
        body = body if body is not None else b"missing"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_download_missing_audio_from_local_server(tmp_path: Path) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    srv.daemon_threads = True
    srv.files = {
        "/mtg/91/1091.mp3": b"a" * 3000,
        "/mtg/92/1092.mp3": b"b" * 2000,
        "/mtg/93/1093.mp3": b"c" * 1000,
        "/commons/Trnecek_op_77.ogg": b"d" * 500,
    }  # 07/6007.mp3 is absent: 404
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    sums = tmp_path / "audio_sha256_tracks.txt"  # MTG-Jamendo's published checksum format
    sums.write_text(f"{hashlib.sha256(b'a' * 3000).hexdigest()} 91/1091.mp3\n{'0' * 64} 93/1093.mp3\n")
    try:
        sources = {
            "jamendo": section("ingest.sources.fma", lists=[str(FIX / "seed" / "MTG_JAMENDO_SONGS_LICENSE.md")], metadata=[str(sums)],
                                    audio_root=str(tmp_path / "j"), download_base_url=f"{base}/mtg"),
            "wikimedia": section("ingest.sources.fma", lists=[str(FIX / "seed" / "WIKIMEDIA_SONGS_LICENSE.md")], audio_root=str(tmp_path / "w"), download_base_url=f"{base}/commons"),
        }
        p = _params(sources, download=True)
        p.downloads.retries, p.downloads.backoff_seconds, p.downloads.timeout_seconds = 1, 0.01, 5.0
        rows, outcomes, report = ingest(p, progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    by_id = {r["track_id"]: r for r in rows}
    assert set(by_id) == {"jamendo:1091", "jamendo:1092", "wikimedia:Trnecek_op_77.ogg"}
    bad = next(o for o in outcomes if o.track_id == "jamendo:1093")  # served bytes do not match the checksum
    assert bad.reason == "audio missing" and "sha256" in bad.detail
    assert not (tmp_path / "j" / "93" / "1093.mp3").exists()
    assert (tmp_path / "j" / "91" / "1091.mp3").read_bytes() == b"a" * 3000
    assert by_id["jamendo:1091"]["sha256"] == hashlib.sha256(b"a" * 3000).hexdigest()
    assert by_id["wikimedia:Trnecek_op_77.ogg"]["audio_path"].endswith("w/Trnecek_op_77.ogg")
    failed = next(o for o in outcomes if o.track_id == "jamendo:6007")
    assert failed.reason == "audio missing" and "404" in failed.detail
    # only allowed tracks are fetched: the public-domain / BY rows without a server file stay missing
    assert report["excluded"]["audio missing"] == 2 + 4  # 6007, 1093 + four Wikimedia rows the server lacks


def test_fma_list_and_metadata_csv_meet_by_page_url(tmp_path: Path) -> None:
    lst = tmp_path / "FMA.md"
    lst.write_text(
        "SONG: Field Test - Rooftops, at Night\n"
        "LINK: https://freemusicarchive.org/music/Field_Test/Demo_Album/Rooftops_at_Night/\n"
        "LICENSE LINK: https://creativecommons.org/licenses/by/3.0/us/\n",
        encoding="utf-8",
    )
    _touch(tmp_path / "audio" / "000" / "000140.mp3")  # FMA's own layout, known from the CSV
    sp = section("ingest.sources.fma", lists=[str(lst)], metadata=[str(FIX / "native" / "raw_tracks.csv")], audio_root=str(tmp_path / "audio"))
    rows, outcomes, report = ingest(_params({"fma": sp}), progress=False)
    (row,) = rows
    assert row["track_id"] == "fma:Field_Test/Demo_Album/Rooftops_at_Night"  # the list entry came first
    assert row["duration"] == 3725.0 and row["audio_path"].endswith("000/000140.mp3")  # merged from the CSV
    dup = next(o for o in outcomes if o.track_id == "fma:140")
    assert dup.reason == "duplicate" and "FMA.md:1" in dup.detail
    assert report["excluded"]["licence not allowed"] == 1  # fma:2, BY-NC-SA
