"""The audio student: EfficientAT MobileNetV3 features + a residual projection into the CLAP space
(docs/students.md). Input is the StudentMel output [B, n_mels, T]; the CNN's channel axis is added here.

On disk (models/audio/student.pt) a student is a plain dict
``{"state_dict": ..., "config": ..., "metrics": ...}`` that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.models.efficientat import build_backbone, count_parameters
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

# What a config must name (distill_audio.model and .dropout), and what the space and the family fix:
# bn_momentum 0.1 rather than EfficientAT's 0.01 (see MobileNetV3.set_bn_momentum). n_mels
# (frontend.student.n_mels) is recorded only: the convolutional encoder takes any number of bands.
REQUIRED_KEYS = ("backbone", "dropout")
FIXED: dict[str, Any] = {"embed_dim": EMBED_DIM, "bn_momentum": 0.1}
KNOWN_KEYS = (*REQUIRED_KEYS, *FIXED, "n_mels")


class ResidualProjection(nn.Module):
    """embed1 = W1·h; embed2 = W2·dropout(GELU(embed1)); out = embed1 + embed2 (both without bias).

    The linear path alone can already reach the target space; the second layer adds a non-linear
    correction, which keeps early training stable when the encoder is random.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.embed1 = nn.Linear(in_dim, out_dim, bias=False)
        self.embed2 = nn.Linear(out_dim, out_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        e1 = self.embed1(h)
        return e1 + self.embed2(self.dropout(F.gelu(e1)))


class AudioStudent(nn.Module):
    """forward(student_mel [B, n_mels, T]) -> [B, embed_dim] L2-normalised."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = dict(config)
        for key, value in FIXED.items():
            cfg.setdefault(key, value)
        self.config = cfg
        self.encoder = build_backbone(cfg["backbone"], bn_momentum=float(cfg["bn_momentum"]))
        self.projection = ResidualProjection(self.encoder.feature_dim, int(cfg["embed_dim"]), float(cfg["dropout"]))
        # A learnable offset added after the projection. Teacher embeddings share a large common
        # component (CLAP's cluster around one direction, a random teacher's almost entirely);
        # starting this offset at that component (`init_output_bias`) lets training spend its
        # steps on how inputs differ, instead of first rotating random outputs onto the mean.
        self.output_bias = nn.Parameter(torch.zeros(int(cfg["embed_dim"])))

    def embed_raw(self, mel: torch.Tensor) -> torch.Tensor:
        """Projection output before L2 normalisation (track embeddings average these)."""
        if mel.dim() != 3:
            raise ValueError(f"AudioStudent expects a log-mel [B, n_mels, T], got shape {tuple(mel.shape)}")
        return self.projection(self.encoder.embed(mel.unsqueeze(1))) + self.output_bias

    @torch.no_grad()
    def init_output_bias(self, mels: torch.Tensor, direction: torch.Tensor, spread: float) -> float:
        """Point the output bias along `direction` (unit mean teacher embedding) with a length that
        makes the projection's current outputs on `mels` deviate from it by the ratio `spread`
        (the teacher's typical |offset from the mean| / |component along it|). Returns the length."""
        # Batch statistics, not the running ones: a fresh encoder's running statistics are still
        # at their initial values and shrink eval-mode activations by orders of magnitude. The
        # running statistics are left untouched (momentum 0 for this pass).
        was_training = self.training
        bns = [m for m in self.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 0.0
        self.encoder.train()
        self.projection.eval()
        proj = self.projection(self.encoder.embed(mels.unsqueeze(1)))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        self.train(was_training)
        length = float(proj.norm(dim=-1).median()) / max(spread, 1e-3)
        self.output_bias.copy_(F.normalize(direction.float().flatten(), dim=0) * length)
        return length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_raw(mel), dim=-1)

    @torch.no_grad()
    def recalibrate_batchnorm(self, mel_batches) -> int:
        """Set the encoder's BatchNorm running statistics to the population statistics of the
        given mel batches under the current weights ("precise BN"); returns the rows seen.

        With few optimisation steps the exponential running averages trail the weights, and the
        evaluation-mode network then differs from the one the loss trained: on the demo that gap
        alone took the validation centred cosine from ~0.4 (batch statistics) to ~0.1.
        """
        bns = [m for m in self.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            return 0
        saved = [(m.momentum, m.training) for m in bns]
        was_training = self.training
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
        self.encoder.train()
        rows = 0
        for mels in mel_batches:
            self.encoder.embed(mels.unsqueeze(1))
            rows += mels.shape[0]
        for m, (mom, _) in zip(bns, saved):
            m.momentum = mom
        self.train(was_training)
        return rows

    # ---- what the training loop's stage 2 needs
    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.projection.parameters(), self.output_bias]

    def freeze_encoder(self) -> None:
        """Stage 2: encoder weights fixed and its BatchNorm statistics frozen (eval mode)."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        self._encoder_frozen = True

    def train(self, mode: bool = True) -> AudioStudent:
        super().train(mode)
        if getattr(self, "_encoder_frozen", False):
            self.encoder.eval()
        return self

    def num_parameters(self) -> int:
        return count_parameters(self)


def build_audio_student(cfg: dict[str, Any]) -> AudioStudent:
    """Build a randomly initialised student; `cfg` keys: backbone, dropout (required), embed_dim, n_mels."""
    unknown = set(cfg) - set(KNOWN_KEYS)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if unknown or missing:
        raise ValueError(f"audio student config: unknown key(s) {sorted(unknown)}, missing key(s) {missing}; "
                         f"known: {sorted(KNOWN_KEYS)}")
    return AudioStudent(cfg)


def load_pretrained_encoder(student: AudioStudent, path: str | Path) -> dict[str, Any]:
    """Load a released EfficientAT checkpoint (``features.*`` + ``classifier.*``) into the encoder.

    Strict on the feature keys: a missing, extra or mis-shaped ``features`` tensor (for example an
    mn10 file into an mn04 student) is an error naming the file. The classifier is ignored.
    Returns provenance: {"pretrained": True, "file", "ignored_keys"}.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable EfficientAT checkpoint ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    ignored = sorted(k for k in state if not k.startswith("features."))
    if not features:
        raise ValueError(f"{path}: no 'features.*' tensors; is this an EfficientAT mn checkpoint?")
    own = student.encoder.state_dict()
    missing = sorted(set(own) - set(features))
    extra = sorted(set(features) - set(own))
    wrong = sorted(k for k in set(own) & set(features) if own[k].shape != features[k].shape)
    if missing or extra or wrong:
        raise ValueError(
            f"{path}: does not fit backbone {student.config['backbone']}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), "
            f"{len(wrong)} mis-shaped (e.g. {wrong[:2]})"
        )
    student.encoder.load_state_dict(features, strict=True)
    if ignored:
        log.info("%s: loaded %d feature tensors; ignored %d classifier tensors (the student has its own head)",
                 path, len(features), len(ignored))
    return {"pretrained": True, "file": str(path), "ignored_keys": len(ignored)}


def init_audio_student(cfg: dict[str, Any], pretrained: str | Path | None) -> tuple[AudioStudent, bool]:
    """Student from `cfg`, with EfficientAT weights when the file exists; otherwise random init
    (logged as a warning). Returns (student, pretrained?)."""
    student = build_audio_student(cfg)
    if pretrained and Path(pretrained).is_file():
        load_pretrained_encoder(student, pretrained)
        log.info("audio student %s starts from pretrained weights %s", cfg.get("backbone"), pretrained)
        return student, True
    if pretrained:
        log.warning("pretrained weights %s not found (fetch them with `student-clap weights fetch %s`); "
                    "the student starts from random init", pretrained, cfg.get("backbone"))
    else:
        log.warning("no pretrained weights configured: the audio student starts from random init")
    return student, False


def save_audio_student(path: str | Path, student: AudioStudent, metrics: dict[str, Any] | None = None) -> None:
    """Write the {"state_dict", "config", "metrics"} file atomically."""
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        "config": dict(student.config),
        "metrics": dict(metrics or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_audio_student(path: str | Path, map_location: str = "cpu") -> AudioStudent:
    """Read models/audio/student.pt (eval mode). A skipped student file raises a clear error."""
    path = Path(path)
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a dict with state_dict/config/metrics")
    if payload.get("skipped"):
        raise ValueError(f"{path}: the audio student was skipped (distillation.audio_enabled: false)")
    for key in ("state_dict", "config"):
        if key not in payload:
            raise ValueError(f"{path}: missing {key!r}; not a student file")
    student = build_audio_student(payload["config"])
    student.load_state_dict(payload["state_dict"], strict=True)
    return student.eval()
