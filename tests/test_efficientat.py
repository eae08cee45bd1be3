"""EfficientAT MobileNetV3: published sizes and the released checkpoints' state-dict layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models.efficientat import build_mobilenet, count_parameters, make_divisible, width_of

FIXTURES = Path(__file__).parent / "fixtures" / "audio_student"

# Params (millions) from the EfficientAT model table, AudioSet head (527 classes) included.
PUBLISHED = {"mn04_as": 0.983, "mn05_as": 1.43, "mn10_as": 4.88, "mn20_as": 17.91}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name: str) -> None:
    n = count_parameters(build_mobilenet(name)) / 1e6
    quoted = PUBLISHED[name]
    decimals = len(str(quoted).split(".")[1])
    # the table quotes 0.983 for 0.9836M: allow one unit in the last quoted digit
    assert abs(n - quoted) < 10.0**-decimals, f"{name}: {n:.4f}M vs published {quoted}M"


def test_feature_extractor_has_no_classifier() -> None:
    full = build_mobilenet("mn10_as")
    trunk = build_mobilenet("mn10_as", num_classes=0)
    assert not any(k.startswith("classifier") for k in trunk.state_dict())
    # the AudioSet head of mn10 is ~1.9M parameters
    assert count_parameters(full) - count_parameters(trunk) == pytest.approx(1.905e6, rel=0.01)


def test_make_divisible_rounding() -> None:
    assert make_divisible(16 * 0.4) == 8  # never below the divisor
    assert make_divisible(72 * 0.4) == 32  # 28.8 rounds to the nearest multiple of 8
    assert make_divisible(120 * 0.4) == 48
    assert make_divisible(100) == 104  # 96 would be within 10 %, nearest is 104
    assert make_divisible(22) == 24


def test_unknown_width_is_named() -> None:
    with pytest.raises(ValueError, match="mn99"):
        width_of("mn99_as")


@pytest.mark.parametrize("name", ["mn04_as", "mn10_as"])
def test_released_key_layout_loads_strictly(name: str) -> None:
    """A state dict with the released checkpoint's keys and shapes (recorded from EfficientAT's
    models/mn/model.py) loads with strict=True and the values land where they should."""
    shapes = json.loads((FIXTURES / f"{name}_state_dict_shapes.json").read_text())
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen)
    model = build_mobilenet(name)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()["features.16.0.weight"], state["features.16.0.weight"])
    assert torch.equal(model.state_dict()["classifier.5.bias"], state["classifier.5.bias"])
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 128, 64))
    assert logits.shape == (2, 527)
    assert torch.isfinite(logits).all()


def test_any_input_length() -> None:
    model = build_mobilenet("mn04_as", num_classes=0).eval()
    with torch.no_grad():
        for t in (96, 1000):
            assert model(torch.randn(1, 1, 128, t)).shape == (1, model.feature_dim)
