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
