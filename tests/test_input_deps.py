"""Editing any input a stage reads makes `dvc status` name that stage, and only the stages that read it.

Runs `dvc status` in a git copy of the repo against the committed dvc.lock: no stage is run,
only dependency hashes are compared, so each case costs a fraction of a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.deps import code_deps, stage_modules

# each case runs `dvc status` (and `dvc commit`) in a copy of the repo: seconds each, minutes together
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, project_copy) -> Path:
    dest = project_copy(tmp_path_factory.mktemp("inputs") / "project")
    _commit_placeholder_outputs(dest)
    return dest


def _commit_placeholder_outputs(project: Path) -> None:
    """Stand-in outputs + `dvc commit`: dvc.lock then records every dep as it is in this copy.

    Outputs' contents do not matter to `dvc status` of deps, and nothing needs to run.
    """
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")
    _dvc_commit(project)


def _dvc_commit(project: Path, *stages: str) -> None:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(project))
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q", *stages], cwd=project, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _changes(project) == {}, "every stage is up to date after the commit"


def _changes(project: Path) -> dict[str, set[str]]:
    """Stage -> the deps (files, folders, params) `dvc status` reports as changed."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(project))
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, set[str]] = {}
    for stage, entries in json.loads(proc.stdout or "{}").items():
        for entry in entries if isinstance(entries, list) else []:
            for dep, state in (entry.get("changed deps") or {}).items():
                if isinstance(state, dict):  # params.yaml: {section or key: "modified"}
                    out.setdefault(stage, set()).update(f"params:{k}" for k in state)
                else:
                    out.setdefault(stage, set()).add(dep)
    return out


def _noticed(project: Path, edit: Callable[[], None]) -> set[str]:
    """Stages `dvc status` calls changed after `edit`; the edit is then committed as the new baseline."""
    assert _changes(project) == {}
    edit()
    changed = set(_changes(project))
    _dvc_commit(project, *sorted(changed))
    return changed


def _params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))


def _append(path: Path, text: str = "\n") -> Callable[[], None]:
    return lambda: path.open("a", encoding="utf-8").write(text)


def _set_param(project: Path, dotted: str, value) -> Callable[[], None]:
    def edit() -> None:
        tree = _params(project)
        node = tree
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
        (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return edit


def test_song_list_metadata_and_audio_edits_reach_ingest_and_mels(project: Path) -> None:
    p = _params(project)["ingest"]["sources"]
    assert _noticed(project, _append(project / p["fma"]["lists"][0])) == {"ingest"}
    assert _noticed(project, _append(project / p["jamendo"]["metadata"][0])) == {"ingest"}
    song = next(f for f in sorted((project / p["wikimedia"]["audio_root"]).rglob("*")) if f.is_file())
    assert _noticed(project, lambda: song.write_bytes(song.read_bytes() + b"\0")) == {"ingest", "mels"}


def test_query_terms_edit_reaches_the_teacher(project: Path) -> None:
    terms = project / _params(project)["text_queries"]["terms"]
    assert _noticed(project, _append(terms, " ")) == {"teacher"}


def test_code_edit_reaches_exactly_the_stages_that_import_it(project: Path) -> None:
    doc = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))
    modules = stage_modules(doc)
    for rel in ("pipeline/data/mel_cache.py", "pipeline/data/text_tokenizer.py", "pipeline/metrics.py"):
        want = {s for s, m in modules.items() if rel in code_deps(project, m)}
        assert want, rel
        assert _noticed(project, _append(project / rel, "# edited\n")) == want, rel


def test_param_edit_reaches_only_the_stages_that_declare_it(project: Path) -> None:
    assert _noticed(project, _set_param(project, "distill_text.epochs", 3)) == {"distill_text"}
    assert _noticed(project, _set_param(project, "evaluate.top_k", 7)) == {"evaluate"}


def test_teacher_files_and_pretrained_weights_reach_the_stages_that_load_them(project: Path) -> None:
    """Inputs named by a param path (the demo teacher's weights, a fetched checkpoint or tokenizer,
    EfficientAT weights) are deps of the stage that reads them, not only the param."""
    demo = project / _params(project)["teacher"]["model"]["demo"]["weights_dir"] / "teacher.json"
    assert _noticed(project, _append(demo, " ")) == {"teacher_model"}
    fetched = project / "models" / "teacher_src" / "roberta-base" / "vocab.json"
    fetched.parent.mkdir(parents=True, exist_ok=True)
    assert _noticed(project, lambda: fetched.write_text("{}")) == {"teacher_model"}
    weights = project / "models" / "pretrained" / "mn04_as_mAP_432.pt"
    assert _noticed(project, lambda: weights.write_bytes(b"weights")) == {"distill_audio"}


def test_a_song_list_params_name_outside_data_sources_is_a_dep_of_ingest(project: Path) -> None:
    """DVC cannot template a list into deps: `deps --write` adds each list params name, and then an
    edit of that list makes `dvc status` name ingest (before that, the ingest stage refuses to run)."""
    from pipeline.deps import stage_input_problems, write_code_deps

    moved = project / "lists" / "FMA_SONGS_LICENSE.md"
    moved.parent.mkdir(exist_ok=True)
    shutil.copy2(project / _params(project)["ingest"]["sources"]["fma"]["lists"][0], moved)
    _set_param(project, "ingest.sources.fma.lists", ["lists/FMA_SONGS_LICENSE.md"])()
    assert [p.split(":")[0] for p in stage_input_problems("ingest", project / "params.yaml")] == [
        "ingest.sources.fma.lists[0]"]
    assert write_code_deps(project) == ["ingest"]
    assert stage_input_problems("ingest", project / "params.yaml") == []
    _dvc_commit(project, "ingest")
    assert _noticed(project, _append(moved)) == {"ingest"}
