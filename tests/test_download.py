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
