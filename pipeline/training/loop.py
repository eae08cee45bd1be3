"""The one training loop, shared by the audio and the text student.

A stage describes *what* to train with a small task object (see `TrainTask`); `fit()` does the
rest the same way for every student:

- AdamW with weight decay and gradient-norm clipping;
- stage 1 (`epochs`) trains every parameter, with the learning rate rising linearly from 0 to
  `lr` over the first epoch (per step); stage 2 (`stage2_epochs`) calls `task.enter_stage2()`
  (freeze the encoder), and trains the returned parameters with a fresh optimizer at `stage2_lr`;
- ReduceLROnPlateau on a validation metric (`monitor`, a key of `task.validate()`), with mode,
  factor, patience, threshold and min_lr from a `PlateauParams` section;
- the loss from a `LossParams` section (`pipeline.training.losses.DistillLoss`), plus the centred cosine
  term around `TrainConfig.centre` when one is given (the mean train teacher embedding);
- after every epoch a checkpoint ``epoch_NNN.pt`` plus ``latest.pt`` and, when the monitored
  metric improved, ``best.pt``. A checkpoint holds model, loss (learnable logit scale), optimizer
  and scheduler state, the epoch, its metrics and the history, the params, the task's model
  config and the RNG states of python, numpy and torch (per rank). `resume=True` continues from
  ``latest.pt`` and reproduces an uninterrupted run exactly (CPU, num_workers 0);
- DVCLive: per-epoch metrics ``train/*``, ``val/*`` and ``lr`` as plots under `live_dir`
  (never touching dvc.yaml and never creating DVC experiments itself);
- a tqdm bar per epoch and a log line per epoch with timing and ETA;
- DDP: when started by torchrun (``WORLD_SIZE > 1`` in the environment) it joins the process group
  (gloo on CPU, nccl on CUDA), shards every epoch with a DistributedSampler (each rank takes
  ``batch_size / world_size`` items per step, so the global batch is unchanged), averages gradients,
  validates on rank 0 and broadcasts the result, and writes checkpoints and logs on rank 0 only.
  Use `relaunch_with_torchrun()` to start such a run from a stage.

Minimal use::

    from pipeline.training.loop import TrainConfig, fit

    class MyTask:
        model = MyStudent(...)                       # nn.Module with embed_raw(...) (or forward)
        dataset = MyDataset(...)                     # torch Dataset of training items
        collate_fn = None                            # or a function items -> batch
        def embed_batch(self, encode, batch):        # -> (student_raw [N, D], teacher [N, D])
            ids, mask, target = batch
            return encode(ids, mask), target         # always call `encode`, never the model
        def validate(self, model):                   # -> {"cosine": ..., ...}; model in eval mode
            ...
        def enter_stage2(self, model):               # freeze what stage 2 keeps fixed
            model.freeze_encoder(); return model.head_parameters()
        def model_config(self):                      # stored in every checkpoint
            return model.config

    result = fit(MyTask(), TrainConfig.from_section(params.distill_text, ckpt_dir=..., live_dir=...,
                 monitor="cosine", resume=args.resume))
    result.best_state_dict, result.best_metrics, result.history

Randomness: the loop seeds python, numpy and torch from `seed` (+ rank) once and shuffles each
epoch with a generator derived from (seed, epoch). A task that needs randomness (augmentation,
dropout) should draw it from torch's global RNG in the main process, or derive it from the epoch
(`set_epoch(epoch)` is called when the task defines it); then resume is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from pipeline.training.losses import DistillLoss
from pipeline.params import LossParams, PlateauParams

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "student-clap-checkpoint/1"


class TrainTask(Protocol):
    """What a stage hands to `fit()`."""

    model: nn.Module
    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any] | None

    def embed_batch(self, encode: Callable[..., torch.Tensor], batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Student raw embeddings and teacher targets, both [N, D], for one batch (already on the
        device). `encode(*inputs)` runs the model's `embed_raw` (through DDP when distributed):
        call it exactly once per batch for every forward pass."""
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (model in eval mode, no grad). Must contain `TrainConfig.monitor`."""
        ...

    def enter_stage2(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """Freeze what stage 2 keeps fixed; return the parameters stage 2 trains."""
        ...

    def model_config(self) -> dict[str, Any]:
        """Config from which the model can be rebuilt; stored in checkpoints."""
        ...


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int  # global: split over ranks under DDP
    lr: float
    ckpt_dir: Path
    monitor: str  # key of task.validate() driving ReduceLROnPlateau and the best checkpoint
    stage2_epochs: int = 0
    stage2_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    loss: LossParams = field(default_factory=LossParams)
    scheduler: PlateauParams = field(default_factory=PlateauParams)
    seed: int = 0
    num_workers: int = 0
    warmup: bool = True  # linear warmup over the first epoch
    live_dir: Path | None = None  # DVCLive directory, None = no DVCLive
    resume: bool = False
    device: str = "cpu"  # cpu | cuda | auto
    params: dict[str, Any] = field(default_factory=dict)  # recorded in checkpoints
    keep_epoch_checkpoints: bool = True
    centre: torch.Tensor | None = None  # adds the centred cosine term to the loss (see DistillLoss)

    @classmethod
    def from_section(cls, section: Any, **kwargs: Any) -> TrainConfig:
        """Fill the common fields from a params section (distill_audio / distill_text)."""
        names = ("epochs", "batch_size", "lr", "stage2_epochs", "stage2_lr", "weight_decay", "grad_clip",
                 "loss", "scheduler", "seed", "num_workers")
        values = {n: getattr(section, n) for n in names if hasattr(section, n)}
        values.setdefault("params", dataclasses.asdict(section))
        values.update(kwargs)
        values["ckpt_dir"] = Path(values["ckpt_dir"])
        if values.get("live_dir") is not None:
            values["live_dir"] = Path(values["live_dir"])
        return cls(**values)


@dataclass
class TrainResult:
    best_epoch: int
    best_metrics: dict[str, float]
    best_state_dict: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    last_metrics: dict[str, float]


# ------------------------------------------------------------------------- distributed helpers


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


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


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


class _RawEncoder(nn.Module):
    """Forward = the student's embed_raw, so DDP's hooks see the pass the loss is built on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> torch.Tensor:
        fn = getattr(self.model, "embed_raw", None)
        return fn(*inputs) if fn is not None else self.model(*inputs)


# ------------------------------------------------------------------------- RNG state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------- checkpoints


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """latest.pt / best.pt as hard links to the epoch file (no extra disk), atomically replaced;
    a copy where links are not possible. Editing tools replace files, never write through links."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (weights_only) and check its format."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a student-clap training checkpoint")
    return ckpt


def _build_scheduler(opt: torch.optim.Optimizer, p: PlateauParams) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=p.mode, factor=p.factor, patience=p.patience, threshold=p.threshold, min_lr=p.min_lr
    )


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------- the loop


def fit(task: TrainTask, cfg: TrainConfig) -> TrainResult:
    """Train `task.model` as configured; returns the best weights and the metric history."""
    env_device = _resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dd = _init_distributed(env_device)
    device = env_device
    if cfg.batch_size % dd.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {dd.world} processes")
    if cfg.epochs < 0 or cfg.stage2_epochs < 0 or cfg.epochs + cfg.stage2_epochs == 0:
        raise ValueError(f"need at least one epoch (epochs={cfg.epochs}, stage2_epochs={cfg.stage2_epochs})")
    per_rank_batch = cfg.batch_size // dd.world
    total_epochs = cfg.epochs + cfg.stage2_epochs
    mode = cfg.scheduler.mode

    _seed_everything(cfg.seed + dd.rank)
    model = task.model.to(device)
    loss_fn = DistillLoss(cfg.loss, centre=cfg.centre).to(device)
    ckpt_dir = Path(cfg.ckpt_dir)

    # --- what to continue from
    ckpt: dict[str, Any] | None = None
    latest = ckpt_dir / "latest.pt"
    if cfg.resume and latest.is_file():
        ckpt = load_checkpoint(latest)
        log.info("resuming from %s (epoch %d done)", latest, ckpt["epoch"])
    elif cfg.resume:
        log.warning("--resume: no checkpoint at %s, starting from scratch", latest)
    if dd.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            stale = sorted(ckpt_dir.glob("epoch_*.pt")) + [p for p in (latest, ckpt_dir / "best.pt") if p.exists()]
            if stale:
                log.info("fresh run: removing %d old checkpoints from %s", len(stale), ckpt_dir)
                for p in stale:
                    p.unlink()

    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "value": None, "metrics": {}}
    if ckpt is not None:
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
        best = dict(ckpt.get("best", best))
        if ckpt.get("stage") == 2:
            task.enter_stage2(model)
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt["loss"])
        if start_epoch >= total_epochs:
            log.info("checkpoint already covers %d of %d epochs: nothing to train", start_epoch, total_epochs)

    def make_encoder() -> nn.Module:
        # Re-wrapped when stage 2 freezes the encoder: DDP registers its hooks on the parameters
        # that require grad at construction time.
        enc: nn.Module = _RawEncoder(model)
        if dd.world > 1:
            enc = nn.parallel.DistributedDataParallel(enc, device_ids=[device.index] if device.type == "cuda" else None)
        return enc

    def make_stage(stage: int) -> tuple[torch.optim.Optimizer, Any, list[nn.Parameter]]:
        if stage == 1:
            params = [p for p in model.parameters() if p.requires_grad]
            lr = cfg.lr
        else:
            params = [p for p in task.enter_stage2(model)]
            lr = cfg.stage2_lr
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
        extra = list(loss_fn.parameters())  # the contrastive logit scale: no weight decay
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=lr)
        return opt, _build_scheduler(opt, cfg.scheduler), params + extra

    stage = 1 if start_epoch < cfg.epochs else 2
    optimizer, scheduler, trainable = make_stage(stage)
    encoder = make_encoder()
    if ckpt is not None:
        if ckpt.get("stage") == stage and start_epoch < total_epochs:
            # `student-clap ckpt reset` may have removed either state: then it starts afresh
            if ckpt.get("optimizer") is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            else:
                log.info("checkpoint has no optimizer state: fresh AdamW at lr %g", optimizer.param_groups[0]["lr"])
            if ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            else:
                log.info("checkpoint has no scheduler state: fresh ReduceLROnPlateau")
        elif start_epoch < total_epochs:
            log.info("checkpoint was in stage %s, continuing in stage %d with a fresh optimizer", ckpt.get("stage"), stage)
        if ckpt.get("lr_override") is not None and start_epoch < total_epochs:
            for g in optimizer.param_groups:
                g["lr"] = float(ckpt["lr_override"])
            log.info("learning rate set to %g by `ckpt reset --lr`", float(ckpt["lr_override"]))
        rng = ckpt["rng"]
        _set_rng_state(rng[dd.rank] if dd.rank < len(rng) else rng[0])

    sampler = DistributedSampler(task.dataset, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        task.dataset,
        batch_size=per_rank_batch,
        sampler=sampler,
        collate_fn=task.collate_fn,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the training set is empty")

    live = None
    if dd.main and cfg.live_dir is not None and start_epoch < total_epochs:
        from dvclive import Live

        live = Live(dir=str(cfg.live_dir), resume=ckpt is not None, save_dvc_exp=False, dvcyaml=None)
        live.step = start_epoch

    epoch_times: list[float] = []
    last_metrics: dict[str, float] = dict(history[-1]) if history else {}
    for epoch in range(start_epoch, total_epochs):
        new_stage = 1 if epoch < cfg.epochs else 2
        if new_stage != stage:
            log.info("stage 2: encoder frozen, training the projection for %d epochs at lr %g",
                     cfg.stage2_epochs, cfg.stage2_lr)
            stage = new_stage
            optimizer, scheduler, trainable = make_stage(stage)
            encoder = make_encoder()
        warm = cfg.warmup and stage == 1 and epoch == 0
        sampler.set_epoch(epoch)
        if hasattr(task, "set_epoch"):
            task.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "cosine": 0.0, "centred_cosine": 0.0}
        n_items = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total_epochs} (stage {stage})", disable=not dd.main,
                   leave=False, mininterval=1.0, dynamic_ncols=True)
        for step, batch in enumerate(bar):
            if warm:
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr * (step + 1) / steps_per_epoch
            batch = _to_device(batch, device)
            student, teacher = task.embed_batch(encoder, batch)
            loss, stats = loss_fn(student, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if dd.world > 1 and loss_fn.logit_scale is not None and loss_fn.logit_scale.grad is not None:
                dist.all_reduce(loss_fn.logit_scale.grad)
                loss_fn.logit_scale.grad /= dd.world
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            n = student.shape[0]
            sums["loss"] += float(loss.detach()) * n
            sums["cosine"] += stats["cosine"] * n
            sums["centred_cosine"] += stats.get("centred_cosine", 0.0) * n
            n_items += n
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", cos=f"{stats['cosine']:.3f}")
        bar.close()
        totals = torch.tensor([sums["loss"], sums["cosine"], sums["centred_cosine"], float(n_items)], dtype=torch.float64)
        if dd.world > 1:
            dist.all_reduce(totals)
        train_metrics = {"loss": float(totals[0] / totals[3]), "cosine": float(totals[1] / totals[3])}
        if cfg.centre is not None:
            train_metrics["cosine_centred"] = float(totals[2] / totals[3])
        if loss_fn.logit_scale is not None:
            train_metrics["logit_scale"] = float(loss_fn.logit_scale.detach())
        lr_used = optimizer.param_groups[0]["lr"]

        # --- validation on rank 0, shared with the others
        val_box: list[Any] = [None]
        if dd.main:
            model.eval()
            with torch.no_grad():
                val_box[0] = {k: float(v) for k, v in task.validate(model).items()}
        if dd.world > 1:
            dist.broadcast_object_list(val_box, src=0)
        val_metrics: dict[str, float] = val_box[0]
        if cfg.monitor not in val_metrics:
            raise KeyError(f"validate() returned {sorted(val_metrics)}, without the monitored {cfg.monitor!r}")
        value = val_metrics[cfg.monitor]
        scheduler.step(value)

        is_best = _improved(value, best["value"], mode)
        metrics = {
            "epoch": epoch + 1,
            "stage": stage,
            "lr": lr_used,
            **{f"train/{k}": v for k, v in train_metrics.items()},
            **{f"val/{k}": v for k, v in val_metrics.items()},
        }
        history.append(metrics)
        last_metrics = metrics
        if is_best:
            best = {"epoch": epoch + 1, "value": value, "metrics": metrics}

        # --- checkpoint (RNG of every rank, gathered on rank 0)
        rng_states = [_rng_state()]
        if dd.world > 1:
            gathered: list[Any] = [None] * dd.world
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if dd.main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "stage": stage,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "loss": {k: v.detach().cpu() for k, v in loss_fn.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "metrics": metrics,
                "history": history,
                "best": best,
                "params": cfg.params,
                "config": task.model_config(),
                "rng": rng_states,
            }
            epoch_path = ckpt_dir / f"epoch_{epoch + 1:03d}.pt"
            _save_atomic(state, epoch_path)
            _link_or_copy(epoch_path, latest)
            if is_best:
                _link_or_copy(epoch_path, ckpt_dir / "best.pt")
            if not cfg.keep_epoch_checkpoints:
                epoch_path.unlink()

            if live is not None:
                for k, v in metrics.items():
                    if k not in ("epoch", "stage"):
                        live.log_metric(k, v)
                live.next_step()

            dt = time.perf_counter() - t0
            epoch_times.append(dt)
            eta = (total_epochs - epoch - 1) * sum(epoch_times) / len(epoch_times)
            log.info(
                "epoch %d/%d (stage %d): loss %.4f, train cos %.4f, val %s %.4f%s, lr %.2e, %.1f s, ETA %s",
                epoch + 1, total_epochs, stage, train_metrics["loss"], train_metrics["cosine"], cfg.monitor,
                value, " (best)" if is_best else "", lr_used, dt, _fmt_seconds(eta),
            )
    if live is not None:
        live.end()
        # DVCLive's own summary duplicates what the stage writes to its metrics.json, and inside
        # a plots folder DVC would list it as an (empty) plot
        (Path(cfg.live_dir) / "metrics.json").unlink(missing_ok=True)

    best_state: dict[str, torch.Tensor]
    if dd.main and (ckpt_dir / "best.pt").is_file():
        best_state = load_checkpoint(ckpt_dir / "best.pt")["model"]
    else:
        best_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dd.world > 1:
        dist.barrier()
    return TrainResult(
        best_epoch=int(best["epoch"]),
        best_metrics=dict(best["metrics"]),
        best_state_dict=best_state,
        history=history,
        last_metrics=last_metrics,
    )
