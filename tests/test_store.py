"""mels.h5 layout, part files, atomic merge, parameter checks and the MelCache reader (pipeline/data/mel_cache.py)."""

from __future__ import annotations

import argparse
import copy
import pickle
import time

import h5py
import numpy as np
import pytest

from pipeline.data import mel_cache
from pipeline.data.mel_cache import CacheMismatchError, Compression, MelCache, PartWriter, TrackRecord
from repo_params import repo_params, section


STEPS = {"teacher_db": 0.05, "student": 0.005}


def small_params(precision: dict | None = None) -> dict:
    """0.1-s segments keep arrays tiny: teacher [11, 64], student [128, 10]; full float16 unless
    a precision is given."""
    audio = section("audio", segment_seconds=0.1, hop_seconds=0.05)
    return mel_cache.cache_params(audio, section("frontend"), 0.0, precision)


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
    params = mel_cache.cache_params(section("audio"), section("frontend"))
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
        assert f["teacher/frames"].chunks == (64, mel_cache.DEFAULT_CHUNK_FRAMES)
        assert f["student/frames"].chunks == (128, mel_cache.DEFAULT_CHUNK_FRAMES)
        assert f["teacher/frames"].dtype == np.float16 and f.attrs["format_version"] == 3
        assert "step" not in f["teacher/frames"].attrs
        assert f["teacher/frames"].compression == "gzip" and f["teacher/frames"].shuffle


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
        assert f["segments/track"].shape[0] == 2 and f["teacher/head"].shape[0] == 2


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
        assert fa["student/frames"].id.read_direct_chunk((0, 0))[1] == fo["student/frames"].id.read_direct_chunk((0, 0))[1]
    # a different compression re-encodes but keeps the values
    out2 = mel_cache.merge_caches([a, b], tmp_path / "merged_lzf.h5", Compression("lzf", 0, True))
    with MelCache(out) as c1, MelCache(out2) as c2, h5py.File(out2) as f:
        assert f["teacher/frames"].compression == "lzf"
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


# --------------------------------------------------------------------------- frames stored once per track


class _PerSegment:
    """What the mels stage hands the writer, segment by segment (float32 as computed): the
    per-segment layout stored every segment whole, rounded to the cache's precision."""

    def __init__(self) -> None:
        self.batches: list[tuple] = []

    def add_segments(self, teacher, student, starts_seconds, teacher_starts=None, student_starts=None) -> None:
        self.batches.append((np.array(teacher), np.array(student), np.asarray(starts_seconds),
                             teacher_starts, student_starts))

    def commit_track(self, rec) -> None:
        self.record = rec

    def arrays(self, cparams: dict) -> tuple[np.ndarray, np.ndarray]:
        """Every segment whole, as the cache's precision stores it (float32 values)."""
        steps = mel_cache.precision_steps(cparams)
        return tuple(np.concatenate([mel_cache.dequantise(mel_cache.quantise(b[k], steps[name]), steps[name])
                                     for b in self.batches])
                     for k, name in ((0, "teacher"), (1, "student")))


def replay_parts(old: dict, cparams: dict, parts_dir, tag: str = "") -> list:
    """Write captured tracks through part files, exactly as the mels stage's processor does."""
    paths = []
    for per_segment in old.values():
        w = PartWriter(parts_dir, cparams, Compression("gzip", 1, True), tag=tag)
        for t, s, secs, ts, ss in per_segment.batches:
            w.add_segments(t, s, secs, teacher_starts=ts, student_starts=ss)
        w.commit_track(per_segment.record)
        paths.append(w.publish())
    return paths


def entries_of(parts: list, cparams: dict, order=("t:long", "t:short")) -> list:
    done = mel_cache.completed_tracks(parts, cparams)
    return [(done[t][1], done[t][2]) for t in order]


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """Two real tracks through the mels stage's processor: a 97.3-s one (18 segments, more than one
    front-end batch, an end-aligned 19th window off the hop grid) and a 4-s repeat-padded one; the
    full float16 cache params and the captured per-segment values."""
    import soundfile as sf

    from pipeline.data.mel_extraction import TrackJob, TrackProcessor

    root = tmp_path_factory.mktemp("computed")
    rng = np.random.default_rng(7)
    for name, seconds in (("long", 97.3037), ("short", 4.0)):
        t = np.arange(int(44100 * seconds)) / 44100
        x = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(t))) * (0.5 + 0.5 * np.sin(0.7 * t)) \
            + 0.02 * rng.standard_normal(len(t))
        sf.write(root / f"{name}.wav", x.astype(np.float32), 44100, subtype="PCM_16")
    p = repo_params()
    cparams = mel_cache.cache_params(p.audio, p.frontend, 0.0)
    proc = TrackProcessor({"params": cparams})
    old = {}
    for i, name in enumerate(("long", "short")):
        job = TrackJob(i, f"t:{name}", str(root / f"{name}.wav"))
        old[job.track_id] = _PerSegment()
        assert proc.process(job, old[job.track_id]).ok
    entries = entries_of(replay_parts(old, cparams, root / "parts"), cparams)
    return root, cparams, old, entries


def with_precision(cparams: dict, precision: dict | None) -> dict:
    out = copy.deepcopy(cparams)
    out["precision"] = mel_cache.cache_params(None, None, 0.0, precision)["precision"]
    return out


@pytest.mark.parametrize("precision", [None, STEPS], ids=["float16", "quantised"])
def test_segments_read_back_bit_identical_to_the_per_segment_layout(computed, tmp_path, precision):
    _, full, old, _ = computed
    cparams = with_precision(full, precision)
    entries = entries_of(replay_parts(old, cparams, tmp_path / "parts"), cparams)
    out = mel_cache.write_cache(tmp_path / "mels.h5", cparams, Compression("gzip", 1, True), entries)
    with MelCache(out) as c:
        assert c.track_ids == ["t:long", "t:short"]
        for tid, per_segment in old.items():
            t_old, s_old = per_segment.arrays(cparams)  # each segment rounded on its own
            idx = c.track_segments(tid)
            assert len(idx) == len(t_old)
            for got, want in ((c.teacher_mels(idx), t_old), (c.student_mels(idx), s_old),
                              (c.teacher_track(tid), t_old), (c.student_track(tid), s_old)):
                assert got.dtype == np.float32 and got.shape == want.shape
                # bit for bit: every value, edge frames included, as the per-segment layout held it
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        assert len(old["t:long"].arrays(cparams)[0]) == 19
        # frames are stored once: 18 windows on the hop grid share one run (9 501 frames), the tail
        # window its own (1 001); each track is padded to whole chunks of 1 024
        stored = c.stored_frames()
        assert stored["teacher"] == stored["student"] == 11 * 1024 + 1024
        assert stored["teacher"] < 0.65 * 20 * 1001


def test_quantised_values_are_within_half_a_step_through_parts_shards_and_merge(computed, tmp_path):
    _, full, old, _ = computed
    cparams = with_precision(full, STEPS)
    steps = {"teacher": STEPS["teacher_db"], "student": STEPS["student"]}
    shards = [replay_parts({t: old[t]}, cparams, tmp_path / f"s{i}", tag=str(i)) for i, t in enumerate(old)]
    # two shard caches (tracks in reverse manifest order), merged, then re-encoded by a merge to lzf
    caches = [mel_cache.write_cache(tmp_path / f"shard{i}.h5", cparams, Compression("gzip", 1, True),
                                    entries_of(parts, cparams, [t])) for i, (parts, t) in enumerate(zip(shards, old))]
    merged = mel_cache.merge_caches(caches[::-1], tmp_path / "merged.h5")
    relz = mel_cache.merge_caches([merged], tmp_path / "lzf.h5", Compression("lzf", 0, True))
    for out in (merged, relz):
        with h5py.File(out) as f:
            for name in ("teacher", "student"):
                for part in ("frames", "head", "tail"):
                    assert f[f"{name}/{part}"].dtype == np.int16 and f[f"{name}/{part}"].attrs["step"] == steps[name]
        with MelCache(out, expect=cparams) as c:
            for tid, per_segment in old.items():
                idx = c.track_segments(tid)
                raw_t = np.concatenate([b[0] for b in per_segment.batches])
                raw_s = np.concatenate([b[1] for b in per_segment.batches])
                rounded = per_segment.arrays(cparams)
                for k, (got, raw, name) in enumerate(((c.teacher_mels(idx), raw_t, "teacher"),
                                                      (c.student_mels(idx), raw_s, "student"))):
                    err = np.abs(got.astype(np.float64) - raw)
                    # step / 2, plus the float32 rounding of code x step
                    assert err.max() <= steps[name] / 2 + 1e-6 * np.abs(raw).max()
                    assert err.max() > steps[name] / 4  # really rounded: not float16 (finer) nor exact
                    np.testing.assert_array_equal(got, rounded[k])


def test_quantise_refuses_what_int16_codes_cannot_hold():
    x = np.array([[-100.0, 24.4, 0.026]], np.float32)
    np.testing.assert_array_equal(mel_cache.quantise(x, 0.05), [[-2000, 488, 1]])
    assert mel_cache.quantise(x, 0.0).dtype == np.float16
    with pytest.raises(ValueError, match=r"teacher mel values reach 100.*coarser mels\.precision"):
        mel_cache.quantise(x, 0.001, "teacher mel")
    with pytest.raises(ValueError, match="not finite"):
        mel_cache.quantise(np.array([1.0, np.nan]), 0.05)


def test_a_changed_precision_changes_the_cache_identity(tmp_path):
    params = small_params(STEPS)
    part, data = write_part(tmp_path / "p", params, [("a:1", 2, 0)])
    done = mel_cache.completed_tracks([part], params)
    out = mel_cache.write_cache(tmp_path / "mels.h5", params, Compression(), [(done["a:1"][1], done["a:1"][2])])
    coarser = small_params({"teacher_db": 0.1, "student": 0.005})
    assert mel_cache.params_hash(coarser) != mel_cache.params_hash(params) != mel_cache.params_hash(small_params())
    with pytest.raises(CacheMismatchError, match=r"precision\.teacher_db: cache has 0\.05, params say 0\.1"):
        MelCache(out, expect=coarser)
    with pytest.raises(CacheMismatchError, match=r"precision\.student: cache has 0\.005, params say 0\.0"):
        MelCache(out, expect=small_params())
    # parts and caches of another precision are neither reused nor merged with this one
    assert mel_cache.completed_tracks([part, out], coarser) == {}
    other, _ = write_part(tmp_path / "q", coarser, [("a:2", 1, 1)])
    with pytest.raises(CacheMismatchError, match="precision"):
        mel_cache.merge_caches([part, other], tmp_path / "m.h5")
    with MelCache(out, expect=params) as c:
        t, s = data["a:1"]
        assert np.abs(c.teacher_mels(slice(None)) - t).max() <= 0.025 + 1e-5
        assert np.abs(c.student_mels(slice(None)) - s).max() <= 0.0025 + 1e-6


def test_any_index_form_reads_the_same_values(computed, tmp_path):
    _, cparams, old, entries = computed
    out = mel_cache.write_cache(tmp_path / "mels.h5", cparams, Compression("lzf", 0, True), entries, chunk_frames=256)
    t_all = np.concatenate([old["t:long"].arrays(cparams)[0], old["t:short"].arrays(cparams)[0]])
    s_all = np.concatenate([old["t:long"].arrays(cparams)[1], old["t:short"].arrays(cparams)[1]])
    with MelCache(out) as c:
        assert len(c) == 20
        for idx in (slice(None), slice(3, 11), slice(0, 20, 4), [19, 0, 5, 5, 18], np.array([7, 6, 2]), 4, -1,
                    range(10, 20), np.array([], dtype=np.int64)):
            want = np.arange(20)[idx] if not isinstance(idx, (list, np.ndarray)) else np.asarray(idx, dtype=np.int64)
            want = np.atleast_1d(want)
            np.testing.assert_array_equal(c.teacher_mels(idx), t_all[want])
            np.testing.assert_array_equal(c.student_mels(idx), s_all[want])
        with pytest.raises(IndexError, match="out of range"):
            c.student_mels([20])
        c2 = pickle.loads(pickle.dumps(c))  # DataLoader workers get a copy that reopens the file
        np.testing.assert_array_equal(c2.student_track(1), s_all[19:])
        c2.close()


@pytest.mark.parametrize("precision", [None, STEPS], ids=["float16", "quantised"])
def test_same_segments_give_byte_identical_caches(computed, tmp_path, precision):
    _, full, old, _ = computed
    cparams = with_precision(full, precision)
    a = mel_cache.write_cache(tmp_path / "a" / "mels.h5", cparams, Compression("gzip", 1, True),
                              entries_of(replay_parts(old, cparams, tmp_path / "parts"), cparams))
    # the same values written again later, through other part files, into another folder
    time.sleep(1.1)
    again = replay_parts(old, cparams, tmp_path / "other-parts", tag="x")
    b = mel_cache.write_cache(tmp_path / "b" / "mels.h5", cparams, Compression("gzip", 1, True),
                              entries_of(again, cparams))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_format_cache_is_refused_naming_the_file(tmp_path, version):
    old = tmp_path / "mels.h5"
    with h5py.File(old, "w") as f:  # format 1: segments stored whole; format 2: float16 frames only
        f.create_dataset("teacher", data=np.zeros((1, 11, 64), np.float16))
        f.attrs["format_version"] = version
        f.attrs["params"] = "{}"
    with pytest.raises(mel_cache.CacheFormatError,
                       match=rf"mels\.h5: mel cache format {version}, this code reads format 3"):
        MelCache(old)
    # as a resume source it is ignored, not merged
    assert mel_cache.completed_tracks([old], small_params()) == {}
