"""Metrics: cosine (raw/centred), the mean baseline, ranking agreement, zero-shot accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cosine_rows_known_values():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(metrics.cosine_rows(a, b), [1.0, 0.0, -1.0, 0.0], atol=1e-12)


def test_cosine_rows_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.cosine_rows(np.zeros((2, 3)), np.zeros((3, 3)))


def test_summarize_percentiles():
    s = metrics.summarize(np.arange(101, dtype=float))
    assert s == {"mean": 50.0, "p10": 10.0, "p50": 50.0, "p90": 90.0}
    assert all(np.isnan(v) for v in metrics.summarize([]).values())


def test_mean_student_scores_high_raw_and_zero_centred():
    # A "random teacher": every embedding close to one direction, small individual deviations.
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=64))
    teacher = _unit(base + 0.02 * rng.normal(size=(200, 64)))
    mean = metrics.mean_embedding(teacher)
    raw, centred = metrics.mean_baseline_rows(teacher, mean)
    assert raw.mean() > 0.95
    np.testing.assert_array_equal(centred, np.zeros(200))
    # a student that outputs exactly the mean is the baseline, also through centred_cosine_rows
    np.testing.assert_array_equal(metrics.centred_cosine_rows(np.tile(mean, (200, 1)), teacher, mean), 0.0)
    # a perfect student scores 1 centred, a noisy one in between
    np.testing.assert_allclose(metrics.centred_cosine_rows(teacher, teacher, mean), 1.0)
    noisy = teacher + 0.015 * rng.normal(size=teacher.shape)
    c = metrics.centred_cosine_rows(noisy, teacher, mean).mean()
    assert 0.2 < c < 0.95


def test_ranks_average_ties():
    np.testing.assert_array_equal(metrics._ranks(np.array([[3.0, 1.0, 3.0, 2.0]])), [[2.5, 0.0, 2.5, 1.0]])


def test_spearman_known_values():
    ref = np.array([[1.0, 2.0, 3.0, 4.0]] * 3)
    test = np.array([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(metrics.spearman_rows(ref, test), [1.0, -1.0, 0.0])


def test_ranking_agreement_identical_and_reversed():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(5, 30))
    same = metrics.ranking_agreement(ref, ref * 2 + 1, k=10)
    assert same == {"top_k_overlap": 1.0, "spearman": pytest.approx(1.0), "recall_at_k": 1.0, "k": 10}
    rev = metrics.ranking_agreement(ref, -ref, k=10)
    assert rev["top_k_overlap"] == 0.0 and rev["recall_at_k"] == 0.0
    assert rev["spearman"] == pytest.approx(-1.0)


def test_ranking_agreement_partial_overlap_and_k_clip():
    ref = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    test = np.array([[6.0, 1.0, 5.0, 4.0, 3.0, 2.0]])  # item 1 demoted to last
    r = metrics.ranking_agreement(ref, test, k=2)
    assert r["top_k_overlap"] == 0.5  # {0,1} vs {0,2}
    assert r["recall_at_k"] == 1.0  # item 0 still in the test top-2
    assert metrics.ranking_agreement(ref, test, k=50)["k"] == 3  # at most half of the 6 items


def test_retrieval_agreement_students():
    rng = np.random.default_rng(2)
    audio = _unit(rng.normal(size=(40, 16)))
    text = _unit(rng.normal(size=(6, 16)))
    perfect = metrics.retrieval_agreement(audio, text, audio * 3.0, k=5)  # norms do not matter
    assert perfect["top_k_overlap"] == 1.0 and perfect["spearman"] == pytest.approx(1.0)
    noisy_audio = audio + 0.3 * rng.normal(size=audio.shape)
    noisy_text = text + 0.3 * rng.normal(size=text.shape)
    a = metrics.retrieval_agreement(audio, text, noisy_audio, k=5)
    e2e = metrics.retrieval_agreement(audio, text, noisy_audio, text_test=noisy_text, k=5)
    t_only = metrics.retrieval_agreement(audio, text, text_test=noisy_text, k=5)
    for r in (a, e2e, t_only):
        assert 0.0 < r["spearman"] < 1.0
    rand = metrics.retrieval_agreement(audio, text, _unit(rng.normal(size=audio.shape)), k=5)
    assert a["spearman"] > rand["spearman"]
    with pytest.raises(ValueError, match="audio_test and/or text_test"):
        metrics.retrieval_agreement(audio, text)
    with pytest.raises(ValueError, match="items"):
        metrics.retrieval_agreement(audio, text, audio[:10])


def test_zero_shot_accuracy():
    prompts = np.eye(3)
    audio = np.array([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.0, 1.0, 0.9], [0.9, 0.0, 1.0]])
    acc, pred = metrics.zero_shot_accuracy(audio, prompts, [{0}, {1}, {1, 2}, [2]])
    np.testing.assert_array_equal(pred, [0, 2, 1, 2])
    assert acc == 0.75
    with pytest.raises(ValueError, match="label sets"):
        metrics.zero_shot_accuracy(audio, prompts, [{0}])


def test_retrieval_agreement_centred_on_the_text_mean():
    # Queries that share one dominant direction: raw rankings are all the same ranking, so a
    # student that only gets that direction right looks perfect raw and is exposed centred.
    rng = np.random.default_rng(3)
    audio = _unit(rng.normal(size=(30, 16)))
    common = _unit(rng.normal(size=16))
    text = common + 0.05 * rng.normal(size=(8, 16))
    mean = metrics.mean_embedding(text)
    lazy_text = np.tile(common, (8, 1))  # ignores what makes each query different
    raw = metrics.retrieval_agreement(audio, text, text_test=lazy_text, k=5)
    centred = metrics.retrieval_agreement(audio, text, text_test=lazy_text, k=5, text_mean=mean)
    assert raw["spearman"] > 0.9
    assert centred["spearman"] < 0.5
    good = metrics.retrieval_agreement(audio, text, text_test=text * 2.0, k=5, text_mean=mean)
    assert good["spearman"] > centred["spearman"]


def test_mean_baseline_scores_exactly_zero_centred_despite_rounding() -> None:
    """A prediction equal to the mean up to float rounding adds nothing, whatever the rounding noise."""
    rng = np.random.default_rng(5)
    teacher = rng.normal(size=(40, 512)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    mean = metrics.mean_embedding(teacher)
    pred = np.tile(metrics.l2_normalize(mean.astype(np.float32)), (len(teacher), 1))  # float32: not bit-equal
    assert np.abs(pred - mean).max() > 0
    assert np.all(metrics.centred_cosine_rows(pred, teacher, mean) == 0.0)
    tracks = rng.normal(size=(12, 512))
    got = metrics.retrieval_agreement(tracks, teacher, text_test=pred, k=3, text_mean=mean)
    assert got["spearman"] == 0.0
