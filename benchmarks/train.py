"""Audio-student training throughput, and whether the data loader can feed a GPU.

    python benchmarks/train.py [--models mn04_as mn10_as] [--batch 32] [--steps 3] [--threads N]
                               [--workers 0 1 2] [--loader-seconds 4] [--skip-training | --skip-loader]
                               [--glibc-defaults]

Prints, per backbone, training samples (10-s segments) per second for one optimisation step
(forward + backward + AdamW, negative-cosine loss with the centred term) at the given batch, on
CPU or on CUDA when available (with peak GPU memory; utilisation from nvidia-smi when present),
and per step the process's user and system CPU seconds and minor page faults (and its peak RSS).
The allocator is set up as every stage sets it (`pipeline.cli.keep_freed_memory`);
`--glibc-defaults` leaves glibc's defaults, for the side-by-side figure in docs/benchmarks.md.

Then the training data loader alone (`benchmarks/loader.py`: the loop's own DataLoader over the
stage's items and collate, strategy "both", 4 segments per track) per number of worker processes:
streamed from data/mels.h5 through HDF5 and held in memory when the demo caches exist (run
`dvc repro teacher` first), else on synthetic in-memory mels. Each figure is segments per second
(wall) and CPU seconds per 1000 segments (this process and its workers). The loader is compared
with what one GPU consumes, not with CPU training: GPU_DEMAND segments/s for mn10_as is an
ASSUMPTION (order of magnitude for one current GPU) until benchmarks/gpu.py has measured it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GPU_DEMAND = 2000.0  # segments/s one current GPU trains mn10_as at: an assumption, not a measurement
TARGET_2_WORKERS = 500.0  # segments/s streamed with 2 workers (issue 14)

from loader import loader_rate, point_selection_reference, training_data  # noqa: E402  (benchmarks/loader.py)
from pipeline.training.losses import DistillLoss  # noqa: E402
from pipeline.models.audio_student import build_audio_student  # noqa: E402
from pipeline.cli import keep_freed_memory  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE  # noqa: E402


def train_rate(name: str, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_audio_student({"backbone": name, "dropout": 0.1}).to(device).train()
    centre = torch.nn.functional.normalize(torch.randn(512), dim=0)
    loss = load_params(ROOT / "params.yaml").distill_text.loss  # a plain cosine loss
    loss_fn = DistillLoss(loss, centre=centre).to(device)
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
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    out = {"model": name, "batch": batch, "samples_per_s": batch * steps / dt, "s_per_step": dt / steps,
           "user_cpu_s_per_step": (r1.ru_utime - r0.ru_utime) / steps,
           "sys_cpu_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
           "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
           "peak_rss_mb": r1.ru_maxrss / 1024}  # of the whole process so far
    if device.type == "cuda":
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def gpu_utilisation() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mn04_as", "mn10_as"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--loader-seconds", type=float, default=4.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--skip-training", action="store_true", help="loader figures only")
    ap.add_argument("--skip-loader", action="store_true", help="training figures only")
    ap.add_argument("--glibc-defaults", action="store_true", help="leave glibc's allocator settings as they are")
    args = ap.parse_args()
    if not args.glibc_defaults:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    if not args.skip_training:
        for name in args.models:
            r = train_rate(name, args.batch, args.steps, device)
            if device.type == "cuda":
                r["nvidia_smi"] = gpu_utilisation()
            print("train ", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    if args.skip_loader:
        return
    print(f"loader: compared with an ASSUMED GPU demand of {GPU_DEMAND:.0f} segments/s (mn10_as, one current GPU)")
    have_demo = all((ROOT / p).is_file() for p in (MELS, TEACHER_CACHE, MANIFEST))
    modes = ["streamed", "memory"] if have_demo else ["synthetic"]
    if modes == ["synthetic"]:
        print("loader: no demo caches (run `dvc repro teacher` for the figures from data/mels.h5)")
    for mode in modes:
        data = training_data(ROOT, mode)
        for workers in args.workers:
            r = {"source": data["origin"], **loader_rate(data, workers, seconds=args.loader_seconds, device=device)}
            r["share_of_gpu_demand"] = r["segments_per_s"] / GPU_DEMAND
            if mode == "streamed" and workers == 2:
                r["meets_target_500"] = r["segments_per_s"] >= TARGET_2_WORKERS
            print("loader", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        if mode == "streamed":
            r = point_selection_reference(data)
            print("loader", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        if mode in ("streamed", "memory"):
            data["source"].close()


if __name__ == "__main__":
    main()
