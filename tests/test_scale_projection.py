"""benchmarks/scale.py: the projection arithmetic and the --gpu-json contract (no timing here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


UNITS = {
    "mels": {"cpu_s_per_audio_minute": 0.2, "mb_per_audio_minute": 1.2, "raw_frames_vs_per_segment": 0.5,
             "int16_bytes": 750, "float16_bytes": 1000, "int16_vs_float16_bytes": 0.75},
    "teacher": {"cpu_s_per_segment": 0.4},
    "student": {"train_cpu_s_per_segment": 0.1, "forward_cpu_s_per_segment": 0.03},
    "loader": {"track_segments_per_cpu_s": 1000.0, "random_segments_per_cpu_s": 250.0},
}


def _args(**kw) -> argparse.Namespace:
    base = {"songs": 11_000, "minutes": 4.0, "epochs": 100, "stage2_epochs": 10, "val_ratio": 0.25,
            "val_max_segments": 2048, "cores": 2, "strategy": "both", "segments_per_track": 4}
    return argparse.Namespace(**{**base, **kw})


def test_corpus_segments_and_bounded_validation(scale) -> None:
    gpu = scale.gpu_rates(None, "mn10_as", 250.0)
    assert gpu["source"].startswith("ASSUMED")
    p = scale.project(UNITS, _args(), gpu)
    c = p["corpus"]
    assert scale.segments_per_song(4.0) == 47  # 0, 5, ..., 230 s: the end-aligned window adds nothing
    assert c["segments"] == 517_000 and c["val_segments_per_epoch"] == 2048
    assert c["train_segments"] + c["val_segments"] == 517_000
    g = p["one_gpu"]
    # an epoch is bounded by the slower of compute and loading
    # strategy both, 4 segments per track: an epoch runs 8 250 train tracks x 4 segments, not all 387 750
    assert c["epoch_items"] == 8_250 and c["epoch_segments"] == 33_000 and c["epoch_track_rows"] == 8_250
    assert g["train_s"] == pytest.approx(33_000 / min(gpu["train"], gpu["loader"]))
    assert g["val_share"] < 0.1 and p["this_machine"]["val_share"] < 0.1
    assert g["total_s"] == pytest.approx(g["mels_s"] + g["teacher_s"] + 110 * (g["train_s"] + g["val_s"]) + g["final_val_s"])
    assert p["disk"]["mels_gb_measured_rate"] == pytest.approx(44_000 * 1.2 / 1e3)
    # real music: the per-segment float16 rate x the frame ratio x the int16/float16 bytes measured in the run
    assert p["real_music_mb_per_minute_estimate"] == pytest.approx(3.5 * 0.5 * 0.75)
    assert p["disk"]["mels_gb_real_music_estimate"] == pytest.approx(44_000 * 3.5 * 0.5 * 0.75 / 1e3)
    assert p["disk"]["outputs_gb"] == pytest.approx(44_000 * 3.5 * 0.5 * 0.75 / 1e3 + p["disk"]["teacher_gb"])
    # bounding the per-epoch validation is what keeps it small: all 129 250 segments cost 63x more
    full = scale.project(UNITS, _args(val_max_segments=10**9), gpu)
    assert full["this_machine"]["val_s"] == pytest.approx(p["this_machine"]["val_s"] * 129_250 / 2048)


def test_real_music_estimate_follows_the_measured_storage_ratio(scale) -> None:
    gpu = scale.gpu_rates(None, "mn10_as", 250.0)
    float16 = {**UNITS, "mels": {**UNITS["mels"], "int16_vs_float16_bytes": 1.0}}
    a, b = scale.project(UNITS, _args(), gpu), scale.project(float16, _args(), gpu)
    assert a["disk"]["mels_gb_real_music_estimate"] == pytest.approx(0.75 * b["disk"]["mels_gb_real_music_estimate"])
    assert b["real_music_mb_per_minute_estimate"] == pytest.approx(3.5 * 0.5)


def test_report_prints_each_factor_of_the_real_music_estimate(scale, capsys) -> None:
    gpu = scale.gpu_rates(None, "mn10_as", 250.0)
    units = {**UNITS, "mels": {**UNITS["mels"], "audio_minutes": 20.0, "formats": [".mp3"]},
             "teacher": {**UNITS["teacher"], "batch": 2},
             "student": {**UNITS["student"], "model": "mn10_as", "batch": 8}}
    scale.report(units, scale.project(units, _args(), gpu), gpu, 2)
    out = capsys.readouterr().out
    assert "int16 codes 0.75x the bytes of the same cache in float16: 750 / 1000 B" in out
    assert ("57.8 GB on real music (ESTIMATE, 1.31 MB/min = 3.5 MB/min measured on real music for the per-segment "
            "float16 layout x frame ratio 0.50 x int16/float16 bytes 0.75") in out


def test_gpu_json_from_the_gpu_benchmark_replaces_the_assumptions(scale, tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "date": "2026-11-30", "teacher_segments_per_s": 1500.0,
                                "train_samples_per_s": {"mn10_as": {"64": 1200.0, "256": 2500.0}},
                                "loader_segments_per_s": {"2": 900.0, "8": 3000.0}}))
    gpu = scale.gpu_rates(str(path), "mn10_as", 250.0)
    assert gpu["source"].startswith("measured") and gpu["gpu"] == "NVIDIA H200"
    assert (gpu["teacher"], gpu["train"], gpu["loader"]) == (1500.0, 2500.0, 3000.0)
    path.write_text(json.dumps({"gpu": "x", "date": "y"}))
    with pytest.raises(SystemExit, match="gpu.json: not a benchmarks/gpu.py result"):
        scale.gpu_rates(str(path), "mn10_as", 250.0)


def test_epoch_follows_the_training_strategy(scale) -> None:
    """The segments an epoch hands the student are what pipeline.data.datasets draws per strategy."""
    gpu = scale.gpu_rates(None, "mn10_as", 250.0)
    runs = {(st, k): scale.project(UNITS, _args(strategy=st, segments_per_track=k), gpu)
            for st, k in (("segments", 4), ("tracks", 4), ("both", 4), ("both", 0), ("both", 100))}
    train_tracks, per_song = 8_250, 47
    assert runs["segments", 4]["corpus"]["epoch_segments"] == train_tracks * per_song
    assert runs["segments", 4]["corpus"]["epoch_items"] == train_tracks * per_song
    assert runs["tracks", 4]["corpus"]["epoch_segments"] == train_tracks * 4
    assert runs["tracks", 4]["corpus"]["epoch_track_rows"] == train_tracks
    assert runs["both", 0]["corpus"]["epoch_segments"] == train_tracks * per_song  # 0: every segment
    assert runs["both", 100]["corpus"]["epoch_segments"] == train_tracks * per_song  # a track has only 47
    here = {key: r["this_machine"] for key, r in runs.items()}
    assert here["segments", 4]["train_s"] == pytest.approx(here["both", 4]["train_s"] * per_song / 4)
    # the same bounded validation is a larger share of a shorter epoch
    assert here["both", 4]["val_s"] == pytest.approx(here["segments", 4]["val_s"])
    assert here["both", 4]["val_share"] > here["segments", 4]["val_share"]
    with pytest.raises(SystemExit, match="--strategy"):
        scale.epoch_segments("frames", 10, 47, 4)
