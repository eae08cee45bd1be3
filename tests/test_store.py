"""mels.h5 layout, part files, atomic merge, parameter checks and the MelCache reader (pipeline/data/mel_cache.py)."""

from __future__ import annotations

import argparse
import copy
import pickle

import h5py
import numpy as np
import pytest

from pipeline.data import mel_cache
from pipeline.params import AudioParams, FrontendParams
from pipeline.data.mel_cache import CacheMismatchError, Compression, MelCache, PartWriter, TrackRecord


def small_params() -> dict:
    """0.1-s segments keep arrays tiny: teacher [11, 64], student [128, 10]."""
    audio = AudioParams(segment_seconds=0.1, hop_seconds=0.05)
    return mel_cache.cache_params(audio, FrontendParams(), 0.0)


def fake_track(rng: np.random.Generator, n: int, shapes) -> tuple[np.ndarray, np.ndarray]:
    (tf, tm), (sm, sf_) = shapes
    return (rng.normal(-40, 10, (n, tf, tm)).astype(np.float32), rng.normal(0, 1, (n, sm, sf_)).astype(np.float32))


def write_part(parts_dir, params, tracks, compression=Compression("gzip", 4, True), seed=0):
    """tracks: list of (track_id, n_segments, manifest_index); returns published path and the data."""
    rng = np.random.default_rng(seed)
    shapes = mel_cache.mel_shapes(params)
    w = PartWriter(parts_dir, params, compression)
    data = {}
    for tid, n, mi in tracks:
        t, s = fake_track(rng, n, shapes)
        w.add_segments(t, s, np.arange(n) * 0.05)
        w.commit_track(TrackRecord(tid, n, 1.5 * n, f"{mi:064x}", f"audio/{tid}.mp3", mi))
        data[tid] = (t, s)
    return w.publish(), data


def test_mel_shapes_of_the_default_params():
    params = mel_cache.cache_params(AudioParams(), FrontendParams())
    assert mel_cache.mel_shapes(params) == ((1001, 64), (128, 1000))


def test_part_round_trip_through_cache(tmp_path):
    params = small_params()
    part, data = write_part(tmp_path / "parts", params, [("a:1", 3, 0), ("a:2", 1, 1), ("a:3", 2, 2)])
    done = mel_cache.completed_tracks([part], params)
    entries = [(done[t][1], done[t][2]) for t in ("a:3", "a:1", "a:2")]  # any order we like
    out = mel_cache.write_cache(tmp_path / "mels.h5", params, Compression("gzip", 4, True), entries)
    with MelCache(out) as c:
        assert c.track_ids == ["a:3", "a:1", "a:2"]
        assert c.n_segments == 6 and len(c) == 6
        assert list(c.track_segments("a:1")) == [2, 3, 4]
        np.testing.assert_array_equal(c.segment_track, [0, 0, 1, 1, 1, 2])
        np.testing.assert_allclose(c.durations, [3.0, 4.5, 1.5])
        t, s = data["a:1"]
        got_t = c.teacher_mels(c.track_segments("a:1"))
        assert got_t.dtype == np.float32 and got_t.shape == t.shape
        np.testing.assert_allclose(got_t, t.astype(np.float16), rtol=0, atol=0)
        np.testing.assert_array_equal(c.student_mels(range(2, 5)), s.astype(np.float16).astype(np.float32))
        # unordered and repeated indices come back in the order asked for
        both = c.student_mels([4, 2, 4])
        np.testing.assert_array_equal(both[0], both[2])
        np.testing.assert_array_equal(both[1], s[0].astype(np.float16))
        assert c.teacher_mels(0).shape == (1, 11, 64)
        assert c.attrs["params_hash"] == mel_cache.params_hash(params)
        assert len(c.attrs["teacher_frontend_hash"]) == 64
    with h5py.File(out) as f:
        assert f["teacher"].chunks == (1, 11, 64) and f["teacher"].dtype == np.float16
        assert f["teacher"].compression == "gzip" and f["teacher"].shuffle


def test_rollback_forgets_a_half_written_track(tmp_path):
    params = small_params()
    shapes = mel_cache.mel_shapes(params)
    w = PartWriter(tmp_path, params, Compression())
    t, s = fake_track(np.random.default_rng(0), 2, shapes)
    w.add_segments(t, s, [0.0, 0.05])
    w.commit_track(TrackRecord("x:1", 2, 1.0, "0" * 64, "p", 0))
    w.add_segments(t, s, [0.0, 0.05])  # a second track that then fails
    w.rollback_track()
    idx = mel_cache.read_index(w.publish())
    assert idx["track_id"] == ["x:1"]
    with h5py.File(tmp_path / next(p.name for p in tmp_path.glob("*.h5"))) as f:
        assert f["teacher"].shape[0] == 2


def test_commit_refuses_a_wrong_segment_count(tmp_path):
    params = small_params()
    w = PartWriter(tmp_path, params, Compression())
    t, s = fake_track(np.random.default_rng(0), 2, mel_cache.mel_shapes(params))
    w.add_segments(t, s, [0.0, 0.05])
    with pytest.raises(ValueError, match="x:1"):
        w.commit_track(TrackRecord("x:1", 3, 1.0, "0" * 64, "p", 0))
    w.discard()
    assert not list(tmp_path.iterdir())


def test_unpublished_parts_are_invisible_and_cleaned(tmp_path):
    params = small_params()
    w = PartWriter(tmp_path, params, Compression())
    t, s = fake_track(np.random.default_rng(0), 1, mel_cache.mel_shapes(params))
    w.add_segments(t, s, [0.0])
    w.commit_track(TrackRecord("x:1", 1, 1.0, "0" * 64, "p", 0))
    w.file.flush()  # as if killed before publish()
    assert list(tmp_path.glob("*.h5")) == []
    assert mel_cache.clean_temporaries(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_cache_built_with_other_params_is_refused_naming_the_field(tmp_path):
    params = small_params()
    part, _ = write_part(tmp_path / "p", params, [("a:1", 1, 0)])
    done = mel_cache.completed_tracks([part], params)
    out = mel_cache.write_cache(tmp_path / "mels.h5", params, Compression(), [(done["a:1"][1], done["a:1"][2])])
    other = copy.deepcopy(params)
    other["frontend"]["teacher"]["f_min"] = 0.0
    with pytest.raises(CacheMismatchError, match=r"frontend\.teacher\.f_min: cache has 50\.0, params say 0\.0"):
        MelCache(out, expect=other)
    MelCache(out, expect=params).close()
    # parts built with other params are not reused
    assert mel_cache.completed_tracks([part], other) == {}


def test_unreadable_part_is_ignored(tmp_path):
    bad = tmp_path / "part-bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert mel_cache.completed_tracks([bad], small_params()) == {}


def test_merge_orders_by_manifest_and_copies_chunks_verbatim(tmp_path):
    params = small_params()
    a, data_a = write_part(tmp_path / "s0", params, [("j:0", 2, 0), ("j:2", 1, 2)], seed=1)
    b, data_b = write_part(tmp_path / "s1", params, [("j:1", 3, 1)], seed=2)
    out = mel_cache.merge_caches([a, b], tmp_path / "merged.h5")
    with MelCache(out) as c:
        assert c.track_ids == ["j:0", "j:1", "j:2"]
        np.testing.assert_array_equal(c.teacher_mels(c.track_segments("j:1")), data_b["j:1"][0].astype(np.float16))
    with h5py.File(a) as fa, h5py.File(out) as fo:  # same compressed bytes, not re-encoded
        assert fa["student"].id.read_direct_chunk((0, 0, 0))[1] == fo["student"].id.read_direct_chunk((0, 0, 0))[1]
    # a different compression re-encodes but keeps the values
    out2 = mel_cache.merge_caches([a, b], tmp_path / "merged_lzf.h5", Compression("lzf", 0, True))
    with MelCache(out) as c1, MelCache(out2) as c2, h5py.File(out2) as f:
        assert f["teacher"].compression == "lzf"
        np.testing.assert_array_equal(c1.student_mels(slice(0, 6)), c2.student_mels(slice(0, 6)))


def test_merge_refuses_overlap_and_param_mismatch(tmp_path):
    params = small_params()
    a, _ = write_part(tmp_path / "s0", params, [("j:0", 1, 0)])
    b, _ = write_part(tmp_path / "s1", params, [("j:0", 1, 0)])
    with pytest.raises(ValueError, match="j:0"):
        mel_cache.merge_caches([a, b], tmp_path / "m.h5")
    other = copy.deepcopy(params)
    other["audio"]["hop_seconds"] = 0.1
    c, _ = write_part(tmp_path / "s2", other, [("j:5", 1, 5)])
    with pytest.raises(CacheMismatchError, match=r"audio\.hop_seconds"):
        mel_cache.merge_caches([a, c], tmp_path / "m.h5")
    assert mel_cache.merge_main(argparse.Namespace(inputs=[str(a), str(c)], out=str(tmp_path / "m.h5"))) == 1
    assert not (tmp_path / "m.h5").exists()


def test_mel_cache_pickles_for_dataloader_workers(tmp_path):
    params = small_params()
    part, _ = write_part(tmp_path / "p", params, [("a:1", 2, 0)])
    done = mel_cache.completed_tracks([part], params)
    out = mel_cache.write_cache(tmp_path / "mels.h5", params, Compression(), [(done["a:1"][1], done["a:1"][2])])
    with MelCache(out) as c:
        c2 = pickle.loads(pickle.dumps(c))
        np.testing.assert_array_equal(c2.student_mels([1]), c.student_mels([1]))
        c2.close()


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run mels|student-clap run mels"):
        MelCache(tmp_path / "nope.h5")


def test_merge_command_writes_a_readable_cache(tmp_path):
    params = small_params()
    a, _ = write_part(tmp_path / "s0", params, [("j:1", 2, 1)], seed=3)
    b, _ = write_part(tmp_path / "s1", params, [("j:0", 1, 0)], seed=4)
    out = tmp_path / "mels.h5"
    assert mel_cache.merge_main(argparse.Namespace(inputs=[str(a), str(b)], out=str(out))) == 0
    with MelCache(out) as c:
        assert c.track_ids == ["j:0", "j:1"] and c.n_segments == 3
    assert not (tmp_path / "mels.h5.tmp").exists()
