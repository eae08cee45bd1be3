"""Audio student backbones by name (the `distill_audio.model` param).

A backbone maps a log-mel image [B, 1, n_mels, T] to pooled features through `.embed(x)` and
says how wide they are in `.feature_dim`; the audio student puts its projection on top. Adding
an architecture: one module with a builder, plus its names in the table below.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.models import efficientat

# name -> builder(bn_momentum=...) of a feature extractor (no classifier head); one line per family
AUDIO_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **efficientat.BACKBONES,  # mn01_as ... mn40_as, EfficientAT's MobileNetV3 widths
}


def build_backbone(name: str, bn_momentum: float) -> nn.Module:
    """The feature extractor registered under `name`, randomly initialised."""
    if name not in AUDIO_BACKBONES:
        raise ValueError(f"distill_audio.model: unknown audio backbone {name!r} (known: {', '.join(AUDIO_BACKBONES)})")
    return AUDIO_BACKBONES[name](bn_momentum=bn_momentum)
