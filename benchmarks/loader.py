"""Shared by benchmarks/train.py and benchmarks/gpu.py: the training data loader's throughput.

Measures the loader the training loop builds (`pipeline.training.loop.build_loader` over
`pipeline.data.datasets.TrainItems` + `Collate`, strategy "both", 4 segments per track) for a
given number of DataLoader workers, on the demo's data/mels.h5 (streamed through HDF5, or held in
memory) when it exists, else on synthetic in-memory mels. Reports segments per second (wall) and
CPU seconds per 1000 segments (this process plus its finished worker processes).
"""

from __future__ import annotations

import resource
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.data.datasets import Collate, MelSource, Split, TrainItems, in_memory_limit, load_splits, open_mels
from pipeline.params import load_params
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE
from pipeline.training.distributed import Ranks
from pipeline.training.loop import TrainConfig, build_loader

SEGMENTS_PER_TRACK = 4


def training_data(root: Path, mode: str, synthetic_tracks: int = 40, frames: int = 1000) -> dict[str, Any]:
    """Train split, mel source and teacher rows. mode: "streamed" | "memory" (from data/mels.h5,
    None when it is absent) or "synthetic"."""
    mels_path, teacher_path, manifest_path = (root / p for p in (MELS, TEACHER_CACHE, MANIFEST))
    if mode in ("streamed", "memory"):
        if not (mels_path.is_file() and teacher_path.is_file() and manifest_path.is_file()):
            return {}
        from pipeline.data.teacher_cache import TeacherCache
        from pipeline.data.manifest import read_manifest

        with open_mels(mels_path) as mels, TeacherCache(teacher_path) as tc:
            train, _ = load_splits(mels, tc, read_manifest(manifest_path))
            seg_emb, seg_norm = np.asarray(tc.segment_embeddings), np.asarray(tc.segment_raw_norms)
        limit = 0 if mode == "streamed" else in_memory_limit("auto")
        source: Any = MelSource(mels_path, train.segments, with_teacher=False, memory_limit=limit)
        origin = f"{MELS} ({'streamed from disk through HDF5' if mode == 'streamed' else 'held in memory'})"
    else:
        per = 12  # segments per synthetic track (a 1-minute song)
        segs = np.arange(synthetic_tracks * per)
        mels = np.random.default_rng(0).standard_normal((len(segs), 128, frames), dtype=np.float32) * 0.3 - 0.5
        source = MelSource.from_arrays(mels.astype(np.float16))
        rng = np.random.default_rng(1)
        seg_emb = rng.standard_normal((len(segs), 512)).astype(np.float32)
        seg_norm = np.ones(len(segs), dtype=np.float32)
        train = Split(np.arange(synthetic_tracks), [str(i) for i in range(synthetic_tracks)],
                      [segs[i * per:(i + 1) * per] for i in range(synthetic_tracks)], segs, seg_emb[:synthetic_tracks])
        origin = f"synthetic in-memory mels ({synthetic_tracks} tracks x {per} segments, {frames} frames)"
    return {"train": train, "source": source, "seg_emb": seg_emb, "seg_norm": seg_norm, "origin": origin}


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def loader_rate(data: dict[str, Any], workers: int, batch_tracks: int = 4, seconds: float = 4.0,
                device: torch.device | None = None) -> dict[str, Any]:
    """Segments per second the training loader delivers with `workers` processes (after its
    first batch), copying each batch to `device` (non-blocking, pinned) when one is given."""
    device = device or torch.device("cpu")
    train = data["train"]
    task = SimpleNamespace(
        dataset=TrainItems(train, "both"),
        collate_fn=Collate(train, data["source"], data["seg_emb"], data["seg_norm"], True, SEGMENTS_PER_TRACK),
    )
    section = replace(load_params(Path(__file__).resolve().parents[1] / "params.yaml").distill_audio, epochs=1, batch_size=batch_tracks)
    cfg = TrainConfig(p=section, ckpt_dir=Path("."), monitor="-", live_dir=None, device=device.type,
                      num_workers=workers, precision="fp32", channels_last=False, compile=False)
    cpu0 = _cpu_seconds()
    loader = build_loader(task, cfg, Ranks(), device)
    rows, epoch, started = 0, 0, None
    while started is None or time.perf_counter() - started < seconds:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            mels = batch["mels"].to(device, non_blocking=True)
            if started is None:  # worker start-up is not throughput
                started = time.perf_counter()
                continue
            rows += mels.shape[0]
            if time.perf_counter() - started >= seconds:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    del loader  # persistent workers exit here, so their CPU time is counted below
    cpu = _cpu_seconds() - cpu0
    return {"workers": workers, "segments_per_s": rows / wall, "cpu_s_per_1000_segments": 1000 * cpu / max(rows, 1),
            "segments": rows}


def point_selection_reference(data: dict[str, Any], batches: int = 40, batch_tracks: int = 4) -> dict[str, Any]:
    """CPU seconds per 1000 segments of the previous streamed reader, for comparison in the same
    run: one HDF5 point selection (sorted unique indices) per batch, in this process."""
    train, source = data["train"], data["source"]
    cache = source._handle()
    collate = Collate(train, source, data["seg_emb"], data["seg_norm"], True, SEGMENTS_PER_TRACK)
    rng = np.random.default_rng(0)
    n, cpu0 = 0, _cpu_seconds()
    for e in range(batches):
        tracks = rng.integers(0, len(train.track_ids), batch_tracks)
        segs = np.concatenate([collate._track_rows(e, int(t)) for t in tracks])
        cache.student_mels(np.unique(segs))
        n += len(segs)
    return {"reader": "one HDF5 point selection per batch (previous)", "cpu_s_per_1000_segments":
            1000 * (_cpu_seconds() - cpu0) / n}
