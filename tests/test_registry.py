"""Registries: a student backbone or a song source is found by name, and an unknown name is refused."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.sources import SOURCES
from pipeline.models.audio_student import AudioStudent
from pipeline.models.efficientat import BACKBONES, build_backbone


def test_every_registered_backbone_builds_a_feature_extractor() -> None:
    assert {"mn04_as", "mn05_as", "mn10_as", "mn20_as"} <= set(BACKBONES)
    net = build_backbone("mn04_as", bn_momentum=0.1)
    net.eval()
    with torch.no_grad():
        feats = net.embed(torch.zeros(2, 1, 128, 200))
    assert feats.shape == (2, net.feature_dim)
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_backbone_names_the_param() -> None:
    with pytest.raises(ValueError, match="distill_audio.model: unknown audio backbone 'resnet9'"):
        AudioStudent({"backbone": "resnet9"})


def test_sources_registry_names_match_their_modules() -> None:
    assert set(SOURCES) == {"fma", "jamendo", "wikimedia"}
    for name, source in SOURCES.items():
        assert source.name == name
        assert source.attribution_file.endswith("_SONGS_LICENSE.md")
