"""The student tokenizer: small, lower-cased, no unknown tokens, padding/truncation, checked on load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.text_tokenizer import save_tokenizer, train_tokenizer
from student_clap.tokenizer import BOS, EOS, MIN_VOCAB, PAD, UNK, TokenizerError, encode, load_tokenizer

CORPUS = [
    "Rock, piano", "JAZZ saxophone", "happy Pop", "Sad, Female Vocal, Violin", "dark ambient",
    "Electric Guitar, HARD ROCK", "dreamy, synth", "Folk acoustic guitar", "drums, energetic",
] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 400)


def test_vocab_is_small_and_capped(tok) -> None:
    size = tok.get_vocab_size()
    assert MIN_VOCAB < size <= 400
    assert [tok.token_to_id(t) for t in (PAD, BOS, EOS, UNK)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 100)


def test_lower_cased_and_unseen_words_have_no_unknown_tokens(tok) -> None:
    assert tok.encode("ROCK, Piano").ids == tok.encode("rock, piano").ids
    unk = tok.token_to_id(UNK)
    for text in ("xylophone, whispered", "Ünïcode 日本 🎵", "zzzz"):
        ids = tok.encode(text).ids
        assert unk not in ids and len(ids) > 2
    # frequent training words become single pieces, so sequences stay short
    assert len(tok.encode("rock piano").ids) == 4


def test_encode_pads_truncates_and_masks(tok) -> None:
    ids, mask = encode(tok, ["rock", "sad female vocal violin " * 10], max_length=16)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, 16)
    n = int(mask[0].sum())
    assert ids[0, 0] == tok.token_to_id(BOS) and ids[0, n - 1] == tok.token_to_id(EOS)
    assert (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert mask[1].all() and ids[1, -1] == tok.token_to_id(EOS)
    # length follows the longest text when it is short
    ids2, _ = encode(tok, ["rock", "jazz"], max_length=16)
    assert ids2.shape[1] == 3
    with pytest.raises(ValueError):
        encode(tok, [], 16)


def test_save_load_roundtrip_and_checks(tok, tmp_path: Path) -> None:
    path = save_tokenizer(tok, tmp_path / "text" / "tokenizer.json")
    loaded = load_tokenizer(path, vocab_size=tok.get_vocab_size())
    assert loaded.encode("dark ambient").ids == tok.encode("dark ambient").ids
    with pytest.raises(TokenizerError, match="expects 9999") as info:
        load_tokenizer(path, vocab_size=9999)
    assert "tokenizer.json" in str(info.value)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{broken", encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(bad)


def test_empty_vocabulary_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    path = tmp_path / "empty.json"
    Tokenizer(models.BPE()).save(str(path))
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer(path)
