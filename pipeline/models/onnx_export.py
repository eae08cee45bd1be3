"""ONNX export of the students, the ONNX-vs-PyTorch parity check and int8 dynamic quantisation.

Export uses the TorchScript-based exporter (`dynamo=False`): it handles the STFT front-end and
gives stable graphs with named dynamic axes. Every exported file is checked against the module
it came from on the same inputs; a row whose cosine falls below the threshold fails the export.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.metrics import cosine_rows, summarize
from student_clap.onnxrt import onnx_session

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The ONNX model does not reproduce the PyTorch module it was exported from."""


@dataclass
class ParityReport:
    """Agreement of an ONNX file with its reference outputs on one batch."""

    path: str
    min_cosine: float
    max_abs_diff: float
    rows: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {"min_cosine": self.min_cosine, "max_abs_diff": self.max_abs_diff, "rows": self.rows}


def export_module(
    module,
    example_inputs: Sequence,
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
) -> Path:
    """Export `module` (in eval mode) to `path` and verify the graph with the ONNX checker."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    log.info("exporting %s -> %s (opset %d)", type(module).__name__, path, opset)
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (see the module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # strided slices stay unfolded
        torch.onnx.export(
            module,
            tuple(example_inputs),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    return path


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The onnxruntime quantisers log every tensor at INFO on the root logger: raise it to ERROR meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def run_onnx(path: str | Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX file once on `feeds`; all outputs in graph order."""
    return onnx_session(Path(path), None).run(None, dict(feeds))


def compare(path: str | Path, reference: np.ndarray, onnx_out: np.ndarray) -> ParityReport:
    """Per-row cosine and max absolute difference between reference and ONNX outputs."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    got = np.asarray(onnx_out, dtype=np.float64).reshape(len(onnx_out), -1)
    if ref.shape != got.shape:
        raise ParityError(f"{path}: output shape {got.shape} differs from the PyTorch output {ref.shape}")
    if not np.all(np.isfinite(got)):
        raise ParityError(f"{path}: ONNX output holds NaN/inf")
    cos = cosine_rows(ref, got)
    return ParityReport(str(path), float(cos.min()), float(np.abs(ref - got).max()), int(ref.shape[0]))


def check_parity(
    module,
    path: str | Path,
    feeds: Mapping[str, np.ndarray],
    min_cosine: float,
) -> ParityReport:
    """Run `module` (PyTorch) and the ONNX file on the same inputs; raise ParityError when any row
    of any output has a cosine below `min_cosine`. `feeds` maps ONNX input names to arrays, passed
    to the module positionally in the same order; a module returning a tuple is compared output by
    output, and the report holds the worst figures."""
    import torch

    module.eval()
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))
    references = [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
    got = run_onnx(path, feeds)
    if len(got) != len(references):
        raise ParityError(f"{path}: {len(got)} ONNX outputs, the PyTorch module returns {len(references)}")
    reports = [compare(path, r, g) for r, g in zip(references, got)]
    report = ParityReport(
        str(path),
        min(r.min_cosine for r in reports),
        max(r.max_abs_diff for r in reports),
        reports[0].rows,
    )
    log.info(
        "parity %s: min cosine %.7f, max abs diff %.2e over %d rows",
        Path(path).name, report.min_cosine, report.max_abs_diff, report.rows,
    )
    if report.min_cosine < min_cosine:
        raise ParityError(
            f"{path}: ONNX output differs from PyTorch: min row cosine {report.min_cosine:.6f} "
            f"< {min_cosine} (max abs diff {report.max_abs_diff:.3e})"
        )
    return report


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    exclude_prefixes: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
) -> Path:
    """Dynamic int8 quantisation of the weights (activations stay float, quantised per batch).

    Nodes whose name starts with one of `exclude_prefixes` stay fp32 — e.g. the mel front-end,
    whose fixed STFT/filterbank weights lose more to int8 than they save. `op_types` limits which
    operators are quantised (None: onnxruntime's default set, which includes Conv).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    excluded = [
        n.name for n in onnx.load(str(src), load_external_data=False).graph.node
        if exclude_prefixes and n.name.startswith(tuple(exclude_prefixes))
    ]
    # the quantiser first rewrites Gemm as MatMul + Add, naming the MatMul "<gemm>_MatMul"
    excluded += [f"{name}_MatMul" for name in excluded]
    log.info("quantising %s -> %s (dynamic int8, %d nodes kept fp32)", src, dst, len(excluded))
    with _quiet_root_logger():
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            op_types_to_quantize=list(op_types) if op_types else None,
        )
    return dst


def quantization_loss(
    fp32_path: str | Path, int8_path: str | Path, feeds: Mapping[str, np.ndarray], output: int = 0
) -> dict[str, float]:
    """Cosine of the int8 model's output `output` against the fp32 model's: summary plus `min`."""
    ref = run_onnx(fp32_path, feeds)[output]
    got = run_onnx(int8_path, feeds)[output]
    cos = cosine_rows(ref.reshape(len(ref), -1), got.reshape(len(got), -1))
    out = {f"cosine_{k}": v for k, v in summarize(cos).items()}
    out["cosine_min"] = float(cos.min())
    return out


def quantize_static_int8(
    src: str | Path,
    dst: str | Path,
    calibration: Sequence[Mapping[str, np.ndarray]],
    op_types: Sequence[str],
) -> Path:
    """Static int8 quantisation (QDQ) of the `op_types` nodes: int8 weights (per output channel) and
    uint8 activations with scales fixed from `calibration` (feeds run through the fp32 model; per
    tensor, the min/max of each batch averaged over the batches).

    Unlike the dynamic quantiser, activations need no per-batch scale search, so onnxruntime fuses
    each DequantizeLinear -> Conv -> QuantizeLinear into one integer convolution. The depthwise
    convolutions and the first and last convolution stay float: on MobileNet students those lose
    the most to int8 (a depthwise filter has a handful of taps per channel; the first and last set
    the scale of everything after them)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    dst = Path(dst)
    log.info("quantising %s -> %s (static int8 QDQ, %d calibration batches)", src, dst, len(calibration))
    with _quiet_root_logger(), tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # shape inference + graph optimisation (BatchNorm folded into Conv) before quantising
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        convs = [n for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
        keep = [n.name for i, n in enumerate(convs) if i in (0, len(convs) - 1)
                or any(a.name == "group" and a.i > 1 for a in n.attribute)]
        quantize_static(
            str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types), nodes_to_exclude=keep,
            # ranges averaged over the calibration batches rather than their extremes: one
            # loud batch no longer coarsens the scale for all the others
            extra_options={"CalibMovingAverage": True},
        )
    return dst
