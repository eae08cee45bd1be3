"""The GPU path in one short run (<= 5 minutes on one GPU): teacher, student training, loader, DDP.

    python benchmarks/gpu.py [--json OUT] [--smoke] [--compile]

On a CUDA machine it measures, through the pipeline's own code:
- teacher segments/s: HTSAT-base with random weights in bf16 (`load_teacher`'s dtype), at the
  CUDA batch of `teacher.cuda_batch_size`, on 10-s log-mels;
- training samples (10-s segments) per second of mn04_as and mn10_as at batch 64 and 256: the
  training loop's `train_one_epoch` (bf16 autocast, channels_last, pinned non-blocking copies,
  AdamW, the distillation loss) over in-memory synthetic mels, after a warm-up epoch;
- the training loader's segments/s per worker count (data/mels.h5 streamed when it exists, else
  synthetic in-memory mels), copying each batch to the GPU;
- a DDP smoke step: torchrun with one process per GPU (here 1), NCCL, one training epoch of two
  steps through the loop (`ddp_ok`).
It prints each figure and, with --json, writes them: keys `gpu`, `date`, `teacher_segments_per_s`,
`train_samples_per_s` {model: {batch: v}}, `loader_segments_per_s` {workers: v}, `ddp_ok`
(plus `ddp_backend`, `loader_source`, `smoke`, `torch`, `notes`).

Without CUDA (or with --smoke) it runs the same code paths with tiny sizes (a tiny HTSAT, mn04_as
only, batch 2 on 32-frame mels, gloo for DDP): a check that the script works, not figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # per-epoch bars would drown the figures
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loader import loader_rate, training_data  # noqa: E402  (benchmarks/loader.py)
from pipeline.data.datasets import Collate, MelSource, Split, TrainItems  # noqa: E402
from pipeline.training.losses import DistillLoss, whitener  # noqa: E402
from pipeline.models.audio_student import build_audio_student  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE  # noqa: E402
from pipeline.teacher.model import Teacher, clap_config, htsat_base_audio_config, roberta_base_text_config  # noqa: E402
from pipeline.training import distributed as D  # noqa: E402
from pipeline.training.loop import (  # noqa: E402
    TrainConfig,
    build_loader,
    build_optimizer,
    prepare_model,
    train_one_epoch,
)

FULL = {"teacher_batch": load_params(ROOT / "params.yaml").teacher.cuda_batch_size, "teacher_seconds": 10.0, "frames": 1000,
        "models": ("mn04_as", "mn10_as"), "batches": (64, 256), "steps": 6, "workers": (0, 1, 2, 4, 8), "loader_seconds": 4.0}
SMOKE = {"teacher_batch": 1, "teacher_seconds": 0.0, "frames": 32, "models": ("mn04_as",), "batches": (2,),
         "steps": 1, "workers": (0, 1), "loader_seconds": 0.3}


# ------------------------------------------------------------------------- teacher


def teacher_rate(device: torch.device, smoke: bool, batch: int, seconds: float) -> float:
    """Segments/s of the HTSAT audio tower (random weights; bf16 on CUDA, as `dtype: auto`)."""
    from transformers import ClapModel

    audio = htsat_base_audio_config()
    if smoke:
        audio.update(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4], patch_embeds_hidden_size=8,
                     hidden_size=64)
    text = roberta_base_text_config(vocab_size=300)
    text.update(num_hidden_layers=1, hidden_size=64, num_attention_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = ClapModel(clap_config(audio, text)).eval().to(device=device, dtype=dtype)
    teacher = Teacher(model=model, tokenizer=None, device=str(device), dtype=dtype, sha256="", provenance={})
    mels = torch.randn(batch, 1001, 64) * 15 - 40
    with torch.no_grad():
        if not smoke:
            teacher.embed_mels_raw(mels)  # warm-up: allocations, kernels
            _sync(device)
        n, start = 0, time.perf_counter()
        while n < (1 if smoke else 2) * batch or time.perf_counter() - start < seconds:
            teacher.embed_mels_raw(mels)
            _sync(device)
            n += batch
    return n / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------- student training


class SyntheticDistillation:
    """A `Distillation` over synthetic in-memory mels (strategy "segments": one row per segment)."""

    def __init__(self, backbone: str, n_segments: int, frames: int) -> None:
        rng = np.random.default_rng(0)
        segs = np.arange(n_segments)
        mels = (rng.standard_normal((n_segments, 128, frames), dtype=np.float32) * 0.3 - 0.5).astype(np.float16)
        emb = rng.standard_normal((n_segments, 512)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        split = Split(segs, [str(i) for i in segs], [segs[i:i + 1] for i in segs], segs, emb)
        torch.manual_seed(0)
        self.model = build_audio_student({"backbone": backbone, "dropout": 0.1})
        self.dataset = TrainItems(split, "segments")
        self.collate_fn = Collate(split, MelSource.from_arrays(mels), emb, np.ones(n_segments, np.float32), False, 0)
        self.teacher_rows = emb

    def embed_batch(self, encode, batch):
        raw = encode(batch["mels"].float())
        return raw, torch.nn.functional.normalize(batch["teacher_raw_rows"], dim=-1)

    def validate(self, model):
        return {"none": 0.0}

    def enter_stage2(self, model):
        return list(model.parameters())

    def model_config(self):
        return {}


def _train_setup(backbone: str, batch: int, steps: int, frames: int, device: torch.device, ranks: D.Ranks,
                 compile_model: bool) -> SimpleNamespace:
    task = SyntheticDistillation(backbone, batch * steps, frames)
    # the shipped distill_audio section, timed for one epoch of this size
    section = replace(load_params(ROOT / "params.yaml").distill_audio, epochs=1, stage2_epochs=0,
                      batch_size=batch * ranks.world)
    cfg = TrainConfig(p=section, ckpt_dir=Path("."), monitor="none", live_dir=None, device=str(device),
                      num_workers=0, precision="bf16", channels_last=True, compile=compile_model, warmup=False)
    model = prepare_model(task, cfg, device)
    # the shipped loss, whitened term included (fitted on the synthetic targets, as the stage fits the training ones)
    whiten = whitener(task.teacher_rows) if cfg.p.loss.whitened_weight > 0 else None
    loss_fn = DistillLoss(cfg.p.loss, whiten=whiten).to(device)
    return SimpleNamespace(task=task, cfg=cfg, model=model, loss_fn=loss_fn,
                           opt=build_optimizer(task, model, loss_fn, cfg, 1),
                           encoder=D.wrap_encoder(model, ranks, device, compile_model),
                           loader=build_loader(task, cfg, ranks, device))


def _epoch(s: SimpleNamespace, device: torch.device, ranks: D.Ranks, epoch: int) -> None:
    s.loader.sampler.set_epoch(epoch)
    s.model.train()
    train_one_epoch(s.task, s.encoder, s.loss_fn, s.opt, s.loader, s.cfg, ranks, device, epoch)


def train_rate(backbone: str, batch: int, steps: int, frames: int, device: torch.device,
               compile_model: bool = False, warm_up: bool = True) -> float:
    """Samples/s of the loop's train_one_epoch, after one warm-up epoch."""
    s = _train_setup(backbone, batch, steps, frames, device, D.Ranks(), compile_model)
    if warm_up:
        _epoch(s, device, D.Ranks(), 0)
        _sync(device)
    start = time.perf_counter()
    _epoch(s, device, D.Ranks(), 1)
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


# ------------------------------------------------------------------------- DDP smoke (under torchrun)


def ddp_step(smoke: bool) -> int:
    """One epoch of two steps through the loop's DDP path (NCCL on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    device = D.resolve_device("auto", int(os.environ.get("LOCAL_RANK", "0")))
    ranks = D.init_ranks(device)
    sizes = SMOKE if smoke else FULL
    s = _train_setup("mn04_as", 2, 2, sizes["frames"], device, ranks, False)
    ok = isinstance(s.encoder, torch.nn.parallel.DistributedDataParallel)
    _epoch(s, device, ranks, 0)
    _sync(device)
    backend = dist.get_backend()
    dist.destroy_process_group()
    print(f"ddp step: backend {backend}, world {ranks.world}, DistributedDataParallel {ok}", flush=True)
    return 0 if ok else 1


def run_ddp_smoke(smoke: bool, timeout: float = 240.0) -> tuple[bool, str | None]:
    """Run `ddp_step` under torchrun; (it worked through DistributedDataParallel, its backend)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--ddp-step"] + (["--smoke"] if smoke else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print("ddp smoke: timed out")
        return False, None
    line = next((x for x in done.stdout.splitlines() if x.startswith("ddp step: backend ")), "")
    ok = done.returncode == 0 and line.endswith("DistributedDataParallel True")
    if not ok:
        print("ddp smoke failed:\n" + done.stdout[-2000:] + done.stderr[-4000:])
    return ok, (line.split()[3].rstrip(",") if line else None)


# ------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the default without CUDA)")
    ap.add_argument("--compile", action="store_true", help="train with torch.compile")
    ap.add_argument("--ddp-step", action="store_true", help=argparse.SUPPRESS)  # the torchrun child
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if args.ddp_step:
        return ddp_step(smoke)
    sizes = SMOKE if smoke else FULL
    device = torch.device("cuda" if cuda else "cpu")
    out: dict = {"gpu": torch.cuda.get_device_name() if cuda else None,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "torch": torch.__version__, "smoke": smoke, "notes": []}
    print(f"device: {out['gpu'] or 'CPU'}{' (smoke sizes: not figures)' if smoke else ''}", flush=True)

    t0 = time.perf_counter()
    out["teacher_segments_per_s"] = teacher_rate(device, smoke, sizes["teacher_batch"], sizes["teacher_seconds"])
    print(f"teacher (HTSAT{'-tiny' if smoke else '-base'}, {'bf16' if cuda else 'fp32'}, batch "
          f"{sizes['teacher_batch']}): {out['teacher_segments_per_s']:.1f} segments/s", flush=True)

    out["train_samples_per_s"] = {}
    for backbone in sizes["models"]:
        rates = out["train_samples_per_s"][backbone] = {}
        for batch in sizes["batches"]:
            try:
                rates[str(batch)] = train_rate(backbone, batch, sizes["steps"], sizes["frames"], device, args.compile,
                                               warm_up=not smoke)
            except torch.OutOfMemoryError:
                out["notes"].append(f"{backbone} batch {batch}: out of GPU memory")
                torch.cuda.empty_cache()
                continue
            print(f"train {backbone} batch {batch}: {rates[str(batch)]:.1f} samples/s", flush=True)

    have_demo = all((ROOT / p).is_file() for p in (MELS, TEACHER_CACHE, MANIFEST))
    data = training_data(ROOT, "streamed") if have_demo and not smoke else \
        training_data(ROOT, "synthetic", synthetic_tracks=8, frames=sizes["frames"])
    out["loader_source"] = data["origin"]
    out["loader_segments_per_s"] = {}
    for workers in sizes["workers"]:
        r = loader_rate(data, workers, seconds=sizes["loader_seconds"], device=device)
        out["loader_segments_per_s"][str(workers)] = r["segments_per_s"]
        print(f"loader ({data['origin']}) {workers} workers: {r['segments_per_s']:.1f} segments/s, "
              f"{r['cpu_s_per_1000_segments']:.2f} CPU-s per 1000", flush=True)

    out["ddp_ok"], out["ddp_backend"] = run_ddp_smoke(smoke)
    print(f"ddp smoke step (torchrun, 1 process, {out['ddp_backend']}): {'ok' if out['ddp_ok'] else 'FAILED'}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["ddp_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
