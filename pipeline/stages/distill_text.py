"""Stage distill_text: train the ~1M-parameter text student on the teacher's query embeddings.

Reads the params distillation.text_enabled and distill_text, the text sets and track embeddings
of data/teacher.h5 and the train/validation split of data/manifest.jsonl. Writes
models/text/tokenizer.json, models/text/student.pt ({"state_dict", "config", "metrics"}),
models/text/metrics.json, DVCLive plots under models/text/plots and training checkpoints under
models/text/checkpoints.

With distill_text.centred_loss (default) the loss compares student and teacher after subtracting
the mean teacher train embedding (the demo teacher's queries differ only in a small part of
their vectors); the length of the offsets is then fitted once on the training queries and stored
in the model as its output calibration.

Selection never looks at the held-out sets: a share of the training queries (grouped by term
combination, so no combination straddles the line) drives the LR schedule and picks the best
epoch. The held-out sets are then scored once each:

- cosine to the teacher, raw and centred on the mean teacher train embedding (the demo teacher
  maps every text to nearly the same direction; a constant student scores 0 centred);
- retrieval agreement: validation tracks ranked by teacher-audio . teacher-text against
  teacher-audio . student-text (top-k overlap, Spearman, recall@k), and the same over all
  tracks ("retrieval_all_tracks": the text student never sees audio); "*_centred" ranks by the
  query's offset from the mean teacher embedding, the part of the ranking a query changes;
- the same figures for two baselines: the mean train embedding, and bag-of-words (the mean of
  the teacher embeddings of the query's own terms, from the teacher's "terms" set).
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

from pipeline.evaluation import metrics as M
from pipeline.params import DistillTextParams, Params
from pipeline.paths import MANIFEST
from pipeline.data.queries import HELD_OUT_SETS, split_into_terms
from pipeline.training.calibration import fit_text_scale, log_fit

log = logging.getLogger(__name__)

TEACHER_H5 = Path("data/teacher.h5")
OUT_DIR = Path("models/text")
MONITOR = "monitor_centred"
EVAL_BATCH = 256


class DistillTextError(RuntimeError):
    """The inputs of distill_text are unusable (missing sets, empty training set...)."""


# --------------------------------------------------------------------------- inputs


@dataclass
class TextData:
    sets: dict[str, tuple[list[str], np.ndarray]]  # name -> (queries, teacher embeddings)
    track_ids: list[str]
    track_embeddings: np.ndarray


def read_teacher_text(path: Path) -> TextData:
    from pipeline.data.teacher_cache import TeacherCache

    with TeacherCache(path) as cache:
        sets = {k: (list(q), np.asarray(e, dtype=np.float32)) for k, (q, e) in cache.text_sets().items()}
        ids, tracks = list(cache.track_ids), np.asarray(cache.track_embeddings, dtype=np.float32)
    if "train" not in sets or not sets["train"][0]:
        raise DistillTextError(f"{path}: text set 'train' is missing or empty (re-run the teacher stage)")
    return TextData(sets, ids, tracks)


def validation_tracks(manifest: Path, track_ids: list[str]) -> list[int]:
    """Rows of teacher.h5 tracks whose manifest split is "val"."""
    from pipeline.data.manifest import read_manifest

    val = {row["track_id"] for row in read_manifest(manifest) if row.get("split") == "val"}
    return [i for i, t in enumerate(track_ids) if t in val]


def split_monitor(queries: list[str], vocabulary: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit rows, monitor rows): whole term combinations go to the monitor share."""
    if fraction <= 0 or len(queries) < 2:
        return list(range(len(queries))), []
    groups: dict[frozenset[str], list[int]] = {}
    for i, q in enumerate(queries):
        terms = split_into_terms(q, vocabulary) if vocabulary else []
        key = frozenset(t.lower() for t in terms) or frozenset([q.lower()])
        groups.setdefault(key, []).append(i)
    keys = sorted(groups, key=lambda k: sorted(k))
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


# --------------------------------------------------------------------------- skipped


def write_skipped(out_dir: Path, reason: str) -> None:
    """Markers for a disabled student, as evaluate and export expect them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"skipped": True, "reason": reason}
    tmp = out_dir / "student.pt.tmp"
    torch.save(marker, tmp)
    tmp.replace(out_dir / "student.pt")
    (out_dir / "metrics.json").write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    (out_dir / "tokenizer.json").unlink(missing_ok=True)  # may be a link into DVC's cache
    (out_dir / "tokenizer.json").write_text(json.dumps(marker) + "\n", encoding="utf-8")
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
                 teacher_mean: np.ndarray, centred: bool, validation: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]):
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
    return np.concatenate(rows).astype(np.float64) if rows else np.zeros((0, 512))


# --------------------------------------------------------------------------- baselines and metrics


def bag_of_words(queries: list[str], terms: tuple[list[str], np.ndarray] | None,
                 fallback: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean of the teacher embeddings of each query's terms (L2), and the share of queries with a term.

    A query without any known term (a free phrasing with none of the listed words) gets `fallback`.
    """
    if terms is None:
        return np.tile(M.l2_normalize(fallback), (len(queries), 1)), 0.0
    names, emb = terms
    exact = {q: emb[i] for i, q in enumerate(names)}
    lower: dict[str, np.ndarray] = {}
    for i, q in enumerate(names):
        lower.setdefault(q.lower(), emb[i])
    rows, covered = [], 0
    for q in queries:
        vecs = [exact.get(p, lower.get(p.lower())) for p in split_into_terms(q, names)]
        vecs = [v for v in vecs if v is not None]
        if vecs:
            covered += 1
            rows.append(np.mean(vecs, axis=0))
        else:
            rows.append(fallback)
    return M.l2_normalize(np.stack(rows)) if rows else np.zeros((0, fallback.shape[0])), covered / max(1, len(queries))


def _cosines(pred: np.ndarray, teacher: np.ndarray, mean: np.ndarray) -> dict[str, Any]:
    return {
        "cosine": M.summarize(M.cosine_rows(pred, teacher)),
        "centred": M.summarize(M.centred_cosine_rows(pred, teacher, mean)),
    }


def _retrieval(tracks: np.ndarray, teacher: np.ndarray, pred: np.ndarray, k: int,
               text_mean: np.ndarray | None = None) -> dict[str, float]:
    out = M.retrieval_agreement(tracks, teacher, text_test=pred, k=k, text_mean=text_mean)
    out["top_k_overlap_chance"] = out["k"] / len(tracks)
    return out


def score_set(name: str, queries: list[str], teacher: np.ndarray, student: np.ndarray, data: TextData,
              teacher_mean: np.ndarray, tracks: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """Student and both baselines on one held-out set; `tracks` maps a report key to the track
    embeddings to rank (e.g. "retrieval": validation tracks)."""
    bow, coverage = bag_of_words(queries, data.sets.get("terms"), teacher_mean)
    mean_pred = np.tile(M.l2_normalize(teacher_mean), (len(queries), 1))
    report: dict[str, Any] = {
        "n": len(queries),
        "student": _cosines(student, teacher, teacher_mean),
        "bag_of_words": {**_cosines(bow, teacher, teacher_mean), "term_coverage": coverage},
        "mean_baseline": _cosines(mean_pred, teacher, teacher_mean),
    }
    if "terms" not in data.sets:
        report["bag_of_words"]["note"] = "teacher.h5 has no 'terms' set: every query falls back to the mean"
    preds = {"student": student, "bag_of_words": bow, "mean_baseline": mean_pred}
    for key, items in tracks.items():
        for who, pred in preds.items():
            # the mean baseline ranks tracks the same for every query: it shows how much of the
            # agreement the direction all queries share explains on its own
            report[who][key] = _retrieval(items, teacher, pred, k)
            # centred: rank by how each query moves the scores away from the mean query's, the
            # part a query adds; the mean baseline has nothing to add (Spearman 0)
            report[who][key + "_centred"] = _retrieval(items, teacher, pred, k, text_mean=teacher_mean)
    s, b = report["student"]["centred"]["mean"], report["bag_of_words"]["centred"]["mean"]
    log.info("%s (%d queries): centred cosine student %.3f, bag-of-words %.3f; raw cosine student %.4f",
             name, len(queries), s, b, report["student"]["cosine"]["mean"])
    return report


# --------------------------------------------------------------------------- stage


def run(params: Params, args: argparse.Namespace) -> int | None:
    if not params.distillation.text_enabled:
        write_skipped(OUT_DIR, "disabled in params (distillation.text_enabled: false)")
        return 0
    distill_text(params.distill_text, TEACHER_H5, MANIFEST, OUT_DIR, resume=bool(getattr(args, "resume", False)))
    return 0


def distill_text(p: DistillTextParams, teacher_h5: Path, manifest: Path, out_dir: Path, *,
                 resume: bool = False, top_k: int = 10) -> dict[str, Any]:
    """Train tokenizer and student, score them, write every output; returns the metrics."""
    from pipeline.models.text_student import build_text_student, save_text_student
    from pipeline.models.text_tokenizer import encode, save_tokenizer, train_tokenizer
    from pipeline.training.loop import TrainConfig, fit

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
    max_len = p.model.max_length

    def enc(queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = encode(tok, queries, max_len)
        width = np.zeros((len(ids), max_len), np.int64)
        m = np.zeros_like(width)
        width[:, : ids.shape[1]], m[:, : ids.shape[1]] = ids, mask
        return width, m

    ids, mask = enc(train_q)
    fit_idx, mon_idx = np.array(fit_rows), np.array(monitor_rows, dtype=np.int64)
    validation = {}
    if len(mon_idx):
        validation["monitor"] = (ids[mon_idx], mask[mon_idx], train_t[mon_idx])
    else:  # no monitor share: follow the fit itself (first rows, for speed)
        validation["monitor"] = (ids[fit_idx[:512]], mask[fit_idx[:512]], train_t[fit_idx[:512]])
    held = {name: data.sets[name] for name in HELD_OUT_SETS if name in data.sets and data.sets[name][0]}
    missing = [n for n in HELD_OUT_SETS if n not in held]
    if missing:
        log.warning("%s: no held-out text set(s) %s: they are left out of the metrics", teacher_h5, ", ".join(missing))
    for name, (queries, teacher) in held.items():
        validation[name] = (*enc(queries), teacher)  # plotted per epoch, never used for selection

    config = {**asdict(p.model), "vocab_size": tok.get_vocab_size()}
    model = build_text_student(config)
    n_params = model.count_parameters()
    log.info("text student: %s parameters, vocabulary %d", f"{n_params:,}", tok.get_vocab_size())
    task = TextTask(model, ids[fit_idx], mask[fit_idx], train_t[fit_idx], teacher_mean, p.centred_loss, validation)
    cfg = TrainConfig.from_section(
        p, ckpt_dir=out_dir / "checkpoints", live_dir=out_dir / "plots", monitor=MONITOR, resume=resume, device="cpu",
    )
    result = fit(task, cfg)
    model.load_state_dict(result.best_state_dict)
    model.eval()
    scale, calibration = None, None
    if p.centred_loss:
        # a bounded, evenly spaced share of the training queries (the ranking guard is quadratic in them)
        calib_idx = fit_idx[np.unique(np.linspace(0, len(fit_idx) - 1, min(len(fit_idx), p.calibration_queries))
                                      .round().astype(int))]
        fit_calib = fit_text_scale(embed_encoded(model, ids[calib_idx], mask[calib_idx]), train_t[calib_idx],
                                   teacher_mean)
        log_fit("text student", fit_calib)
        scale, calibration = fit_calib.after, fit_calib.report()
        model.calibrate(torch.from_numpy(teacher_mean), scale)

    # --- final scores
    val_rows = validation_tracks(manifest, data.track_ids) if manifest.is_file() else []
    tracks: dict[str, np.ndarray] = {}
    if len(val_rows) >= 2:
        tracks["retrieval"] = data.track_embeddings[val_rows]
    else:
        log.warning("%s: fewer than 2 validation tracks in %s: retrieval agreement left out", manifest, teacher_h5)
    if len(data.track_ids) > max(len(val_rows), 1):
        # the text student never sees audio, so no track is "seen": ranking all of them is fair
        # and gives top-k overlap room to mean something when the validation split is small
        tracks["retrieval_all_tracks"] = data.track_embeddings
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
    for name, (queries, teacher) in held.items():
        v_ids, v_mask, _ = validation[name]
        student = embed_encoded(model, v_ids, v_mask)
        report[name] = score_set(name, queries, teacher, student, data, teacher_mean, tracks, top_k)
    if "val_combos" in report:
        s = report["val_combos"]["student"]["centred"]["mean"]
        b = report["val_combos"]["bag_of_words"]["centred"]["mean"]
        report["beats_bag_of_words_on_val_combos"] = bool(s > b)
        if s <= b:
            log.warning("val_combos: the student (%.3f) does not beat bag-of-words (%.3f)", s, b)
    log.info("retrieval agreement over %d validation tracks and all %d tracks", len(val_rows), len(data.track_ids))

    save_text_student(model, out_dir / "student.pt", metrics=report)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _summary_plot(out_dir / "plots" / "held_out.png", report)
    log.info("wrote %s, %s and %s", out_dir / "student.pt", out_dir / "tokenizer.json", out_dir / "metrics.json")
    return report


def _summary_plot(path: Path, report: dict[str, Any]) -> None:
    """Bars: centred cosine of the student and both baselines on every held-out set."""
    from pipeline.evaluation.plots import agreement_bars

    names = [n for n in HELD_OUT_SETS if n in report]
    if not names:
        return
    results = {
        n: {w: report[n][w]["centred"]["mean"] for w in ("student", "bag_of_words", "mean_baseline")} for n in names
    }
    agreement_bars(path, results, ["student", "bag_of_words", "mean_baseline"], "centred cosine to the teacher")
