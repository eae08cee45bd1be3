"""The error evaluate raises when its inputs do not fit together."""

from __future__ import annotations


class EvaluateError(RuntimeError):
    """The inputs of evaluate are inconsistent (e.g. no validation track in the caches)."""
