"""Ray for the per-song stages (mels, teacher): connecting to a cluster and keeping work in flight.
The stage process is Ray's driver and writes every result itself. How and why: docs/cluster.md."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# A task is tried again this often when its worker or node dies; an actor is restarted as often.
RETRIES = 3
T = TypeVar("T")


class ClusterError(RuntimeError):
    """Ray is wanted but missing, or the cluster cannot run the work (the message says what to do)."""


@contextmanager
def connect(address: str) -> Iterator[Any]:
    """Connect this process to the Ray cluster at `address` ("auto": RAY_ADDRESS, else the local
    cluster, else a new local one) and disconnect at the end; an existing connection is reused."""
    try:
        import ray
    except ImportError:
        raise ClusterError(
            "cluster.ray_address is set but Ray is not installed: pip install 'student-clap[ray]' "
            "(or set cluster.ray_address to \"\" to run here)"
        ) from None
    if ray.is_initialized():
        yield ray
        return
    package = Path(__file__).resolve().parent
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        # workers import the driver's pipeline package, whatever is installed on their nodes
        "runtime_env": {"py_modules": [str(package)], "excludes": ["__pycache__", "*.pyc"]},
    }
    if address == "auto":
        kwargs["include_dashboard"] = False
        target = None  # Ray's own order: RAY_ADDRESS, the cluster running here, else start one
    else:
        target = address
    try:
        ray.init(address=target, **kwargs)
    except ConnectionError as exc:
        raise ClusterError(f"cluster.ray_address {address!r}: cannot reach a Ray cluster ({exc})") from None
    resources = ray.cluster_resources()
    log.info("Ray cluster %s: %d CPU, %d GPU on %d node(s)", address, int(resources.get("CPU", 0)),
             int(resources.get("GPU", 0)), len([n for n in ray.nodes() if n.get("Alive")]))
    try:
        yield ray
    finally:
        ray.shutdown()


def windowed(ray: Any, items: deque[T], submit: Callable[[T], Any], window: int) -> Iterator[tuple[T, Any]]:
    """Submit items (taken from the left of `items`) keeping at most `window` in flight, and yield
    (item, object ref) as each finishes. The caller may append to `items` while iterating (work to
    try again in smaller pieces); inputs are read only when their item is submitted (backpressure)."""
    inflight: dict[Any, T] = {}
    while items or inflight:
        while items and len(inflight) < max(1, window):
            item = items.popleft()
            inflight[submit(item)] = item
        ready, _ = ray.wait(list(inflight), num_returns=1)
        yield inflight.pop(ready[0]), ready[0]


def chunks(seq: list[T], size: int) -> Iterable[list[T]]:
    return (seq[i : i + size] for i in range(0, len(seq), max(1, size)))
