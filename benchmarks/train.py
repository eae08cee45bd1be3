"""Audio-student training throughput and whether the data loader keeps up.

    python benchmarks/train.py [--models mn04_as mn10_as] [--batch 32] [--steps 4] [--threads N]

Prints, per backbone, training samples (10-s segments) per second for one optimisation step
(forward + backward + AdamW, negative-cosine loss with the centred term) at the given batch, on
CPU or on CUDA when available (with peak GPU memory; utilisation from nvidia-smi when present).
Then the data loader alone (the stage's `Collate` over its `MelSource`, strategy "both" with 4
segments per track): from data/mels.h5 when
the demo caches exist — both held in memory and streamed from HDF5 — otherwise from synthetic
in-memory mels. The loader must deliver at least 3x what training consumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.training.losses import DistillLoss  # noqa: E402
from pipeline.models.audio_student import build_audio_student  # noqa: E402
from pipeline.params import LossParams  # noqa: E402


def train_rate(name: str, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_audio_student({"backbone": name}).to(device).train()
    centre = torch.nn.functional.normalize(torch.randn(512), dim=0)
    loss_fn = DistillLoss(LossParams(), centre=centre).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    mels = torch.randn(batch, 128, 1000, device=device) * 0.3 - 0.5
    target = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1)

    def step() -> None:
        loss, _ = loss_fn(model.embed_raw(mels), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"model": name, "batch": batch, "samples_per_s": batch * steps / dt, "s_per_step": dt / steps}
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def gpu_utilisation() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def loader_rate(batch: int, seconds: float, stream: bool) -> dict:
    """Segments per second delivered by the stage's collate function over the training split."""
    from pipeline.stages import distill_audio as stage

    mels_path, teacher_path, manifest_path = (ROOT / p for p in (stage.MELS, stage.TEACHER_CACHE, stage.MANIFEST))
    have_demo = mels_path.is_file() and teacher_path.is_file() and manifest_path.is_file()
    if have_demo:
        from pipeline.data.teacher_cache import TeacherCache
        from pipeline.data.manifest import read_manifest

        with stage._open_mels(mels_path) as mels, TeacherCache(teacher_path) as tc:
            train, _ = stage.load_splits(mels, tc, read_manifest(manifest_path))
            seg_emb, seg_norm = tc.segment_embeddings, tc.segment_raw_norms
        limit = stage.PRELOAD_LIMIT_BYTES
        if stream:
            stage.PRELOAD_LIMIT_BYTES = 0
        try:
            source = stage.MelSource(mels_path, train.segments, with_teacher=False)
        finally:
            stage.PRELOAD_LIMIT_BYTES = limit
        origin = "data/mels.h5 (" + ("streamed" if stream else "in memory") + ")"
    else:
        if stream:
            return {"source": "streamed", "skipped": "no data/mels.h5: run `dvc repro distill_audio` first"}
        n_tracks, per = 40, 4
        segs = np.arange(n_tracks * per)
        mem = (np.random.default_rng(0).standard_normal((len(segs), 128, 1000)) * 0.3 - 0.5).astype(np.float16)

        class _Mem:
            def student(self, idx):
                return mem[idx].astype(np.float32)

            with_teacher = False

        source = _Mem()
        seg_emb = np.random.default_rng(1).standard_normal((len(segs), 512)).astype(np.float32)
        seg_norm = np.ones(len(segs), dtype=np.float32)
        train = stage.Split(np.arange(n_tracks), [str(i) for i in range(n_tracks)],
                            [segs[i * per:(i + 1) * per] for i in range(n_tracks)], segs, seg_emb[:n_tracks])
        origin = "synthetic in-memory mels"
    items = stage.TrainItems(train, "both")
    collate = stage.Collate(train, source, seg_emb, seg_norm, items.by_track, 4)
    rng = np.random.default_rng(0)
    rows = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        # `batch` training rows: tracks of up to 4 segments each, as the default strategy draws them
        b = collate([int(i) for i in rng.integers(0, len(items), max(1, batch // 4))])
        rows += b["mels"].shape[0]
    dt = time.perf_counter() - t0
    return {"source": origin, "segments_per_s": rows / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mn04_as", "mn10_as"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--loader-seconds", type=float, default=5.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    fastest = None
    for name in args.models:
        r = train_rate(name, args.batch, args.steps, device)
        if device.type == "cuda":
            r["nvidia_smi"] = gpu_utilisation()
        print("train ", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        fastest = r["samples_per_s"] if fastest is None else max(fastest, r["samples_per_s"])
    for stream in (False, True):
        r = loader_rate(args.batch, args.loader_seconds, stream)
        if "segments_per_s" in r:
            r["ratio_to_fastest_training"] = r["segments_per_s"] / fastest
            r["keeps_up_3x"] = r["ratio_to_fastest_training"] >= 3.0
        print("loader", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
