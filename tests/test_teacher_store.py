"""teacher.h5: the teacher stage's embedding loop, resume, shards + merge, and the reader."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.data.teacher_cache import EmbeddingStoreError, TeacherCache, merge_shards, partial_path, shard_path
from pipeline.stages.teacher import build_embeddings
from pipeline.teacher.model import build_demo_teacher, load_teacher
from repo_params import section

TRACK_LENGTHS = (2, 1, 4, 3)  # segments per track
QUERIES = {"train": ["piano", "calm rock", "jazz, SAX"], "eval_prompts": ["piano", "drums"], "val_free": []}
PARAMS = {"teacher": {"batch_size": 3}}


class ArrayMelCache:
    """In-memory stand-in with the pipeline.data.mel_cache.MelCache read API (the teacher stage's only view)."""

    def __init__(self, seed: int = 0, lengths: tuple[int, ...] = TRACK_LENGTHS):
        rng = np.random.default_rng(seed)
        self.track_ids = [f"demo:{i}" for i in range(len(lengths))]
        self.segment_track = np.repeat(np.arange(len(lengths)), lengths)
        self.n_segments = int(sum(lengths))
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._mels = (rng.standard_normal((self.n_segments, 1001, 64)) * 15 - 40).astype(np.float32)
        self.attrs = {"teacher_frontend_hash": "abc123", "n_mels": 64}
        self.reads: list[int] = []

    def track_segments(self, track_id: str) -> range:
        i = self.track_ids.index(track_id)
        return range(int(self._starts[i]), int(self._starts[i + 1]))

    def teacher_mels(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        self.reads.extend(idx.tolist())
        return self._mels[idx]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    return load_teacher(build_demo_teacher(section("teacher.model"), tmp_path_factory.mktemp("t") / "teacher"))


@pytest.fixture(scope="module")
def mels() -> ArrayMelCache:
    return ArrayMelCache()


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, teacher, mels) -> Path:
    out = tmp_path_factory.mktemp("full") / "teacher.h5"
    return build_embeddings(teacher, mels, out, QUERIES, batch_size=3, params=PARAMS)


def test_layout_and_values(full: Path, teacher, mels: ArrayMelCache) -> None:
    assert not partial_path(full).exists()
    with TeacherCache(full) as cache:
        seg = cache.segment_embeddings
        assert seg.shape == (mels.n_segments, 512) and seg.dtype == np.float32
        np.testing.assert_allclose(seg, teacher.embed_mels(torch.from_numpy(mels._mels)).numpy(), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(seg, axis=1), 1.0, atol=1e-5)
        assert cache.track_ids == mels.track_ids
        raw = teacher.embed_mels_raw(torch.from_numpy(mels._mels)).numpy()
        for i, tid in enumerate(mels.track_ids):
            r = mels.track_segments(tid)
            mean = raw[r.start : r.stop].mean(axis=0)
            np.testing.assert_allclose(cache.track_embeddings[i], mean / np.linalg.norm(mean), atol=1e-5)
        sets = cache.text_sets()
        assert sorted(sets) == sorted(QUERIES)
        for name, queries in QUERIES.items():
            got_q, got_e = sets[name]
            assert got_q == queries and got_e.shape == (len(queries), 512)
        np.testing.assert_allclose(sets["train"][1], teacher.embed_text(QUERIES["train"]).numpy(), atol=1e-5)
        np.testing.assert_array_equal(sets["train"][1][0], sets["eval_prompts"][1][0])  # "piano" twice
        assert cache.teacher_sha256 == teacher.sha256
        assert cache.attrs["frontend_hash"] == "abc123"
        assert "teacher_provenance" in cache.attrs and "params" in cache.attrs
    with h5py.File(full) as f:
        assert "segments/done" not in f


class Interrupt(Exception):
    pass


def test_interrupted_run_continues(tmp_path: Path, teacher, mels: ArrayMelCache, full: Path) -> None:
    out = tmp_path / "teacher.h5"
    real = teacher.embed_mels_raw
    calls = {"n": 0}

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt
        return real(x)

    teacher.embed_mels_raw = failing
    try:
        with pytest.raises(Interrupt):
            build_embeddings(teacher, mels, out, QUERIES, batch_size=3, params=PARAMS)
    finally:
        del teacher.embed_mels_raw
    assert partial_path(out).exists() and not out.exists()
    with h5py.File(partial_path(out)) as f:
        assert f["segments/done"][:].sum() == 6  # two batches of three survived
    mels.reads.clear()
    build_embeddings(teacher, mels, out, QUERIES, batch_size=3, params=PARAMS)
    assert sorted(set(mels.reads)) == list(range(6, mels.n_segments))  # only the missing rows were read
    with TeacherCache(out) as a, TeacherCache(full) as b:
        np.testing.assert_allclose(a.segment_embeddings, b.segment_embeddings, atol=1e-6)
        np.testing.assert_allclose(a.track_embeddings, b.track_embeddings, atol=1e-6)
    # the same batches give the same numbers, and the file does not remember the interruption
    assert out.read_bytes() == full.read_bytes()


def test_the_same_run_gives_a_byte_identical_file(tmp_path: Path, teacher, mels: ArrayMelCache, full: Path) -> None:
    time.sleep(1.1)  # a creation or modification time anywhere in the file would now differ
    again = build_embeddings(teacher, mels, tmp_path / "elsewhere" / "teacher.h5", QUERIES, batch_size=3, params=PARAMS)
    assert again.read_bytes() == full.read_bytes()


def test_partial_from_another_mel_cache_starts_over(tmp_path: Path, teacher, full: Path) -> None:
    out = tmp_path / "teacher.h5"
    other = ArrayMelCache(seed=1)
    other.track_ids = ["other:0", "other:1", "other:2", "other:3"]
    with pytest.raises(Interrupt):
        real = teacher.embed_mels_raw
        teacher.embed_mels_raw = lambda x: (_ for _ in ()).throw(Interrupt) if len(other.reads) > 3 else real(x)
        try:
            build_embeddings(teacher, other, out, QUERIES, batch_size=3, params=PARAMS)
        finally:
            del teacher.embed_mels_raw
    assert partial_path(out).exists()
    fresh = ArrayMelCache(seed=0)
    build_embeddings(teacher, fresh, out, QUERIES, batch_size=3, params=PARAMS)
    assert sorted(set(fresh.reads)) == list(range(fresh.n_segments))  # nothing reused
    with TeacherCache(out) as a, TeacherCache(full) as b:
        np.testing.assert_allclose(a.segment_embeddings, b.segment_embeddings, atol=1e-6)


def test_shards_merge_to_the_full_result(tmp_path: Path, teacher, mels: ArrayMelCache, full: Path) -> None:
    out = tmp_path / "teacher.h5"
    parts = []
    for k in range(3):
        query_sets = QUERIES if k == 0 else None
        parts.append(build_embeddings(teacher, mels, out, query_sets, batch_size=4, params=PARAMS, shard=(k, 3)))
    assert parts == [shard_path(out, k, 3) for k in range(3)] and not out.exists()
    ranges = [mels.track_segments(t) for t in mels.track_ids]
    with pytest.raises(EmbeddingStoreError, match="segments not embedded"):
        merge_shards(parts[:2], tmp_path / "incomplete.h5", mels.track_ids, ranges)
    merge_shards(parts, out, mels.track_ids, ranges)
    with TeacherCache(out) as a, TeacherCache(full) as b:
        np.testing.assert_allclose(a.segment_embeddings, b.segment_embeddings, atol=1e-6)
        np.testing.assert_allclose(a.track_embeddings, b.track_embeddings, atol=1e-6)
        assert a.text_sets().keys() == b.text_sets().keys()
        assert a.attrs["teacher_sha256"] == b.attrs["teacher_sha256"]


def test_merge_refuses_shards_of_different_runs(tmp_path: Path, teacher, mels: ArrayMelCache) -> None:
    a = build_embeddings(teacher, mels, tmp_path / "a.h5", QUERIES, batch_size=8, params=PARAMS, shard=(0, 2))
    other = ArrayMelCache(seed=0)
    other.attrs = {"teacher_frontend_hash": "different"}
    b = build_embeddings(teacher, other, tmp_path / "b.h5", None, batch_size=8, params=PARAMS, shard=(1, 2))
    ranges = [mels.track_segments(t) for t in mels.track_ids]
    with pytest.raises(EmbeddingStoreError, match="b.h5.shard-1-of-2: made with a different frontend_hash"):
        merge_shards([a, b], tmp_path / "out.h5", mels.track_ids, ranges)


def test_corrupt_mels_name_the_track(tmp_path: Path, teacher) -> None:
    bad = ArrayMelCache(seed=2)
    bad._mels[4, 10, 3] = np.nan
    with pytest.raises(RuntimeError, match="segment 4 of track demo:2"):
        build_embeddings(teacher, bad, tmp_path / "t.h5", QUERIES, batch_size=3, params=PARAMS)


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingStoreError, match="missing.h5: not found"):
        TeacherCache(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.create_dataset("segments/embedding", data=np.zeros((2, 512), "f4"))
    with pytest.raises(EmbeddingStoreError, match="half.h5: no /tracks/track_id"):
        TeacherCache(tmp_path / "half.h5")


# --------------------------------------------------------------------------- the stage on a real mel cache


def _write_mel_cache(path: Path, params, lengths=(2, 1, 3)) -> None:
    """A data/mels.h5 in pipeline.data.mel_cache's layout (a published part file has exactly that layout)."""
    from pipeline.data.mel_cache import Compression, PartWriter, TrackRecord, cache_params

    rng = np.random.default_rng(5)
    writer = PartWriter(path.parent / "parts", cache_params(params.audio, params.frontend), Compression())
    for i, n in enumerate(lengths):
        teacher_mels = (rng.standard_normal((n, 1001, 64)) * 15 - 40).astype(np.float32)
        student_mels = rng.standard_normal((n, 128, 1000)).astype(np.float32)
        writer.add_segments(teacher_mels, student_mels, np.arange(n) * 5.0)
        writer.commit_track(TrackRecord(f"demo:{i}", n, 10.0 + 5 * n, "0" * 64, f"a/{i}.ogg", i))
    writer.publish().rename(path)


def test_stage_run_reads_the_mel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher) -> None:
    import argparse
    import json

    from pipeline.params import load_params
    from pipeline.stages import teacher as stage
    from pipeline.data.mel_cache import MelCache

    monkeypatch.chdir(tmp_path)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    (tmp_path / "data").mkdir()
    terms = {"Genre": ["rock", "jazz", "pop", "folk"], "Instrument": ["piano", "guitar", "drums"], "Mood": ["calm", "sad"]}
    (tmp_path / "data" / "terms.json").write_text(json.dumps(terms))
    params.text_queries.terms = "data/terms.json"
    params.text_queries.n_train, params.text_queries.n_val = 12, 4
    params.text_queries.held_out_terms_per_category = 1
    params.text_queries.single_terms = False  # exactly the 12 sampled queries
    params.teacher.model.dir = "models/teacher"
    build_demo_teacher(params.teacher.model, tmp_path / "models" / "teacher")
    _write_mel_cache(tmp_path / "data" / "mels.h5", params)

    assert stage.run(params, argparse.Namespace(shard=None, resume=False)) == 0
    with MelCache("data/mels.h5") as mels, TeacherCache("data/teacher.h5") as cache:
        expected = teacher.embed_mels(torch.from_numpy(mels.teacher_mels(np.arange(mels.n_segments)))).numpy()
        np.testing.assert_allclose(cache.segment_embeddings, expected, atol=1e-5)
        assert cache.track_ids == mels.track_ids
        assert cache.attrs["frontend_hash"] == mels.attrs["teacher_frontend_hash"]
        sets = cache.text_sets()
        assert {"train", "val_combos", "val_terms", "val_free", "eval_prompts"} <= set(sets)
        assert len(sets["train"][0]) == 12 and sets["eval_prompts"][0] == params.text_queries.eval_prompts
        whole = cache.segment_embeddings.copy(), cache.track_embeddings.copy()

    for k in range(2):
        assert stage.run(params, argparse.Namespace(shard=(k, 2), resume=False)) == 0
    merged = tmp_path / "merged.h5"
    shards = [str(shard_path("data/teacher.h5", k, 2)) for k in range(2)]
    assert stage.merge_main(argparse.Namespace(inputs=shards, out=str(merged), mels="data/mels.h5")) == 0
    with TeacherCache(merged) as cache:
        np.testing.assert_allclose(cache.segment_embeddings, whole[0], atol=1e-6)
        np.testing.assert_allclose(cache.track_embeddings, whole[1], atol=1e-6)
