"""`student-clap teacher fetch` against an HTTP server on 127.0.0.1 (never the real network)."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml

from pipeline.teacher.model import build_demo_tokenizer
from pipeline.teacher.fetch import main

CHECKPOINT_BYTES = b"not really a checkpoint, but bytes with a known sha256\n" * 1000


@pytest.fixture()
def server(tmp_path: Path):
    root = tmp_path / "www"
    (root / "laion").mkdir(parents=True)
    (root / "laion" / "music.pt").write_bytes(CHECKPOINT_BYTES)
    tok = root / "roberta-base"
    tok.mkdir()
    tokenizer = build_demo_tokenizer(400)
    tokenizer.model.save(str(tok))
    tokenizer.save(str(tok / "tokenizer.json"))
    (tok / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 400}))
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            hits.append(self.path)
            return super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def _params(tmp_path: Path, base: str, sha: str = "") -> argparse.Namespace:
    data = {
        "teacher": {"model": {
            "source": "checkpoint",
            "checkpoint": str(tmp_path / "src" / "music.pt"),
            "checkpoint_url": f"{base}/laion/music.pt",
            "checkpoint_sha256": sha,
            "tokenizer_dir": str(tmp_path / "src" / "roberta-base"),
            "tokenizer_url": f"{base}/roberta-base",
        }},
        "ingest": {"downloads": {"retries": 0, "backoff_seconds": 0.01, "timeout_seconds": 5.0}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return argparse.Namespace(params=str(path))


def test_fetch_places_every_file(tmp_path: Path, server, caplog: pytest.LogCaptureFixture) -> None:
    base, hits = server
    sha = hashlib.sha256(CHECKPOINT_BYTES).hexdigest()
    assert main(_params(tmp_path, base, sha)) == 0
    assert (tmp_path / "src" / "music.pt").read_bytes() == CHECKPOINT_BYTES
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "config.json"):
        assert (tmp_path / "src" / "roberta-base" / name).is_file(), name
    assert len(hits) == 5
    # a second run finds everything in place and verified: nothing is downloaded again
    assert main(_params(tmp_path, base, sha)) == 0
    assert len(hits) == 5


def test_missing_sha256_is_reported_with_the_value(tmp_path: Path, server, caplog: pytest.LogCaptureFixture) -> None:
    base, _ = server
    assert main(_params(tmp_path, base)) == 0
    assert hashlib.sha256(CHECKPOINT_BYTES).hexdigest() in caplog.text
    assert "checkpoint_sha256 is empty" in caplog.text


def test_wrong_sha256_fails_and_keeps_nothing(tmp_path: Path, server, caplog: pytest.LogCaptureFixture) -> None:
    base, _ = server
    assert main(_params(tmp_path, base, "0" * 64)) == 1
    assert "does not match" in caplog.text and "music.pt" in caplog.text
    assert not (tmp_path / "src" / "music.pt").exists()


def test_offline_names_files_and_places(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(_params(tmp_path, f"http://127.0.0.1:{port}")) == 1
    assert "Place these files by hand" in caplog.text
    assert str(tmp_path / "src" / "music.pt") in caplog.text
    assert str(tmp_path / "src" / "roberta-base" / "merges.txt") in caplog.text


def test_truncated_tokenizer_is_refused(tmp_path: Path, server, caplog: pytest.LogCaptureFixture) -> None:
    base, _ = server
    www = tmp_path / "www" / "roberta-base"
    (www / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    assert main(_params(tmp_path, base)) == 1
    assert "tokenizer has only" in caplog.text
