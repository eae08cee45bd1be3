"""Which project files each DVC stage runs: the import closure of its stage module.

`dvc.yaml` must list every one of them under the stage's `deps:` (a file, or a folder above it),
or `dvc status` would call a stage up to date after its code changed. `student-clap deps` prints
what is missing; tests/test_stage_deps.py fails on it.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterable
from pathlib import Path

import yaml

PACKAGE = "pipeline"
# The project's import packages: the pipeline and the runtime it imports (student_clap).
PACKAGES = (PACKAGE, "student_clap")
# The runner every stage goes through: it parses and validates params.yaml before the stage runs.
RUNNER_MODULES = ("pipeline.params",)


def _module_file(root: Path, dotted: str) -> Path | None:
    rel = Path(*dotted.split("."))
    for cand in (rel.with_suffix(".py"), rel / "__init__.py"):
        if (root / cand).is_file():
            return cand
    return None


def _imported_names(tree: ast.AST, current: str) -> Iterable[str]:
    """Dotted names a module imports, anywhere in its body (imports inside functions run too)."""
    package = current.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            yield base
            for alias in node.names:  # `from pipeline.data import audio` imports a module
                yield f"{base}.{alias.name}"


def import_closure(root: Path, start: str) -> set[Path]:
    """Project files (relative to `root`) that importing module `start` executes."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        dotted = todo.pop()
        if not any(dotted == p or dotted.startswith(p + ".") for p in PACKAGES):
            continue
        # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = _module_file(root, name)
            if path is None or path in seen:
                continue
            seen.add(path)
            tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=str(path))
            current = name if path.name != "__init__.py" else name + ".__init__"
            todo.extend(_imported_names(tree, current))
    return seen


def stage_modules(dvc_yaml: dict) -> dict[str, str]:
    """Stage name -> the module its `student-clap run <stage>` command runs."""
    out = {}
    for name, stage in dvc_yaml.get("stages", {}).items():
        words = str(stage.get("cmd", "")).split()
        if words[:2] == ["student-clap", "run"] and len(words) >= 3:
            out[name] = f"{PACKAGE}.stages.{words[2]}"
    return out


def _covered(path: Path, deps: Iterable[str]) -> bool:
    posix = path.as_posix()
    return any(posix == d.rstrip("/") or posix.startswith(d.rstrip("/") + "/") for d in deps)


def missing_deps(root: Path) -> dict[str, list[str]]:
    """Stage -> project files it executes that its `deps:` do not cover."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    missing: dict[str, list[str]] = {}
    for stage, module in stage_modules(dvc_yaml).items():
        deps = [str(d) for d in dvc_yaml["stages"][stage].get("deps", [])]
        gaps = [f for f in code_deps(root, module) if not _covered(Path(f), deps)]
        if gaps:
            missing[stage] = gaps
    return missing


def code_deps(root: Path, module: str) -> list[str]:
    """The sorted project files a stage module executes (its runner included)."""
    files: set[Path] = set()
    for start in (module, *RUNNER_MODULES):
        files |= import_closure(root, start)
    return sorted(p.as_posix() for p in files)


def is_code_dep(dep: str) -> bool:
    """A dvc.yaml dep that names a project code file (rewritten by write_code_deps)."""
    return dep.startswith(tuple(f"{p}/" for p in PACKAGES))


def write_code_deps(root: Path) -> list[str]:
    """Rewrite the code entries (`pipeline/...`, `student_clap/...`) of every stage's deps in dvc.yaml from the code.

    Round-trips through ruamel.yaml so comments and the other deps stay as written.
    Returns the stages whose deps changed.
    """
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = rt.load(path.read_text(encoding="utf-8"))
    changed = []
    for stage, module in stage_modules(doc).items():
        deps = doc["stages"][stage].setdefault("deps", [])
        want = code_deps(root, module)
        have = [str(d) for d in deps if is_code_dep(str(d))]
        if have == want:
            continue
        others = [d for d in deps if not is_code_dep(str(d))]
        deps.clear()
        deps.extend([*want, *others])
        changed.append(stage)
    if changed:
        with path.open("w", encoding="utf-8") as fh:
            rt.dump(doc, fh)
    return changed


def main(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if args.write:
        changed = write_code_deps(root)
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: code deps already exact")
    missing = missing_deps(root)
    for stage, files in missing.items():
        print(f"{stage}: not in deps: {', '.join(files)}")
    if not missing:
        print("every stage's code is in its dvc.yaml deps")
    return 1 if missing else 0
