"""Every file a stage's code executes is one of its dvc.yaml deps, so a code change re-runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.deps import code_deps, import_closure, is_code_dep, missing_deps, stage_modules, write_code_deps


def test_every_stage_lists_its_import_closure(repo_root: Path) -> None:
    missing = missing_deps(repo_root)
    assert not missing, "dvc.yaml deps miss code the stage runs (fix: student-clap deps --write): " + "; ".join(
        f"{stage}: {', '.join(files)}" for stage, files in missing.items()
    )


def test_code_deps_are_exact(repo_root: Path) -> None:
    """No stale entries either: the listed pipeline/ and student_clap/ files are exactly the closure."""
    doc = yaml.safe_load((repo_root / "dvc.yaml").read_text(encoding="utf-8"))
    modules = stage_modules(doc)
    assert set(modules) == set(doc["stages"]), "every stage runs through `student-clap run <stage>`"
    for stage, module in modules.items():
        listed = [d for d in doc["stages"][stage]["deps"] if is_code_dep(str(d))]
        assert listed == code_deps(repo_root, module), stage


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_closure_follows_lazy_relative_and_module_imports(tmp_path: Path) -> None:
    _write(tmp_path, "pipeline/__init__.py", "")
    _write(tmp_path, "pipeline/stages/__init__.py", "")
    _write(tmp_path, "pipeline/stages/a.py", "from pipeline.lib import b\n\ndef f():\n    import pipeline.lazy\n")
    _write(tmp_path, "pipeline/lib/__init__.py", "")
    _write(tmp_path, "pipeline/lib/b.py", "from . import c\nimport numpy\n")
    _write(tmp_path, "pipeline/lib/c.py", "")
    _write(tmp_path, "pipeline/lazy.py", "from .lib.c import x\n")
    _write(tmp_path, "pipeline/unused.py", "")
    got = {p.as_posix() for p in import_closure(tmp_path, "pipeline.stages.a")}
    assert got == {
        "pipeline/__init__.py", "pipeline/stages/__init__.py", "pipeline/stages/a.py", "pipeline/lib/__init__.py",
        "pipeline/lib/b.py", "pipeline/lib/c.py", "pipeline/lazy.py",
    }


@pytest.mark.slow
def test_write_fixes_a_stage_that_lost_a_dep(repo_root: Path, tmp_path: Path) -> None:
    shutil.copytree(repo_root / "pipeline", tmp_path / "pipeline")
    shutil.copytree(repo_root / "student_clap", tmp_path / "student_clap")
    doc = (repo_root / "dvc.yaml").read_text(encoding="utf-8")
    dropped = "      - pipeline/stages/export.py\n"
    assert dropped in doc
    (tmp_path / "dvc.yaml").write_text(doc.replace(dropped, ""), encoding="utf-8")
    assert missing_deps(tmp_path) == {"export": ["pipeline/stages/export.py"]}
    assert write_code_deps(tmp_path) == ["export"]
    assert missing_deps(tmp_path) == {}
    after = (tmp_path / "dvc.yaml").read_text(encoding="utf-8")
    assert after.startswith("# Stages in pipeline order.")  # comments survive the rewrite
    assert yaml.safe_load(after) == yaml.safe_load(doc)
