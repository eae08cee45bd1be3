"""`student-clap compare FOLDER`: the teacher and the exported student side by side on any music folder.

Every readable song is decoded once and embedded twice, exactly as in training: by the exported
audio student through the runtime's song-level path (what `index` computes) and by the teacher on
the same segment times (what data/teacher.h5 holds for a training track). Options and what each
figure means: docs/compare.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import metrics as M
from pipeline.evaluation import fidelity
from pipeline.params import SameSpaceParams, TeacherFrontendParams
from student_clap.audio import AudioDecodeError, decode_track, map_starts, resample_int16, segment_length, segment_starts
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "This audio is a {label} song."
RECALL_KS = (1, 5, 10)
TEACHER_BATCH = 8  # segments per teacher forward pass


class CompareError(RuntimeError):
    """compare cannot run: a missing model or folder, or an unusable labels/captions file (named)."""


# --------------------------------------------------------------------------- teacher side (torch)


class TeacherAudio:
    """Waveforms -> teacher track vectors, cut and averaged as the mel and teacher caches do."""

    def __init__(self, teacher_dir: str | Path, frontend: TeacherFrontendParams, *, decode_rate: int,
                 segment_seconds: float, hop_seconds: float, device: str = "cpu", mel_step: float = 0.0) -> None:
        from pipeline.data.frontends import TeacherMel, segment_mels
        from pipeline.teacher.model import load_teacher

        self.teacher = load_teacher(teacher_dir, device=device)
        self.mel = TeacherMel(frontend).eval()
        self._segment_mels = segment_mels
        self.rate = int(frontend.sample_rate)
        self.decode_rate = int(decode_rate)
        self.segment_seconds, self.hop_seconds = float(segment_seconds), float(hop_seconds)
        self.mel_step = float(mel_step)  # the mel cache's teacher step (0: float16)

    def embed_wave(self, wave_int16: np.ndarray) -> np.ndarray:
        import torch

        from pipeline.data.mel_cache import dequantise, quantise

        starts = segment_starts(len(wave_int16), self.decode_rate, self.segment_seconds, self.hop_seconds)
        wave = wave_int16 if self.rate == self.decode_rate else resample_int16(wave_int16, self.decode_rate, self.rate)
        t_starts, t_len = map_starts(starts, self.decode_rate, self.rate), segment_length(self.rate, self.segment_seconds)
        total = None
        with torch.no_grad():
            for i in range(0, len(t_starts), TEACHER_BATCH):
                mels = self._segment_mels(self.mel, wave, t_starts[i:i + TEACHER_BATCH], t_len, TEACHER_BATCH)
                mels = dequantise(quantise(mels, self.mel_step), self.mel_step)  # as the mel cache stores them
                raw = self.teacher.embed_mels_raw(torch.from_numpy(mels)).double().sum(dim=0).numpy()
                total = raw if total is None else total + raw
        return M.l2_normalize(total / len(starts))

    def embed_text(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        out = [self.teacher.embed_text(list(texts[i:i + batch])).numpy() for i in range(0, len(texts), batch)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, EMBED_DIM))

    def identity(self) -> dict[str, Any]:
        prov = self.teacher.provenance
        return {"kind": prov.get("kind", "unknown"), "source": prov.get("source", ""),
                "checkpoint_sha256": prov.get("source_sha256", ""), "weights_sha256": self.teacher.sha256}


# --------------------------------------------------------------------------- embedding a folder


@dataclass
class Embedded:
    paths: list[Path]  # readable songs, in the row order of the arrays
    teacher: np.ndarray  # [n, 512] unit
    student: np.ndarray  # [n, 512] unit
    failed: list[tuple[str, str]] = field(default_factory=list)


def embed_folder(files: Sequence[Path], decode_rate: int, student_embed: Callable[[np.ndarray], np.ndarray],
                 teacher_embed: Callable[[np.ndarray], np.ndarray], progress: bool = True) -> Embedded:
    """Decode each file once and embed it with both models; files the decoder or the usability rule
    refuses (unreadable, silent, too short) are reported and skipped."""
    paths, t_rows, s_rows, failed = [], [], [], []
    for f in tqdm(files, desc="compare", unit="song", disable=not progress):
        try:
            wave = decode_track(f, decode_rate).wave
        except AudioDecodeError as exc:
            log.warning("skipped %s: %s", f, exc.reason)
            failed.append((str(f), exc.reason))
            continue
        paths.append(Path(f))
        s_rows.append(np.asarray(student_embed(wave), dtype=np.float64))
        t_rows.append(np.asarray(teacher_embed(wave), dtype=np.float64))
    return Embedded(paths, np.stack(t_rows) if t_rows else np.zeros((0, EMBED_DIM)),
                    np.stack(s_rows) if s_rows else np.zeros((0, EMBED_DIM)), failed)


# --------------------------------------------------------------------------- labels and captions


def _key(path: Path) -> str:
    return str(path.resolve())


def read_pairs(csv_path: Path, column: str, root: Path, known: Sequence[Path]) -> tuple[list[tuple[int, str]], list[str]]:
    """Rows `path,<column>` of a CSV -> ([(index into known, value)], problems).

    A header row naming `path` and `column` may come first (other columns are ignored), else the
    first two columns are taken. Relative paths are relative to `root`. A row whose path is not one
    of the readable songs, or whose value is empty, is reported (file and line) and skipped."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CompareError(f"{csv_path}: not found") from None
    except UnicodeDecodeError as exc:
        raise CompareError(f"{csv_path}: not UTF-8 text: {exc}") from None
    rows = list(csv.reader(text.splitlines()))
    index = {_key(p): i for i, p in enumerate(known)}
    path_col, value_col, start = 0, 1, 0
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        header = [c.strip().lower() for c in rows[0]]
        if column not in header:
            raise CompareError(f"{csv_path}: the header has a 'path' column but no {column!r} column")
        path_col, value_col, start = header.index("path"), header.index(column), 1
    pairs, problems = [], []
    for line, row in enumerate(rows[start:], start=start + 1):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) <= max(path_col, value_col):
            problems.append(f"{csv_path}:{line}: expected path,{column}; got {row!r}")
            continue
        raw_path, value = row[path_col].strip(), row[value_col].strip()
        if not value:
            problems.append(f"{csv_path}:{line}: empty {column} for {raw_path}")
            continue
        p = Path(raw_path)
        i = index.get(_key(p if p.is_absolute() else root / p))
        if i is None:
            problems.append(f"{csv_path}:{line}: {raw_path} is not a readable song under {root}")
            continue
        pairs.append((i, value))
    return pairs, problems


def read_labels(spec: Path, root: Path, known: Sequence[Path]) -> tuple[list[tuple[int, str]], list[str]]:
    """Labels from a folder of label subfolders (GTZAN: genres/blues/blues.00000.wav) or a CSV."""
    if spec.is_dir():
        # the path as found, not resolved: a label folder of symlinks names the label, the link's
        # target does not
        base, real_base = Path(os.path.abspath(spec)), spec.resolve()
        pairs, problems = [], []
        for i, p in enumerate(known):
            try:
                rel = Path(os.path.abspath(p)).relative_to(base)
            except ValueError:
                try:
                    rel = p.resolve().relative_to(real_base)
                except ValueError:
                    rel = None
            if rel is None:
                problems.append(f"{p}: not under the labels folder {spec}")
                continue
            if len(rel.parts) < 2:
                problems.append(f"{p}: directly in {spec}, not in a label subfolder")
                continue
            pairs.append((i, rel.parts[0]))
        return pairs, problems
    if spec.is_file():
        return read_pairs(spec, "label", root, known)
    raise CompareError(f"--labels {spec}: neither a folder of label subfolders nor a CSV file")


# --------------------------------------------------------------------------- figures


def zero_shot(items: np.ndarray, labels: Sequence[str], audio: dict[str, np.ndarray],
              prompts: dict[str, np.ndarray], template: str) -> dict[str, Any]:
    """Accuracy of nearest-prompt labelling for each (audio, prompt) pairing.

    items: rows of the audio arrays that carry a label; labels: their labels; audio/prompts: the
    embeddings per side ("teacher", "student"); pairings: teacher = teacher audio x teacher
    prompts, audio_student = student audio x teacher prompts, end_to_end = student audio x
    student prompts (when the student prompts are given)."""
    classes = sorted(set(labels))
    out: dict[str, Any] = {"n_tracks": len(items), "n_labels": len(classes), "template": template,
                           "chance": 1.0 / len(classes) if classes else None}
    if len(classes) < 2:
        out["note"] = "fewer than two labels: zero-shot accuracy needs at least two"
        return out
    truth = [{classes.index(lab)} for lab in labels]
    pairings = {"teacher": ("teacher", "teacher"), "audio_student": ("student", "teacher"),
                "end_to_end": ("student", "student")}
    for name, (a, t) in pairings.items():
        if t in prompts:
            out[name], _ = M.zero_shot_accuracy(audio[a][items], prompts[t], truth)
    return out


def caption_recall(text: np.ndarray, audio: np.ndarray, targets: Sequence[int],
                   ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """recall@k: share of captions whose song is among the k songs nearest to the caption."""
    scores = M.l2_normalize(text) @ M.l2_normalize(audio).T
    target_scores = scores[np.arange(len(targets)), np.asarray(targets)]
    # rank = songs scored strictly higher than the captioned one (ties resolved in its favour)
    rank = (scores > target_scores[:, None]).sum(axis=1)
    return {f"recall@{k}": float(np.mean(rank < k)) for k in ks}


def captions_report(pairs: Sequence[tuple[int, str]], audio: dict[str, np.ndarray],
                    text: dict[str, np.ndarray], top_k: int = 10) -> dict[str, Any]:
    """Recall@k per pairing and the end-to-end text-query result overlap with the teacher's ranking."""
    targets = [i for i, _ in pairs]
    n_tracks = len(audio["teacher"])
    out: dict[str, Any] = {"n_captions": len(pairs), "n_tracks": n_tracks}
    pairings = {"teacher": ("teacher", "teacher"), "audio_student": ("student", "teacher"),
                "text_student": ("teacher", "student"), "end_to_end": ("student", "student")}
    for name, (a, t) in pairings.items():
        if t in text:
            out[name] = caption_recall(text[t], audio[a], targets)
    trivial = [k for k in RECALL_KS if k >= n_tracks]
    if trivial:
        out["note"] = f"only {n_tracks} songs: recall@{', @'.join(map(str, trivial))} is 1 by construction"
    if "student" in text:
        agree = M.retrieval_agreement(audio["teacher"], text["teacher"], audio["student"], text_test=text["student"],
                                      k=top_k)
        out["end_to_end_agreement"] = agree
    return out


def same_space_section(emb: Embedded, p: SameSpaceParams) -> dict[str, Any]:
    """The verdict and figures, laid out as evaluate's `same_space` section."""
    if len(emb.paths) == 0:
        return {"skipped": True, "reason": "no readable song"}
    return fidelity.same_space_section(emb.teacher, emb.student, M.mean_embedding(emb.teacher), asdict(p),
                                       centre="the mean teacher embedding of these songs")


# --------------------------------------------------------------------------- the command


def compare(folder: Path, *, models: Path, teacher_dir: Path, frontend: TeacherFrontendParams,
            same_space_params: SameSpaceParams, labels: Path | None = None, captions: Path | None = None,
            template: str = DEFAULT_PROMPT, device: str = "cpu", batch_size: int = 16,
            threads: int | None = None, progress: bool = True, mel_step: float = 0.0) -> dict[str, Any]:
    """Run both models on `folder` and return the report (what --json writes)."""
    from student_clap.embed import TextEmbedder, open_audio_embedder, scan_audio
    from student_clap.spec import SearchError

    if "{label}" not in template:
        raise CompareError(f"--prompt {template!r}: must contain {{label}}")
    try:
        files = [Path(p) for p in scan_audio(folder, resolve=False).files]
        student = open_audio_embedder(models, batch_size=batch_size, threads=threads)
    except SearchError as exc:
        raise CompareError(str(exc)) from exc
    geometry = student.geometry
    decode_rate = geometry.decode_sample_rate or geometry.sample_rate

    def student_embed(wave: np.ndarray) -> np.ndarray:
        # the file decoded at the mel cache's rate, on to the student's: the samples `index` embeds
        (out,) = list(student.embed_waves([resample_int16(wave, decode_rate, geometry.sample_rate)]))
        if isinstance(out, BaseException):
            raise out
        return out[0]

    if not files:
        raise CompareError(f"{folder}: no audio files")
    try:
        text_student: TextEmbedder | None = TextEmbedder(models, threads=threads)
    except SearchError as exc:
        log.warning("no text student (%s): end-to-end figures are left out", exc)
        text_student = None
    from pipeline.teacher.model import TeacherError

    try:
        teacher = TeacherAudio(teacher_dir, frontend, decode_rate=decode_rate,
                               segment_seconds=geometry.segment_seconds, hop_seconds=geometry.hop_seconds, device=device,
                               mel_step=mel_step)
    except TeacherError as exc:
        raise CompareError(str(exc)) from exc
    emb = embed_folder(files, decode_rate, student_embed, teacher.embed_wave, progress=progress)
    report: dict[str, Any] = {
        "folder": str(folder), "n_files": len(files), "n_tracks": len(emb.paths),
        "failed": [{"path": p, "reason": r} for p, r in emb.failed],
        "teacher": teacher.identity(), "student": {"audio_model": str(models), "audio_identity": student.model_id},
        "same_space": same_space_section(emb, same_space_params),
    }
    problems: list[str] = []
    audio = {"teacher": emb.teacher, "student": emb.student}
    if labels is not None:
        pairs, bad = read_labels(labels, folder, emb.paths)
        problems += bad
        classes = sorted({lab for _, lab in pairs})
        prompts_text = [template.format(label=c) for c in classes]
        prompts = {"teacher": teacher.embed_text(prompts_text)} if classes else {}
        if classes and text_student is not None:
            prompts["student"] = text_student.embed(prompts_text).astype(np.float64)
        items = np.asarray([i for i, _ in pairs], dtype=np.int64)
        labs = [lab for _, lab in pairs]
        report["zero_shot"] = zero_shot(items, labs, audio, prompts, template) if pairs else \
            {"n_tracks": 0, "note": f"{labels}: no label for any readable song"}
    if captions is not None:
        pairs, bad = read_pairs(captions, "caption", folder, emb.paths)
        problems += bad
        if pairs:
            texts = [c for _, c in pairs]
            text = {"teacher": teacher.embed_text(texts)}
            if text_student is not None:
                text["student"] = text_student.embed(texts).astype(np.float64)
            report["captions"] = captions_report(pairs, audio, text)
        else:
            report["captions"] = {"n_captions": 0, "note": f"{captions}: no caption for any readable song"}
    report["problems"] = problems
    for line in problems:
        log.warning("%s", line)
    return M.json_safe(report)


def render_text(report: dict[str, Any]) -> str:
    """The report as Markdown tables for the terminal."""
    from pipeline.models.model_card import markdown_table, same_space_table, teacher_line

    parts = [f"{report['n_tracks']} of {report['n_files']} files under {report['folder']} compared. "
             + teacher_line(report.get("teacher") or {}),
             same_space_table(report["same_space"])]
    zs = report.get("zero_shot")
    if zs:
        if zs.get("note"):
            parts.append(f"Zero-shot: {zs['note']}.")
        else:
            parts.append(f"Zero-shot accuracy, {zs['n_tracks']} songs, {zs['n_labels']} labels, prompt "
                         f"\"{zs['template']}\" (chance {zs['chance']:.4f}):")
            parts.append(markdown_table(["teacher", "audio student (teacher text)", "end to end (student text)"],
                                [[zs.get("teacher"), zs.get("audio_student"), zs.get("end_to_end")]]))
    cap = report.get("captions")
    if cap:
        if not cap.get("n_captions"):
            parts.append(f"Captions: {cap['note']}.")
        else:
            names = {"teacher": "teacher", "audio_student": "audio student (teacher text)",
                     "text_student": "text student (teacher audio)", "end_to_end": "end to end"}
            rows = [[names[n], *(cap[n][f"recall@{k}"] for k in RECALL_KS)] for n in names if n in cap]
            parts.append(f"Text-to-music recall, {cap['n_captions']} captions over {cap['n_tracks']} songs:")
            parts.append(markdown_table(["ranking by", *(f"recall@{k}" for k in RECALL_KS)], rows))
            if cap.get("end_to_end_agreement"):
                a = cap["end_to_end_agreement"]
                parts.append(f"End-to-end text-query result overlap with the teacher (top-{a['k']}): "
                             f"{a['top_k_overlap']:.4f}, Spearman {a['spearman']:.4f}.")
            if cap.get("note"):
                parts.append(f"{cap['note']}.")
    if report.get("failed"):
        parts.append(f"{len(report['failed'])} file(s) could not be used and were skipped:\n"
                     + "\n".join(f"  {f['path']}: {f['reason']}" for f in report["failed"]))
    if report.get("problems"):
        parts.append(f"{len(report['problems'])} labels/captions row(s) skipped:\n"
                     + "\n".join(f"  {p}" for p in report["problems"]))
    return "\n\n".join(parts)


def main(args: argparse.Namespace) -> int:
    from pipeline.params import ParamsError, load_params

    try:  # the teacher front-end and the same-space bar are the project's
        params = load_params(args.params)
    except ParamsError as exc:
        log.error("--params: %s", exc)
        return 2
    try:
        report = compare(
            Path(args.folder), models=Path(args.models), teacher_dir=Path(args.teacher or params.teacher.model.dir),
            frontend=params.frontend.teacher, same_space_params=params.evaluate.same_space,
            labels=Path(args.labels) if args.labels else None, captions=Path(args.captions) if args.captions else None,
            template=args.prompt or DEFAULT_PROMPT, device=args.device, batch_size=args.batch_size, threads=args.threads,
            mel_step=params.mels.precision.teacher_db,
        )
    except CompareError as exc:
        log.error("%s", exc)
        return 2
    print(render_text(report))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nwrote {out}", file=sys.stderr)
    return 0 if report["n_tracks"] else 1
