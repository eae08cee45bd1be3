"""Training checkpoints: the format, saving, loading, latest/best links, RNG state, and editing.

One file per epoch, ``epoch_NNN.pt``, written atomically; ``latest.pt`` and ``best.pt`` are hard
links to it. Everything is read with ``torch.load(weights_only=True)``: tensors, numbers, strings,
lists and dicts only. The format and `student-clap ckpt`: docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "student-clap-checkpoint/1"
LATEST = "latest.pt"
BEST = "best.pt"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a training checkpoint; the message names it."""


# ------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- reading


def _read(path: Path) -> dict[str, Any]:
    """Any checkpoint-like dict (training checkpoint or student.pt), weights only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # truncated, corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict")
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (weights_only) and check its format."""
    path = Path(path)
    ckpt = _read(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a student-clap training checkpoint")
    return ckpt


def epoch_path(ckpt_dir: Path, epoch: int) -> Path:
    return ckpt_dir / f"epoch_{epoch:03d}.pt"


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `--resume` continues from: latest.pt, or, when that is unreadable (a
    truncated copy, a full disk), the newest readable epoch file, with a warning naming both.
    None when the folder holds no checkpoint at all."""
    latest = ckpt_dir / LATEST
    candidates = [latest] if latest.is_file() else []
    candidates += sorted(ckpt_dir.glob("epoch_*.pt"), reverse=True)
    failures: list[str] = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            log.warning("%s", exc)
            continue
        if failures:
            log.warning("--resume: %d unreadable checkpoint(s) skipped; resuming from %s (epoch %d) instead",
                        len(failures), path, int(ckpt["epoch"]))
        return path, ckpt
    if failures:
        raise CheckpointError(f"{ckpt_dir}: no readable checkpoint to resume from: " + "; ".join(failures))
    return None


def repair_best(ckpt_dir: Path, ckpt: dict[str, Any]) -> None:
    """After resuming from an older file than latest.pt: when best.pt is unreadable too (the same
    file under another name), point it at the epoch `ckpt` records as best, or remove it."""
    best = ckpt_dir / BEST
    if not best.exists():
        return
    try:
        load_checkpoint(best)
        return
    except CheckpointError:
        pass
    src = epoch_path(ckpt_dir, int(ckpt.get("best", {}).get("epoch", 0)))
    try:
        load_checkpoint(src)
    except CheckpointError:
        best.unlink()
        log.warning("%s was unreadable and %s is not there to replace it: removed", best, src.name)
        return
    _link_or_copy(src, best)
    log.warning("%s was unreadable: now %s again", best, src.name)


# ------------------------------------------------------------------------- writing


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no extra disk), atomically replaced; a copy where links
    are not possible. Editing tools replace files, never write through links."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_epoch(ckpt_dir: Path, state: dict[str, Any], is_best: bool) -> Path:
    """Write ``epoch_NNN.pt`` and point latest.pt (and best.pt when `is_best`) at it."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    path = epoch_path(ckpt_dir, int(state["epoch"]))
    _save_atomic(state, path)
    _link_or_copy(path, ckpt_dir / LATEST)
    if is_best:
        _link_or_copy(path, ckpt_dir / BEST)
    return path


def remove_all(ckpt_dir: Path) -> int:
    """A fresh run starts from an empty folder: delete epoch files, latest and best."""
    stale = sorted(ckpt_dir.glob("epoch_*.pt")) + [p for p in (ckpt_dir / LATEST, ckpt_dir / BEST) if p.exists()]
    for p in stale:
        p.unlink()
    return len(stale)


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------- inspecting and editing


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    """Trainable-parameter count from a state dict (BatchNorm statistics are buffers, not parameters)."""
    return sum(int(v.numel()) for k, v in state.items() if not k.endswith(BUFFER_SUFFIXES))


def list_checkpoints(directory: Path) -> list[dict[str, Any]]:
    """Rows (epoch, stage, lr, metrics, file) for every epoch checkpoint in `directory`."""
    marks = {}
    for name in (BEST, LATEST):
        if (directory / name).is_file():
            marks[name] = _read(directory / name).get("epoch")
    rows = []
    for f in sorted(directory.glob("epoch_*.pt")):
        ck = _read(f)
        m = dict(ck.get("metrics", {}))
        rows.append({
            "file": f.name,
            "epoch": ck.get("epoch"),
            "stage": ck.get("stage"),
            "lr": m.get("lr"),
            "metrics": {k: v for k, v in m.items() if k not in ("epoch", "stage", "lr")},
            "best": ck.get("epoch") == marks.get(BEST),
            "latest": ck.get("epoch") == marks.get(LATEST),
        })
    return rows


def describe(path: Path) -> dict[str, Any]:
    """Config, parameter count and metrics of a training checkpoint or a student.pt."""
    ck = _read(path)
    if ck.get("skipped"):
        return {"file": str(path), "skipped": True, "reason": ck.get("reason", "")}
    state = ck.get("model") if "model" in ck else ck.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: neither a training checkpoint nor a student file")
    info: dict[str, Any] = {
        "file": str(path),
        "kind": "training checkpoint" if "model" in ck else "student",
        "config": ck.get("config", {}),
        "parameters": parameter_count(state),
        "metrics": ck.get("metrics", {}),
    }
    if "model" in ck:
        info.update(epoch=ck.get("epoch"), stage=ck.get("stage"), best=ck.get("best", {}).get("epoch"),
                    has_optimizer=ck.get("optimizer") is not None, has_scheduler=ck.get("scheduler") is not None,
                    lr_override=ck.get("lr_override"), params=ck.get("params", {}))
    return info


def reset(path: Path, lr: float | None = None, optimizer: bool = False, scheduler: bool = False) -> Path:
    """Edit a training checkpoint in place after copying it to `<path>.bak`; returns the backup.

    `lr` is recorded as ``lr_override`` (and written into the optimizer's param groups when that
    state is kept); the loop applies it on resume and starts a new plateau-patience window."""
    if path.is_dir():
        path = path / LATEST
    ck = _read(path)
    if "model" not in ck or "epoch" not in ck:
        raise CheckpointError(f"{path}: not a training checkpoint (a student.pt has no optimizer to reset)")
    if lr is None and not optimizer and not scheduler:
        raise CheckpointError("nothing to reset: give --lr, --optimizer and/or --scheduler")
    if lr is not None and lr <= 0:
        raise CheckpointError(f"--lr must be positive, got {lr}")
    backup = path.with_name(path.name + ".bak")
    shutil.copyfile(path, backup)
    if optimizer:
        ck["optimizer"] = None
        log.info("%s: optimizer state removed (resume starts AdamW afresh)", path)
    if scheduler:
        ck["scheduler"] = None
        log.info("%s: scheduler state removed (resume starts ReduceLROnPlateau afresh)", path)
    if lr is not None:
        ck["lr_override"] = float(lr)
        if ck.get("optimizer") is not None:
            for g in ck["optimizer"].get("param_groups", []):
                g["lr"] = float(lr)
        log.info("%s: learning rate set to %g for the resumed run", path, lr)
    _save_atomic(ck, path)  # replaces the file: the epoch file it may be linked to keeps its content
    print(f"{path} updated (backup: {backup})")
    return backup


# ------------------------------------------------------------------------- `student-clap ckpt`


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def cmd_ls(directory: Path) -> int:
    """One line per epoch: stage, learning rate, train and validation metrics, best/latest marks."""
    if not directory.is_dir():
        print(f"{directory}: no such folder")
        return 1
    rows = list_checkpoints(directory)
    if not rows:
        print(f"{directory}: no epoch checkpoints")
        return 1
    keys = sorted({k for r in rows for k in r["metrics"]}, key=lambda k: (not k.startswith("train/"), k))
    header = ["epoch", "stage", "lr", *keys, ""]
    table = [header]
    for r in rows:
        mark = " ".join(x for x, on in (("best", r["best"]), ("latest", r["latest"])) if on)
        table.append([str(r["epoch"]), str(r["stage"]), _fmt(r["lr"]), *(_fmt(r["metrics"].get(k, "")) for k in keys), mark])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def main(args: argparse.Namespace) -> int:
    """`student-clap ckpt ls [DIR] | show PATH | reset PATH [--lr X] [--optimizer] [--scheduler]`."""
    try:
        if args.ckpt_command == "ls":
            return cmd_ls(Path(args.dir))
        if args.ckpt_command == "show":
            print(json.dumps(describe(Path(args.path)), indent=2, sort_keys=True, default=str))
            return 0
        if args.ckpt_command == "reset":
            reset(Path(args.path), args.lr, args.optimizer, args.scheduler)
            return 0
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    raise SystemExit(f"unknown ckpt command {args.ckpt_command!r}")
