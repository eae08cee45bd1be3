"""What each DVC stage reads, so that `dvc status` sees every change: the import closure of its module
and the inputs params name (`PARAM_INPUTS`). The rules: docs/layout.md."""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- inputs named by params


def _ingest_inputs(params: dict) -> Iterator[tuple[str, str]]:
    sources = (params.get("ingest") or {}).get("sources") or {}
    for name, sp in sources.items():
        sp = sp or {}
        where = f"ingest.sources.{name}"
        for key in ("lists", "metadata"):
            for i, path in enumerate(sp.get(key) or []):
                yield f"{where}.{key}[{i}]", str(path)
        for key in ("licenses_file", "audio_root"):
            if sp.get(key):
                yield f"{where}.{key}", str(sp[key])


# stage -> (params dict -> (param name, path) for each file or folder the stage reads through params)
PARAM_INPUTS = {"ingest": _ingest_inputs}

_TEMPLATE = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def _lookup(params: dict, dotted: str) -> Any:
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def resolve_dep(dep: str, params: dict) -> str | None:
    """A dvc.yaml dep with its `${a.b}` templates filled from params (None if one is missing)."""
    values = [_lookup(params, m.group(1)) for m in _TEMPLATE.finditer(dep)]
    if any(v is None or isinstance(v, (dict, list)) for v in values):
        return None
    it = iter(values)
    return _TEMPLATE.sub(lambda _m: str(next(it)), dep)


def _inside(path: str, dep: str, root: Path) -> bool:
    target, folder = (root / path).resolve(), (root / dep).resolve()
    return target == folder or target.is_relative_to(folder)


def uncovered_param_inputs(root: Path, params: dict, dvc_yaml: dict) -> dict[str, list[tuple[str, str]]]:
    """Stage -> (param, path) of inputs it reads through params that none of its deps covers."""
    gaps: dict[str, list[tuple[str, str]]] = {}
    for stage, inputs in PARAM_INPUTS.items():
        spec = (dvc_yaml.get("stages") or {}).get(stage)
        if spec is None:
            continue
        deps = [d for d in (resolve_dep(str(d), params) for d in spec.get("deps") or []) if d]
        missing = [(name, path) for name, path in inputs(params) if not any(_inside(path, d, root) for d in deps)]
        if missing:
            gaps[stage] = missing
    return gaps


def stage_input_problems(stage: str, params_file: str | Path) -> list[str]:
    """Why `stage` must not run: inputs named by params that dvc.yaml beside params_file does not list.

    Empty when there is no dvc.yaml there (a stage run outside a DVC project)."""
    params_file = Path(params_file)
    root = params_file.resolve().parent
    if not (root / "dvc.yaml").is_file() or not params_file.is_file():
        return []
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    return [f"{name}: {path} is read by the {stage} stage but is not among its deps in dvc.yaml, so "
            f"`dvc status` would not see it change; run `student-clap deps --write` to add it"
            for name, path in uncovered_param_inputs(root, params, dvc_yaml).get(stage, [])]


def write_code_deps(root: Path) -> list[str]:
    """Rewrite the code entries (`pipeline/...`, `student_clap/...`) of every stage's deps in dvc.yaml from the code.

    Also adds the inputs params name that no dep covers (`uncovered_param_inputs`), as paths.
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
    params_file = root / "params.yaml"
    params = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}) if params_file.is_file() else {}
    changed = []
    for stage, inputs in uncovered_param_inputs(root, params, doc).items():
        doc["stages"][stage].setdefault("deps", []).extend(dict.fromkeys(path for _, path in inputs))
        changed.append(stage)
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
    changed = list(dict.fromkeys(changed))
    if changed:
        with path.open("w", encoding="utf-8") as fh:
            rt.dump(doc, fh)
    return changed


def main(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if args.write:
        changed = write_code_deps(root)
        print(f"dvc.yaml: deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: deps already exact")
    missing = missing_deps(root)
    for stage, files in missing.items():
        print(f"{stage}: not in deps: {', '.join(files)}")
    if not missing:
        print("every stage's code is in its dvc.yaml deps")
    inputs = [line for stage in PARAM_INPUTS for line in stage_input_problems(stage, root / "params.yaml")]
    for line in inputs:
        print(line)
    return 1 if missing or inputs else 0
