"""ONNX export helpers: dynamic batch, parity check (passes and fails), int8 quantisation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import onnx as onnx_utils

torch.set_num_threads(1)


class TinyEmbedder(torch.nn.Module):
    """conv + pooling + linear + L2, like a (very) small audio student on a [B, 8, 20] input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(8, 32, 3, padding=1)
        self.proj = torch.nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=-1)
        return torch.nn.functional.normalize(self.proj(h), dim=-1)


def _export(module: torch.nn.Module, path) -> None:
    onnx_utils.export_module(
        module,
        (torch.zeros(2, 8, 20),),
        path,
        input_names=["x"],
        output_names=["embedding"],
        dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}},
        opset=17,
    )


def test_export_dynamic_batch_and_parity(tmp_path):
    model = TinyEmbedder()
    path = tmp_path / "tiny.onnx"
    _export(model, path)
    for batch in (1, 5):
        x = np.random.default_rng(batch).normal(size=(batch, 8, 20)).astype(np.float32)
        report = onnx_utils.check_parity(model, path, {"x": x}, min_cosine=0.9999)
        assert report.rows == batch
        assert report.min_cosine > 0.9999 and report.max_abs_diff < 1e-4


def test_parity_mismatch_raises(tmp_path):
    model = TinyEmbedder()
    path = tmp_path / "tiny.onnx"
    _export(model, path)
    with torch.no_grad():  # the module drifts away from its export
        model.proj.weight.mul_(-1.0)
    x = np.random.default_rng(0).normal(size=(3, 8, 20)).astype(np.float32)
    with pytest.raises(onnx_utils.ParityError, match="differs from PyTorch"):
        onnx_utils.check_parity(model, path, {"x": x}, min_cosine=0.9999)


def test_compare_rejects_wrong_shape_and_nan(tmp_path):
    with pytest.raises(onnx_utils.ParityError, match="shape"):
        onnx_utils.compare("m.onnx", np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(onnx_utils.ParityError, match="NaN"):
        onnx_utils.compare("m.onnx", np.zeros((1, 2)), np.array([[np.nan, 1.0]]))


def test_int8_quantisation_is_smaller_and_close(tmp_path):
    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.a = torch.nn.Linear(64, 256)
            self.b = torch.nn.Linear(256, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    model = Wide()
    fp32 = tmp_path / "wide.onnx"
    onnx_utils.export_module(
        model, (torch.zeros(2, 64),), fp32, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset=17,
    )
    int8 = onnx_utils.quantize_int8(fp32, tmp_path / "wide.int8.onnx")
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    loss = onnx_utils.quantization_loss(fp32, int8, {"x": x})
    assert 0.95 < loss["cosine_min"] < 1.0  # close but not bit-identical
    assert loss["cosine_min"] <= loss["cosine_p10"] <= loss["cosine_mean"]
