"""Audio paths never leave their source's audio_root: traversal, absolute names, encoded
separators and symlinks are excluded with their reason, and downloads write only inside the root."""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.stages.ingest import ingest
from pipeline.data.sources.base import escapes_root
from pipeline.params import IngestParams
from pipeline.stages import ingest as stage
from repo_params import repo_params, section

CC0 = "[CC0](https://creativecommons.org/publicdomain/zero/1.0/)"
OUTSIDE = "path outside audio root"


def _wikimedia_list(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["| FILENAME | URL | LICENSE |", "| --- | --- | --- |"]
    lines += [f"| {name} | {url} | {CC0} |" for name, url in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _outcomes(p: IngestParams) -> tuple[list[dict], dict]:
    rows, outcomes, _ = ingest(p, progress=False)
    return rows, {o.track_id: o for o in outcomes}


@pytest.mark.parametrize("rel", ["../x.ogg", "a/../../x.ogg", "/etc/passwd", "..%2Fx.ogg", "..%252Fx.ogg",
                                 "a\\..\\..\\x.ogg", "C:/x.ogg", "a\x00b"])
def test_escapes_root_refuses(tmp_path: Path, rel: str) -> None:
    assert escapes_root(tmp_path, rel)


def test_escapes_root_allows_ordinary_names(tmp_path: Path) -> None:
    for rel in ("x.ogg", "07/6007.mp3", "100%_love.mp3", "a..b.ogg", "Café tune.ogg"):
        assert not escapes_root(tmp_path, rel), rel


def test_wikimedia_traversal_and_absolute_filenames_are_excluded(tmp_path: Path) -> None:
    root = tmp_path / "w"
    (root / "sub").mkdir(parents=True)
    (root / "Good.ogg").write_bytes(b"x")
    lst = _wikimedia_list(tmp_path / "W.md", [
        ("../../../../etc/passwd", "https://commons.wikimedia.org/wiki/File:Passwd.ogg"),
        ("/etc/hostname", "https://commons.wikimedia.org/wiki/File:Hostname.ogg"),
        ("Good.ogg", "https://commons.wikimedia.org/wiki/File:Good.ogg"),
    ])
    rows, by_id = _outcomes(dataclasses.replace(section("ingest"), sources={"wikimedia": section("ingest.sources.fma", lists=[str(lst)], audio_root=str(root))}))
    assert [r["track_id"] for r in rows] == ["wikimedia:Good.ogg"]
    for track, bad in (("wikimedia:Passwd.ogg", "../../../../etc/passwd"), ("wikimedia:Hostname.ogg", "/etc/hostname")):
        o = by_id[track]
        assert o.reason == OUTSIDE and bad in o.detail and o.audio_path is None


def test_fma_link_with_encoded_separators_is_excluded(tmp_path: Path) -> None:
    root = tmp_path / "fma"
    root.mkdir()
    target = tmp_path / "tmp"
    target.mkdir()
    (target / "x.mp3").write_bytes(b"x")  # exists, so only the path rule can keep it out
    lst = tmp_path / "FMA.md"
    lst.write_text(
        "SONG: A - B\nLINK: https://freemusicarchive.org/music/A/B/..%2F..%2Ftmp%2Fx\n"
        "LICENSE LINK: https://creativecommons.org/licenses/by/4.0/\n", encoding="utf-8",
    )
    rows, by_id = _outcomes(dataclasses.replace(section("ingest"), sources={"fma": section("ingest.sources.fma", lists=[str(lst)], audio_root=str(root / "a"))},
                                         download=True))
    assert rows == []
    (o,) = by_id.values()
    assert o.reason == OUTSIDE and "../../tmp/x" in o.detail


def test_symlink_leaving_the_root_is_excluded(tmp_path: Path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    secret = tmp_path / "secret.ogg"
    secret.write_bytes(b"x")
    (root / "Link.ogg").symlink_to(secret)
    lst = _wikimedia_list(tmp_path / "W.md", [("Link.ogg", "https://commons.wikimedia.org/wiki/File:Link.ogg")])
    rows, by_id = _outcomes(dataclasses.replace(section("ingest"), sources={"wikimedia": section("ingest.sources.fma", lists=[str(lst)], audio_root=str(root))}))
    assert rows == [] and by_id["wikimedia:Link.ogg"].reason == OUTSIDE
    assert by_id["wikimedia:Link.ogg"].detail == (f"'Link.ogg' is a symlink ({root / 'Link.ogg'} -> {secret}) "
                                                  f"pointing outside the audio root {root}")


class _Any(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        body = b"OggS" + b"\0" * 200
        self.send_response(200)
        self.send_header("Content-Type", "audio/ogg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_download_never_writes_outside_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Any)
    srv.daemon_threads, srv.hits = True, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    root = tmp_path / "a" / "w"
    lst = _wikimedia_list(tmp_path / "W.md", [
        ("", "https://commons.wikimedia.org/wiki/File:../../x.ogg"),
        ("", "https://commons.wikimedia.org/wiki/File:..%2F..%2Fy.ogg"),
        ("", "https://commons.wikimedia.org/wiki/File:Fine.ogg"),
    ])
    sp = section("ingest.sources.fma", lists=[str(lst)], audio_root=str(root),
                      download_base_url=f"http://127.0.0.1:{srv.server_address[1]}/commons")
    p = dataclasses.replace(section("ingest"), sources={"wikimedia": sp}, download=True)
    p.downloads.retries = 0
    try:
        assert stage.run(dataclasses.replace(repo_params(), ingest=p), argparse.Namespace(shard=None, resume=False)) == 0
    finally:
        srv.shutdown()
        srv.server_close()
    written = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*.ogg*"))
    assert written == ["a/w/Fine.ogg"]
    assert srv.hits == ["/commons/Fine.ogg"]
    audit = {e["track_id"]: e for e in json.loads(Path("data/licenses/audit.json").read_text())["entries"]}
    assert audit["wikimedia:../../x.ogg"]["reason"] == OUTSIDE
    assert audit["wikimedia:../../y.ogg"]["reason"] == OUTSIDE  # (the page URL is percent-decoded)


def test_missing_audio_root_fails_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    lst = _wikimedia_list(tmp_path / "W.md", [("Good.ogg", "https://commons.wikimedia.org/wiki/File:Good.ogg")])
    p = dataclasses.replace(section("ingest"), sources={"wikimedia": section("ingest.sources.fma", lists=[str(lst)], audio_root="nowhere/w")})
    assert stage.run(dataclasses.replace(repo_params(), ingest=p), argparse.Namespace(shard=None, resume=False)) == 2
    assert "ingest.sources.wikimedia.audio_root: nowhere/w does not exist" in caplog.text
    assert not Path("data/manifest.jsonl").exists()
