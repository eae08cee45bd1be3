"""Small params profiles for tests that run the pipeline through DVC."""

from __future__ import annotations


def deep_update(base: dict, new: dict) -> None:
    """Merge `new` into `base` in place, descending into nested sections (like `dvc exp run -S`)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
