"""Stage distill_text: train the ~1M-parameter text student on the teacher's query embeddings.

Reads the text sets and track embeddings of data/teacher.h5 and the split of data/manifest.jsonl;
writes models/text/ (tokenizer.json, student.pt, metrics.json, plots/, checkpoints/). `run` ->
`train_text_student`: tokenizer, student, `pipeline.training.loop.fit`, calibration, held-out
scores (`pipeline.evaluation.held_out_text`), outputs. Selection never looks at the held-out sets.
How and why: docs/students.md, "Text student".
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pipeline import metrics as M
from pipeline.atomic import write_json
from pipeline.data.manifest import read_manifest
from pipeline.data.queries import HELD_OUT_SETS, split_into_terms
from pipeline.data.teacher_cache import TeacherCache
from pipeline.data.text_tokenizer import save_tokenizer, train_tokenizer
from pipeline.evaluation.held_out_text import held_out_plot, score_held_out_set
from pipeline.models.skipped import write_skip_marker
from pipeline.models.text_student import build_text_student, save_text_student
from pipeline.params import DistillTextParams, Params
from pipeline.paths import MANIFEST, TEACHER_CACHE
from pipeline.training.calibration import fit_text_scale, log_fit
from pipeline.training.loop import TrainConfig, fit
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

OUT_DIR = Path("models/text")
MONITOR = "monitor_centred"
EVAL_BATCH = 256
FIT_MONITOR_ROWS = 512  # without a monitor share, training follows this many of its own queries

# name -> (token ids, attention mask, teacher embeddings), all rows padded to max_length
EncodedSets = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


class DistillTextError(RuntimeError):
    """The inputs of distill_text are unusable (missing sets, empty training set...)."""


# --------------------------------------------------------------------------- inputs


@dataclass
class TextData:
    sets: dict[str, tuple[list[str], np.ndarray]]  # name -> (queries, teacher embeddings)
    track_ids: list[str]
    track_embeddings: np.ndarray


def read_teacher_text(path: Path) -> TextData:
    with TeacherCache(path) as cache:
        sets = {k: (list(q), np.asarray(e, dtype=np.float32)) for k, (q, e) in cache.text_sets().items()}
        ids, tracks = list(cache.track_ids), np.asarray(cache.track_embeddings, dtype=np.float32)
    if "train" not in sets or not sets["train"][0]:
        raise DistillTextError(f"{path}: text set 'train' is missing or empty (re-run the teacher stage)")
    return TextData(sets, ids, tracks)


def split_monitor(queries: list[str], vocabulary: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit rows, monitor rows): whole term combinations of two or more terms go to the monitor share."""
    if fraction <= 0 or len(queries) < 2:
        return list(range(len(queries))), []
    groups: dict[frozenset[str], list[int]] = {}
    for i, q in enumerate(queries):
        terms = split_into_terms(q, vocabulary) if vocabulary else []
        key = frozenset(t.lower() for t in terms) or frozenset([q.lower()])
        groups.setdefault(key, []).append(i)
    # A term alone ("organ", "Organ") is the base every query with it builds on: it always trains,
    # and the monitor judges combinations of two or more terms.
    keys = sorted((k for k in groups if len(k) > 1), key=lambda k: sorted(k))
    random.Random(seed).shuffle(keys)
    want = max(1, int(round(fraction * len(queries))))
    monitor: list[int] = []
    for key in keys:
        if len(monitor) >= want:
            break
        monitor.extend(groups[key])
    held = set(monitor)
    fit = [i for i in range(len(queries)) if i not in held]
    if not fit:
        raise DistillTextError(f"distill_text.monitor_fraction {fraction} leaves no training query")
    return fit, sorted(monitor)


def encode_padded(tok, queries: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask of `queries`, zero-padded to exactly `max_len` columns."""
    from student_clap.tokenizer import encode

    ids, mask = encode(tok, queries, max_len)
    width = np.zeros((len(ids), max_len), np.int64)
    m = np.zeros_like(width)
    width[:, : ids.shape[1]], m[:, : ids.shape[1]] = ids, mask
    return width, m


# --------------------------------------------------------------------------- skipped


def write_skipped(out_dir: Path, reason: str) -> None:
    """Markers for a disabled student, as evaluate and export expect them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"skipped": True, "reason": reason}
    write_skip_marker(out_dir / "student.pt", reason)
    write_json(out_dir / "metrics.json", marker)
    write_json(out_dir / "tokenizer.json", marker, indent=None)
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    shutil.rmtree(out_dir / "plots", ignore_errors=True)
    (out_dir / "plots").mkdir()
    log.info("text student skipped: %s", reason)


# --------------------------------------------------------------------------- training task


def _trim_collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack a batch and drop the padding columns no item of it needs."""
    ids, mask, target = (torch.stack(x) for x in zip(*items))
    length = max(1, int(mask.sum(dim=1).max()))
    return ids[:, :length], mask[:, :length], target


class TextTask:
    """What pipeline.training.loop.fit needs for the text student."""

    def __init__(self, model, ids: np.ndarray, mask: np.ndarray, targets: np.ndarray,
                 teacher_mean: np.ndarray, centred: bool, validation: EncodedSets):
        self.model = model
        self.dataset = TensorDataset(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(targets))
        self.collate_fn = _trim_collate
        self.mean = torch.from_numpy(teacher_mean.astype(np.float32))
        self.centred = centred
        self.validation = validation
        self.teacher_mean = teacher_mean

    def embed_batch(self, encode, batch):
        ids, mask, target = batch
        raw = encode(ids, mask)
        if not self.centred:
            return raw, target
        mean = self.mean.to(raw.device)
        # the loss normalises both sides again: this is the cosine of the centred pair
        return torch.nn.functional.normalize(raw, dim=-1) - mean, target - mean

    def validate(self, model) -> dict[str, float]:
        out = {}
        for name, (ids, mask, teacher) in self.validation.items():
            student = embed_encoded(model, ids, mask)
            out[f"{name}_centred"] = float(M.centred_cosine_rows(student, teacher, self.teacher_mean).mean())
            out[f"{name}_cosine"] = float(M.cosine_rows(student, teacher).mean())
        return out

    def enter_stage2(self, model):
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("projection.")
        return [p for p in model.parameters() if p.requires_grad]

    def model_config(self) -> dict[str, Any]:
        return asdict(self.model.config)


def embed_encoded(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Student embeddings of pre-encoded rows, in batches, as float64 numpy."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(ids), EVAL_BATCH):
            m = torch.from_numpy(mask[i:i + EVAL_BATCH])
            length = max(1, int(m.sum(dim=1).max()))
            b = torch.from_numpy(ids[i:i + EVAL_BATCH, :length]).to(device)
            rows.append(model(b, m[:, :length].to(device)).cpu().numpy())
    model.train(was_training)
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, EMBED_DIM))


# --------------------------------------------------------------------------- the run, step by step


def validation_sets(data: TextData, tok, max_len: int, ids: np.ndarray, mask: np.ndarray,
                    fit_idx: np.ndarray, mon_idx: np.ndarray, teacher_h5: Path) -> EncodedSets:
    """What `TextTask.validate` scores each epoch: the monitor share of the training queries
    (selection and LR schedule), then every held-out set present (plotted, never used for selection)."""
    train_t = data.sets["train"][1]
    validation: EncodedSets = {}
    if len(mon_idx):
        validation["monitor"] = (ids[mon_idx], mask[mon_idx], train_t[mon_idx])
    else:  # no monitor share: follow the fit itself (first rows, for speed)
        rows = fit_idx[:FIT_MONITOR_ROWS]
        validation["monitor"] = (ids[rows], mask[rows], train_t[rows])
    held = held_out_sets(data)
    missing = [n for n in HELD_OUT_SETS if n not in held]
    if missing:
        log.warning("%s: no held-out text set(s) %s: they are left out of the metrics", teacher_h5, ", ".join(missing))
    for name, (queries, teacher) in held.items():
        validation[name] = (*encode_padded(tok, queries, max_len), teacher)
    return validation


def held_out_sets(data: TextData) -> dict[str, tuple[list[str], np.ndarray]]:
    """The non-empty held-out query sets of the teacher cache, in HELD_OUT_SETS order."""
    return {name: data.sets[name] for name in HELD_OUT_SETS if name in data.sets and data.sets[name][0]}


def calibrate_text_student(model, p: DistillTextParams, ids: np.ndarray, mask: np.ndarray, train_t: np.ndarray,
                           fit_idx: np.ndarray, teacher_mean: np.ndarray) -> tuple[float | None, dict[str, Any] | None]:
    """With the centred loss: fit the output scale on the training queries and store it in the model;
    returns (scale, calibration report), both None without the centred loss."""
    if not p.centred_loss:
        return None, None
    # a bounded, evenly spaced share of the training queries (the ranking guard is quadratic in them)
    calib_idx = fit_idx[np.unique(np.linspace(0, len(fit_idx) - 1, min(len(fit_idx), p.calibration_queries))
                                  .round().astype(int))]
    fit_calib = fit_text_scale(embed_encoded(model, ids[calib_idx], mask[calib_idx]), train_t[calib_idx],
                               teacher_mean)
    log_fit("text student", fit_calib)
    scale = fit_calib.after
    model.calibrate(torch.from_numpy(teacher_mean), scale)
    return scale, fit_calib.report()


def retrieval_tracks(data: TextData, manifest: Path, teacher_h5: Path) -> tuple[dict[str, np.ndarray], list[int]]:
    """(report key -> track embeddings to rank, rows of the validation tracks)."""
    rows = read_manifest(manifest) if manifest.is_file() else []
    val = {row["track_id"] for row in rows if row.get("split") == "val"}
    val_rows = [i for i, t in enumerate(data.track_ids) if t in val]  # rows of teacher.h5's validation tracks
    tracks: dict[str, np.ndarray] = {}
    if len(val_rows) >= 2:
        tracks["retrieval"] = data.track_embeddings[val_rows]
    else:
        log.warning("%s: fewer than 2 validation tracks in %s: retrieval agreement left out", manifest, teacher_h5)
    if len(data.track_ids) > max(len(val_rows), 1):
        # the text student never sees audio, so no track is "seen": ranking all of them is fair
        # and gives top-k overlap room to mean something when the validation split is small
        tracks["retrieval_all_tracks"] = data.track_embeddings
    return tracks, val_rows


def score_held_out(report: dict[str, Any], model, data: TextData, validation: EncodedSets,
                   teacher_mean: np.ndarray, tracks: dict[str, np.ndarray], top_k: int) -> None:
    """Add each held-out set's scores to `report`, and whether the student beats bag-of-words."""
    for name, (queries, teacher) in held_out_sets(data).items():
        v_ids, v_mask, _ = validation[name]
        student = embed_encoded(model, v_ids, v_mask)
        report[name] = score_held_out_set(name, queries, teacher, student, data.sets.get("terms"), teacher_mean,
                                          tracks, top_k)
    if "val_combos" in report:
        s = report["val_combos"]["student"]["centred"]["mean"]
        b = report["val_combos"]["bag_of_words"]["centred"]["mean"]
        report["beats_bag_of_words_on_val_combos"] = bool(s > b)
        if s <= b:
            log.warning("val_combos: the student (%.3f) does not beat bag-of-words (%.3f)", s, b)


def train_text_student(p: DistillTextParams, teacher_h5: Path, manifest: Path, out_dir: Path, *,
                       resume: bool = False, top_k: int = 10) -> dict[str, Any]:
    """Train tokenizer and student, score them, write every output; returns the metrics."""
    torch.manual_seed(p.seed)
    data = read_teacher_text(teacher_h5)
    train_q, train_t = data.sets["train"]
    vocabulary = data.sets["terms"][0] if "terms" in data.sets else []
    teacher_mean = M.mean_embedding(train_t)
    fit_rows, monitor_rows = split_monitor(train_q, vocabulary, p.monitor_fraction, p.seed)
    log.info("text student: %d training queries, %d kept aside to monitor training", len(fit_rows), len(monitor_rows))

    # tokenizer: training queries only; held-out terms and free phrasings must come out of
    # sub-word pieces learnt elsewhere, as any unseen word would
    tok = train_tokenizer(train_q, p.model.vocab_size)
    save_tokenizer(tok, out_dir / "tokenizer.json")
    ids, mask = encode_padded(tok, train_q, p.model.max_length)
    fit_idx, mon_idx = np.array(fit_rows), np.array(monitor_rows, dtype=np.int64)
    validation = validation_sets(data, tok, p.model.max_length, ids, mask, fit_idx, mon_idx, teacher_h5)

    model = build_text_student({**asdict(p.model), "vocab_size": tok.get_vocab_size()})
    n_params = model.count_parameters()
    log.info("text student: %s parameters, vocabulary %d", f"{n_params:,}", tok.get_vocab_size())
    task = TextTask(model, ids[fit_idx], mask[fit_idx], train_t[fit_idx], teacher_mean, p.centred_loss, validation)
    # the text student trains on the CPU in fp32, its queries in memory (no loader workers)
    cfg = TrainConfig(p, out_dir / "checkpoints", MONITOR, out_dir / "plots", device="cpu", num_workers=0,
                      precision="fp32", channels_last=False, compile=False, resume=resume)
    result = fit(task, cfg)
    model.load_state_dict(result.best_state_dict)
    model.eval()
    scale, calibration = calibrate_text_student(model, p, ids, mask, train_t, fit_idx, teacher_mean)

    tracks, val_rows = retrieval_tracks(data, manifest, teacher_h5)
    report: dict[str, Any] = {
        "skipped": False,
        "parameters": n_params,
        "vocab_size": tok.get_vocab_size(),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "centred_loss": p.centred_loss,
        "anchor_scale": scale,
        "calibration": calibration,
        "n_train": len(fit_rows),
        "monitor": {k.removeprefix("val/"): v for k, v in result.best_metrics.items() if k.startswith("val/monitor")},
        "retrieval_tracks": len(val_rows),
        "retrieval_all_tracks": len(data.track_ids),
    }
    score_held_out(report, model, data, validation, teacher_mean, tracks, top_k)
    log.info("retrieval agreement over %d validation tracks and all %d tracks", len(val_rows), len(data.track_ids))

    save_text_student(model, out_dir / "student.pt", metrics=report)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    held_out_plot(out_dir / "plots" / "held_out.png", report)
    log.info("wrote %s, %s and %s", out_dir / "student.pt", out_dir / "tokenizer.json", out_dir / "metrics.json")
    return report


def run(params: Params, args: argparse.Namespace) -> int | None:
    if not params.distillation.text_enabled:
        write_skipped(OUT_DIR, "disabled in params (distillation.text_enabled: false)")
        return 0
    train_text_student(params.distill_text, TEACHER_CACHE, MANIFEST, OUT_DIR, resume=bool(getattr(args, "resume", False)))
    return 0
