"""`student-clap ckpt ls | show | reset`: inspect and edit training checkpoints.

Works on any checkpoint written by `pipeline.training.loop.fit` (audio and text students alike) and, for
`show`, on a final ``student.pt``. `reset` always copies the file to ``<file>.bak`` before writing.

- ``ckpt ls [DIR]``: one line per epoch: stage, learning rate, train loss/cosine, validation
  metrics; marks the best and the latest checkpoint.
- ``ckpt show PATH``: epoch, model config, parameter count, metrics and the training params.
- ``ckpt reset PATH [--lr X] [--optimizer] [--scheduler]``: set the learning rate used when the
  run is resumed, drop the optimizer state (fresh AdamW moments) and/or the scheduler state
  (fresh ReduceLROnPlateau). PATH may be a folder (its latest.pt is edited).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file") from None
    except Exception as exc:  # corrupt / foreign file
        raise SystemExit(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: not a checkpoint dict")
    return obj


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    """Trainable-parameter count from a state dict (BatchNorm statistics are buffers, not parameters)."""
    return sum(int(v.numel()) for k, v in state.items() if not k.endswith(BUFFER_SUFFIXES))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def list_checkpoints(directory: Path) -> list[dict[str, Any]]:
    """Rows (epoch, stage, lr, metrics, file) for every epoch checkpoint in `directory`."""
    files = sorted(directory.glob("epoch_*.pt"))
    best_epoch = latest_epoch = None
    for name in ("best.pt", "latest.pt"):
        if (directory / name).is_file():
            e = _load(directory / name).get("epoch")
            if name == "best.pt":
                best_epoch = e
            else:
                latest_epoch = e
    rows = []
    for f in files:
        ck = _load(f)
        m = dict(ck.get("metrics", {}))
        rows.append({
            "file": f.name,
            "epoch": ck.get("epoch"),
            "stage": ck.get("stage"),
            "lr": m.get("lr"),
            "metrics": {k: v for k, v in m.items() if k not in ("epoch", "stage", "lr")},
            "best": ck.get("epoch") == best_epoch,
            "latest": ck.get("epoch") == latest_epoch,
        })
    return rows


def cmd_ls(directory: Path) -> int:
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


def describe(path: Path) -> dict[str, Any]:
    """Config, parameter count and metrics of a training checkpoint or a student.pt."""
    ck = _load(path)
    if ck.get("skipped"):
        return {"file": str(path), "skipped": True, "reason": ck.get("reason", "")}
    state = ck.get("model") if "model" in ck else ck.get("state_dict")
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: neither a training checkpoint nor a student file")
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


def cmd_show(path: Path) -> int:
    print(json.dumps(describe(path), indent=2, sort_keys=True, default=str))
    return 0


def reset(path: Path, lr: float | None = None, optimizer: bool = False, scheduler: bool = False) -> Path:
    """Edit a training checkpoint in place after copying it to `<path>.bak`; returns the backup."""
    if path.is_dir():
        path = path / "latest.pt"
    ck = _load(path)
    if "model" not in ck or "epoch" not in ck:
        raise SystemExit(f"{path}: not a training checkpoint (a student.pt has no optimizer to reset)")
    if lr is None and not optimizer and not scheduler:
        raise SystemExit("nothing to reset: give --lr, --optimizer and/or --scheduler")
    if lr is not None and lr <= 0:
        raise SystemExit(f"--lr must be positive, got {lr}")
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
        if ck.get("scheduler") is not None:
            ck["scheduler"]["_last_lr"] = [float(lr)] * len(ck["scheduler"].get("_last_lr", [0]))
            ck["scheduler"]["num_bad_epochs"] = 0  # a manual lr starts a new patience window
        log.info("%s: learning rate set to %g for the resumed run", path, lr)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ck, tmp)
    tmp.replace(path)
    print(f"{path} updated (backup: {backup})")
    return backup


def main(args: argparse.Namespace) -> int:
    cmd = args.ckpt_command
    if cmd == "ls":
        return cmd_ls(Path(args.dir))
    if cmd == "show":
        return cmd_show(Path(args.path))
    if cmd == "reset":
        reset(Path(args.path), args.lr, args.optimizer, args.scheduler)
        return 0
    raise SystemExit(f"unknown ckpt command {cmd!r}")
