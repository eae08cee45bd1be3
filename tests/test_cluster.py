"""The mels and teacher stages on a local Ray cluster (a head and two `ray start` worker nodes on
127.0.0.1) write the bytes the local run writes, also when a worker node is killed mid-run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from benchmarks.cluster import LocalRayCluster, make_project
from pipeline.data import mel_ray, teacher_cache
from pipeline.params import load_params
from pipeline.stages import mels as mels_stage
from pipeline.stages import teacher as teacher_stage

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (the optional extra: pip install 'student-clap[ray]')")

OUTPUTS = ("data/mels.h5", "data/teacher.h5")
SONGS, SECONDS = 4, 15.0  # 2 segments per song: a few batches of each kind, in seconds of CPU


def _project(root: Path) -> Path:
    make_project(root, SONGS, SECONDS)
    (root / "audio/page.mp3").write_bytes(b"<html>not audio</html>\n" * 20)  # a track every run must refuse alike
    with open(root / "data/manifest.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"track_id": "bad:html", "source": "demo", "artist": "b", "title": "page",
                             "audio_path": "audio/page.mp3", "license": "CC0-1.0", "license_url": "", "url": "",
                             "split": "train", "tags": [], "duration": None}) + "\n")
    return root


def _run_stages(root: Path, monkeypatch: pytest.MonkeyPatch, **cluster: object) -> dict:
    """Run mels then teacher in `root` (this process is Ray's driver); returns the mels report."""
    monkeypatch.chdir(root)
    params = load_params(root / "params.yaml")
    params.teacher.batch_size = 2
    for key, value in cluster.items():
        setattr(params.cluster, key, value)
    args = argparse.Namespace(shard=None)
    assert mels_stage.run(params, args) == 0
    assert teacher_stage.run(params, args) == 0
    report = json.loads((root / "models/report/mels.json").read_text())
    return report


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    root = _project(tmp_path_factory.mktemp("local"))
    with pytest.MonkeyPatch.context() as mp:
        report = _run_stages(root, mp)
    return report, {out: (root / out).read_bytes() for out in OUTPUTS}


@pytest.fixture(scope="module")
def ray_cluster():
    with LocalRayCluster(workers=2, cpus_per_worker=2) as cluster:
        yield cluster


def _on_cluster(cluster: LocalRayCluster) -> dict:
    return {"ray_address": cluster.address, "tracks_per_task": 1, "teacher_actors": 2, "teacher_cpus": 1}


@needs_ray
def test_stages_on_a_ray_cluster_write_the_local_bytes(tmp_path, monkeypatch, local_run, ray_cluster):
    report, local = local_run
    assert report["tracks_ok"] == SONGS and report["segments"] >= 2 * SONGS
    assert [f["kind"] for f in report["failures"]] == ["non-audio"]
    got = _run_stages(_project(tmp_path), monkeypatch, **_on_cluster(ray_cluster))
    assert got == report  # the same tracks, failures worded alike, the same sizes
    for out in OUTPUTS:
        assert (tmp_path / out).read_bytes() == local[out], f"{out} differs from the local run"
    assert not (tmp_path / "data/mels.h5.parts").exists()


@needs_ray
def test_a_worker_node_killed_mid_run_loses_nothing(tmp_path, monkeypatch, local_run, ray_cluster):
    """One worker node is SIGKILLed after the first mels track is published, a fresh one joins, and
    that one is killed after the first teacher batch is written: Ray reruns the lost tasks and
    restarts the lost actor on the surviving node, and the outputs are still the local bytes."""
    _, local = local_run
    kills = []

    def kill_after_first(original, what):
        def wrapper(*a, **k):
            result = original(*a, **k)
            if what not in kills:
                kills.append(what)
                ray_cluster.kill_worker(-1)
            return result
        return wrapper

    monkeypatch.setattr(mel_ray, "_publish", kill_after_first(mel_ray._publish, "mels"))
    monkeypatch.setattr(teacher_cache.EmbeddingWriter, "write",
                        kill_after_first(teacher_cache.EmbeddingWriter.write, "teacher"))
    real_teacher_run = teacher_stage.run

    def teacher_run_on_two_nodes(*a, **k):
        ray_cluster.add_worker()  # replace the node the mels run lost, to lose one again
        return real_teacher_run(*a, **k)

    monkeypatch.setattr(teacher_stage, "run", teacher_run_on_two_nodes)
    _run_stages(_project(tmp_path), monkeypatch, **_on_cluster(ray_cluster))
    assert kills == ["mels", "teacher"]
    assert len(ray_cluster.alive_workers()) == 1
    for out in OUTPUTS:
        assert (tmp_path / out).read_bytes() == local[out], f"{out} differs from the local run"


def test_ray_is_only_in_its_extra_and_dev(repo_root: Path):
    """`pip install .` and '.[pipeline]' do not pull Ray; '.[ray]' does, and CI's '.[dev]' through it."""
    project = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]

    def has_ray(reqs: list[str]) -> bool:
        return any(r.split(">")[0].split("=")[0].split("[")[0].strip() == "ray" for r in reqs)

    assert not has_ray(project["dependencies"]) and not has_ray(extras["pipeline"])
    assert "student-clap[ray]" not in extras["pipeline"]
    assert has_ray(extras["ray"]) and "student-clap[ray]" in extras["dev"]


def test_without_ray_the_stage_says_how_to_get_it(monkeypatch):
    """cluster.ray_address set where Ray cannot be imported: a clear error naming the extra."""
    import builtins

    from pipeline import cluster

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(cluster.ClusterError, match=r"pip install 'student-clap\[ray\]'"):
        with cluster.connect("auto"):
            pass
