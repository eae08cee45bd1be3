"""Ranges and relations of params are checked at load and name the dotted field; a missing key
is an error; `student-clap check` validates params and inputs without running a stage."""

from __future__ import annotations

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from pipeline import params as params_module
from pipeline.cli import main as cli_main
from pipeline.params import RELATIONS, ParamsError, range_of
from repo_params import repo_params


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"distill_audio": {"epochs": -1}}, "distill_audio.epochs: must be >= 1, got -1"),
        ({"distill_audio": {"batch_size": 0}}, "distill_audio.batch_size: must be >= 1, got 0"),
        ({"distill_audio": {"lr": -1}}, "distill_audio.lr: must be > 0, got -1.0"),
        ({"distill_text": {"loss": {"temperature": 0}}}, "distill_text.loss.temperature: must be > 0, got 0.0"),
        ({"audio": {"segment_seconds": 0}}, "audio.segment_seconds: must be > 0, got 0.0"),
        ({"audio": {"hop_seconds": 0}}, "audio.hop_seconds: must be > 0, got 0.0"),
        ({"audio": {"hop_seconds": 12}}, "audio.hop_seconds: must be <= segment_seconds (10), got 12"),
        ({"ingest": {"sources": {}, "val_ratio": 1.5}}, "ingest.val_ratio: must be in [0, 1), got 1.5"),
        ({"ingest": {"sources": {}, "val_ratio": 1}}, "ingest.val_ratio: must be in [0, 1), got 1.0"),
        ({"ingest": {"sources": {}, "downloads": {"max_megabytes": 0}}}, "ingest.downloads.max_megabytes: must be > 0"),
        ({"mels": {"workers": -1}}, "mels.workers: must be >= 0, got -1"),
        ({"distill_audio": {"scheduler": {"factor": 1.0}}}, "distill_audio.scheduler.factor: must be in (0, 1)"),
        ({"distill_text": {"model": {"dim": 130, "heads": 4}}}, "distill_text.model.heads: must divide dim (130)"),
        ({"distill_text": {"loss": {"whitened_weight": 1.0}}}, "distill_text.loss: whitened_weight must be 0"),
        ({"text_queries": {"min_categories": 3, "max_categories": 2, "free_phrasings": [], "eval_prompts": []}}, "text_queries.max_categories: must be >= min_categories (3)"),
        ({"teacher": {"model": {"checkpoint_sha256": "abc"}}}, "teacher.model.checkpoint_sha256: must be empty or 64 hex digits"),
    ],
)
def test_out_of_range_values_name_themselves(data: dict, message: str) -> None:
    with pytest.raises(ParamsError) as err:
        repo_params(data)
    assert message in str(err.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ParamsError) as err:
        repo_params({"distill_audio": {"epochs": 0, "lr": 0}, "evaluate": {"top_k": 0}})
    assert len(str(err.value).splitlines()) == 3


def test_ranges_sit_on_numeric_fields_and_relations_name_real_ones() -> None:
    """A retyped field must not keep a range that silently checks nothing; a renamed one, no relation."""
    for cls, name, _, _ in RELATIONS:
        assert name in {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__}.{name}"
    checked = 0
    for cls in vars(params_module).values():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == params_module.__name__):
            continue
        for name, hint in typing.get_type_hints(cls, include_extras=True).items():
            if range_of(hint) is None:
                continue
            checked += 1
            bare = typing.get_type_hints(cls)[name]
            numeric = {bare} if bare in (int, float) else set(typing.get_args(bare)) & {int, float}
            assert numeric, f"{cls.__name__}.{name}"
    assert checked > 50  # the ranges are found at all


def _project(tmp_path: Path, repo_root: Path, edit=None) -> Path:
    shutil.copy(repo_root / "dvc.yaml", tmp_path / "dvc.yaml")
    data = yaml.safe_load((repo_root / "params.yaml").read_text())
    if edit:
        edit(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "params.yaml"


def test_run_refuses_a_missing_section(tmp_path: Path, repo_root: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    params = _project(tmp_path, repo_root, lambda d: d.pop("distill_text"))
    assert cli_main(["run", "distill_text", "--params", str(params)]) == 2
    assert "missing key(s) distill_text" in caplog.text
    assert not (tmp_path / "models").exists()  # nothing ran


def test_check_lists_every_problem_without_running(tmp_path: Path, repo_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)

    def edit(d: dict) -> None:
        d["ingest"]["sources"]["fma"]["lists"] = ["data/nope.md"]
        d["teacher"]["model"].update(source="checkpoint", checkpoint="ckpt/none.pt", tokenizer_dir="tok")

    params = _project(tmp_path, repo_root, edit)
    assert cli_main(["check", "--params", str(params)]) == 1
    out = capsys.readouterr().out
    assert "ingest.sources.fma.lists[0]: data/nope.md not found" in out
    assert "ingest.sources.jamendo.audio_root: data/demo/audio/jamendo does not exist" in out
    assert "teacher.model.checkpoint: ckpt/none.pt not found" in out
    assert "teacher.model.tokenizer_dir: no roberta-base tokenizer files in tok" in out
    assert "text_queries.terms: data/demo/query_terms.json not found" in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()

    params = _project(tmp_path, repo_root, lambda d: d.pop("mels"))
    assert cli_main(["check", "--params", str(params)]) == 1
    assert "missing key(s) mels" in capsys.readouterr().out
    params = _project(tmp_path, repo_root, lambda d: d["distill_audio"].update(epochs=-1))
    assert cli_main(["check", "--params", str(params)]) == 1
    assert "distill_audio.epochs: must be >= 1, got -1" in capsys.readouterr().out


def test_check_passes_on_the_demo_project(repo_root: Path, monkeypatch, capsys) -> None:
    if not (repo_root / "data" / "demo" / "audio").is_dir():
        pytest.skip("data/demo/audio not generated (student-clap demo synth)")
    monkeypatch.chdir(repo_root)
    assert cli_main(["check"]) == 0
    assert "look usable" in capsys.readouterr().out


def test_check_names_what_ingest_would_refuse(tmp_path: Path, repo_root: Path, monkeypatch, capsys) -> None:
    """A song list no dvc.yaml dep covers (the stage refuses it) and audio symlinks leading out of
    their root (ingest excludes their songs) make `check` fail, naming the param and the path."""
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "song.ogg").write_bytes(b"OggS")
    for name in ("fma", "jamendo", "wikimedia"):
        (tmp_path / "audio" / name).mkdir(parents=True)
    (tmp_path / "audio" / "fma" / "song.ogg").symlink_to(outside / "song.ogg")
    (tmp_path / "audio" / "jamendo" / "album").symlink_to(outside, target_is_directory=True)
    (tmp_path / "audio" / "wikimedia" / "inside.ogg").symlink_to(tmp_path / "audio" / "wikimedia" / "x.ogg")
    shutil.copytree(repo_root / "data" / "sources", tmp_path / "data" / "sources")
    (tmp_path / "lists").mkdir()
    shutil.copy(repo_root / "data/sources/fma/FMA_SONGS_LICENSE.md", tmp_path / "lists" / "FMA_SONGS_LICENSE.md")
    (tmp_path / "data/demo").mkdir(parents=True)
    shutil.copy(repo_root / "data/demo/query_terms.json", tmp_path / "data/demo/query_terms.json")

    def edit(d: dict) -> None:
        for name, sp in d["ingest"]["sources"].items():
            sp["audio_root"] = f"audio/{name}"
        d["ingest"]["sources"]["fma"]["lists"] = ["lists/FMA_SONGS_LICENSE.md"]

    params = _project(tmp_path, repo_root, edit)
    assert cli_main(["check", "--params", str(params)]) == 1
    out = capsys.readouterr().out
    assert ("ingest.sources.fma.lists[0]: lists/FMA_SONGS_LICENSE.md is read by the ingest stage but is not among "
            "its deps in dvc.yaml") in out
    assert f"ingest.sources.fma.audio_root: 1 symlink(s) point outside audio/fma (audio/fma/song.ogg -> {outside}" in out
    assert f"ingest.sources.jamendo.audio_root: 1 symlink(s) point outside audio/jamendo (audio/jamendo/album -> {outside})" in out
    assert "wikimedia.audio_root" not in out  # a link that stays inside its root is fine

    # the ingest stage refuses the uncovered list and names it; `deps --write` adds it to dvc.yaml
    assert cli_main(["run", "ingest", "--params", str(params)]) == 2
    assert not (tmp_path / "data" / "manifest.jsonl").exists()
    from pipeline.deps import write_code_deps

    assert "ingest" in write_code_deps(tmp_path)
    assert "lists/FMA_SONGS_LICENSE.md" in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert cli_main(["check", "--params", str(params)]) == 1
    assert "lists/FMA_SONGS_LICENSE.md is read by" not in capsys.readouterr().out
