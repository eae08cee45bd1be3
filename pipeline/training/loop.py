"""The one training loop, shared by the audio and the text student.

A stage describes *what* to train with a small `Distillation` object; `fit()` does the rest the
same way for every student, in small steps (`restore`, `build_optimizer`, `build_loader`,
`train_one_epoch`, `validate`, `save`). What it does (optimiser, stages, schedule, checkpoints,
DDP, CUDA paths, randomness): docs/students.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from pipeline.training.losses import DistillLoss
from pipeline.params import DistillAudioParams, DistillTextParams
from pipeline.training import checkpoint as ckpt_io
from pipeline.training import distributed as D
from pipeline.training import schedule

log = logging.getLogger(__name__)


class Distillation(Protocol):
    """What a stage hands to `fit()`: a student, its training items and how to score it."""

    model: nn.Module
    dataset: Dataset
    collate_fn: Callable[[list[Any]], Any] | None

    def embed_batch(self, encode: Callable[..., torch.Tensor], batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Student raw embeddings and teacher targets, both [N, D], for one batch (already on the
        device). `encode(*inputs)` runs the model's `embed_raw` (through DDP when distributed):
        call it exactly once per batch."""
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
    """What `fit()` needs: the student's params section, read as it is (epochs, batch_size, lr,
    stage2_epochs, stage2_lr, weight_decay, grad_clip, loss, scheduler, seed, threads), and this run's
    settings besides it."""

    p: DistillAudioParams | DistillTextParams
    ckpt_dir: Path
    monitor: str  # key of validate() driving ReduceLROnPlateau and the best checkpoint
    live_dir: Path | None  # DVCLive directory, None = no DVCLive
    device: str  # cpu | cuda | auto
    num_workers: int | str  # DataLoader workers per rank; "auto": from the CPUs per rank
    precision: str  # "bf16": autocast on CUDA (CPU always fp32)
    channels_last: bool  # on CUDA
    compile: bool
    resume: bool = False
    centre: torch.Tensor | None = None  # adds the centred cosine term to the loss (see DistillLoss)
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, W) for the whitened cosine term
    warmup: bool = True  # linear warmup over the first epoch

    @property
    def total_epochs(self) -> int:
        return self.p.epochs + self.p.stage2_epochs

    def stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.p.epochs else 2


@dataclass
class TrainResult:
    best_epoch: int
    best_metrics: dict[str, float]
    best_state_dict: dict[str, torch.Tensor]
    history: list[dict[str, Any]]


@dataclass
class TrainState:
    """Where training stands: what a checkpoint restores and the next epoch continues from."""

    epoch: int = 0  # epochs done
    stage: int = 1
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "value": None, "metrics": {}})
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(int(ckpt["epoch"]), int(ckpt.get("stage", 1)), dict(ckpt.get("best", cls().best)),
                   list(ckpt.get("history", [])))

    def record(self, metrics: dict[str, Any], value: float, mode: str) -> bool:
        """Append one epoch's metrics; True when it is the new best."""
        self.epoch = int(metrics["epoch"])
        self.history.append(metrics)
        if schedule.improved(value, self.best["value"], mode):
            self.best = {"epoch": self.epoch, "value": value, "metrics": metrics}
            return True
        return False


@dataclass
class Optimisation:
    """The optimiser side of one training stage."""

    stage: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    trainable: list[nn.Parameter]
    base_lr: float


class EpochKeys(Sampler):
    """Wraps a sampler to yield (epoch, index): per-item randomness drawn from those is the same in
    any DataLoader worker and after a resume."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


# ------------------------------------------------------------------------- building blocks


def resolve_num_workers(value: int | str, world: int = 1) -> int:
    """`auto`: the CPUs this process may use, shared by the ranks, one left for the training
    process itself, at most 8 (beyond that HDF5 reads stop scaling); at least 1."""
    if value != "auto":
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"num_workers must be a count >= 0 or 'auto', got {value!r}")
        return value
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, world) - 1))


def restore(cfg: TrainConfig, ranks: D.Ranks) -> dict[str, Any] | None:
    """The checkpoint to continue from (`resume`), else None; a fresh run empties the folder."""
    ckpt_dir = Path(cfg.ckpt_dir)
    found = ckpt_io.find_resumable(ckpt_dir) if cfg.resume and ckpt_dir.is_dir() else None
    if found is not None:
        log.info("resuming from %s (epoch %d done)", found[0], found[1]["epoch"])
    elif cfg.resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
    if ranks.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if found is not None and found[0].name != ckpt_io.LATEST:
            ckpt_io.repair_best(ckpt_dir, found[1])
        if found is None:
            n = ckpt_io.remove_all(ckpt_dir)
            if n:
                log.info("fresh run: removed %d old checkpoints from %s", n, ckpt_dir)
    return None if found is None else found[1]


def build_optimizer(task: Distillation, model: nn.Module, loss_fn: nn.Module, cfg: TrainConfig,
                    stage: int) -> Optimisation:
    """AdamW over what `stage` trains (the loss's logit scale without weight decay) + the plateau."""
    if stage == 1:
        params, lr = [p for p in model.parameters() if p.requires_grad], cfg.p.lr
    else:
        params, lr = list(task.enter_stage2(model)), cfg.p.stage2_lr
    groups = [{"params": params, "weight_decay": cfg.p.weight_decay}]
    extra = list(loss_fn.parameters())
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    return Optimisation(stage, opt, schedule.plateau(opt, cfg.p.scheduler), params + extra, lr)


def restore_optimisation(ckpt: dict[str, Any], opt: Optimisation, cfg: TrainConfig) -> None:
    """Optimizer and scheduler state from a checkpoint of the same stage; `ckpt reset` may have
    removed either (then it starts afresh) or set a learning rate."""
    if int(ckpt["epoch"]) >= cfg.total_epochs:
        return
    if ckpt.get("stage") == opt.stage:
        if ckpt.get("optimizer") is not None:
            opt.optimizer.load_state_dict(ckpt["optimizer"])
        else:
            log.info("checkpoint has no optimizer state: fresh AdamW at lr %g", opt.base_lr)
        if ckpt.get("scheduler") is not None:
            opt.scheduler.load_state_dict(ckpt["scheduler"])
        else:
            log.info("checkpoint has no scheduler state: fresh ReduceLROnPlateau")
    else:
        log.info("checkpoint was in stage %s, continuing in stage %d with a fresh optimizer", ckpt.get("stage"), opt.stage)
    if ckpt.get("lr_override") is not None:
        schedule.override_lr(opt.optimizer, opt.scheduler, float(ckpt["lr_override"]))
        log.info("learning rate set to %g by `ckpt reset --lr`", float(ckpt["lr_override"]))


def build_loader(task: Distillation, cfg: TrainConfig, ranks: D.Ranks, device: torch.device) -> DataLoader:
    """Shuffled per epoch from (seed, epoch), sharded over ranks; workers persist across epochs."""
    sampler: Sampler = DistributedSampler(task.dataset, num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                          seed=cfg.p.seed)
    if getattr(task.dataset, "keyed_by_epoch", False):
        sampler = EpochKeys(sampler)
    workers = resolve_num_workers(cfg.num_workers, ranks.world)
    loader = DataLoader(
        task.dataset,
        batch_size=cfg.p.batch_size // ranks.world,
        sampler=sampler,
        collate_fn=task.collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.p.seed + ranks.rank),  # leaves the global RNG alone
    )
    if len(loader) == 0:
        raise ValueError("the training set is empty")
    if ranks.main:
        log.info("data loader: %d worker(s), %d steps per epoch", workers, len(loader))
    return loader


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def train_one_epoch(task: Distillation, encoder: nn.Module, loss_fn: DistillLoss, opt: Optimisation,
                    loader: DataLoader, cfg: TrainConfig, ranks: D.Ranks, device: torch.device,
                    epoch: int) -> dict[str, float]:
    """One pass over the loader; returns the item-weighted train metrics (summed over ranks)."""
    warming_up = cfg.warmup and opt.stage == 1 and epoch == 0
    amp = torch.bfloat16 if cfg.precision == "bf16" and device.type == "cuda" else None  # the CPU trains in fp32
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, cosine, centred cosine (item-weighted), items
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.total_epochs} (stage {opt.stage})", disable=not ranks.main,
               leave=False, mininterval=1.0, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        lr = schedule.get_lr(cfg.p.lr, step, len(loader), warming_up)
        if lr is not None:
            schedule.set_lr(opt.optimizer, lr)
        batch = _to_device(batch, device)
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            student, teacher = task.embed_batch(encoder, batch)
        loss, stats = loss_fn(student.float(), teacher.float())
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        D.average_gradient(loss_fn.logit_scale, ranks)
        if cfg.p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(opt.trainable, cfg.p.grad_clip)
        opt.optimizer.step()
        n = student.shape[0]
        value = float(loss.detach())
        sums[0] += value * n
        sums[1] += stats["cosine"] * n
        sums[2] += stats.get("centred_cosine", 0.0) * n
        sums[3] += n
        bar.set_postfix(loss=f"{value:.4f}", cos=f"{stats['cosine']:.3f}")
    bar.close()
    totals = D.all_sum(sums, ranks)
    metrics = {"loss": float(totals[0] / totals[3]), "cosine": float(totals[1] / totals[3])}
    if cfg.centre is not None:
        metrics["cosine_centred"] = float(totals[2] / totals[3])
    if loss_fn.logit_scale is not None:
        metrics["logit_scale"] = float(loss_fn.logit_scale.detach())
    return metrics


def validate(task: Distillation, model: nn.Module, ranks: D.Ranks, monitor: str) -> dict[str, float]:
    """The task's validation metrics, computed on rank 0 and shared with every rank."""
    metrics = None
    if ranks.main:
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in task.validate(model).items()}
    metrics = D.from_main(metrics, ranks)
    if monitor not in metrics:
        raise KeyError(f"validate() returned {sorted(metrics)}, without the monitored {monitor!r}")
    return metrics


# Where the work runs (loader workers, mels held or streamed) does not change what is computed, so a
# checkpoint leaves it out of its params and is the same file however it was made.
PLACEMENT_ONLY = ("num_workers", "in_memory_gb")


def save(task: Distillation, model: nn.Module, loss_fn: nn.Module, opt: Optimisation, state: TrainState,
         cfg: TrainConfig, ranks: D.Ranks, is_best: bool) -> None:
    """Checkpoint the epoch just finished (RNG states of every rank, written by rank 0)."""
    rng = D.gather(ckpt_io.rng_state(), ranks)
    if not ranks.main:
        return
    ckpt_io.save_epoch(Path(cfg.ckpt_dir), {
        "epoch": state.epoch,
        "stage": opt.stage,
        "model": ckpt_io.cpu_state(model),
        "loss": ckpt_io.cpu_state(loss_fn),
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "metrics": state.history[-1],
        "history": state.history,
        "best": state.best,
        "params": {k: v for k, v in dataclasses.asdict(cfg.p).items() if k not in PLACEMENT_ONLY},
        "config": task.model_config(),
        "rng": rng,
    }, is_best)


def _open_live(cfg: TrainConfig, resumed: bool, start_epoch: int) -> Any:
    from dvclive import Live

    live = Live(dir=str(cfg.live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None)
    live.step = start_epoch
    return live


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def prepare_model(task: Distillation, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The task's model on `device` (channels_last weights on CUDA when asked)."""
    model = task.model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _restore_weights(ckpt: dict[str, Any], task: Distillation, model: nn.Module, loss_fn: nn.Module) -> None:
    if ckpt.get("stage") == 2:
        task.enter_stage2(model)
    model.load_state_dict(ckpt["model"])
    loss_fn.load_state_dict(ckpt["loss"])


# ------------------------------------------------------------------------- the loop


def fit(task: Distillation, cfg: TrainConfig) -> TrainResult:
    """Train `task.model` as configured; returns the best weights and the metric history."""
    device = D.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    ranks = D.init_ranks(device)
    if cfg.p.batch_size % ranks.world:
        raise ValueError(f"batch_size {cfg.p.batch_size} is not divisible by the {ranks.world} processes")
    if cfg.p.epochs < 0 or cfg.p.stage2_epochs < 0 or cfg.total_epochs == 0:
        raise ValueError(f"need at least one epoch (epochs={cfg.p.epochs}, stage2_epochs={cfg.p.stage2_epochs})")
    if cfg.p.threads and device.type == "cpu":
        # small models: a second thread buys little and, on a busy machine, costs up to 4x in spin-waits
        torch.set_num_threads(cfg.p.threads)
    ckpt_io.seed_everything(cfg.p.seed + ranks.rank)
    model = prepare_model(task, cfg, device)
    loss_fn = DistillLoss(cfg.p.loss, centre=cfg.centre, whiten=cfg.whiten).to(device)

    ckpt = restore(cfg, ranks)
    state = TrainState.from_checkpoint(ckpt) if ckpt is not None else TrainState()
    if ckpt is not None:
        _restore_weights(ckpt, task, model, loss_fn)
        if state.epoch >= cfg.total_epochs:
            log.info("checkpoint already covers %d of %d epochs: nothing to train", state.epoch, cfg.total_epochs)
    opt = build_optimizer(task, model, loss_fn, cfg, cfg.stage_of(state.epoch))
    encoder = D.wrap_encoder(model, ranks, device, cfg.compile)
    if ckpt is not None:
        restore_optimisation(ckpt, opt, cfg)
        rng = ckpt["rng"]
        ckpt_io.set_rng_state(rng[ranks.rank] if ranks.rank < len(rng) else rng[0])
    loader = build_loader(task, cfg, ranks, device)
    live = None
    if ranks.main and cfg.live_dir is not None and state.epoch < cfg.total_epochs:
        live = _open_live(cfg, ckpt is not None, state.epoch)

    epoch_times: list[float] = []
    for epoch in range(state.epoch, cfg.total_epochs):
        if cfg.stage_of(epoch) != opt.stage:
            log.info("stage 2: encoder frozen, training the projection for %d epochs at lr %g",
                     cfg.p.stage2_epochs, cfg.p.stage2_lr)
            opt = build_optimizer(task, model, loss_fn, cfg, 2)
            encoder = D.wrap_encoder(model, ranks, device, cfg.compile)
        loader.sampler.set_epoch(epoch)
        if hasattr(task, "set_epoch"):
            task.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        train_metrics = train_one_epoch(task, encoder, loss_fn, opt, loader, cfg, ranks, device, epoch)
        lr_used = opt.optimizer.param_groups[0]["lr"]
        val_metrics = validate(task, model, ranks, cfg.monitor)
        value = val_metrics[cfg.monitor]
        opt.scheduler.step(value)
        metrics = {"epoch": epoch + 1, "stage": opt.stage, "lr": lr_used,
                   **{f"train/{k}": v for k, v in train_metrics.items()},
                   **{f"val/{k}": v for k, v in val_metrics.items()}}
        is_best = state.record(metrics, value, cfg.p.scheduler.mode)
        save(task, model, loss_fn, opt, state, cfg, ranks, is_best)
        if not ranks.main:
            continue
        if live is not None:
            for k, v in metrics.items():
                if k not in ("epoch", "stage"):
                    live.log_metric(k, v)
            live.next_step()
        epoch_times.append(time.perf_counter() - t0)
        eta = (cfg.total_epochs - epoch - 1) * sum(epoch_times) / len(epoch_times)
        log.info("epoch %d/%d (stage %d): loss %.4f, train cos %.4f, val %s %.4f%s, lr %.2e, %.1f s, ETA %s",
                 epoch + 1, cfg.total_epochs, opt.stage, train_metrics["loss"], train_metrics["cosine"], cfg.monitor,
                 value, " (best)" if is_best else "", lr_used, epoch_times[-1], _fmt_seconds(eta))
    if live is not None:
        live.end()
        # DVCLive's own summary duplicates what the stage writes to its metrics.json, and inside
        # a plots folder DVC would list it as an (empty) plot
        (Path(cfg.live_dir) / "metrics.json").unlink(missing_ok=True)
    return _result(model, state, cfg, ranks)


def _result(model: nn.Module, state: TrainState, cfg: TrainConfig, ranks: D.Ranks) -> TrainResult:
    best_file = Path(cfg.ckpt_dir) / ckpt_io.BEST
    if ranks.main and best_file.is_file():
        best_state = ckpt_io.load_checkpoint(best_file)["model"]
    else:
        best_state = ckpt_io.cpu_state(model)
    D.barrier(ranks)
    return TrainResult(
        best_epoch=int(state.best["epoch"]),
        best_metrics=dict(state.best["metrics"]),
        best_state_dict=best_state,
        history=state.history,
    )
