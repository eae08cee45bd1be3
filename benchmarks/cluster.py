"""Throughput of the mels and teacher stages on a local Ray cluster of 1 and 2 worker nodes.

    nice -n 10 python benchmarks/cluster.py [--songs 37] [--seconds 60] [--cpus-per-worker 1]

Builds a small project in a temporary folder (demo songs cut to --seconds, the committed demo
teacher), runs `student-clap run mels` and `run teacher` once locally (cluster.ray_address "")
and once per cluster size through `ray start` nodes on 127.0.0.1 (a head without CPUs plus N
workers), checks every run's data/mels.h5 and data/teacher.h5 are byte-identical to the local
ones, and prints segments per second for each stage: over the whole stage (connecting to the
cluster and starting the teacher actors included, as a user's run pays them) and over its work
(the rate the stage logs from its first batch on). LocalRayCluster is also what
tests/test_cluster.py starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_AUDIO = REPO / "data/demo/audio"
DEMO_TEACHER = REPO / "data/demo/teacher"
# Node failures are noticed within a few seconds instead of Ray's default ~30 s.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3", "RAY_USAGE_STATS_ENABLED": "0"}


# One token per process: Ray caches the first token a process loads, so every cluster started from
# here shares it.
_TOKEN = secrets.token_hex(32)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    """Every port a node listens on, chosen free: several nodes share 127.0.0.1."""
    names = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    return [x for name, port in zip(names, _free_ports(len(names))) for x in (name, str(port))]


class LocalRayCluster:
    """A Ray head without CPUs and worker nodes, each a `ray start --block` process group of its own
    on 127.0.0.1, so one node can be killed like a lost machine. Use as a context manager: every
    process it started is ended on exit (only those: never `ray stop`, which ends every Ray on the machine).
    The cluster has a token of this process's own (Ray's token authentication), set in its environment
    while the cluster runs, so drivers here and in child processes connect to it and to no other."""

    def __init__(self, workers: int, cpus_per_worker: int, object_store_mb: int = 100) -> None:
        self.n_workers, self.cpus, self.store = workers, cpus_per_worker, str(object_store_mb << 20)
        self.ray_bin = str(Path(sys.executable).with_name("ray"))
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN}
        self.saved_env: dict[str, str | None] = {}
        self.env = {**os.environ, **FAST_HEALTH_CHECKS, **self.auth}
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address = ""
        self.temp_dir = ""

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / log_name, "ab")
        return subprocess.Popen([self.ray_bin, "start", "--block", "--node-ip-address", "127.0.0.1",
                                 "--object-store-memory", self.store, *_node_ports(), *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> LocalRayCluster:
        # short: Unix socket paths under it must stay below ~100 characters
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.saved_env = {k: os.environ.get(k) for k in self.auth}
        os.environ.update(self.auth)
        port = _free_ports(1)[0]
        self.address = f"127.0.0.1:{port}"
        try:
            self.head = self._start(["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard=false",
                                     "--disable-usage-stats", "--temp-dir", self.temp_dir], "head.log")
            for _ in range(self.n_workers):
                self.add_worker()
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_worker(self, timeout: float = 120.0) -> None:
        """Start one more worker node and wait until the cluster counts its CPUs (nodes are started
        one at a time: two raylets starting at once on one host pick the same socket names)."""
        import ray

        want = self.cpus * (len(self.alive_workers()) + 1)
        self.workers.append(self._start(["--address", self.address, "--num-cpus", str(self.cpus)],
                                        f"worker{len(self.workers)}.log"))
        connected = ray.is_initialized()
        if not connected:
            ray.init(address=self.address, logging_level="WARNING")
        try:
            deadline = time.monotonic() + timeout
            while ray.cluster_resources().get("CPU", 0) < want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a Ray worker did not join {self.address} (logs in {self.temp_dir})")
                time.sleep(0.2)
        finally:
            if not connected:
                ray.shutdown()

    def alive_workers(self) -> list[subprocess.Popen]:
        return [p for p in self.workers if p.poll() is None]

    def kill_worker(self, i: int = -1) -> None:
        """SIGKILL worker node i's whole process group (its raylet, object store and agents): a lost machine."""
        os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait()

    def __exit__(self, *exc: object) -> None:
        # SIGKILL: a throw-away cluster has nothing to save, and `ray start --block` lingers on SIGTERM
        for p in [*self.workers, *([self.head] if self.head else [])]:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_project(root: Path, songs: int, seconds: float) -> Path:
    """A folder the stages run in: the first `songs` demo songs (cut to `seconds` by
    mels.max_track_minutes), a manifest, and params pointing at the committed demo teacher."""
    import yaml

    (root / "data").mkdir(parents=True)
    files = sorted(p for p in DEMO_AUDIO.rglob("*") if p.is_file())[:songs]
    with open(root / "data/manifest.jsonl", "w", encoding="utf-8") as fh:
        for i, src in enumerate(files):
            rel = Path("audio") / src.relative_to(DEMO_AUDIO)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
            fh.write(json.dumps({"track_id": f"demo:{i}", "source": "demo", "artist": "a", "title": src.stem,
                                 "audio_path": str(rel), "license": "CC0-1.0", "license_url": "", "url": "",
                                 "split": "train", "tags": [], "duration": None}) + "\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["mels"].update(workers=1, max_track_minutes=seconds / 60.0)
    params["teacher"]["model"]["dir"] = str(DEMO_TEACHER)
    params["teacher"].update(device="cpu", dtype="fp32")
    params["text_queries"].update(terms=str(REPO / params["text_queries"]["terms"]), n_train=40, n_val=10)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return root


def set_cluster(root: Path, **cluster: object) -> None:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    params["cluster"].update(cluster)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def run_stage(root: Path, stage: str) -> tuple[float, float]:
    """(seconds `student-clap run <stage>` takes in `root` with this checkout's code, segments per
    second of its work: the rate the stage logs, from its first batch on (after connecting and,
    for the teacher, loading the actors))."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", stage, "--params", "params.yaml"], cwd=root,
                          env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode:
        raise RuntimeError(f"run {stage} failed in {root}:\n{proc.stderr[-4000:]}")
    # mels: the Ray line when there is one (after connecting), else the local compute line
    patterns = {"mels": [r"on the Ray cluster: .*\(([\d.]+) seg/s\)", r"computed \d+ segments .*\(([\d.]+) seg/s\)"],
                "teacher": [r"embedded \d+ segments in .*\(([\d.]+) seg/s\)"]}[stage]
    for pattern in patterns:
        found = re.findall(pattern, proc.stderr)
        if found:
            return seconds, float(found[-1])
    raise RuntimeError(f"run {stage}: no rate in its log:\n{proc.stderr[-2000:]}")


def _segments(root: Path) -> int:
    import h5py

    with h5py.File(root / "data/mels.h5", "r") as f:
        return int(f["segments/track"].shape[0])


def measure(root: Path) -> dict[str, float]:
    for out in ("data/mels.h5", "data/teacher.h5"):
        (root / out).unlink(missing_ok=True)
    runs = {stage: run_stage(root, stage) for stage in ("mels", "teacher")}
    n = _segments(root)
    row: dict[str, float] = {"segments": n}
    for stage, (seconds, rate) in runs.items():
        row[f"{stage}_stage"], row[f"{stage}_work"] = n / seconds, rate
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--songs", type=int, default=37, help="demo songs (37 in all)")
    ap.add_argument("--seconds", type=float, default=60.0, help="audio per song (mels.max_track_minutes)")
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        root = make_project(Path(tmp), a.songs, a.seconds)
        rows = [("local (no Ray)", measure(root))]
        reference = {out: (root / out).read_bytes() for out in ("data/mels.h5", "data/teacher.h5")}
        for n in a.workers:
            with LocalRayCluster(n, a.cpus_per_worker) as c:
                set_cluster(root, ray_address=c.address, tracks_per_task=1, teacher_actors=n * a.cpus_per_worker,
                            teacher_cpus=1)
                row = measure(root)
            same = all((root / out).read_bytes() == data for out, data in reference.items())
            if not same:
                raise SystemExit(f"{n} worker(s): outputs differ from the local run")
            rows.append((f"Ray, {n} worker node(s) x {a.cpus_per_worker} CPU", row))
            set_cluster(root, ray_address="")
    print(f"{a.songs} songs x {a.seconds:.0f} s, {rows[0][1]['segments']} segments; outputs byte-identical to local")
    print("segments per second: whole stage (start-up included) / its work (from the first batch on)")
    print(f"{'run':34s} {'mels stage':>11s} {'mels work':>10s} {'teacher stage':>14s} {'teacher work':>13s}")
    for name, row in rows:
        print(f"{name:34s} {row['mels_stage']:11.2f} {row['mels_work']:10.2f} {row['teacher_stage']:14.2f} "
              f"{row['teacher_work']:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
