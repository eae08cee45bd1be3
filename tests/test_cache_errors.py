"""A truncated data/mels.h5 or data/teacher.h5 gives an error naming the file, wherever it is opened."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.data.cache_files import UnreadableCacheError
from pipeline.data.teacher_cache import TeacherCache
from pipeline.data.mel_cache import MelCache
from pipeline.teacher.model import build_demo_teacher
from repo_params import params_tree, section


def _truncated_h5(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("segments/embedding", data=np.random.default_rng(0).standard_normal((400, 512), dtype="f4"))
        f.create_dataset("tracks/track_id", data=np.array([b"a:1"]))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(("reader", "what"), [(MelCache, "mel cache"), (TeacherCache, "teacher cache")])
def test_truncated_cache_names_the_file(tmp_path: Path, reader, what: str) -> None:
    path = _truncated_h5(tmp_path / "data" / "cache.h5")
    with pytest.raises(UnreadableCacheError) as err:
        reader(path)
    message = str(err.value)
    assert message.startswith(f"{path}: the {what} cannot be read") and "dvc checkout" in message


@pytest.mark.slow
def test_teacher_stage_reports_a_truncated_mel_cache(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    terms = {"Genre": ["rock", "jazz", "pop"], "Mood": ["calm", "sad"]}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "terms.json").write_text(json.dumps(terms))
    params = {"teacher": {"model": {"dir": "models/teacher"}},
              "text_queries": {"terms": "data/terms.json", "n_train": 6, "n_val": 2, "held_out_terms_per_category": 1,
                               "free_phrasings": [], "eval_prompts": ["calm"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_tree(params)))
    build_demo_teacher(section("teacher.model"), tmp_path / "models" / "teacher")
    _truncated_h5(tmp_path / "data" / "mels.h5")
    assert cli_main(["run", "teacher", "--params", "params.yaml"]) == 1
    assert "data/mels.h5: the mel cache cannot be read" in caplog.text
    assert not (tmp_path / "data" / "teacher.h5").exists()
