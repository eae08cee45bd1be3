"""The mels stage end to end on small generated tracks: contents, bad input, failure bounds, resume
after a real SIGKILL, parallel workers and --shard k/n + merge."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from pipeline.data import mel_cache
from pipeline.data.frontends import StudentMel, TeacherMel
from pipeline.params import Params
from pipeline.stages import mels as stage
from student_clap.audio import cut, decode_int16, int16_to_float, map_starts, resample_int16, segment_starts
from repo_params import params_tree, repo_params

REPO = Path(__file__).resolve().parents[1]


def music(sr: int, seconds: float, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 110.0 * 2 ** (seed % 12 / 12)
    x = sum(0.2 / k * np.sin(2 * np.pi * f0 * k * t) for k in range(1, 6)) + 0.02 * rng.standard_normal(len(t))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def manifest_row(track_id: str, path: str) -> dict:
    return {"track_id": track_id, "source": "test", "artist": "a", "title": track_id, "audio_path": path,
            "license": "CC0-1.0", "license_url": "", "url": "", "split": "train", "tags": [], "duration": None}


def write_manifest(root: Path, items: list[tuple[str, str]]) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for tid, path in items:
            fh.write(json.dumps(manifest_row(tid, path)) + "\n")


def good_tracks(root: Path) -> list[tuple[str, str]]:
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    sf.write(audio / "long.wav", music(44100, 25.0, 1, channels=2), 44100, subtype="PCM_16")
    sf.write(audio / "short.flac", music(22050, 3.0, 2), 22050, subtype="PCM_24")
    sf.write(audio / "mid.mp3", music(22050, 12.0, 3), 22050, format="MP3")
    return [("t:long", "audio/long.wav"), ("t:short", "audio/short.flac"), ("t:mid", "audio/mid.mp3")]


def bad_tracks(root: Path) -> list[tuple[str, str]]:
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    sf.write(audio / "silent.wav", np.zeros(22050 * 12, np.float32), 22050, subtype="PCM_16")
    (audio / "empty.ogg").write_bytes(b"")
    (audio / "page.mp3").write_bytes(b"<!DOCTYPE html><html><body>Forbidden</body></html>\n" * 10)
    (audio / "garbage.flac").write_bytes(np.random.default_rng(0).bytes(3000))
    return [("t:silent", "audio/silent.wav"), ("t:empty", "audio/empty.ogg"), ("t:html", "audio/page.mp3"),
            ("t:missing", "audio/nope.opus"), ("t:garbage", "audio/garbage.flac")]


def params(workers: int = 1, max_failure_ratio: float = 0.5) -> Params:
    p = repo_params()
    p.mels.workers = workers
    p.mels.max_failure_ratio = max_failure_ratio
    return p


def args(shard=None) -> argparse.Namespace:
    return argparse.Namespace(shard=shard, resume=False)


def expected_mels(path: Path, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """Recompute a track's mels directly from the library functions."""
    sr = p.audio.sample_rate
    wave = decode_int16(path, sr)
    starts = segment_starts(len(wave), sr, p.audio.segment_seconds, p.audio.hop_seconds)
    w32 = resample_int16(wave, sr, 32000)
    with torch.no_grad():
        t = TeacherMel(p.frontend.teacher)(torch.from_numpy(int16_to_float(cut(wave, starts, 480000)))).numpy()
        s = StudentMel(p.frontend.student)(
            torch.from_numpy(int16_to_float(cut(w32, map_starts(starts, sr, 32000), 320000)))).numpy()
    return t, s


def test_stage_computes_both_mels_and_reports_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good, bad = good_tracks(tmp_path), bad_tracks(tmp_path)
    write_manifest(tmp_path, good + bad)
    p = params(max_failure_ratio=0.7)
    assert stage.run(p, args()) == 0

    report = json.loads((tmp_path / "models/report/mels.json").read_text())
    assert report["tracks_total"] == 8 and report["tracks_ok"] == 3 and report["tracks_failed"] == 5
    kinds = {f["track_id"]: f["kind"] for f in report["failures"]}
    assert kinds == {"t:silent": "silent", "t:empty": "empty", "t:html": "non-audio", "t:missing": "missing",
                     "t:garbage": "corrupt"}
    assert all(f["reason"] for f in report["failures"])
    assert report["audio_minutes"] == pytest.approx((25 + 3 + 12) / 60, abs=0.01)

    expect = mel_cache.cache_params(p.audio, p.frontend, 0.0, p.mels.precision)
    with mel_cache.MelCache(tmp_path / "data/mels.h5", expect=expect) as c:
        assert c.track_ids == ["t:long", "t:short", "t:mid"]  # manifest order
        assert [len(c.track_segments(t)) for t in c.track_ids] == [4, 1, 2]
        assert report["segments"] == c.n_segments == 7
        np.testing.assert_allclose(c.segment_start[:4], [0, 5, 10, 15])
        for tid, rel in good:
            t, s = expected_mels(tmp_path / rel, p)
            idx = c.track_segments(tid)
            # stored at mels.precision: within half a step (plus float32 noise of the two computations)
            np.testing.assert_allclose(c.teacher_mels(idx), t, rtol=0, atol=p.mels.precision.teacher_db / 2 + 1e-3)
            np.testing.assert_allclose(c.student_mels(idx), s, rtol=0, atol=p.mels.precision.student / 2 + 1e-4)
        assert c.sha256[0] == store_sha(tmp_path / "audio/long.wav")
    assert not (tmp_path / "data/mels.h5.parts").exists()


def store_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stage_fails_above_the_failure_ratio_or_with_nothing_usable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path, good_tracks(tmp_path)[1:2] + bad_tracks(tmp_path)[:2])
    assert stage.run(params(max_failure_ratio=0.5), args()) == 1  # 2 of 3 failed
    report = json.loads((tmp_path / "models/report/mels.json").read_text())
    assert report["tracks_failed"] == 2 and report["tracks_ok"] == 1
    write_manifest(tmp_path, bad_tracks(tmp_path))
    assert stage.run(params(max_failure_ratio=1.0), args()) == 1  # nothing usable


def test_bad_manifest_is_a_clear_error(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/manifest.jsonl").write_text('{"track_id": "x:1"}\n')
    assert stage.run(params(), args()) == 1
    assert "manifest.jsonl:1" in caplog.text


def flagged_and_refused_tracks(root: Path) -> list[tuple[str, str]]:
    """A truncated MP3 and a float WAV with NaN/inf (kept, flagged); a 1-sample WAV, silence and an
    all-NaN file (refused by the usability rule)."""
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    sf.write(audio / "whole.mp3", music(22050, 24.0, 4), 22050, format="MP3")
    data = (audio / "whole.mp3").read_bytes()
    (audio / "cut.mp3").write_bytes(data[: len(data) // 2])
    holes = music(22050, 6.0, 5)
    holes[1000:1010] = np.nan
    holes[2000] = np.inf
    sf.write(audio / "holes.wav", holes, 22050, subtype="FLOAT")
    sf.write(audio / "one.wav", np.array([0.5], np.float32), 22050, subtype="PCM_16")
    sf.write(audio / "silent.wav", np.zeros(22050 * 3, np.float32), 22050, subtype="PCM_16")
    sf.write(audio / "nan.wav", np.full(22050 * 3, np.nan, np.float32), 22050, subtype="FLOAT")
    return [("t:cut", "audio/cut.mp3"), ("t:holes", "audio/holes.wav"), ("t:one", "audio/one.wav"),
            ("t:silent", "audio/silent.wav"), ("t:nan", "audio/nan.wav")]


def test_partial_and_nan_tracks_are_kept_and_flagged_short_silent_nan_refused(tmp_path, monkeypatch):
    from student_clap.audio import AudioDecodeError, decode_track

    monkeypatch.chdir(tmp_path)
    tracks = flagged_and_refused_tracks(tmp_path)
    write_manifest(tmp_path, tracks)
    assert stage.run(params(max_failure_ratio=0.7), args()) == 0
    report = json.loads(Path("models/report/mels.json").read_text())
    assert report["tracks_ok"] == 2 and report["tracks_flagged"] == 2
    flags = {f["track_id"]: f["notes"] for f in report["flagged"]}
    (partial,) = flags["t:cut"]
    assert partial.startswith("partial decode: decoded 1") and " of 24.0 s; " in partial
    assert flags["t:holes"] == [f"11 of {22050 * 6} samples were NaN/inf (replaced by 0/+-1)"]
    with mel_cache.MelCache("data/mels.h5") as c:
        assert c.track_ids == ["t:cut", "t:holes"]
        assert len(c.track_segments("t:cut")) == 2  # the ~12 s that decoded (the whole 24 s would give 4)
    # refusals carry exactly the reason every command gives (student_clap.audio.decode_track's)
    failures = {f["track_id"]: (f["kind"], f["reason"]) for f in report["failures"]}
    for tid, rel in tracks[2:]:
        with pytest.raises(AudioDecodeError) as err:
            decode_track(rel, 32000)
        assert failures[tid] == (err.value.kind, err.value.reason)
    assert {k for k, _ in failures.values()} == {"too-short", "silent", "non-finite"}

    # a second run reuses the cached mels and still reports the flags
    assert stage.run(params(max_failure_ratio=0.7), args()) == 0
    again = json.loads(Path("models/report/mels.json").read_text())
    assert again["tracks_reused"] == 2 and again["flagged"] == report["flagged"]


def test_flags_survive_a_killed_run(tmp_path):
    """Notes saved beside the part files of an interrupted run reach the report of the resumed
    run; a track computed again replaces (or clears) its older notes."""
    from pipeline.data import decode_notes as dn

    parts = tmp_path / "parts"
    dn.save_track_notes(parts, "t:a", "a.mp3", ["partial decode: decoded 1.0 of 2.0 s; x"])
    dn.save_track_notes(parts, "t:b", "b.mp3", ["3 of 9 samples were NaN/inf (replaced by 0/+-1)"])
    dn.save_track_notes(parts, "t:c", "c.mp3", [])  # nothing to say: no file
    assert sorted(dn.saved_notes(parts)) == ["t:a", "t:b"]
    previous = {"t:d": {"track_id": "t:d", "audio_path": "d.mp3", "notes": ["old"]},
                "t:e": {"track_id": "t:e", "audio_path": "moved.mp3", "notes": ["other file"]}}
    kept = [("t:a", "a.mp3"), ("t:b", "b.mp3"), ("t:c", "c.mp3"), ("t:d", "d.mp3"), ("t:e", "e.mp3")]
    flagged = dn.flagged_tracks(kept, {"t:b": []}, dn.saved_notes(parts), previous)
    assert [(f["track_id"], f["notes"]) for f in flagged] == [
        ("t:a", ["partial decode: decoded 1.0 of 2.0 s; x"]), ("t:d", ["old"])]


def test_rerun_reuses_finished_tracks_and_recomputes_changed_audio(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path, good_tracks(tmp_path))
    assert stage.run(params(), args()) == 0
    with mel_cache.MelCache("data/mels.h5") as c:
        before = c.student_mels(slice(0, c.n_segments))
    assert stage.run(params(), args()) == 0
    report = json.loads(Path("models/report/mels.json").read_text())
    assert report["tracks_reused"] == 3 and report["tracks_ok"] == 3
    sf.write("audio/short.flac", music(22050, 3.0, 7), 22050, subtype="PCM_24")  # the file changed
    assert stage.run(params(), args()) == 0
    report = json.loads(Path("models/report/mels.json").read_text())
    assert report["tracks_reused"] == 2
    with mel_cache.MelCache("data/mels.h5") as c:
        after = c.student_mels(slice(0, c.n_segments))
        short = list(c.track_segments("t:short"))
    keep = [i for i in range(len(before)) if i not in short]
    np.testing.assert_array_equal(after[keep], before[keep])
    assert not np.array_equal(after[short], before[short])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    items = []
    for i in range(8):
        sf.write(audio / f"{i}.wav", music(22050, 20.0, 10 + i), 22050, subtype="PCM_16")
        items.append((f"k:{i}", f"audio/{i}.wav"))
    write_manifest(tmp_path, items[:2])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_tree({"mels": {"workers": 1}})))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "mels", "--params", "params.yaml"]
    # a finished cache of the first two tracks ...
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    old = tmp_path / "data/mels.h5"
    old_bytes = old.read_bytes()
    # ... then a run over all eight, killed once some tracks are published
    write_manifest(tmp_path, items)
    parts = tmp_path / "data/mels.h5.parts"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(parts.glob("*.h5"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert old.read_bytes() == old_bytes  # the previous cache is untouched and readable
    with mel_cache.MelCache(old) as c:
        assert c.track_ids == ["k:0", "k:1"]
    published = sorted(parts.glob("*.h5"))
    assert len(published) >= 2
    finished = set()
    for part in published:  # every published part is a complete, readable cache
        idx = mel_cache.read_index(part)
        finished.update(idx["track_id"])
    # resume: finished tracks are not recomputed, the rest are, nothing twice
    os.chdir(tmp_path)
    try:
        p = params()
        assert stage.run(p, args()) == 0
    finally:
        os.chdir(REPO)
    report = json.loads((tmp_path / "models/report/mels.json").read_text())
    assert report["tracks_reused"] == len(finished | {"k:0", "k:1"})
    with mel_cache.MelCache(old) as c:
        assert c.track_ids == [f"k:{i}" for i in range(8)]
        assert c.n_segments == 8 * 3 and np.array_equal(np.bincount(c.segment_track), [3] * 8)
        t, s = expected_mels(audio / "5.wav", p)
        np.testing.assert_allclose(c.teacher_mels(c.track_segments("k:5")), t, atol=0.07)
        np.testing.assert_allclose(c.student_mels(c.track_segments("k:5")), s, atol=4e-3)


@pytest.mark.slow
def test_parallel_workers_and_shards_give_the_same_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path, good_tracks(tmp_path) + bad_tracks(tmp_path)[3:4])
    assert stage.run(params(workers=2), args()) == 0
    whole = tmp_path / "data/mels.h5"
    for k in range(2):
        assert stage.run(params(), args(shard=(k, 2))) == 0
    shards = [tmp_path / f"data/mels.shard-{k}-of-2.h5" for k in range(2)]
    assert all(s.exists() for s in shards)
    assert (tmp_path / "models/report/mels.shard-1-of-2.json").exists()
    merged = mel_cache.merge_caches(shards, tmp_path / "merged.h5")
    with mel_cache.MelCache(whole) as a, mel_cache.MelCache(merged) as b:
        assert a.track_ids == b.track_ids == ["t:long", "t:short", "t:mid"]
        np.testing.assert_array_equal(a.segment_track, b.segment_track)
        np.testing.assert_array_equal(a.teacher_mels(slice(0, a.n_segments)), b.teacher_mels(slice(0, b.n_segments)))
        np.testing.assert_array_equal(a.student_mels(slice(0, a.n_segments)), b.student_mels(slice(0, b.n_segments)))
    # deterministic files: merged shards, and a serial run in another folder, give the same bytes
    assert merged.read_bytes() == whole.read_bytes()
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "audio", other / "audio")
    shutil.copytree(tmp_path / "data", other / "data", ignore=shutil.ignore_patterns("*.h5"))
    monkeypatch.chdir(other)
    time.sleep(1.1)  # a timestamp anywhere in the file would now differ
    assert stage.run(params(workers=1), args()) == 0
    assert (other / "data/mels.h5").read_bytes() == whole.read_bytes()
