"""`student-clap teacher fetch` through huggingface_hub against a Hub-like server on 127.0.0.1.

The server answers what `hf_hub_download` asks of a Hub endpoint (HF_ENDPOINT): HEAD and GET on
`/{repo_id}/resolve/{revision}/{filename}` with X-Repo-Commit, ETag and Content-Length, plus
X-Linked-Etag / X-Linked-Size for the LFS-stored checkpoint. Nothing reaches the real network.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.teacher.model import build_demo_tokenizer
from pipeline.teacher.fetch import main
from repo_params import params_tree, repo_params, section

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_BYTES = b"not really a checkpoint, but bytes with a known sha256\n" * 1000
CKPT_REPO, TOK_REPO = "laion-test/clap", "roberta-test/roberta-base"
CKPT_REV, TOK_REV = "a" * 40, "b" * 40
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "config.json")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], bytes]:
    tok_dir = tmp_path_factory.mktemp("tok")
    tokenizer = build_demo_tokenizer(400)
    tokenizer.model.save(str(tok_dir))
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 400}))
    files = {(CKPT_REPO, CKPT_REV, "music.pt"): CHECKPOINT_BYTES}
    files.update({(TOK_REPO, TOK_REV, n): (tok_dir / n).read_bytes() for n in TOKENIZER_FILES})
    return files


@pytest.fixture()
def hub(hub_files):
    """A Hub endpoint on 127.0.0.1; yields (base URL, request log, the served files)."""
    files = dict(hub_files)
    hits: list[tuple[str, str, str]] = []  # (method, path, authorization)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            hits.append((self.command, self.path, self.headers.get("authorization", "")))
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":  # org/name/resolve/revision/filename
                key = (f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                data = files.get(key)
                if data is not None:
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", key[1])
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                    if key[2].endswith(".pt"):  # LFS: the linked blob's sha256 and size
                        self.send_header("X-Linked-Etag", f'"{_sha(data)}"')
                        self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return
            if parts[:1] == ["plain"]:  # a non-Hub mirror: plain files, no Hub headers
                data = files.get((CKPT_REPO, CKPT_REV, parts[-1]))
                if data is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            self._answer(body=False)

        def do_GET(self):  # noqa: N802
            self._answer(body=True)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits, files
    httpd.shutdown()
    httpd.server_close()


def _params(tmp_path: Path, hub_files, *, ckpt_sha: str | None = None, tok_sha: bool = True, **extra) -> Path:
    model = {
        "source": "checkpoint",
        "checkpoint": str(tmp_path / "src" / "music.pt"),
        "checkpoint_hub": {"repo_id": CKPT_REPO, "filename": "music.pt", "revision": CKPT_REV},
        "checkpoint_sha256": _sha(CHECKPOINT_BYTES) if ckpt_sha is None else ckpt_sha,
        "tokenizer_dir": str(tmp_path / "src" / "roberta-base"),
        "tokenizer_hub": {"repo_id": TOK_REPO, "filename": "", "revision": TOK_REV},
        "tokenizer_sha256": {n: _sha(hub_files[(TOK_REPO, TOK_REV, n)]) for n in TOKENIZER_FILES} if tok_sha else {},
    }
    model.update(extra)
    data = {"teacher": {"model": model},
            "ingest": {"sources": {}, "downloads": {"retries": 0, "backoff_seconds": 0.01, "timeout_seconds": 5.0}}}
    path = tmp_path / "params.yaml"
    tree = params_tree(data)
    tree["teacher"]["model"]["tokenizer_sha256"] = model["tokenizer_sha256"]  # replaced, not merged
    path.write_text(yaml.safe_dump(tree))
    return path


def _cli(params: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter, so huggingface_hub reads this environment at import."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full.update(env, PYTHONPATH=str(REPO), TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher", "fetch", "--params", str(params), *extra],
                          capture_output=True, text=True, env=full, cwd=params.parent, timeout=300)


@pytest.fixture()
def in_process_hub(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """For in-process calls: point the already imported huggingface_hub at the test endpoint and cache."""
    from huggingface_hub import constants

    base, hits, files = hub
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return base, hits, files


@pytest.mark.slow
def test_fetch_through_the_hub_client_with_cache_token_and_offline_mode(tmp_path: Path, hub, hub_files) -> None:
    base, hits, _ = hub
    params = _params(tmp_path, hub_files)
    env = {"HF_ENDPOINT": base, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "0"}
    proc = _cli(params, env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "src" / "music.pt").read_bytes() == CHECKPOINT_BYTES
    for name in TOKENIZER_FILES:
        assert (tmp_path / "src" / "roberta-base" / name).read_bytes() == hub_files[(TOK_REPO, TOK_REV, name)]
    # the Hub client asked for the pinned revision, with the token, and kept its own cache
    resolved = [(m, p, auth) for m, p, auth in hits if "/resolve/" in p]  # the client may also ask /api/...
    assert {p for m, p, _ in resolved if m == "GET"} == {f"/{CKPT_REPO}/resolve/{CKPT_REV}/music.pt"} | {
        f"/{TOK_REPO}/resolve/{TOK_REV}/{n}" for n in TOKENIZER_FILES}
    assert all(auth == "Bearer hf_test_token" for _, _, auth in resolved)
    snapshot = tmp_path / "hf" / "hub" / "models--laion-test--clap" / "snapshots" / CKPT_REV / "music.pt"
    assert snapshot.read_bytes() == CHECKPOINT_BYTES
    record = json.loads((tmp_path / "src" / "fetch.json").read_text())
    assert record["trusted_unverified"] == []
    ckpt = next(e for e in record["files"] if e["path"].endswith("music.pt"))
    assert ckpt["source"] == f"hf://{CKPT_REPO}@{CKPT_REV}/music.pt" and ckpt["verified"] is True
    assert ckpt["sha256"] == _sha(CHECKPOINT_BYTES)

    # a second run finds every file in place and verified: nothing is asked of the Hub
    n = len(resolved)
    assert _cli(params, env).returncode == 0
    assert sum("/resolve/" in p for _, p, _ in hits) == n

    # offline, files gone from the target but still in the Hub cache: served from the cache
    (tmp_path / "src" / "music.pt").unlink()
    proc = _cli(params, dict(env, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "src" / "music.pt").read_bytes() == CHECKPOINT_BYTES
    assert sum("/resolve/" in p for _, p, _ in hits) == n


def test_offline_without_cache_fails_naming_every_file(tmp_path: Path, hub, hub_files) -> None:
    base, hits, _ = hub
    params = _params(tmp_path, hub_files)
    proc = _cli(params, {"HF_ENDPOINT": base, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert hits == []
    assert "5 teacher file(s) not fetched" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr
    assert f"hf://{CKPT_REPO}@{CKPT_REV}/music.pt -> {tmp_path / 'src' / 'music.pt'}" in proc.stderr
    assert "Place these files by hand" in proc.stderr
    assert f"{base}/{TOK_REPO}/resolve/{TOK_REV}/merges.txt" in proc.stderr
    assert not (tmp_path / "src" / "music.pt").exists()


def test_unpinned_checkpoint_is_refused_before_download_unless_trusted(
    tmp_path: Path, in_process_hub, hub_files, caplog: pytest.LogCaptureFixture
) -> None:
    _, hits, _ = in_process_hub
    params = _params(tmp_path, hub_files, ckpt_sha="")
    assert main(argparse.Namespace(params=str(params), trust=False)) == 1
    assert "no sha256 pinned (teacher.model.checkpoint_sha256 is empty); refused" in caplog.text
    assert not any(p.endswith("music.pt") for _, p, _ in hits)
    assert not (tmp_path / "src" / "music.pt").exists()

    assert main(argparse.Namespace(params=str(params), trust=True)) == 0
    record = json.loads((tmp_path / "src" / "fetch.json").read_text())
    assert record["trusted_unverified"] == [str(tmp_path / "src" / "music.pt")]
    entry = next(e for e in record["files"] if e["path"].endswith("music.pt"))
    assert entry["trusted"] is True and entry["verified"] is False and entry["sha256"] == _sha(CHECKPOINT_BYTES)
    assert "trusted without verification" in caplog.text


def test_wrong_sha256_is_refused_and_nothing_is_placed(
    tmp_path: Path, in_process_hub, hub_files, caplog: pytest.LogCaptureFixture
) -> None:
    params = _params(tmp_path, hub_files, ckpt_sha="0" * 64)
    assert main(argparse.Namespace(params=str(params), trust=False)) == 1
    assert f"differs from the pinned {'0' * 64}" in caplog.text and "music.pt" in caplog.text
    assert not (tmp_path / "src" / "music.pt").exists()
    assert not (tmp_path / "src" / "fetch.json").exists()


def test_non_hub_url_uses_the_project_downloader(
    tmp_path: Path, in_process_hub, hub_files, caplog: pytest.LogCaptureFixture
) -> None:
    base, hits, _ = in_process_hub
    params = _params(tmp_path, hub_files, checkpoint_url=f"{base}/plain/music.pt")
    assert main(argparse.Namespace(params=str(params), trust=False)) == 0, caplog.text
    assert (tmp_path / "src" / "music.pt").read_bytes() == CHECKPOINT_BYTES
    assert ("GET", "/plain/music.pt") in {(m, p) for m, p, _ in hits}
    record = json.loads((tmp_path / "src" / "fetch.json").read_text())
    assert any(e["source"] == f"{base}/plain/music.pt" and e["verified"] for e in record["files"])


def test_truncated_tokenizer_is_refused(
    tmp_path: Path, in_process_hub, hub_files, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, files = in_process_hub
    files[(TOK_REPO, TOK_REV, "tokenizer.json")] = json.dumps(
        {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}).encode()
    params = _params(tmp_path, hub_files, tok_sha=False)
    assert main(argparse.Namespace(params=str(params), trust=True)) == 1
    assert "tokenizer has only" in caplog.text


def test_stage_fetches_nothing_for_the_demo_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.fetch_teacher import fetch_stage

    p = repo_params().teacher.model  # source: demo
    fetch_stage(p, section("ingest.downloads"), tmp_path / "teacher_src")
    assert json.loads((tmp_path / "teacher_src" / "fetch.json").read_text())["teacher_source"] == "demo"
    assert [f.name for f in (tmp_path / "teacher_src").iterdir()] == ["fetch.json"]


def test_stage_refuses_files_outside_the_tracked_folder(tmp_path: Path) -> None:
    from pipeline.stages.fetch_teacher import fetch_stage
    from pipeline.teacher.fetch import FetchError

    params = repo_params()
    p = params.teacher.model
    p.source, p.checkpoint = "checkpoint", str(tmp_path / "elsewhere" / "music.pt")
    with pytest.raises(FetchError, match=r"teacher\.model\.checkpoint: .* is outside"):
        fetch_stage(p, section("ingest.downloads"), tmp_path / "teacher_src")


def test_a_wrong_file_in_place_is_replaced_by_the_pinned_one(
    tmp_path: Path, in_process_hub, hub_files, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "src" / "music.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"a swapped checkpoint")
    assert main(argparse.Namespace(params=str(_params(tmp_path, hub_files)), trust=False)) == 0, caplog.text
    assert dest.read_bytes() == CHECKPOINT_BYTES
    assert "not the pinned" in caplog.text and "removed, fetching it again" in caplog.text


def test_a_file_placed_by_hand_is_not_recorded_as_fetched(tmp_path: Path, in_process_hub, hub_files) -> None:
    """fetch.json names the Hub only for bytes fetched from it; a checkpoint copied in by hand is
    recorded as such, also on the next run, while a fetched file keeps its source across runs."""
    base, hits, _ = in_process_hub
    dest = tmp_path / "src" / "music.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(CHECKPOINT_BYTES)
    params = argparse.Namespace(params=str(_params(tmp_path, hub_files)), trust=False)
    for _ in range(2):
        assert main(params) == 0
        record = json.loads((tmp_path / "src" / "fetch.json").read_text())
        ckpt = next(e for e in record["files"] if e["path"].endswith("music.pt"))
        assert (ckpt["source"], ckpt["fetched"], ckpt["verified"]) == (
            "already in place (not fetched by this project)", False, True)
        vocab = next(e for e in record["files"] if e["path"].endswith("vocab.json"))
        assert vocab["source"] == f"hf://{TOK_REPO}@{TOK_REV}/vocab.json" and vocab["fetched"] is True
    assert not any("music.pt" in p for _, p, _ in hits)  # the checkpoint was never asked for
