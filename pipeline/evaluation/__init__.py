"""Judging a student against its teacher: fidelity figures, retrieval, zero-shot, reports."""
