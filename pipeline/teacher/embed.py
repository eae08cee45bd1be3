"""The teacher's segment embedding, here or as Ray actors on a cluster (cluster.ray_address set): both
run `embed_block`, so a batch gives the same bytes wherever it runs. Resources, failures: docs/cluster.md.
"""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import cluster
from pipeline.data.cache_files import contiguous_runs
from pipeline.teacher.model import Teacher, load_teacher

log = logging.getLogger(__name__)

WAIT_LOG_S = 60.0


def segment_batches(rows: np.ndarray, batch_size: int) -> Iterator[tuple[int, int]]:
    """Pending rows -> contiguous [start, stop) ranges of at most batch_size (contiguous reads are cheap)."""
    for a, b in contiguous_runs(rows):
        for start in range(a, b, batch_size):
            yield start, min(start + batch_size, b)


def embed_block(teacher: Teacher, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
    """[B, 1001, 64] teacher mels -> (L2-normalised embeddings, raw norms, offset of the first
    non-finite or zero embedding or None)."""
    raw = teacher.embed_mels_raw(torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)))
    norms = raw.norm(dim=-1)
    bad = ~torch.isfinite(raw).all(dim=-1) | (norms == 0)
    first_bad = int(torch.nonzero(bad)[0]) if bad.any() else None
    return (raw / norms[:, None]).cpu().numpy(), norms.cpu().numpy(), first_bad


def teacher_files(model_dir: str | Path) -> dict[str, bytes]:
    """A teacher folder's files (relative path -> bytes), to rebuild it on a worker."""
    root = Path(model_dir)
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    if not files:
        raise cluster.ClusterError(f"{root}: no teacher files to send to the cluster")
    return files


class TeacherActor:
    """A teacher loaded on a Ray worker from the driver's folder (a Ray actor class)."""

    def __init__(self, files: dict[str, bytes], device: str, dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self._dir = tempfile.TemporaryDirectory(prefix="student-clap-teacher-")
        for rel, data in files.items():
            path = Path(self._dir.name) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.teacher = load_teacher(self._dir.name, device=device, dtype=dtype)

    def describe(self) -> dict:
        t = self.teacher
        return {"sha256": t.sha256, "provenance": t.provenance, "device": t.device,
                "dtype": str(t.dtype).removeprefix("torch.")}

    def embed(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, int | None]:
        with torch.no_grad():
            return embed_block(self.teacher, block)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        return self.teacher.embed_text(texts).cpu().numpy()


class RayTeacher:
    """Teacher actors on a Ray cluster, standing in for a Teacher where the teacher stage uses one:
    sha256, provenance, device, dtype, embed_text, plus embed_batches for the segments."""

    def __init__(self, ray: Any, actors: list[Any]) -> None:
        self.ray, self.actors = ray, actors
        infos = _wait_ready(ray, [a.describe.remote() for a in actors])
        if len({(i["sha256"], i["device"].split(":")[0], i["dtype"]) for i in infos}) != 1:
            raise cluster.ClusterError(f"teacher actors disagree on weights, device or dtype: {infos}")
        info = infos[0]
        self.sha256, self.provenance, self.device = info["sha256"], info["provenance"], info["device"]
        self.dtype = getattr(torch, info["dtype"])
        log.info("%d teacher actor(s) on %s/%s", len(actors), self.device, info["dtype"])

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.array(self.ray.get(self.actors[0].embed_text.remote(list(texts)))))  # writable copy

    def embed_batches(self, read: Callable[[int, int], np.ndarray], batches: list[tuple[int, int]],
                      write: Callable[[int, int, tuple], None]) -> None:
        """read(start, stop) -> mels for each batch, sent to the least busy actor; write(start, stop,
        embed_block's result) as each returns. Two batches per actor are in flight."""
        load = [0] * len(self.actors)
        owner: dict[Any, int] = {}

        def submit(batch: tuple[int, int]) -> Any:
            i = load.index(min(load))
            load[i] += 1
            ref = self.actors[i].embed.remote(read(*batch))
            owner[ref] = i
            return ref

        for (start, stop), ref in cluster.windowed(self.ray, deque(batches), submit, 2 * len(self.actors)):
            load[owner.pop(ref)] -= 1
            write(start, stop, self.ray.get(ref))


def _wait_ready(ray: Any, refs: list[Any]) -> list[dict]:
    """Actor descriptions, logging while the cluster has no room for some actors yet."""
    while True:
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=WAIT_LOG_S)
        if not pending:
            return ray.get(refs)
        log.warning("%d of %d teacher actors are still waiting for resources (cluster: %s)",
                    len(pending), len(refs), ray.available_resources())


def actor_options(ray: Any, device: str, actors: int, cpus: int) -> tuple[int, dict]:
    """(number of actors, Ray resource options): GPU actors when the cluster has GPUs and the
    teacher may use them, else CPU actors of `cpus` CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise cluster.ClusterError(f"teacher.device is {device!r} but the Ray cluster has no GPU")
    if gpus and device != "cpu":
        return actors or gpus, {"num_gpus": 1, "num_cpus": 1}
    return actors or max(1, int(resources.get("CPU", 0)) // cpus), {"num_cpus": cpus}


@contextmanager
def ray_teacher(address: str, model_dir: str | Path, device: str, dtype: str, actors: int, cpus: int
                ) -> Iterator[RayTeacher]:
    """Connect to the cluster at `address`, start the teacher actors, and stop them at the end."""
    with cluster.connect(address) as ray:
        n, options = actor_options(ray, device, actors, cpus)
        files = ray.put(teacher_files(model_dir))
        # A call to an actor that is restarting (its node was lost, its teacher is loading again) is
        # retried until it answers: a bounded count ran out on a loaded machine while the restart was
        # still under way (ActorUnavailableError). Restarts stay bounded; past them a call fails.
        remote = ray.remote(TeacherActor).options(max_restarts=cluster.RETRIES, max_task_retries=-1,
                                                  scheduling_strategy="SPREAD", **options)
        handles = [remote.remote(files, device, dtype, cpus) for _ in range(n)]
        try:
            yield RayTeacher(ray, handles)
        finally:
            for h in handles:
                ray.kill(h)
