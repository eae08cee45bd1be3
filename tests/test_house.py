"""The house rules the code keeps: one source of truth for knobs, thin stages, short functions."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from pipeline.params import Params

MAX_FUNCTION_LINES = 80


def _sections(cls: type):
    """Every params dataclass reachable from `cls` (itself included)."""
    yield cls
    for f in dataclasses.fields(cls):
        for tp in (typing.get_type_hints(cls)[f.name], *typing.get_args(typing.get_type_hints(cls)[f.name])):
            if dataclasses.is_dataclass(tp):
                yield from _sections(tp)


def test_params_dataclasses_hold_no_defaults() -> None:
    """params.yaml is the one place a value is written: a default in the typed view would be a second."""
    with_default = sorted({
        f"{cls.__name__}.{f.name}"
        for cls in _sections(Params)
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    })
    assert not with_default, ", ".join(with_default)


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


def test_library_code_does_not_import_a_stage(repo_root: Path) -> None:
    """A stage module does its stage's work (one room per stage); the library under it never imports
    a stage (tests and benchmarks, which stand above every stage, may)."""
    problems = []
    for path in sorted((repo_root / "pipeline").rglob("*.py")):
        rel = path.relative_to(repo_root)
        if rel.parts[:2] == ("pipeline", "stages"):
            continue
        for module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module.startswith("pipeline.stages") or (module == "pipeline" and "stages" in names):
                problems.append(f"{rel} imports {module}: stage modules are not libraries")
    assert not problems, "\n".join(problems)
