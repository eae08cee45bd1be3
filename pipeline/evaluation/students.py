"""The students evaluate compares, loaded from their checkpoints as numpy-in/numpy-out functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.evaluation.errors import EvaluateError


@dataclass
class Students:
    """What evaluate compares. An entry is None when that student is disabled (see `*_skipped`)."""

    audio_embed_raw: Callable[[np.ndarray], np.ndarray] | None = None  # student mels -> raw [n, 512]
    text_embed: Callable[[Sequence[str]], np.ndarray] | None = None  # texts -> [n, 512]
    teacher_text_embed: Callable[[Sequence[str]], np.ndarray] | None = None  # for tag prompts
    audio_skipped: str = ""
    text_skipped: str = ""
    notes: list[str] = field(default_factory=list)


def student_skip_reason(path: Path) -> str:
    """'' when `path` holds a trained student; the recorded reason when its stage was disabled."""
    from pipeline.models.skipped import skip_reason

    if not path.is_file():
        raise EvaluateError(f"{path}: student checkpoint missing (run its distill stage first)")
    return skip_reason(path)


def load_students(audio_path: Path, text_path: Path, tokenizer_path: Path, teacher_dir: Path | None) -> Students:
    """Load whichever students exist, wrapped as numpy-in/numpy-out functions."""
    import torch

    out = Students()
    out.audio_skipped = student_skip_reason(audio_path)
    if not out.audio_skipped:
        from pipeline.models.audio_student import load_audio_student

        audio = load_audio_student(audio_path).eval()

        def audio_embed_raw(mels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return audio.embed_raw(torch.from_numpy(np.ascontiguousarray(mels, dtype=np.float32))).numpy()

        out.audio_embed_raw = audio_embed_raw
    out.text_skipped = student_skip_reason(text_path)
    if not out.text_skipped:
        from student_clap.tokenizer import encode, load_tokenizer
        from pipeline.models.text_student import load_text_student

        text = load_text_student(text_path).eval()
        tok = load_tokenizer(tokenizer_path, vocab_size=text.config.vocab_size)

        def text_embed(texts: Sequence[str]) -> np.ndarray:
            ids, mask = encode(tok, list(texts), text.config.max_length)
            with torch.inference_mode():
                return text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        out.text_embed = text_embed
    if teacher_dir is not None and teacher_dir.is_dir():
        from pipeline.teacher.model import load_teacher

        teacher = None

        def teacher_text_embed(texts: Sequence[str]) -> np.ndarray:
            nonlocal teacher
            if teacher is None:  # the teacher is only needed for tag prompts; load on demand
                teacher = load_teacher(teacher_dir, device="cpu", verify=False)
            return teacher.embed_text(list(texts)).numpy()

        out.teacher_text_embed = teacher_text_embed
    return out
