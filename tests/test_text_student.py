"""The text student: size, masked pooling, checkpoint round trip and ONNX parity."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models.text_student import (
    TextStudent,
    build_text_student,
    export_text_onnx,
    load_text_student,
    save_text_student,
)
from repo_params import section

SMALL = {"vocab_size": 300, "dim": 32, "layers": 2, "heads": 2, "ff_dim": 64, "max_length": 16, "dropout": 0.0}


def _batch(vocab: int, lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids * mask, mask


def test_default_params_give_about_one_million_parameters() -> None:
    model = build_text_student(asdict(section("distill_text.model")))
    n = model.count_parameters()
    assert 0.8e6 <= n <= 1.3e6, n


def test_output_is_unit_norm_512() -> None:
    torch.manual_seed(0)
    model = build_text_student(SMALL).eval()
    ids, mask = _batch(300, [3, 7, 16], 16)
    out = model(ids, mask)
    assert out.shape == (3, 512)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_padding_does_not_change_the_embedding() -> None:
    torch.manual_seed(0)
    model = build_text_student(SMALL).eval()
    ids, mask = _batch(300, [5], 5)
    short = model(ids, mask)
    padded_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.int64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 6, dtype=torch.int64)], dim=1)
    # junk under the mask must not leak into the result either
    junk_ids = padded_ids.clone()
    junk_ids[0, 5:] = 42
    assert torch.allclose(model(padded_ids, padded_mask), short, atol=1e-6)
    assert torch.allclose(model(junk_ids, padded_mask), short, atol=1e-6)


def test_positions_matter_and_length_is_checked() -> None:
    torch.manual_seed(0)
    model = build_text_student(SMALL).eval()
    ids = torch.tensor([[1, 10, 20, 2]])
    mask = torch.ones_like(ids)
    swapped = torch.tensor([[1, 20, 10, 2]])
    assert not torch.allclose(model(ids, mask), model(swapped, mask))
    with pytest.raises(ValueError, match="max_length"):
        model(torch.ones(1, 17, dtype=torch.int64), torch.ones(1, 17, dtype=torch.int64))


def test_calibration_is_identity_until_set_and_then_rescales_offsets() -> None:
    torch.manual_seed(0)
    model = build_text_student(SMALL).eval()
    ids, mask = _batch(300, [4, 9, 6], 9)
    unit = torch.nn.functional.normalize(model.embed_raw(ids, mask), dim=-1)
    assert torch.allclose(model(ids, mask), unit, atol=1e-6)
    anchor = torch.nn.functional.normalize(torch.randn(512), dim=0)
    model.calibrate(anchor, 0.2)
    expected = torch.nn.functional.normalize(anchor + 0.2 * (unit - anchor), dim=-1)
    assert torch.allclose(model(ids, mask), expected, atol=1e-6)
    # a small scale pulls every output towards the anchor
    assert (model(ids, mask) @ anchor).min() > (unit @ anchor).max()


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_text_student(SMALL).eval()
    model.calibrate(torch.nn.functional.normalize(torch.randn(512), dim=0), 0.3)
    path = save_text_student(model, tmp_path / "student.pt", metrics={"val_combos": {"cosine_mean": 0.5}})
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob) == {"state_dict", "config", "metrics"}
    loaded = load_text_student(path)
    assert isinstance(loaded, TextStudent) and not loaded.training
    ids, mask = _batch(300, [4, 9], 9)
    assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_load_refuses_skipped_and_broken_files(tmp_path: Path) -> None:
    skipped = tmp_path / "skipped.pt"
    torch.save({"skipped": True}, skipped)
    with pytest.raises(ValueError, match="skipped"):
        load_text_student(skipped)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        load_text_student(broken)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_text_student(tmp_path / "missing.pt")


def test_onnx_matches_pytorch_with_dynamic_batch_and_length(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_text_student(SMALL).eval()
    model.calibrate(torch.nn.functional.normalize(torch.randn(512), dim=0), 0.25)
    path = export_text_onnx(model, tmp_path / "text.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for lengths, width in (([3, 11, 7], 11), ([16], 16), ([2, 2, 5, 9, 12, 1, 4], 12)):
        ids, mask = _batch(300, lengths, width, seed=width)
        with torch.no_grad():
            ref = model(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got.shape == ref.shape
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        assert cos.min() >= 0.9999
