"""Device choice and DDP plumbing for the training loop (torchrun: NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a (possibly one-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA process uses the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group torchrun set up (also for one process: DDP then runs as asked),
    else a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not under_torchrun():
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Re-run the current command under torchrun with `nproc` processes on this machine.

    Called by a stage when `nproc > 1` and it is not already running under torchrun; returns the
    exit code of the distributed run.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.cli", *argv]
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)


class RawEncoder(nn.Module):
    """Forward = the student's embed_raw, so DDP's hooks see the pass the loss is built on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> torch.Tensor:
        fn = getattr(self.model, "embed_raw", None)
        return fn(*inputs) if fn is not None else self.model(*inputs)


def wrap_encoder(model: nn.Module, ranks: Ranks, device: torch.device, compile_model: bool = False) -> nn.Module:
    """The callable a task encodes batches with: DDP-wrapped when distributed, optionally compiled.
    Rebuilt when stage 2 freezes the encoder: DDP registers hooks on the parameters that require
    grad at construction time."""
    enc: nn.Module = RawEncoder(model)
    if ranks.world > 1 or dist.is_initialized():
        enc = nn.parallel.DistributedDataParallel(enc, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        enc = torch.compile(enc)
    return enc


def average_gradient(param: nn.Parameter | None, ranks: Ranks) -> None:
    """Average one parameter's gradient over ranks (for parameters outside the DDP module)."""
    if ranks.world > 1 and param is not None and param.grad is not None:
        dist.all_reduce(param.grad)
        param.grad /= ranks.world


def all_sum(values: list[float], ranks: Ranks) -> torch.Tensor:
    totals = torch.tensor(values, dtype=torch.float64)
    if ranks.world > 1:
        dist.all_reduce(totals)
    return totals


def from_main(obj: Any, ranks: Ranks) -> Any:
    """`obj` as computed on rank 0, on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """One `obj` per rank, in rank order (on every rank)."""
    if ranks.world == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()
