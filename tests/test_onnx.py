"""ONNX export helpers: dynamic batch, parity check (passes and fails), int8 quantisation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import onnx_export as onnx_utils

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


def test_tuple_outputs_are_all_checked(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.lin = torch.nn.Linear(4, 8)

        def forward(self, x: torch.Tensor):
            raw = self.lin(x)
            return torch.nn.functional.normalize(raw, dim=-1), raw

    model = Two()
    path = tmp_path / "two.onnx"
    onnx_utils.export_module(
        model, (torch.zeros(2, 4),), path, input_names=["x"], output_names=["embedding", "embedding_raw"],
        dynamic_axes={"x": {0: "batch"}, "embedding": {0: "batch"}, "embedding_raw": {0: "batch"}}, opset=17,
    )
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    assert onnx_utils.check_parity(model, path, {"x": x}, 0.9999).min_cosine > 0.9999
    with torch.no_grad():
        model.lin.bias.add_(5.0)  # moves the raw output and, less so, the normalised one
    with pytest.raises(onnx_utils.ParityError):
        onnx_utils.check_parity(model, path, {"x": x}, 0.9999)


def test_quantize_can_keep_named_nodes_fp32(tmp_path):
    class Pre(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.frontend = torch.nn.Linear(64, 64)
            self.body = torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(torch.relu(self.frontend(x)))

    import onnx

    path = tmp_path / "pre.onnx"
    onnx_utils.export_module(
        Pre(), (torch.zeros(2, 64),), path, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset=17,
    )
    q = onnx_utils.quantize_int8(path, tmp_path / "pre.int8.onnx", exclude_prefixes=("/frontend/",))
    nodes = onnx.load(str(q)).graph.node
    assert any(n.op_type == "MatMulInteger" for n in nodes)
    assert any(n.name.startswith("/frontend/") and n.op_type in ("Gemm", "MatMul") for n in nodes)
    assert not any(n.name.startswith("/frontend/") and n.op_type == "MatMulInteger" for n in nodes)
