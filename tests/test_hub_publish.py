"""`student-clap publish` and `--models hf://OWNER/NAME[@REV]` against a Hub-like server on 127.0.0.1.

The server keeps repos as commits of {path: bytes} and answers what huggingface_hub's upload_folder
and snapshot_download ask of a Hub endpoint (HF_ENDPOINT): repo and branch creation, `preupload`
(every file "regular", so its contents come inline), `commit` (ndjson, base64 contents), revision
info, the recursive tree, and HEAD/GET on `/{repo}/resolve/{revision}/{path}`. Commands run in a
fresh interpreter so huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from pipeline.stages.export import write_checksums
from student_clap import hub
from student_clap.cli import main as runtime_main

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_write_token"
HUB_REPO = "someone/tiny-student"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos as {repo_id: {"private", "refs": {branch: commit}, "commits": {commit: {path: bytes}}}}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.hits: list[tuple[str, str, str]] = []  # (method, path, authorization)
        self.lock = threading.Lock()

    def commit(self, repo_id: str, parent: str | None, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1((parent or "").encode())
        for path in sorted(files):
            digest.update(f"{path}\0{_git_oid(files[path])}\n".encode())
        sha = digest.hexdigest()
        self.repos[repo_id]["commits"][sha] = files
        return sha

    def resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        if rev in repo["refs"]:
            return repo["refs"][rev]
        found = [sha for sha in repo["commits"] if len(rev) >= 7 and sha.startswith(rev)]
        return found[0] if len(found) == 1 else None


def _handler(state: FakeHub, base: list[str]):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, code: str = "") -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json",
                                                           **({"X-Error-Code": code} if code else {})})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _repo(self, repo_id: str) -> dict | None:
            repo = state.repos.get(repo_id)
            if repo is None:
                self._json(404, {"error": f"Repository {repo_id} not found"}, "RepoNotFound")
            return repo

        def _commit_of(self, repo_id: str, rev: str) -> str | None:
            sha = state.resolve(repo_id, rev)
            if sha is None:
                self._json(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound")
            return sha

        def _writer(self) -> bool:
            if self.headers.get("authorization") != f"Bearer {TOKEN}":
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        def _handle(self, head: bool = False) -> None:
            url = urlsplit(self.path)
            state.hits.append((self.command, url.path, self.headers.get("authorization", "")))
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            with state.lock:
                if self.command == "POST":
                    return self._post(parts)
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo_id, what, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    if (repo := self._repo(repo_id)) is None or (sha := self._commit_of(repo_id, rev)) is None:
                        return
                    files = repo["commits"][sha]
                    if what == "revision":
                        return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                                                "siblings": [{"rfilename": p} for p in sorted(files)]})
                    if what == "tree":
                        return self._json(200, [{"type": "file", "path": p, "size": len(d), "oid": _git_oid(d)}
                                                for p, d in sorted(files.items())])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, rev, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    if (repo := self._repo(repo_id)) is None or (sha := self._commit_of(repo_id, rev)) is None:
                        return
                    data = repo["commits"][sha].get(path)
                    if data is None:
                        return self._json(404, {"error": f"{path} not found"}, "EntryNotFound")
                    return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(data)}"',
                                                  "Content-Type": "application/octet-stream"}, head=head)
            self._json(404, {"error": f"not a Hub route: {self.command} {url.path}"})

        def _post(self, parts: list[str]) -> None:
            body = self._body()
            if not self._writer():
                return
            if parts == ["api", "repos", "create"]:
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                url = f"{base[0]}/{repo_id}"
                if repo_id in state.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                state.repos[repo_id] = {"private": payload.get("visibility") == "private" or bool(payload.get("private")),
                                        "refs": {}, "commits": {}}
                state.repos[repo_id]["refs"]["main"] = state.commit(repo_id, None, {".gitattributes": b"*.onnx filter=lfs\n"})
                return self._json(200, {"url": url})
            if parts == ["api", "validate-yaml"]:  # the client checks a README.md card's metadata before uploading
                card = json.loads(body)["content"]
                ok = card.startswith("---\n") and "\n---\n" in card
                return self._json(200 if ok else 400, {"errors": [] if ok else [{"message": "no metadata"}],
                                                       "warnings": []})
            if parts[:2] != ["api", "models"] or len(parts) < 6:
                return self._json(404, {"error": f"not a Hub route: POST /{'/'.join(parts)}"})
            repo_id, what, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if (repo := self._repo(repo_id)) is None:
                return
            if what == "branch":
                if rev in repo["refs"]:
                    return self._json(409, {"error": "Reference already exists"})
                repo["refs"][rev] = repo["refs"]["main"]
                return self._json(200, {})
            if (sha := self._commit_of(repo_id, rev)) is None:
                return
            current = repo["commits"][sha]
            if what == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": _git_oid(current[f["path"]]) if f["path"] in current else None} for f in files]})
            if what == "commit":
                files = dict(current)
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                    elif item["key"] != "header":
                        return self._json(400, {"error": f"unexpected commit entry {item['key']}"})
                new = state.commit(repo_id, sha, files)
                repo["refs"][rev] = new
                return self._json(200, {"commitUrl": f"{base[0]}/{repo_id}/commit/{new}", "commitOid": new,
                                        "success": True})
            self._json(404, {"error": f"not a Hub route: POST /{'/'.join(parts)}"})

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._handle()

        def do_HEAD(self):  # noqa: N802
            self._handle(head=True)

        def do_POST(self):  # noqa: N802
            self._handle()

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture()
def fake_hub():
    """(base URL, FakeHub) for a Hub endpoint on 127.0.0.1."""
    state, base = FakeHub(), [""]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, base))
    base[0] = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield base[0], state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def bundle(tiny_export: Path, tmp_path: Path) -> Path:
    """A complete export bundle: the tiny export, a model card and SHA256SUMS, as the export stage writes."""
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    (out / "README.md").write_text("---\nlibrary_name: onnx\n---\n# tiny student\n\nfirst card\n", encoding="utf-8")
    write_checksums(out)
    return out


@pytest.fixture()
def hub_here(fake_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """For in-process calls (endpoint passed explicitly): the already imported huggingface_hub online,
    with its cache under tmp_path."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return fake_hub


def _env(tmp_path: Path, base: str, *, offline: bool = False, home: str = "hf") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(REPO), HF_ENDPOINT=base, HF_HOME=str(tmp_path / home), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter, so huggingface_hub reads this environment at import."""
    return subprocess.run([sys.executable, "-m", "student_clap", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _card(folder: Path, text: str) -> None:
    """A new model card, and SHA256SUMS rewritten as the export writes it."""
    (folder / "README.md").write_text(f"---\nlibrary_name: onnx\n---\n# tiny student\n\n{text}\n", encoding="utf-8")
    write_checksums(folder)


def test_hub_addresses_are_parsed_or_refused() -> None:
    assert hub.parse_address("hf://owner/name") == hub.HubAddress("owner/name", "main")
    assert hub.parse_address("hf://owner/my.model-2@v1.0") == hub.HubAddress("owner/my.model-2", "v1.0")
    assert hub.parse_address("hf://o/n@refs/pr/3").revision == "refs/pr/3"
    for bad in ("hf://name", "hf://a/b/c", "hf://a/b@", "hf://../b", "hf://a/b@x@y", "hf://a/b@../main", "hf:// a/b"):
        with pytest.raises(hub.HubError, match="not a Hub address"):
            hub.parse_address(bad)
    # a folder is used as it is, and nothing loads huggingface_hub for it
    code = ("import sys; from student_clap import StudentClap; import student_clap.cli, student_clap.hub as h; "
            "assert h.resolve_models('models/export') == h.Path('models/export'); "
            "StudentClap('models/export'); print(sorted(m for m in sys.modules if m.startswith('huggingface_hub')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.slow
def test_publish_then_search_through_hf_gives_the_folders_hits_online_and_offline(
        fake_hub, bundle: Path, tiny_songs: Path, tmp_path: Path, capsys) -> None:
    base, state = fake_hub
    (bundle / "notes.txt").write_text("scratch, not part of the bundle")
    env = _env(tmp_path, base)
    proc = _cli(env, "publish", HUB_REPO, "--models", str(bundle), "--token", TOKEN, "--private")
    assert proc.returncode == 0, proc.stderr
    commit = proc.stdout.split("commit ", 1)[1].split()[0]
    assert f"{base}/{HUB_REPO}" in proc.stdout and "notes.txt" in proc.stderr
    repo = state.repos[HUB_REPO]
    assert repo["private"] and repo["refs"]["main"] == commit
    listed = hub.read_checksums(bundle / "SHA256SUMS", "bundle")
    assert set(repo["commits"][commit]) == {".gitattributes", "SHA256SUMS", *listed}  # notes.txt stayed home
    assert all(repo["commits"][commit][n] == (bundle / n).read_bytes() for n in listed)
    assert all(auth == f"Bearer {TOKEN}" for method, _, auth in state.hits if method == "POST")

    db = tmp_path / "music.db"
    assert runtime_main(["index", str(tiny_songs), "--out", str(db), "--models", str(bundle), "--threads", "1"]) == 0
    capsys.readouterr()
    assert runtime_main(["search", "calm piano", "--index", str(db), "-k", "3", "--models", str(bundle),
                         "--threads", "1"]) == 0
    local = capsys.readouterr().out
    assert len(local.splitlines()) == 3

    online = _cli(env, "search", "calm piano", "--index", str(db), "-k", "3", "--models", f"hf://{HUB_REPO}",
                  "--threads", "1")
    assert online.returncode == 0, online.stderr
    assert online.stdout == local  # same files, same identity: the index is accepted and the hits agree
    assert any(p.endswith("/resolve/" + commit + "/text_student.onnx") for m, p, _ in state.hits if m == "GET")
    assert not any(p.endswith("/notes.txt") or p.endswith("/.gitattributes") for _, p, _ in state.hits)

    # offline, through the API (as a beets plugin calls it): the cache answers alone, no request is made
    before = len(state.hits)
    code = ("import sys; from student_clap import StudentClap\n"
            "c = StudentClap(sys.argv[1], threads=1); print(c.models_dir)\n"
            "for path, score in c.search('calm piano', sys.argv[2], k=3): print(f'{score:+.5f}  {path}')\n")
    api = subprocess.run([sys.executable, "-c", code, f"hf://{HUB_REPO}", str(db)], capture_output=True, text=True,
                         env=_env(tmp_path, base, offline=True), timeout=300)
    assert api.returncode == 0, api.stderr
    folder, *hits = api.stdout.splitlines()
    assert Path(folder).name == commit and Path(folder).is_relative_to(tmp_path / "hf")  # HF_HOME's cache
    assert hits == [line.split(None, 1)[1] for line in local.splitlines()] and len(state.hits) == before

    # offline with an empty cache: a clear refusal naming the repo
    empty = _cli(_env(tmp_path, base, offline=True, home="empty"), "search", "calm piano", "--index", str(db),
                 "--models", f"hf://{HUB_REPO}")
    assert empty.returncode == 2
    assert f"hf://{HUB_REPO}: not in the Hugging Face cache" in empty.stderr and "HF_HUB_OFFLINE=1" in empty.stderr
    assert "Traceback" not in empty.stderr and len(state.hits) == before


def test_a_revision_pins_a_commit_and_a_branch(hub_here, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    base, _ = hub_here

    def publish(*, revision: str = "main") -> str:
        return hub.publish(bundle, HUB_REPO, revision=revision, token=TOKEN, endpoint=base).commit

    first = publish()
    _card(bundle, "second card")
    second = publish()
    _card(bundle, "dev card")
    dev = publish(revision="dev")
    assert len({first, second, dev}) == 3

    def card(rev: str | None) -> tuple[str, str]:
        address = hub.parse_address(f"hf://{HUB_REPO}" + (f"@{rev}" if rev else ""))
        folder = hub.download_bundle(address, endpoint=base)
        return folder.name, (folder / "README.md").read_text(encoding="utf-8").splitlines()[-1]

    assert card(first) == (first, "first card")
    assert card(first[:10]) == (first, "first card")
    assert card(None) == (second, "second card")
    assert card("dev") == (dev, "dev card")
    with pytest.raises(hub.HubError, match=f"hf://{HUB_REPO}@nope: the repo has no revision 'nope'"):
        card("nope")
    # offline, a branch name is looked up in the refs the cache recorded at the last download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert card("dev") == (dev, "dev card") and card(None) == (second, "second card")


def test_a_file_changed_on_the_server_or_in_the_cache_is_refused_by_name(hub_here, bundle: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    base, state = hub_here
    commit = hub.publish(bundle, HUB_REPO, token=TOKEN, endpoint=base).commit
    files = state.repos[HUB_REPO]["commits"][commit]
    good = files["text_student.onnx"]
    files["text_student.onnx"] = good[:100] + bytes([good[100] ^ 1]) + good[101:]  # same size, one bit off
    address = hub.parse_address(f"hf://{HUB_REPO}")
    with pytest.raises(hub.HubError, match=f"hf://{HUB_REPO}: text_student.onnx has sha256 .* refusing it"):
        hub.download_bundle(address, endpoint=base)

    # the served file repaired, a fresh cache downloads a good bundle; then damage the cached copy
    files["text_student.onnx"] = good
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf2" / "hub"))
    folder = hub.download_bundle(address, endpoint=base)
    blob = (folder / "audio_student_head.onnx").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match=f"hf://{HUB_REPO}: audio_student_head.onnx has sha256"):
        hub.download_bundle(address, endpoint=base)


def test_the_size_cap_refuses_a_large_repo_before_downloading_its_files(hub_here, bundle: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, state = hub_here
    state.repos[HUB_REPO] = {"private": False, "refs": {}, "commits": {}}
    files = {n: (bundle / n).read_bytes() for n in [*hub.read_checksums(bundle / "SHA256SUMS", "b"), "SHA256SUMS"]}
    state.repos[HUB_REPO]["refs"]["main"] = state.commit(HUB_REPO, None, files)
    total = sum(len(d) for n, d in files.items() if n != "SHA256SUMS")
    monkeypatch.setattr(hub, "MAX_BUNDLE_BYTES", total - 1)
    with pytest.raises(hub.HubError, match=rf"hf://{HUB_REPO}: the bundle holds .* not downloading it"):
        hub.download_bundle(hub.HubAddress(HUB_REPO), endpoint=base)
    fetched = {p.rsplit("/", 1)[1] for m, p, _ in state.hits if m == "GET" and "/resolve/" in p}
    assert fetched == {"SHA256SUMS"}
    monkeypatch.setattr(hub, "MAX_BUNDLE_BYTES", total)
    assert (hub.download_bundle(hub.HubAddress(HUB_REPO), endpoint=base) / "student_clap.json").is_file()


def test_publish_refuses_an_incomplete_or_changed_bundle_before_contacting_the_hub(
        bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = "http://127.0.0.1:9"  # nothing listens: a refusal must come before any request

    def refused(folder: Path) -> str:
        caplog.clear()
        assert runtime_main(["publish", HUB_REPO, "--models", str(folder), "--endpoint", closed, "--token", TOKEN]) == 2
        return caplog.text

    def variant(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(bundle, out, symlinks=True)
        return out

    missing = variant("missing")
    (missing / "text_student.onnx").unlink()
    assert "text_student.onnx is listed in SHA256SUMS but missing" in refused(missing)

    changed = variant("changed")
    (changed / "tokenizer.json").write_text("{}")
    assert "tokenizer.json has sha256" in refused(changed)

    unlisted = variant("unlisted")
    sums = (unlisted / "SHA256SUMS").read_text().splitlines()
    (unlisted / "SHA256SUMS").write_text("\n".join(l for l in sums if not l.endswith("  audio_student_head.onnx")) + "\n")
    assert "student_clap.json names audio_student_head.onnx but SHA256SUMS does not list it" in refused(unlisted)

    no_sums = variant("no_sums")
    (no_sums / "SHA256SUMS").unlink()
    assert "SHA256SUMS not found: not an export bundle" in refused(no_sums)

    no_card = variant("no_card")
    (no_card / "README.md").unlink()
    write_checksums(no_card)
    assert "SHA256SUMS does not list README.md" in refused(no_card)

    outside = tmp_path / "secret.txt"
    outside.write_text("---\nlibrary_name: onnx\n---\n# tiny student\n\nfirst card\n")  # the card's very bytes
    linked = variant("linked")
    (linked / "README.md").unlink()
    (linked / "README.md").symlink_to(outside)
    assert "README.md is a link to" in refused(linked) and "outside the bundle" in caplog.text

    escaping = variant("escaping")
    (escaping / "SHA256SUMS").write_text((escaping / "SHA256SUMS").read_text() + f"{'0' * 64}  ../secret.txt\n")
    assert "is not '<sha256>  <relative path>'" in refused(escaping)

    assert runtime_main(["publish", HUB_REPO, "--models", str(tmp_path / "nowhere"), "--endpoint", closed]) == 2
    assert "no such folder" in caplog.text
