"""Shared test set-up: no test reaches the network, and every test sees the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports transformers/huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the clone; absent in a user's clone, so tests that need it skip."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: the shared sample data sits beside the clone only in CI")
    return SHARED


def _deep_update(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


@pytest.fixture(scope="session")
def deep_update():
    """Merge a nested params profile into a parsed params.yaml in place (like `dvc exp run -S`)."""
    return _deep_update
