"""pipeline.data.download against a small HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.data.download import DownloadError, DownloadJob, download, download_many, part_path

DATA = bytes((i * 7 + 3) % 251 for i in range(50_000))
SHA = hashlib.sha256(DATA).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Routes by path; the server object holds hit counts and the Range headers it saw."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send_body(self, body: bytes, status: int = 200, extra: dict | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _serve_with_range(self) -> None:
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if not m:
            self._send_body(DATA)
            return
        start = int(m.group(1))
        if start >= len(DATA):
            self._send_body(b"", 416, {"Content-Range": f"bytes */{len(DATA)}"})
            return
        self._send_body(DATA[start:], 206, {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"})

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        path = self.path.split("?")[0]
        srv.hits[path] += 1
        srv.ranges.append((path, self.headers.get("Range")))
        n = srv.hits[path]
        if path == "/file":
            self._serve_with_range()
        elif path == "/norange":
            self._send_body(DATA)
        elif path == "/missing":
            self._send_body(b"not here", 404)
        elif path == "/busy":  # 429 once, then fine
            if n == 1:
                self._send_body(b"slow down", 429, {"Retry-After": "0"})
            else:
                self._serve_with_range()
        elif path == "/broken":
            self._send_body(b"oops", 500)
        elif path == "/truncated":  # first answer promises everything, sends 20 000 bytes, hangs up
            if n == 1:
                self._send_body(DATA[:20_000], length=len(DATA))
                self.close_connection = True
            else:
                self._serve_with_range()
        elif path == "/stall":  # headers and a first block, then silence
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA[:10_000])
            self.wfile.flush()
            time.sleep(1.5)
        elif path == "/endless":  # no length, never ends (until the client hangs up)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(DATA)
            except OSError:
                pass
        elif path == "/huge":  # announces more than any cap
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        elif path == "/html":
            self._send_body(b"<!DOCTYPE html><html><body>Sign in</body></html>", extra={"Content-Type": "text/html; charset=utf-8"})
        elif path == "/html-as-json":  # the type says JSON, the body is a web page
            self._send_body(b"\n  <html><head><title>404</title></head></html>", extra={"Content-Type": "application/json"})
        elif path == "/to-file":
            self._send_body(b"", 302, {"Location": "file:///etc/passwd"})
        elif path == "/loop":
            self._send_body(b"", 302, {"Location": "/loop"})
        elif path == "/slow":
            time.sleep(1.5)
            self._send_body(DATA)
        else:
            self._send_body(b"?", 400)


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.hits = Counter()
    srv.ranges = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


FAST = dict(retries=2, backoff=0.01, timeout=5.0, progress=False)


def test_success_writes_file_and_returns_sha(server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "a.bin"
    assert download(f"{server.base}/file", dest, SHA, **FAST) == SHA
    assert dest.read_bytes() == DATA
    assert not part_path(dest).exists()


def test_existing_file_with_matching_hash_is_not_fetched(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    dest.write_bytes(DATA)
    assert download(f"{server.base}/file", dest, SHA, **FAST) == SHA
    assert server.hits["/file"] == 0


def test_resumes_partial_file_with_range(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(DATA[:12_345])
    assert download(f"{server.base}/file", dest, SHA, **FAST) == SHA
    assert dest.read_bytes() == DATA
    assert server.ranges == [("/file", "bytes=12345-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(b"x" * 999)  # would corrupt the file if appended to
    assert download(f"{server.base}/norange", dest, SHA, **FAST) == SHA
    assert dest.read_bytes() == DATA


def test_stale_part_longer_than_file_is_restarted(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    part_path(dest).write_bytes(b"y" * (len(DATA) + 10))
    assert download(f"{server.base}/file", dest, SHA, **FAST) == SHA
    assert dest.read_bytes() == DATA


def test_404_fails_at_once_naming_url_and_file(server, tmp_path: Path) -> None:
    dest = tmp_path / "gone.bin"
    with pytest.raises(DownloadError) as err:
        download(f"{server.base}/missing", dest, **FAST)
    assert "404" in str(err.value) and "/missing" in str(err.value) and "gone.bin" in str(err.value)
    assert server.hits["/missing"] == 1
    assert not dest.exists()


def test_429_is_retried(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    assert download(f"{server.base}/busy", dest, SHA, **FAST) == SHA
    assert server.hits["/busy"] == 2


def test_5xx_retried_a_bounded_number_of_times(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 500.*3 attempts"):
        download(f"{server.base}/broken", tmp_path / "a.bin", **FAST)
    assert server.hits["/broken"] == 3


def test_truncated_transfer_is_resumed(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    assert download(f"{server.base}/truncated", dest, SHA, **FAST) == SHA
    assert dest.read_bytes() == DATA
    assert server.hits["/truncated"] == 2
    assert server.ranges[1] == ("/truncated", "bytes=20000-")


def test_slow_server_times_out_with_clear_error(server, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="no answer within 0.2 s"):
        download(f"{server.base}/slow", tmp_path / "a.bin", retries=1, backoff=0.01, timeout=0.2, progress=False)
    assert time.monotonic() - t0 < 1.4  # two 0.2 s attempts, not the server's 1.5 s
    assert server.hits["/slow"] == 2


def test_stalled_transfer_times_out_and_keeps_partial_bytes(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="stalled for 0.2 s at byte 10000"):
        download(f"{server.base}/stall", dest, retries=0, timeout=0.2, progress=False)
    assert part_path(dest).read_bytes() == DATA[:10_000]  # a later run resumes from here
    assert not dest.exists()


def test_sha256_mismatch_raises_and_leaves_nothing(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{server.base}/file", dest, "0" * 64, **FAST)
    assert not dest.exists() and not part_path(dest).exists()


def test_download_many_reports_each_job(server, tmp_path: Path) -> None:
    jobs = [
        DownloadJob(f"{server.base}/file", tmp_path / "1.bin", SHA),
        (f"{server.base}/missing", tmp_path / "2.bin"),
        DownloadJob(f"{server.base}/busy", tmp_path / "3.bin"),
    ]
    results = download_many(jobs, concurrency=2, retries=1, backoff=0.01, timeout=5.0, progress=False)
    assert [r.ok for r in results] == [True, False, True]
    assert results[0].sha256 == SHA and results[2].sha256 == SHA
    assert "404" in results[1].error
    assert (tmp_path / "1.bin").read_bytes() == DATA and not (tmp_path / "2.bin").exists()


def test_endless_response_stops_at_the_cap(server, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match=r"/endless -> .*a\.bin failed: the body exceeds the cap of 200000 bytes"):
        download(f"{server.base}/endless", dest, max_bytes=200_000, **FAST)
    assert not dest.exists() and not part_path(dest).exists()
    assert server.hits["/endless"] == 1  # a refusal is not retried


def test_expected_size_is_the_cap_and_announced_sizes_are_checked(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="exceeds the cap of 1000 bytes"):
        download(f"{server.base}/endless", tmp_path / "a.bin", expected_size=1000, **FAST)
    with pytest.raises(DownloadError, match="announces 1099511627776 bytes"):
        download(f"{server.base}/huge", tmp_path / "b.bin", **FAST)
    with pytest.raises(DownloadError, match=f"{len(DATA)} bytes arrived, expected {len(DATA) + 1}"):
        download(f"{server.base}/file", tmp_path / "c.bin", expected_size=len(DATA) + 1, **FAST)
    assert not list(tmp_path.iterdir())
    assert download(f"{server.base}/file", tmp_path / "d.bin", expected_size=len(DATA), **FAST) == SHA


@pytest.mark.parametrize("route", ["/html", "/html-as-json"])
def test_html_page_is_refused_naming_url_and_file(server, tmp_path: Path, route: str) -> None:
    dest = tmp_path / "tokenizer.json"
    with pytest.raises(DownloadError, match=rf"{route} -> .*tokenizer\.json failed: the server sent an HTML page"):
        download(f"{server.base}{route}", dest, **FAST)
    assert not dest.exists() and not part_path(dest).exists()
    assert server.hits[route] == 1


@pytest.mark.parametrize(("route", "reason"), [("/to-file", "not http"), ("/loop", "redirect loop")])
def test_bad_redirects_fail_without_retries(server, tmp_path: Path, route: str, reason: str) -> None:
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match=reason):
        download(f"{server.base}{route}", dest, **FAST)
    assert not dest.exists() and not part_path(dest).exists()
    assert server.hits[route] == (1 if route == "/to-file" else 11)  # one attempt (a loop: 1 + 10 redirects)


def test_non_http_url_is_refused_before_any_io(tmp_path: Path) -> None:
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "127.0.0.1/x"):
        with pytest.raises(DownloadError, match="only http"):
            download(url, tmp_path / "sub" / "a.bin", **FAST)
    assert not (tmp_path / "sub").exists()
