"""distill_audio stage: train the EfficientAT audio student against the cached teacher embeddings.

Reads params `distillation.audio_enabled` and `distill_audio` only. Inputs: data/mels.h5 (student
and teacher log-mels per 10-s segment), data/teacher.h5 (teacher segment and track embeddings),
data/manifest.jsonl (the artist-disjoint `split`). Outputs under models/audio/: student.pt (best
epoch), metrics.json, plots/ (DVCLive), checkpoints/ (every epoch, latest, best; kept by DVC
between runs so `student-clap run distill_audio --resume` continues).

Strategy "both" (default): a training item is a track; each step draws up to
`segments_per_track` of its segments, and the loss has one row per segment (target: the teacher
segment embedding) *and* one row per track (student track embedding = L2(mean of the raw segment
embeddings) against the teacher's L2(mean of the raw segment projections) over the same segments —
exactly the cached track embedding when all segments are drawn). One forward pass serves both
kinds of row. "segments": items are single segments; "tracks": track rows only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline import metrics as M
from pipeline.augment import Augmenter, frontend_centres, mixup_targets
from pipeline.evaluation.fidelity import neighbour_agreement
from pipeline.manifest import read_manifest
from pipeline.models.audio_student import AudioStudent, init_audio_student, save_audio_student
from pipeline.params import DistillAudioParams, Params
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE
from pipeline.train import TrainConfig, fit, relaunch_with_torchrun, under_torchrun
from pipeline.training.calibration import calibrate_audio_student, log_fit

log = logging.getLogger(__name__)

OUT_DIR = Path("models/audio")
PRELOAD_LIMIT_BYTES = 1 << 30  # train mels up to 1 GiB (fp16) are held in memory
# Before each stage-1 validation the encoder's BatchNorm statistics are recomputed on this many
# train segments (see AudioStudent.recalibrate_batchnorm); stage 2 keeps them frozen.
BN_CALIBRATION_SEGMENTS = 128


def _open_mels(path: Path):
    from pipeline.store import MelCache

    return MelCache(path)


# ----------------------------------------------------------------------------- data


class MelSource:
    """Student (and optionally teacher) mels of given segments: from memory when small, otherwise
    read from the HDF5 file, opened once per process (DataLoader workers must not share handles)."""

    def __init__(self, path: Path, segments: np.ndarray, with_teacher: bool) -> None:
        self.path = path
        self.with_teacher = with_teacher
        self._pid: int | None = None
        self._cache = None
        self._student: dict[int, int] | None = None
        self._student_arr: np.ndarray | None = None
        self._teacher_arr: np.ndarray | None = None
        cache = self._handle()
        shape = cache.student_mels(np.asarray(segments[:1], dtype=np.int64)).shape if len(segments) else (0, 0, 0)
        per_row = int(np.prod(shape[1:])) * 2
        if with_teacher:
            per_row += 1001 * 64 * 2
        if len(segments) and len(segments) * per_row <= PRELOAD_LIMIT_BYTES:
            order = np.sort(np.asarray(segments, dtype=np.int64))
            self._student = {int(s): i for i, s in enumerate(order)}
            self._student_arr = cache.student_mels(order).astype(np.float16)
            if with_teacher:
                self._teacher_arr = cache.teacher_mels(order).astype(np.float16)
            log.info("holding %d segments in memory (%.0f MB)", len(order), len(order) * per_row / 1e6)
            self.close()

    def _handle(self):
        if self._cache is None or self._pid != os.getpid():
            self._cache = _open_mels(self.path)
            self._pid = os.getpid()
        return self._cache

    def close(self) -> None:
        if self._cache is not None and self._pid == os.getpid():
            self._cache.close()
        self._cache = None

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the file themselves
        state = dict(self.__dict__)
        state["_cache"] = None
        state["_pid"] = None
        return state

    def _read(self, segs: np.ndarray, teacher: bool) -> np.ndarray:
        if self._student is not None:
            rows = np.fromiter((self._student[int(s)] for s in segs), dtype=np.int64, count=len(segs))
            arr = self._teacher_arr if teacher else self._student_arr
            return arr[rows].astype(np.float32)
        order = np.argsort(segs, kind="stable")
        uniq, inverse = np.unique(segs[order], return_inverse=True)
        cache = self._handle()
        data = cache.teacher_mels(uniq) if teacher else cache.student_mels(uniq)
        out = np.empty((len(segs), *data.shape[1:]), dtype=np.float32)
        out[order] = data[inverse]
        return out

    def student(self, segs: np.ndarray) -> np.ndarray:
        return self._read(segs, teacher=False)

    def teacher(self, segs: np.ndarray) -> np.ndarray:
        return self._read(segs, teacher=True)


@dataclass
class Split:
    """Segment and track indices of one split, with the teacher targets."""

    tracks: np.ndarray  # mel-cache track indices
    track_ids: list[str]
    track_segments: list[np.ndarray]  # per track, its global segment indices
    segments: np.ndarray  # all segments of these tracks
    teacher_tracks: np.ndarray  # [n_tracks, 512]


def load_splits(mels, teacher, manifest: list[dict]) -> tuple[Split, Split]:
    """Train/val from the manifest's `split`; tracks missing from either cache are left out (logged)."""
    split_of = {r["track_id"]: r.get("split") for r in manifest}
    t_row = {tid: i for i, tid in enumerate(teacher.track_ids)}
    t_emb = np.asarray(teacher.track_embeddings, dtype=np.float32)
    parts: dict[str, list[int]] = {"train": [], "val": []}
    missing = 0
    for i, tid in enumerate(mels.track_ids):
        s = split_of.get(tid)
        if s not in parts or tid not in t_row:
            missing += 1
            continue
        parts[s].append(i)
    if missing:
        log.warning("%d tracks of the mel cache are not in the manifest or the teacher cache; left out", missing)

    def build(idx: list[int]) -> Split:
        ids = [mels.track_ids[i] for i in idx]
        segs = [np.asarray(mels.track_segments(t), dtype=np.int64) for t in ids]
        flat = np.concatenate(segs) if segs else np.zeros(0, dtype=np.int64)
        teach = t_emb[[t_row[t] for t in ids]] if ids else np.zeros((0, t_emb.shape[1]), dtype=np.float32)
        return Split(np.asarray(idx, dtype=np.int64), ids, segs, flat, teach)

    train, val = build(parts["train"]), build(parts["val"])
    if not len(train.tracks):
        raise ValueError(f"{MANIFEST}: no track with split 'train' is in {MELS} and {TEACHER_CACHE}")
    if not len(val.tracks):
        raise ValueError(f"{MANIFEST}: no track with split 'val' is in {MELS} and {TEACHER_CACHE}")
    return train, val


class TrainItems(Dataset):
    """"segments": item i is train segment i; "tracks" / "both": item i is train track i."""

    def __init__(self, split: Split, strategy: str) -> None:
        self.split = split
        self.by_track = strategy in ("tracks", "both")

    def __len__(self) -> int:
        return len(self.split.tracks) if self.by_track else len(self.split.segments)

    def __getitem__(self, i: int) -> int:
        return int(i)


class Collate:
    """Item ids -> one batch: the mel rows, the item of each row, and the cached raw teacher
    projection of each row (embedding x its stored norm), from which any average is rebuilt."""

    def __init__(self, split: Split, source: MelSource, seg_emb: np.ndarray, seg_norm: np.ndarray,
                 by_track: bool, segments_per_track: int) -> None:
        self.split = split
        self.source = source
        self.seg_emb = seg_emb
        self.seg_norm = seg_norm
        self.by_track = by_track
        self.per_track = segments_per_track

    def _track_rows(self, t: int) -> np.ndarray:
        segs = self.split.track_segments[t]
        if self.per_track and len(segs) > self.per_track:
            # torch's RNG: seeded per epoch in the main process, per worker in DataLoader workers
            pick = torch.randperm(len(segs))[: self.per_track].sort().values.numpy()
            segs = segs[pick]
        return segs

    def __call__(self, items: list[int]) -> dict[str, torch.Tensor]:
        rows = [self._track_rows(i) if self.by_track else self.split.segments[i : i + 1] for i in items]
        segs = np.concatenate(rows)
        item_of_row = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, r in enumerate(rows)])
        batch = {
            "mels": torch.from_numpy(self.source.student(segs)),
            "row_item": torch.from_numpy(item_of_row),
            "teacher_raw_rows": torch.from_numpy((self.seg_emb[segs] * self.seg_norm[segs, None]).astype(np.float32)),
        }
        if self.source.with_teacher:
            batch["teacher_mels"] = torch.from_numpy(self.source.teacher(segs))
        return batch


def average_rows(rows: torch.Tensor, row_item: torch.Tensor, n_items: int) -> torch.Tensor:
    """Mean of the rows of each item -> [n_items, D]."""
    sums = torch.zeros(n_items, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, row_item, rows)
    counts = torch.bincount(row_item, minlength=n_items).clamp_min(1).to(rows.dtype)
    return sums / counts[:, None]


# ----------------------------------------------------------------------------- the task


class AudioDistillTask:
    """The `pipeline.train.TrainTask` of the audio student."""

    def __init__(
        self,
        model: AudioStudent,
        train: Split,
        val: Split,
        source: MelSource,
        seg_emb: np.ndarray,
        seg_norm: np.ndarray,
        p: DistillAudioParams,
        augmenter: Augmenter,
        teacher=None,
        val_mels=None,
        eval_batch: int = 16,
    ) -> None:
        self.model = model
        self.p = p
        self.dataset = TrainItems(train, p.strategy)
        self.collate_fn = Collate(train, source, seg_emb, seg_norm, self.dataset.by_track, p.segments_per_track)
        self.segment_rows = p.strategy in ("segments", "both")
        self.track_rows = p.strategy in ("tracks", "both")
        self.augmenter = augmenter
        self.teacher = teacher
        self.val = val
        self.val_mels = val_mels  # callable segs -> np.ndarray student mels
        self.eval_batch = eval_batch
        self.seg_emb = seg_emb
        self.train_segment_mean = M.l2_normalize(seg_emb[train.segments].astype(np.float64).mean(axis=0))
        self.train_track_mean = M.mean_embedding(train.teacher_tracks)
        n_bn = min(BN_CALIBRATION_SEGMENTS, len(train.segments))
        self.train_segments_for_bn = train.segments[np.linspace(0, len(train.segments) - 1, n_bn).astype(np.int64)]

    def embed_batch(self, encode, batch):
        mels, row_item = batch["mels"], batch["row_item"]
        n_items = int(row_item.max()) + 1
        plan = None
        if self.augmenter.active:
            plan = self.augmenter.draw(row_item.cpu(), mels.shape[1], mels.shape[2])
            mels = self.augmenter.apply_student(mels, plan)
        raw = encode(mels)
        if self.teacher is not None:  # the teacher hears exactly what the student heard
            tmels = batch["teacher_mels"]
            if plan is not None:
                tmels = self.augmenter.apply_teacher(tmels, plan)
            t_raw = self.teacher.embed_mels_raw(tmels).clone().to(raw.device)
        else:
            t_raw = batch["teacher_raw_rows"]
            if plan is not None:
                t_raw = mixup_targets(t_raw, plan.to(t_raw.device))
        students, targets = [], []
        if self.segment_rows:
            students.append(raw)
            targets.append(t_raw)
        if self.track_rows:
            students.append(average_rows(raw, row_item, n_items))
            targets.append(average_rows(t_raw, row_item, n_items))
        return torch.cat(students), torch.nn.functional.normalize(torch.cat(targets), dim=-1)

    @torch.no_grad()
    def embed_val_segments(self, model: AudioStudent) -> np.ndarray:
        device = next(model.parameters()).device
        segs = self.val.segments
        out = []
        for a in range(0, len(segs), self.eval_batch):
            mels = torch.from_numpy(self.val_mels(segs[a : a + self.eval_batch])).to(device)
            out.append(model.embed_raw(mels).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def recalibration_batches(self):
        """Fixed, evenly spaced train segments (at most BN_CALIBRATION_SEGMENTS) in eval batches."""
        segs = self.train_segments_for_bn
        device = next(self.model.parameters()).device
        for a in range(0, len(segs), self.eval_batch):
            yield torch.from_numpy(self.collate_fn.source.student(segs[a : a + self.eval_batch])).to(device)

    def validate(self, model: AudioStudent) -> dict[str, float]:
        if not getattr(model, "_encoder_frozen", False):
            model.recalibrate_batchnorm(self.recalibration_batches())
        return validation_metrics(self.embed_val_segments(model), self.val, self.seg_emb,
                                  self.train_segment_mean, self.train_track_mean)

    def enter_stage2(self, model: AudioStudent):
        model.freeze_encoder()
        return model.head_parameters()

    def model_config(self) -> dict[str, Any]:
        return dict(self.model.config)


def validation_metrics(
    raw: np.ndarray, val: Split, seg_emb: np.ndarray, segment_mean: np.ndarray, track_mean: np.ndarray
) -> dict[str, float]:
    """Segment and track cosine of the student, raw and centred, and its track neighbour figures,
    on the validation split (the same definitions as the evaluate stage)."""
    t_seg = seg_emb[val.segments].astype(np.float64)
    s_seg = M.l2_normalize(raw)
    bounds = np.cumsum([0] + [len(s) for s in val.track_segments])
    s_trk = M.l2_normalize(np.stack([raw[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))
    t_trk = val.teacher_tracks.astype(np.float64)
    out = {
        "segment_cosine": float(M.cosine_rows(s_seg, t_seg).mean()),
        "segment_cosine_centred": float(M.centred_cosine_rows(s_seg, t_seg, segment_mean).mean()),
        "track_cosine": float(M.cosine_rows(s_trk, t_trk).mean()),
        "track_cosine_centred": float(M.centred_cosine_rows(s_trk, t_trk, track_mean).mean()),
    }
    # audio-to-audio neighbour figures (evaluate's same-space section); left out below 3 tracks
    nb = neighbour_agreement(t_trk, s_trk, ks=(5,))
    if nb["top5_overlap"] is not None:
        out["track_top5_overlap"] = float(nb["top5_overlap"])
        out["track_neighbour_spearman"] = float(nb["neighbour_spearman"])
    return out


def baseline_metrics(val: Split, seg_emb: np.ndarray, segment_mean: np.ndarray, track_mean: np.ndarray) -> dict[str, float]:
    """The constant mean-embedding prediction on the same validation rows (centred: 0)."""
    t_seg = seg_emb[val.segments].astype(np.float64)
    return {
        "segment_cosine": float(M.cosine_rows(np.broadcast_to(segment_mean, t_seg.shape), t_seg).mean()),
        "track_cosine": float(M.cosine_rows(np.broadcast_to(track_mean, val.teacher_tracks.shape),
                                            val.teacher_tracks.astype(np.float64)).mean()),
        "segment_cosine_centred": 0.0,
        "track_cosine_centred": 0.0,
    }


# ----------------------------------------------------------------------------- outputs


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_skipped(out_dir: Path, reason: str) -> None:
    """Disabled student: the markers the contract asks for, plus the declared output folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "metrics.json", {"skipped": True, "reason": reason})
    torch.save({"skipped": True, "reason": reason}, out_dir / "student.pt")
    for sub in ("checkpoints", "plots"):
        (out_dir / sub).mkdir(exist_ok=True)
    _write_json(out_dir / "checkpoints" / "skipped.json", {"skipped": True, "reason": reason})
    log.info("audio student skipped: %s", reason)


def init_output_bias(model: AudioStudent, source: MelSource, train: Split, seg_emb: np.ndarray, n: int = 16) -> float:
    """Start the student's output bias on the mean train teacher embedding, scaled so the student's
    initial spread around it matches the teacher's (see AudioStudent.init_output_bias)."""
    t = seg_emb[train.segments].astype(np.float64)
    mean = M.l2_normalize(t.mean(axis=0))
    along = t @ mean
    across = np.linalg.norm(t - along[:, None] * mean[None], axis=1)
    spread = float(np.median(across / np.maximum(along, 1e-6)))
    segs = train.segments[np.linspace(0, len(train.segments) - 1, min(n, len(train.segments))).astype(int)]
    mels = torch.from_numpy(source.student(segs))
    return model.init_output_bias(mels, torch.from_numpy(mean), spread)


def _model_config(p: DistillAudioParams) -> dict[str, Any]:
    return {"backbone": p.model, "embed_dim": 512, "dropout": p.dropout, "n_mels": 128}


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.distill_audio
    out_dir = OUT_DIR
    if not params.distillation.audio_enabled:
        write_skipped(out_dir, "distillation.audio_enabled is false")
        return 0
    if p.nproc > 1 and not under_torchrun():
        argv = ["run", "distill_audio", "--params", getattr(args, "params", "params.yaml")]
        if getattr(args, "resume", False):
            argv.append("--resume")
        return relaunch_with_torchrun(p.nproc, argv)
    train_audio_student(p, out_dir, resume=bool(getattr(args, "resume", False)), teacher_dir=Path(params.teacher.model.dir))
    return 0


def train_audio_student(
    p: DistillAudioParams,
    out_dir: Path,
    *,
    resume: bool = False,
    mels_path: Path = MELS,
    teacher_path: Path = TEACHER_CACHE,
    manifest_path: Path = MANIFEST,
    teacher_dir: Path = Path("models/teacher"),
) -> dict[str, Any]:
    """Train and write student.pt, metrics.json, plots/ and checkpoints/ under `out_dir`."""
    from pipeline.embedding_store import TeacherCache

    torch.manual_seed(p.seed)  # the student's initial weights
    rank = int(os.environ.get("RANK", "0"))
    manifest = read_manifest(manifest_path)
    with _open_mels(mels_path) as mels, TeacherCache(teacher_path) as tcache:
        train, val = load_splits(mels, tcache, manifest)
        seg_emb = np.asarray(tcache.segment_embeddings, dtype=np.float32)
        seg_norm = np.asarray(tcache.segment_raw_norms, dtype=np.float32)
        attrs = dict(mels.attrs)
    log.info("training on %d tracks / %d segments, validating on %d tracks / %d segments",
             len(train.tracks), len(train.segments), len(val.tracks), len(val.segments))

    recompute = not p.use_teacher_embedding_cache
    source = MelSource(mels_path, train.segments, with_teacher=recompute)
    val_source = MelSource(mels_path, val.segments, with_teacher=False)
    teacher = None
    if recompute:
        from pipeline.teacher import load_teacher

        teacher = load_teacher(teacher_dir, device="cpu" if p.device == "cpu" else "auto")
        log.info("teacher recomputed on the augmented input (use_teacher_embedding_cache: false): %s", teacher_dir)
    s_centres, t_centres = frontend_centres(attrs)
    augmenter = Augmenter(p.augment, s_centres, t_centres)

    model, pretrained = init_audio_student(_model_config(p), p.pretrained or None)
    if not resume or not (out_dir / "checkpoints" / "latest.pt").is_file():
        length = init_output_bias(model, source, train, seg_emb)
        log.info("output bias set along the mean train teacher embedding (length %.3g)", length)
    task = AudioDistillTask(model, train, val, source, seg_emb, seg_norm, p, augmenter, teacher, val_source.student,
                            eval_batch=p.batch_size)
    centre = torch.from_numpy(task.train_segment_mean.astype(np.float32)) if p.centred_loss else None
    cfg = TrainConfig.from_section(
        p,
        ckpt_dir=out_dir / "checkpoints",
        live_dir=out_dir / "plots",
        monitor=p.monitor,
        resume=resume,
        device=p.device,
        centre=centre,
    )
    result = fit(task, cfg)
    if rank != 0:
        return {}

    model.load_state_dict(result.best_state_dict)
    model.eval()
    best = result.best_metrics
    val_before = validation_metrics(task.embed_val_segments(model), val, seg_emb, task.train_segment_mean,
                                    task.train_track_mean)
    calibration = calibrate_audio_student(model, source.student, train.track_segments, seg_emb, seg_norm,
                                          p.calibration_segments, p.batch_size * 4)
    log_fit("audio student", calibration)
    # the final figures are those of the written student (calibrated), on the validation split
    val_best = validation_metrics(task.embed_val_segments(model), val, seg_emb, task.train_segment_mean,
                                  task.train_track_mean)
    report = {
        "skipped": False,
        "pretrained": pretrained,
        "model": p.model,
        "params_count": model.num_parameters(),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "monitor": p.monitor,
        "val": val_best,
        "val_before_calibration": val_before,
        "calibration": calibration.report(),
        "baseline": baseline_metrics(val, seg_emb, task.train_segment_mean, task.train_track_mean),
        "train": {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("train/")},
        "n_train_tracks": len(train.tracks),
        "n_val_tracks": len(val.tracks),
    }
    save_audio_student(out_dir / "student.pt", model, report)
    _write_json(out_dir / "metrics.json", report)
    log.info("audio student: best epoch %d, val track cosine %.4f (baseline %.4f), centred %.4f (baseline 0)",
             result.best_epoch, val_best.get("track_cosine", float("nan")), report["baseline"]["track_cosine"],
             val_best.get("track_cosine_centred", float("nan")))
    return report
