"""The house rules the code keeps: one source of truth for knobs, thin stages, short functions."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import yaml

from pipeline.params import MissingSection, Params

MAX_FUNCTION_LINES = 80


def _defaults(obj, prefix: str = ""):
    """(dotted name, default) for every field of a params dataclass (class or default instance)
    that has a default; fields without one must be set by params.yaml."""
    for f in dataclasses.fields(obj):
        name = f"{prefix}{f.name}"
        if not isinstance(obj, type):
            value = getattr(obj, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if isinstance(value, MissingSection):  # no defaults: params.yaml must have the section
            continue
        if dataclasses.is_dataclass(value):
            yield from _defaults(value, name + ".")
        else:
            yield name, value


def _lookup(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return KeyError
        node = node[key]
    return node


def test_dataclass_defaults_equal_params_yaml(repo_root: Path) -> None:
    """A default either equals params.yaml or does not exist (then params.yaml must give the value)."""
    tree = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    wrong = []
    for name, default in _defaults(Params):
        value = _lookup(tree, name)
        if value is KeyError:
            wrong.append(f"{name}: default {default!r}, absent from params.yaml")
        elif value != default and not (isinstance(default, float) and isinstance(value, (int, float)) and value == default):
            wrong.append(f"{name}: default {default!r} != params.yaml {value!r}")
    assert not wrong, "\n".join(wrong)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_long_function_without_a_reason(repo_root: Path) -> None:
    """Functions stay under ~80 lines unless their docstring says why they are longer ("Long: ...")."""
    long = []
    for path in sorted((repo_root / "pipeline").rglob("*.py")):
        for fn in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            lines = fn.end_lineno - fn.lineno + 1
            doc = ast.get_docstring(fn) or ""
            if lines > MAX_FUNCTION_LINES and "Long:" not in doc:
                long.append(f"{path.relative_to(repo_root)}:{fn.lineno} {fn.name} ({lines} lines)")
    assert not long, "\n".join(long)


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_stages_are_thin(repo_root: Path) -> None:
    """Stage modules hold no classes (their own error types aside), and no library or benchmark imports
    from a stage module."""
    problems = []
    for path in sorted((repo_root / "pipeline" / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            errors = {"Exception", "RuntimeError", "ValueError"}
            if isinstance(node, ast.ClassDef) and not any(getattr(b, "id", "") in errors for b in node.bases):
                problems.append(f"{path.name} defines class {node.name}: it belongs in a library module")
    users = [*(repo_root / "pipeline").rglob("*.py"), *(repo_root / "benchmarks").rglob("*.py")]
    for path in sorted(users):
        rel = path.relative_to(repo_root)
        if rel.parts[:2] == ("pipeline", "stages"):
            continue
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module.startswith("pipeline.stages") or (module == "pipeline" and "stages" in names):
                problems.append(f"{rel} imports {module}: stage modules are not libraries")
    assert not problems, "\n".join(problems)
