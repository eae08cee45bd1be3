"""Training the text student's tokenizer: a small lower-cased byte-level BPE on the training queries.

Loading and encoding live in the runtime (student_clap.tokenizer), which search uses without the
pipeline; this module adds training and saving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipeline.atomic import atomic_path
from student_clap.tokenizer import BOS, EOS, MIN_VOCAB, SPECIAL_TOKENS, UNK

log = logging.getLogger(__name__)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a lower-cased byte-level BPE with at most `vocab_size` entries.

    The vocabulary stops growing when the corpus has no more pairs to merge, so a small corpus
    gives a smaller table than asked for; the model takes its size from the tokenizer.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"distill_text.model.vocab_size: need at least {MIN_VOCAB} (bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # prefix space: a word gets the same pieces at the start of a query as in its middle
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    log.info("trained byte-level BPE on %d texts: %d tokens (asked for %d)", len(texts), tok.get_vocab_size(), vocab_size)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write tokenizer.json atomically (a half-written file would break export and search)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return path
