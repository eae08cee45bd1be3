"""The held-out text scoring shared by distill_text and evaluate (pipeline.evaluation.held_out_text)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.held_out_text import score_held_out_set, text_fidelity
from pipeline.metrics import l2_normalize, mean_embedding

DIM = 16


def _teacher(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows sharing one large direction plus small per-row offsets, and their unit mean."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=DIM)
    rows = l2_normalize(5.0 * shared + rng.normal(size=(n, DIM)))
    return rows, mean_embedding(rows)


def test_fidelity_separates_copying_the_offsets_from_the_shared_direction() -> None:
    teacher, mean = _teacher()
    perfect = text_fidelity(teacher, teacher, mean)
    assert perfect["cosine"]["mean"] == pytest.approx(1.0) and perfect["centred"]["p10"] == pytest.approx(1.0)
    constant = text_fidelity(np.tile(mean, (len(teacher), 1)), teacher, mean)
    assert constant["cosine"]["mean"] > 0.9  # the shared direction alone scores high raw...
    assert constant["centred"]["mean"] == pytest.approx(0.0, abs=1e-12)  # ...and nothing centred
    flipped = l2_normalize(2 * mean - teacher)  # every offset reversed
    assert text_fidelity(flipped, teacher, mean)["centred"]["p90"] < -0.9
    assert set(perfect["cosine"]) == {"mean", "p10", "p50", "p90"}


def test_held_out_set_scores_student_and_baselines_alike() -> None:
    teacher, mean = _teacher()
    queries = [f"Rock {i}" if i % 2 else f"Jazz {i}" for i in range(len(teacher))]
    terms = (["Rock", "Jazz"], teacher[:2])
    rng = np.random.default_rng(1)
    tracks = l2_normalize(rng.normal(size=(6, DIM)))
    report = score_held_out_set("val_combos", queries, teacher, teacher, terms, mean, {"retrieval": tracks}, k=3)
    assert report["n"] == len(queries)
    assert report["bag_of_words"]["term_coverage"] == 1.0 and "note" not in report["bag_of_words"]
    for who in ("student", "bag_of_words", "mean_baseline"):
        assert report[who]["retrieval"]["top_k_overlap_chance"] == pytest.approx(3 / 6)
    # the student equals the teacher: its rankings agree exactly, raw and centred
    assert report["student"]["retrieval"]["top_k_overlap"] == pytest.approx(1.0)
    assert report["student"]["retrieval_centred"]["spearman"] == pytest.approx(1.0)
    without = score_held_out_set("val_free", queries, teacher, teacher, None, mean, {}, k=3)
    assert without["bag_of_words"]["term_coverage"] == 0.0 and "note" in without["bag_of_words"]
    assert without["bag_of_words"]["centred"]["mean"] == pytest.approx(0.0, abs=1e-3)  # the mean, re-normalised
