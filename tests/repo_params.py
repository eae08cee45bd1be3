"""The project's params.yaml as tests' base: the typed params hold no defaults, so a test that needs
params takes the committed values and changes only what it is about."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import Params, params_from_dict

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


def deep_update(base: dict, new: dict) -> None:
    """Merge a nested mapping into `base` in place (like `dvc exp run -S`); other values replace."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


@lru_cache(maxsize=1)
def _tree() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))


def params_tree(overrides: dict | None = None) -> dict:
    """A fresh copy of the parsed params.yaml with nested `overrides` merged in."""
    tree = copy.deepcopy(_tree())
    deep_update(tree, overrides or {})
    return tree


def repo_params(overrides: dict | None = None) -> Params:
    """Validated Params: params.yaml with nested `overrides`, e.g. {"distill_audio": {"epochs": 2}}."""
    return params_from_dict(params_tree(overrides))


def section(dotted: str, **overrides: Any) -> Any:
    """One typed section of params.yaml with some keys changed: section("frontend.student", n_mels=64);
    a nested mapping merges (section("teacher.model", demo={"seed": 1}))."""
    nested: dict = {}
    node = nested
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = overrides
    obj: Any = repo_params(nested)
    for part in parts:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj
