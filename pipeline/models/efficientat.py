"""EfficientAT MobileNetV3 family (mn01 … mn40), written to load the released AudioSet weights.

The architecture follows "Efficient Large-Scale Audio Tagging via Transformer-to-CNN Knowledge
Distillation" (Schmid et al.); module names and nesting match its released checkpoints
(``mn10_as_mAP_471.pt`` …: keys ``features.N…`` and ``classifier…``), so they load with ``strict=True``.
Only channel squeeze-excitation (EfficientAT's default ``se_dims='c'``) is implemented: it is what
every released ``mn*_as`` model uses, and it keeps the network independent of the input length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

# Width multiplier per model name prefix (EfficientAT's naming: mn<width*10>_<dataset>).
WIDTHS: dict[str, float] = {f"mn{w:02d}": w / 10 for w in (1, 2, 4, 5, 6, 8, 10, 12, 14, 16, 20, 30, 40)}

# MobileNetV3-Large block table at width 1.0:
# (input channels, kernel, expanded channels, output channels, squeeze-excitation, hardswish, stride)
BLOCKS: tuple[tuple[int, int, int, int, bool, bool, int], ...] = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
LAST_CHANNEL = 1280  # width of the hidden layer of the "mlp" classifier at width 1.0
SE_REDUCTION = 4
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
AUDIOSET_CLASSES = 527


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of `divisor` (at least `divisor`),
    never more than 10 % below `value` — the TF MobileNet rule the released weights were built with."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def width_of(name: str) -> float:
    """Width multiplier of a model name such as ``mn10_as`` or ``mn04``."""
    prefix = name[:4]
    if prefix not in WIDTHS:
        raise ValueError(f"unknown EfficientAT model {name!r}; known widths: {', '.join(sorted(WIDTHS))}")
    return WIDTHS[prefix]


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional activation; children named 0, 1, 2 like the checkpoints."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.Hardswish,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class _ChannelGate(nn.Module):
    """Squeeze (mean over frequency and time) -> fc1 -> ReLU -> fc2 -> sigmoid, one gate per channel."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s[:, :, None, None]


class SqueezeExcite(nn.Module):
    """Channel squeeze-excitation. EfficientAT wraps its gates in a list (``conc_se_layers``) so that
    frequency/time gates can run beside the channel gate; the released models use the channel gate
    alone, so the list holds one gate and the key layout matches theirs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = make_divisible(channels // SE_REDUCTION, 8)
        self.conc_se_layers = nn.ModuleList([_ChannelGate(channels, squeeze)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conc_se_layers[0](x)


@dataclass(frozen=True)
class BlockConfig:
    cin: int
    kernel: int
    expanded: int
    cout: int
    se: bool
    hardswish: bool
    stride: int


def block_configs(width: float) -> list[BlockConfig]:
    """The block table scaled to `width` with the same channel rounding as the released weights."""
    return [
        BlockConfig(
            make_divisible(cin * width),
            k,
            make_divisible(exp * width),
            make_divisible(cout * width),
            se,
            hs,
            stride,
        )
        for cin, k, exp, cout, se, hs, stride in BLOCKS
    ]


class InvertedResidual(nn.Module):
    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.cin:
            layers.append(ConvBNAct(cfg.cin, cfg.expanded, 1, activation=act))
        layers.append(ConvBNAct(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride, cfg.expanded, act))
        if cfg.se:
            layers.append(SqueezeExcite(cfg.expanded))
        layers.append(ConvBNAct(cfg.expanded, cfg.cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.residual = cfg.stride == 1 and cfg.cin == cfg.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3(nn.Module):
    """EfficientAT MobileNetV3 on a log-mel "image" [B, 1, F, T].

    `num_classes=0` builds the feature extractor alone (no ``classifier`` parameters at all), which
    is what a distillation student wants; `num_classes=527` rebuilds the released AudioSet tagger.
    """

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = AUDIOSET_CLASSES,
        dropout: float = 0.2,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        blocks = block_configs(width)
        last_in = blocks[-1].cout
        self.feature_dim = 6 * last_in
        layers: list[nn.Module] = [ConvBNAct(1, blocks[0].cin, 3, stride=2)]
        layers += [InvertedResidual(b) for b in blocks]
        layers.append(ConvBNAct(last_in, self.feature_dim, 1))
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Module | None = None
        if num_classes:
            hidden = make_divisible(LAST_CHANNEL * width)
            self.classifier = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(1),
                nn.Linear(self.feature_dim, hidden),
                nn.Hardswish(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        self._init_weights()
        self.set_bn_momentum(bn_momentum)

    def set_bn_momentum(self, momentum: float) -> None:
        """EfficientAT trains with 0.01 (long AudioSet runs). A short distillation run needs the
        running statistics to follow the weights faster, or evaluation-mode outputs lag far behind
        the training-mode ones."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, F, T] -> globally average-pooled features [B, feature_dim]."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """AudioSet logits [B, num_classes] (or pooled features when built without a classifier)."""
        fmap = self.features(x)
        if self.classifier is None:
            return fmap.mean(dim=(2, 3))
        return self.classifier(fmap)


def build_mobilenet(name: str, num_classes: int = AUDIOSET_CLASSES, dropout: float = 0.2) -> MobileNetV3:
    """`build_mobilenet("mn10_as")` -> the mn10 architecture (random init); load weights separately."""
    return MobileNetV3(width_of(name), num_classes=num_classes, dropout=dropout)


# The audio-student backbones by name (the `distill_audio.model` param): features only, no classifier.
BACKBONES = {f"{prefix}_as": partial(MobileNetV3, width, num_classes=0) for prefix, width in WIDTHS.items()}


def build_backbone(name: str, bn_momentum: float) -> MobileNetV3:
    """The feature extractor `distill_audio.model` names, randomly initialised: `.embed(x)` maps a
    log-mel image [B, 1, n_mels, T] to pooled features of width `.feature_dim`."""
    if name not in BACKBONES:
        raise ValueError(f"distill_audio.model: unknown audio backbone {name!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[name](bn_momentum=bn_momentum)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
