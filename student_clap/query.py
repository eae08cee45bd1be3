"""Text queries through the text student (onnxruntime, tokenizers and numpy only).

What a text search loads: nothing of the audio path (decoders, resamplers, the log-mel), so a
`student-clap search` process imports only what embedding one query needs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from student_clap.identity import checked_identity
from student_clap.onnxrt import onnx_session
from student_clap.spec import SPEC_FILE, SearchError, load_spec, text_identity


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def check_query(text: str) -> str:
    """The query stripped, or SearchError saying why it cannot be embedded. Arguments that were not
    valid UTF-8 on the command line reach Python as lone surrogates; they are refused here rather
    than guessed at (the tokenizer would fail on them)."""
    if not isinstance(text, str):
        raise SearchError(f"the query must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = os.fsencode(text[exc.start : exc.end])
        raise SearchError(f"the query is not valid UTF-8 text (byte(s) {raw.hex(' ')} at character {exc.start}); "
                          "check the terminal's character encoding") from None
    text = text.strip()
    if not text:
        raise SearchError('empty query text: give some words to search for, e.g. "calm piano"')
    return text


class TextEmbedder:
    """Texts -> 512-d vectors with the text ONNX student and its tokenizer.

    `optimize=False` skips onnxruntime's graph optimisation: a faster start for a process that
    embeds one query (`student-clap search`), slightly slower calls after it (student_clap.onnxrt)."""

    def __init__(self, models_dir: str | Path, threads: int | None = None, optimize: bool = True):
        from student_clap.tokenizer import load_tokenizer

        self.models_dir = Path(models_dir)
        spec = load_spec(models_dir)
        text = spec.get("text")
        if not text:
            reason = (spec.get("skipped") or {}).get("text", "not in the export")
            raise SearchError(f"{self.models_dir / SPEC_FILE}: no text student ({reason})")
        try:
            self.tokenizer = load_tokenizer(self.models_dir / text["tokenizer"])
        except ValueError as exc:  # TokenizerError: missing, malformed or empty vocabulary
            raise SearchError(str(exc)) from exc
        self.max_length = int(text["max_length"])
        # A query is a handful of tokens through a ~1M-parameter model: more threads gain nothing
        # measurable (benchmarks/text.py times both) and would take cores from the host server.
        try:
            self.session = onnx_session(self.models_dir / text["file"], 1 if threads is None else threads,
                                        optimize=optimize)
        except FileNotFoundError as exc:
            raise SearchError(str(exc)) from None
        self.model_identity = checked_identity(self.models_dir, self.session)

    @functools.cached_property
    def model_id(self) -> str:
        """sha256 over the text files (student_clap.spec.text_identity); hashed when first asked for."""
        return text_identity(self.models_dir)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from student_clap.tokenizer import encode

        texts = [check_query(t) for t in texts]
        ids, mask = encode(self.tokenizer, texts, self.max_length)
        (emb,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return unit(emb)
