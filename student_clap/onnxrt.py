"""ONNX Runtime sessions on the CPU, as every runtime path creates them (onnxruntime only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def onnx_session(path: Path, threads: int | None, spinning: bool = True, optimize: bool = True) -> Any:
    """A CPU onnxruntime session of `path` (FileNotFoundError when absent); `threads`: intra-op
    threads (None: all cores); `spinning`: let idle pool threads spin-wait for the next call;
    `optimize`: onnxruntime's full graph optimisation (fusions, layout changes). Without it the
    session starts faster (the text student's: ~16 instead of ~34 ms of CPU) and each call runs a
    little slower (a batch of 64 queries: ~15 % more), the right trade for a process that embeds
    one query and exits (benchmarks/library.py)."""
    import onnxruntime as ort

    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
