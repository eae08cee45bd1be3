"""`student-clap results`: the README results block is regenerated from metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main
from pipeline.evaluation.results import END, START

METRICS = {
    "audio": {"skipped": True, "reason": "distillation.audio_enabled: false"},
    "text": {"skipped": False, "val_free": {"n": 8, "cosine": 0.8123, "centred": 0.3456, "baseline_cosine": 0.79}},
    "retrieval": {"skipped": True, "reason": "no eval prompts"},
    "tags": {"skipped": True, "reason": "the manifest has no tags on validation tracks"},
    "notes": ["audio student skipped: distillation.audio_enabled: false"],
}


def _write(tmp_path: Path, readme: str) -> tuple[Path, Path]:
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "README.md").write_text(readme)
    return tmp_path / "README.md", tmp_path / "metrics.json"


def test_block_is_rewritten_and_the_rest_kept(tmp_path: Path):
    readme, metrics = _write(tmp_path, f"# Title\n\nintro\n\n{START}\nold figures 0.99\n{END}\n\n## After\n")
    args = ["results", "--readme", str(readme), "--metrics", str(metrics)]
    assert main([*args, "--check"]) == 1  # stale
    assert main(args) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n" + START) and text.endswith(END + "\n\n## After\n")
    assert "old figures" not in text
    assert "| val_free | 8 | 0.8123 | 0.3456 | 0.7900 |" in text
    assert "Audio student skipped: distillation.audio_enabled: false." in text
    assert "Measured against the teacher." in text
    assert main([*args, "--check"]) == 0  # idempotent
    assert main(args) == 0 and readme.read_text() == text


def test_missing_markers_and_metrics_are_clear_errors(tmp_path: Path, caplog):
    readme, metrics = _write(tmp_path, "# no markers\n")
    assert main(["results", "--readme", str(readme), "--metrics", str(metrics)]) == 2
    assert START in caplog.text
    assert main(["results", "--readme", str(readme), "--metrics", str(tmp_path / "none.json")]) == 2
    assert "dvc repro evaluate" in caplog.text


SAME_SPACE = {
    "same_space": False, "failed": "top5_overlap 0.6680 < 0.9", "min_median_cosine": 0.98, "min_top5_overlap": 0.9,
    "audio_student": {"n_tracks": 50, "track_cosine": {"mean": 0.834, "median": 0.854, "p05": 0.72, "min": 0.699},
                      "track_cosine_centred": {"mean": 0.5, "median": 0.51, "p05": 0.2, "min": 0.1},
                      "top5_overlap": 0.668, "top5_k": 5, "top10_overlap": 0.7, "top10_k": 10, "neighbour_spearman": 0.61},
    "end_to_end": {"n_tracks": 50, "n_queries": 8, "k": 10, "text_query_overlap": 0.55, "text_query_spearman": 0.4,
                   "text_query_overlap_centred": 0.6, "text_query_spearman_centred": 0.5},
}


def test_same_space_verdict_teacher_digest_and_model_index():
    import yaml

    from pipeline.models import model_card

    teacher = {"kind": "converted", "source": "music_audioset_epoch_15_esc_90.14.pt", "checkpoint_sha256": "c" * 64,
               "weights_sha256": "w" * 64}
    metrics = {**METRICS, "same_space": SAME_SPACE, "teacher": teacher}
    text = model_card.results_markdown(metrics)
    assert "Same space as the teacher: **no** (bar: median track cosine >= 0.98, top-5 neighbour overlap >= 0.90, " \
           "on 50 tracks; failed: top5_overlap 0.6680 < 0.9)." in text
    assert "| track cosine | 0.8340 | 0.8540 | 0.7200 | 0.6990 |" in text
    centred_bar = {**SAME_SPACE, "min_median_centred_cosine": 0.9,
                   "audio_student": {**SAME_SPACE["audio_student"],
                                     "mean_baseline": {"mean": 0.7, "median": 0.71, "p05": 0.6, "min": 0.5}}}
    with_bar = model_card.results_markdown({**metrics, "same_space": centred_bar})
    assert "top-5 neighbour overlap >= 0.90 and median centred track cosine >= 0.90, on 50 tracks" in with_bar
    assert "| mean embedding (baseline) | 0.7000 | 0.7100 | 0.6000 | 0.5000 |" in with_bar
    assert "| top-5 neighbour overlap (k=5) | 0.6680 |" in text
    assert "| end to end: text-query top-10 result overlap (8 prompts) | 0.5500 |" in text
    assert f"checkpoint sha256 `{'c' * 64}`" in text and "offline demo teacher" not in text

    header = model_card.front_matter(metrics)
    assert header.startswith("---\n") and header.endswith("\n---")
    meta = yaml.safe_load(header.strip("-\n"))
    result = meta["model-index"][0]["results"][0]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values["median_track_cosine"] == 0.854 and values["top5_neighbour_overlap"] == 0.668
    assert values["text_query_overlap"] == 0.55 and "LAION-CLAP" in result["task"]["name"]
    assert "50 tracks" in result["dataset"]["name"]

    demo = {**metrics, "teacher": {"kind": "demo", "weights_sha256": "d" * 64}}
    assert "Measured against **the offline demo teacher** (weights sha256" in model_card.results_markdown(demo)
    assert "demo teacher" in yaml.safe_load(model_card.front_matter(demo).strip("-\n"))["model-index"][0]["results"][0]["task"]["name"]
    assert "model-index" not in model_card.front_matter(METRICS)  # nothing measured, no model-index
