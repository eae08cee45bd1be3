"""The text student: a ~1M-parameter transformer encoder into the 512-d CLAP space (docs/students.md).

It takes ``input_ids`` and ``attention_mask`` (int64 [B, L], from student_clap.tokenizer.encode),
ends in an output calibration (`TextStudent.calibrate`) and exports to ONNX with a dynamic batch and length.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.params import TextStudentModelParams
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TextStudentConfig(TextStudentModelParams):
    """The params' model fields (distill_text.model) and what is fixed by the space and the tokenizer."""

    out_dim: int = EMBED_DIM
    pad_id: int = 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> TextStudentConfig:
        fields = dataclasses.fields(cls)
        unknown = sorted(set(cfg) - {f.name for f in fields})
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in cfg]
        if unknown or missing:
            raise ValueError(f"text student config: unknown key(s) {unknown}, missing key(s) {missing}")
        return cls(**cfg)


class EncoderBlock(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + MLP(LN(x)).

    Written out instead of nn.TransformerEncoderLayer, whose inference fast path
    (aten::_transformer_encoder_layer_fwd) has no ONNX export.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout_p = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; attn_bias [B, 1, 1, L] additive (0 for tokens, very negative for padding)."""
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.dropout_p if self.training else 0.0
        )
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, n, -1)))
        return x + self.dropout(self.ff(self.norm2(x)))


class TextStudent(nn.Module):
    """forward(input_ids [B, L] int64, attention_mask [B, L] int64) -> [B, 512] L2-normalised."""

    def __init__(self, config: TextStudentConfig) -> None:
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"text student: dim {config.dim} is not divisible by heads {config.heads}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_id)
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(config.dim, config.heads, config.ff_dim, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.projection = nn.Linear(config.dim, config.out_dim)
        # Output calibration, identity until `calibrate()`: out = L2(anchor + scale * (L2(raw) - anchor)).
        # A student trained on centred targets gets the direction of each query's offset from the
        # mean teacher embedding right but not its length; one fitted scale restores it.
        self.register_buffer("anchor", torch.zeros(config.out_dim))
        self.register_buffer("anchor_scale", torch.ones(()))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.token_embedding.weight[config.pad_id].zero_()

    def embed_raw(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projection output before L2 normalisation, [B, out_dim]."""
        length = input_ids.shape[1]
        if not torch.jit.is_tracing() and length > self.config.max_length:
            raise ValueError(
                f"text student: sequence length {length} > max_length {self.config.max_length} "
                "(encode() truncates to max_length)"
            )
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        mask = attention_mask.to(x.dtype)
        # additive bias rather than a bool mask: exports cleanly, and a finite value keeps an
        # all-padding row (never produced by encode) from turning into NaN
        attn_bias = ((1.0 - mask) * -1e4)[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_bias)
        x = self.norm(x)
        weights = mask.unsqueeze(-1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.projection(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(self.embed_raw(input_ids, attention_mask), dim=-1)
        return F.normalize(self.anchor + self.anchor_scale * (unit - self.anchor), dim=-1)

    @torch.no_grad()
    def calibrate(self, anchor: torch.Tensor, scale: float) -> None:
        """Set the output calibration (see __init__); anchor = mean teacher embedding."""
        self.anchor.copy_(torch.as_tensor(anchor, dtype=self.anchor.dtype).reshape(-1))
        self.anchor_scale.fill_(float(scale))

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_text_student(cfg: dict[str, Any] | TextStudentConfig) -> TextStudent:
    """Build from a config dict (the `config` entry of student.pt, or params distill_text.model)."""
    config = cfg if isinstance(cfg, TextStudentConfig) else TextStudentConfig.from_dict(dict(cfg))
    model = TextStudent(config)
    log.info("text student: %s parameters (%s)", f"{model.count_parameters():,}", dataclasses.asdict(config))
    return model


def save_text_student(model: TextStudent, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write {"state_dict", "config", "metrics"} atomically; loadable with weights_only=True."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(
            {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": dataclasses.asdict(model.config),
                "metrics": metrics or {},
            },
            tmp,
        )
    return path


def load_text_student(path: str | Path) -> TextStudent:
    """Load models/text/student.pt (strictly) in eval mode; clear errors for skipped/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text student checkpoint not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read text student checkpoint: {exc}") from exc
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(blob).__name__}")
    if blob.get("skipped"):
        raise ValueError(f"{path}: the text student was skipped (distillation.text_enabled is false)")
    if "state_dict" not in blob or "config" not in blob:
        raise ValueError(f"{path}: checkpoint lacks 'state_dict' or 'config'")
    model = TextStudent(TextStudentConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.eval()


ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUT = "embedding"


def export_text_onnx(model: TextStudent, path: str | Path, opset: int = 17) -> Path:
    """ONNX with inputs input_ids/attention_mask (int64 [batch, length]) and output embedding [batch, 512].

    The example batch holds a padded row, so the traced graph contains the masked path.
    """
    from pipeline.models.onnx_export import export_module

    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]], dtype=torch.int64) % model.config.vocab_size
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
    return export_module(
        model.eval(),
        (ids, mask),
        path,
        input_names=ONNX_INPUTS,
        output_names=(ONNX_OUTPUT,),
        dynamic_axes={
            "input_ids": {0: "batch", 1: "length"},
            "attention_mask": {0: "batch", 1: "length"},
            ONNX_OUTPUT: {0: "batch"},
        },
        opset=opset,
    )
