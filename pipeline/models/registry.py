"""Audio student backbones by name (the `distill_audio.model` param).

A backbone maps a log-mel image [B, 1, n_mels, T] to pooled features through `.embed(x)` and
says how wide they are in `.feature_dim`; the audio student puts its projection on top. Adding
an architecture: one module with a builder, plus its names in the table below.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from pipeline.models import efficientat

# name -> builder(bn_momentum=...) of a feature extractor (no classifier head)
AUDIO_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    f"{prefix}_as": partial(efficientat.MobileNetV3, width, num_classes=0) for prefix, width in efficientat.WIDTHS.items()
}


def build_backbone(name: str, bn_momentum: float) -> nn.Module:
    """The feature extractor registered under `name`, randomly initialised."""
    if name not in AUDIO_BACKBONES:
        raise ValueError(f"distill_audio.model: unknown audio backbone {name!r} (known: {', '.join(AUDIO_BACKBONES)})")
    return AUDIO_BACKBONES[name](bn_momentum=bn_momentum)
