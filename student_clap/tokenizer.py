"""The text student's query tokenizer: loading tokenizer.json and encoding queries (tokenizers + numpy).

A small lower-cased byte-level BPE trained on the training queries (pipeline.data.text_tokenizer
trains it). Byte-level BPE starts from the 256 byte symbols, so any word (held-out terms, free
phrasings, typos, other scripts) encodes into known sub-word pieces and nothing maps to an unknown
token. Every sequence is wrapped as ``<s> ... </s>``; padding uses ``<pad>`` (id 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3 in this order
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or not the one the model expects."""


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """Load tokenizer.json and check it is usable (specials present, expected size if given)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        if _skipped_marker(path):
            raise TokenizerError(f"{path}: the text student was skipped, there is no tokenizer") from None
        raise TokenizerError(f"{path}: not a valid tokenizer.json: {exc}") from exc
    size = tok.get_vocab_size()
    if size < len(SPECIAL_TOKENS) + 1:
        raise TokenizerError(f"{path}: the vocabulary is empty ({size} entries)")
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"{path}: special token(s) {', '.join(missing)} missing")
    if tok.token_to_id(PAD) != 0:
        raise TokenizerError(f"{path}: {PAD} must have id 0, has {tok.token_to_id(PAD)}")
    if vocab_size is not None and size != vocab_size:
        raise TokenizerError(f"{path}: vocabulary has {size} entries, the model expects {vocab_size}")
    return tok


def _skipped_marker(path: Path) -> bool:
    """distill_text writes {"skipped": true, ...} here when the text student is disabled."""
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("skipped"))
    except (ValueError, AttributeError, OSError):
        return False


def encode(tok: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both int64 [B, L], L = longest sequence capped at max_length.

    Over-long texts are cut but keep their closing ``</s>``; padding is ``<pad>`` (id 0) on the right.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (<s>, a token, </s>), got {max_length}")
    if not texts:
        raise ValueError("encode() needs at least one text")
    eos = tok.token_to_id(EOS)
    rows = []
    for enc in tok.encode_batch(list(texts)):
        ids = enc.ids
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos]
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return input_ids, mask
