"""distill_audio stage: train the EfficientAT audio student against the cached teacher embeddings.

Inputs: data/mels.h5, data/teacher.h5, data/manifest.jsonl (the artist-disjoint `split`); outputs
under models/audio/ (student.pt, metrics.json, plots/, checkpoints/ for `--resume`). `run` ->
`train_audio_student`: read the caches and the split, build the student and its task,
`pipeline.training.loop.fit`, calibrate, score the validation split, write the outputs. The
training strategies and the rest: docs/students.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import metrics as M
from pipeline.atomic import write_json
from pipeline.data import datasets
from pipeline.data.datasets import (
    Collate,
    MelSource,
    Split,
    TrainItems,
    average_rows,
    in_memory_limit,
    load_splits,
    loader_workers,
    monitor_subset,
)
from pipeline.data.manifest import read_manifest
from pipeline.evaluation.fidelity import neighbour_agreement
from pipeline.models.audio_student import AudioStudent, init_audio_student, save_audio_student
from pipeline.models.skipped import write_skip_marker
from pipeline.params import DistillAudioParams, Params
from pipeline.paths import MANIFEST, MELS, TEACHER_CACHE
from pipeline.training.augment import Augmenter, frontend_centres, mixup_targets
from pipeline.training.calibration import calibrate_audio_student, log_fit
from pipeline.training.distributed import relaunch_with_torchrun, under_torchrun
from pipeline.training.loop import TrainConfig, TrainResult, fit
from pipeline.training.losses import whitener
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

# Before each stage-1 validation the encoder's BatchNorm statistics are recomputed on this many
# train segments (see AudioStudent.recalibrate_batchnorm); stage 2 keeps them frozen.
BN_CALIBRATION_SEGMENTS = 128

OUT_DIR = Path("models/audio")


# ----------------------------------------------------------------------------- the task


class AudioDistillTask:
    """The `pipeline.training.loop.Distillation` of the audio student.

    Validation during training watches `monitor` (all validation tracks, at most
    `val_max_segments` segments); the run scores the whole split once after training."""

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
        self.collate_fn = Collate(train, source, seg_emb, seg_norm, self.dataset.by_track, p.segments_per_track,
                                  seed=p.seed)
        self.segment_rows = p.strategy in ("segments", "both")
        self.track_rows = p.strategy in ("tracks", "both")
        self.augmenter = augmenter
        self.teacher = teacher
        self.val = val
        self.monitor = monitor_subset(val, p.val_max_segments, seg_emb, seg_norm)
        self.val_mels = val_mels  # callable segs -> np.ndarray student mels
        self.eval_batch = eval_batch
        self.seg_emb = seg_emb
        self.train_segment_mean = M.l2_normalize(seg_emb[train.segments].astype(np.float64).mean(axis=0))
        self.train_track_mean = M.mean_embedding(train.teacher_tracks)
        n_bn = min(BN_CALIBRATION_SEGMENTS, len(train.segments))
        self.train_segments_for_bn = train.segments[np.linspace(0, len(train.segments) - 1, n_bn).astype(np.int64)]

    def embed_batch(self, encode, batch):
        mels, row_item = batch["mels"].float(), batch["row_item"]  # float16 from the loader
        n_items = int(row_item.max()) + 1
        plan = None
        if self.augmenter.active:
            plan = self.augmenter.draw(row_item.cpu(), mels.shape[1], mels.shape[2])
            mels = self.augmenter.apply_student(mels, plan)
        raw = encode(mels)
        if self.teacher is not None:  # the teacher hears exactly what the student heard
            tmels = batch["teacher_mels"].float()
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
    def embed_val_segments(self, model: AudioStudent, split: Split | None = None) -> np.ndarray:
        device = next(model.parameters()).device
        segs = (split or self.val).segments
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
        return validation_metrics(self.embed_val_segments(model, self.monitor), self.monitor, self.seg_emb,
                                  self.train_segment_mean, self.train_track_mean)

    def validation_figures(self, model: AudioStudent) -> dict[str, float]:
        """`validation_metrics` on the whole validation split (not the monitor subset)."""
        return validation_metrics(self.embed_val_segments(model), self.val, self.seg_emb, self.train_segment_mean,
                                  self.train_track_mean)

    def enter_stage2(self, model: AudioStudent):
        model.freeze_encoder()
        return model.head_parameters()

    def model_config(self) -> dict[str, Any]:
        return dict(self.model.config)


# ----------------------------------------------------------------------------- validation figures


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


def write_skipped(out_dir: Path, reason: str) -> None:
    """Disabled student: the markers the contract asks for, plus the declared output folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"skipped": True, "reason": reason}
    write_json(out_dir / "metrics.json", marker, sort_keys=True)
    write_skip_marker(out_dir / "student.pt", reason)
    for sub in ("checkpoints", "plots"):
        (out_dir / sub).mkdir(exist_ok=True)
    write_json(out_dir / "checkpoints" / "skipped.json", marker, sort_keys=True)
    log.info("audio student skipped: %s", reason)


# ----------------------------------------------------------------------------- the run


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


def train_subset(split: Split, n: int, seed: int) -> Split:
    """`n` tracks of `split` (all when n is 0 or at least their number), a fixed draw for the seed;
    a larger `n` keeps every track of a smaller one (the fidelity-vs-data curve nests)."""
    if n <= 0 or n >= len(split.tracks):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split.tracks))[:n])
    segs = [split.track_segments[i] for i in keep]
    return Split(split.tracks[keep], [split.track_ids[i] for i in keep], segs, np.concatenate(segs),
                 split.teacher_tracks[keep])


@dataclass
class AudioInputs:
    """What the run reads from the caches: the split, the teacher targets, the mel cache's attributes."""

    train: Split
    val: Split
    seg_emb: np.ndarray  # [n_segments, EMBED_DIM] unit teacher segment embeddings
    seg_norm: np.ndarray  # [n_segments] their raw norms
    mel_attrs: dict[str, Any]


def read_audio_inputs(mels_path: Path, teacher_path: Path, manifest_path: Path) -> AudioInputs:
    """The train/validation split of the cached tracks and the teacher's segment targets."""
    from pipeline.data.teacher_cache import TeacherCache

    manifest = read_manifest(manifest_path)
    with datasets.open_mels(mels_path) as mels, TeacherCache(teacher_path) as tcache:
        train, val = load_splits(mels, tcache, manifest)
        seg_emb = np.asarray(tcache.segment_embeddings, dtype=np.float32)
        seg_norm = np.asarray(tcache.segment_raw_norms, dtype=np.float32)
        attrs = dict(mels.attrs)
    log.info("training on %d tracks / %d segments, validating on %d tracks / %d segments",
             len(train.tracks), len(train.segments), len(val.tracks), len(val.segments))
    return AudioInputs(train, val, seg_emb, seg_norm, attrs)


def build_audio_task(p: DistillAudioParams, n_mels: int, inputs: AudioInputs, mels_path: Path, teacher_dir: Path,
                     with_output_bias: bool) -> tuple[AudioDistillTask, MelSource, bool]:
    """The student (pretrained or random, its output bias set unless resuming) and its task;
    returns (task, train mel source, whether pretrained weights were loaded)."""
    train, val = inputs.train, inputs.val
    recompute = not p.use_teacher_embedding_cache
    memory = in_memory_limit(p.in_memory_gb, max(1, p.nproc))
    source = MelSource(mels_path, train.segments, with_teacher=recompute, memory_limit=memory)
    val_source = MelSource(mels_path, val.segments, with_teacher=False, memory_limit=memory)
    teacher = None
    if recompute:
        from pipeline.teacher.model import load_teacher

        teacher = load_teacher(teacher_dir, device="cpu" if p.device == "cpu" else "auto")
        log.info("teacher recomputed on the augmented input (use_teacher_embedding_cache: false): %s", teacher_dir)
    s_centres, t_centres = frontend_centres(inputs.mel_attrs)
    augmenter = Augmenter(p.augment, s_centres, t_centres)

    config = {"backbone": p.model, "embed_dim": EMBED_DIM, "dropout": p.dropout, "n_mels": n_mels}
    model, pretrained = init_audio_student(config, p.pretrained or None)
    if with_output_bias:
        length = init_output_bias(model, source, train, inputs.seg_emb)
        log.info("output bias set along the mean train teacher embedding (length %.3g)", length)
    task = AudioDistillTask(model, train, val, source, inputs.seg_emb, inputs.seg_norm, p, augmenter, teacher,
                            val_source.student, eval_batch=p.batch_size)
    return task, source, pretrained


def audio_report(p: DistillAudioParams, task: AudioDistillTask, inputs: AudioInputs, source: MelSource,
                 result: TrainResult, pretrained: bool) -> dict[str, Any]:
    """Load the best epoch into the task's student, calibrate it and score it on the validation split."""
    model, train, val, seg_emb, seg_norm = task.model, inputs.train, inputs.val, inputs.seg_emb, inputs.seg_norm
    model.load_state_dict(result.best_state_dict)
    model.eval()
    val_before = task.validation_figures(model)
    if p.calibrate:
        # chosen on held-out tracks, kept only if their rankings and centred cosine hold
        fit = calibrate_audio_student(model, task.val_mels, val.track_segments, seg_emb, seg_norm,
                                      p.calibration_segments, p.batch_size * 4, centre=task.train_track_mean)
        log_fit("audio student", fit)
        calibration = fit.report()
    else:
        calibration = {"skipped": True, "reason": "distill_audio.calibrate is false"}
    # the final figures are those of the written student (calibrated), on the validation split
    val_best = task.validation_figures(model)
    return {
        "skipped": False,
        "pretrained": pretrained,
        "model": p.model,
        "params_count": model.num_parameters(),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "monitor": p.monitor,
        "val": val_best,
        "val_before_calibration": val_before,
        "calibration": calibration,
        "baseline": baseline_metrics(val, seg_emb, task.train_segment_mean, task.train_track_mean),
        "train": {k.split("/", 1)[1]: v for k, v in result.best_metrics.items() if k.startswith("train/")},
        "n_train_tracks": len(train.tracks),
        "n_val_tracks": len(val.tracks),
    }


def train_audio_student(
    p: DistillAudioParams,
    n_mels: int,
    out_dir: Path,
    teacher_dir: Path,
    *,
    resume: bool = False,
    mels_path: Path = MELS,
    teacher_path: Path = TEACHER_CACHE,
    manifest_path: Path = MANIFEST,
) -> dict[str, Any]:
    """Train and write student.pt, metrics.json, plots/ and checkpoints/ under `out_dir`."""
    torch.manual_seed(p.seed)  # the student's initial weights
    rank = int(os.environ.get("RANK", "0"))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    inputs = read_audio_inputs(mels_path, teacher_path, manifest_path)
    if p.max_train_tracks:
        inputs.train = train_subset(inputs.train, p.max_train_tracks, p.seed)
        log.info("training on a fixed subset of %d training tracks (distill_audio.max_train_tracks)",
                 len(inputs.train.tracks))
    fresh = not resume or not (out_dir / "checkpoints" / "latest.pt").is_file()
    task, source, pretrained = build_audio_task(p, n_mels, inputs, mels_path, teacher_dir, with_output_bias=fresh)
    centre = torch.from_numpy(task.train_segment_mean.astype(np.float32)) if p.centred_loss else None
    whiten = whitener(inputs.seg_emb[inputs.train.segments]) if p.loss.whitened_weight > 0 else None
    cfg = TrainConfig(p, out_dir / "checkpoints", p.monitor, out_dir / "plots", p.device,
                      loader_workers(p.num_workers, source), p.precision, p.channels_last, p.compile,
                      resume=resume, centre=centre, whiten=whiten)
    result = fit(task, cfg)
    if rank != 0:
        return {}

    report = audio_report(p, task, inputs, source, result, pretrained)
    # what ran it, not how long: student.pt and metrics.json are outputs whose md5 dvc.lock records,
    # so the timings go to the log and the same inputs write the same files on any machine or load
    report["runtime"] = {"threads": torch.get_num_threads(), "device": str(next(task.model.parameters()).device)}
    save_audio_student(out_dir / "student.pt", task.model, report)
    write_json(out_dir / "metrics.json", report, sort_keys=True)
    val_best = report["val"]
    log.info("audio student: best epoch %d, val track cosine %.4f (baseline %.4f), centred %.4f (baseline 0); "
             "%.0f CPU-s, %.0f s wall, %d thread(s)", result.best_epoch, val_best.get("track_cosine", float("nan")),
             report["baseline"]["track_cosine"], val_best.get("track_cosine_centred", float("nan")),
             time.process_time() - cpu0, time.perf_counter() - wall0, report["runtime"]["threads"])
    return report


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
    train_audio_student(p, params.frontend.student.n_mels, out_dir, Path(params.teacher.model.dir),
                        resume=bool(getattr(args, "resume", False)))
    return 0
