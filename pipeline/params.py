"""Typed view of params.yaml.

Every knob of the pipeline is a field of one of the dataclasses below; each stage reads only
its own sections (the ones dvc.yaml declares for it). Unknown keys and values of the wrong type
are refused with the dotted path of the offending field, so a typo in `dvc exp run -S` fails at
once instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """params.yaml (or a -S override) holds a key or value the pipeline cannot use."""


# --------------------------------------------------------------------------- sections


@dataclass
class AudioParams:
    """Audio conventions shared by every stage that touches waveforms."""

    sample_rate: int = 48000  # decode rate; CLAP works at 48 kHz
    segment_seconds: float = 10.0
    hop_seconds: float = 5.0  # 50 % overlap


@dataclass
class TeacherFrontendParams:
    """CLAP HTSAT log-mel (laion_clap's torchlibrosa front-end)."""

    sample_rate: int = 48000
    n_fft: int = 1024
    hop_length: int = 480
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0


@dataclass
class StudentFrontendParams:
    """EfficientAT AugmentMelSTFT at inference (what the pretrained weights expect)."""

    sample_rate: int = 32000
    n_fft: int = 1024
    win_length: int = 800
    hop_length: int = 320
    n_mels: int = 128
    preemphasis: float = 0.97
    f_min: float = 0.0
    f_max: float = 15000.0


@dataclass
class FrontendParams:
    teacher: TeacherFrontendParams = field(default_factory=TeacherFrontendParams)
    student: StudentFrontendParams = field(default_factory=StudentFrontendParams)


@dataclass
class SourceParams:
    """One song source: the lists/metadata to read and where its audio lives."""

    lists: list[str] = field(default_factory=list)  # seed-format *_SONGS_LICENSE.md files
    metadata: list[str] = field(default_factory=list)  # native metadata (CSV/TSV/JSON)
    licenses_file: str = ""  # MTG-Jamendo audio_licenses.txt
    audio_root: str = ""
    download_base_url: str = ""  # where missing audio is fetched from when ingest.download


@dataclass
class LicensePolicyParams:
    allow_public_domain: bool = True
    allow_cc0: bool = True
    allow_by: bool = True
    allow_by_sa: bool = False
    allow_nc: bool = False
    allow_nd: bool = False
    allow_unknown: bool = False


@dataclass
class DownloadParams:
    concurrency: int = 4
    retries: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 30.0


@dataclass
class IngestParams:
    sources: dict[str, SourceParams] = field(default_factory=dict)
    policy: LicensePolicyParams = field(default_factory=LicensePolicyParams)
    val_ratio: float = 0.2
    split_salt: str = "student-clap"
    download: bool = False
    downloads: DownloadParams = field(default_factory=DownloadParams)


@dataclass
class MelsParams:
    workers: int = 2
    max_failure_ratio: float = 0.5
    compression: Literal["gzip", "lzf", "none"] = "gzip"  # HDF5 filter for the mels (+ byte shuffle)
    compression_level: int = 1  # gzip only; 1 is ~25 % faster than 4 for ~2 % more bytes on fp16 mels
    max_track_minutes: float = 0.0  # 0 = whole track


@dataclass
class DemoTrainParams:
    """How `student-clap demo teacher` trains the demo teacher (pipeline.teacher_demo)."""

    clips: int = 640  # synthetic 10-s training clips, every attribute combination equally often
    val_clips: int = 128  # held-out clips (other seeds) for the zero-shot accuracy it prints
    epochs: int = 25
    batch_size: int = 32
    lr: float = 0.003
    weight_decay: float = 0.01
    logit_scale: float = 14.3  # 1 / temperature of the contrastive loss (CLAP starts at 1 / 0.07)
    codec_share: float = 0.5  # share of clips sent through a low-bitrate MP3/Vorbis round trip
    seed: int = 0
    threads: int = 2  # torch CPU threads (0 = torch's default)


@dataclass
class DemoTeacherParams:
    """The offline demo teacher: its shape, where its trained weights are committed, how they were trained.

    source demo: the trained weights in weights_dir (checked against weights_sha256) are installed;
    source demo_random: a seeded random ClapModel of this shape is built instead."""

    seed: int = 0
    audio_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    audio_heads: list[int] = field(default_factory=lambda: [2, 4, 8])
    audio_patch_hidden: int = 32
    # HTSAT folds the 1001 x 64 mel into a 256 x 256 image cut into patches (4 x 4 in LAION's); 8 x 8
    # patches give a quarter of the tokens, which is what lets the demo teacher train on a CPU
    audio_patch_size: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 1000
    weights_dir: str = "data/demo/teacher"
    weights_sha256: str = "8c7842f685373715ec3daad4b703fd864bd30ab9876d2c6726818de59a7553cd"
    train: DemoTrainParams = field(default_factory=DemoTrainParams)


@dataclass
class TeacherModelParams:
    source: Literal["demo", "demo_random", "checkpoint"] = "demo"
    dir: str = "models/teacher"
    checkpoint: str = "models/teacher_src/music_audioset_epoch_15_esc_90.14.pt"
    checkpoint_url: str = (
        "https://huggingface.co/lukewys/laion_clap/resolve/main/music_audioset_epoch_15_esc_90.14.pt"
    )
    checkpoint_sha256: str = ""
    tokenizer_dir: str = "models/teacher_src/roberta-base"
    # where `student-clap teacher fetch` gets roberta-base's vocab.json, merges.txt, tokenizer.json, config.json
    tokenizer_url: str = "https://huggingface.co/FacebookAI/roberta-base/resolve/main"
    demo: DemoTeacherParams = field(default_factory=DemoTeacherParams)


@dataclass
class TextQueryParams:
    terms: str = "data/text/query_terms.json"
    n_train: int = 2000
    n_val: int = 200
    min_categories: int = 1
    max_categories: int = 4
    held_out_terms_per_category: int = 2
    seed: int = 0
    free_phrasings: list[str] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)


@dataclass
class TeacherParams:
    model: TeacherModelParams = field(default_factory=TeacherModelParams)
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["fp32", "bf16"] = "fp32"


@dataclass
class DistillationParams:
    audio_enabled: bool = True
    text_enabled: bool = True


@dataclass
class PlateauParams:
    mode: Literal["max", "min"] = "max"
    factor: float = 0.5
    patience: int = 3
    threshold: float = 1e-4
    min_lr: float = 1e-6


@dataclass
class AugmentParams:
    gain_db: float = 0.0  # +/- range of a random level change, 0 = off
    spec_masks: bool = False
    freq_mask: int = 16
    time_mask: int = 64
    mixup: float = 0.0  # mixup probability, 0 = off


@dataclass
class LossParams:
    kind: Literal["cosine", "mse", "mse_raw"] = "cosine"
    temperature: float = 1.0
    contrastive_weight: float = 0.0
    contrastive_logit_scale: float = 2.6592  # log(1/0.07), learnable only for contrastive


@dataclass
class DistillAudioParams:
    model: str = "mn04_as"
    pretrained: str = ""  # path to EfficientAT .pt, empty = random init
    dropout: float = 0.1
    epochs: int = 4
    stage2_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    stage2_lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    strategy: Literal["segments", "tracks", "both"] = "both"
    # tracks/both: segments drawn per track item and step (0 = all of the track's segments)
    segments_per_track: int = 4
    use_teacher_embedding_cache: bool = True
    loss: LossParams = field(default_factory=LossParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    scheduler: PlateauParams = field(default_factory=PlateauParams)
    # add -cos(student - mean, teacher - mean) to the loss (mean = mean train teacher embedding)
    centred_loss: bool = True
    # validation metric for ReduceLROnPlateau and the best checkpoint:
    # track_cosine[_centred] | segment_cosine[_centred]
    monitor: Literal["track_cosine", "track_cosine_centred", "segment_cosine", "segment_cosine_centred"] = (
        "track_cosine_centred"
    )
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    nproc: int = 1
    seed: int = 0


@dataclass
class TextStudentModelParams:
    vocab_size: int = 2000
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ff_dim: int = 512
    max_length: int = 32
    dropout: float = 0.1


@dataclass
class DistillTextParams:
    model: TextStudentModelParams = field(default_factory=TextStudentModelParams)
    epochs: int = 20
    stage2_epochs: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    stage2_lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    loss: LossParams = field(default_factory=LossParams)
    scheduler: PlateauParams = field(default_factory=PlateauParams)
    # compare student and teacher after subtracting the mean teacher train embedding: the
    # differences between queries are a small part of each CLAP text vector, a raw cosine
    # loss barely sees them
    centred_loss: bool = True
    # share of the training queries (whole term combinations) kept aside to drive the LR
    # schedule and pick the best epoch, so the held-out sets are never used for selection
    monitor_fraction: float = 0.1
    seed: int = 0


@dataclass
class EvaluateParams:
    top_k: int = 10
    batch_size: int = 16


@dataclass
class ExportParams:
    opset: int = 17
    quantize_int8: bool = True
    parity_min_cosine: float = 0.9999


@dataclass
class Params:
    audio: AudioParams = field(default_factory=AudioParams)
    frontend: FrontendParams = field(default_factory=FrontendParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    mels: MelsParams = field(default_factory=MelsParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    text_queries: TextQueryParams = field(default_factory=TextQueryParams)
    distillation: DistillationParams = field(default_factory=DistillationParams)
    distill_audio: DistillAudioParams = field(default_factory=DistillAudioParams)
    distill_text: DistillTextParams = field(default_factory=DistillTextParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)


# --------------------------------------------------------------------------- loading


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and build dataclasses; `where` names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(option, value, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    raise ParamsError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ParamsError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def params_from_dict(data: dict | None) -> Params:
    """Build validated Params from a parsed params.yaml mapping (missing keys take defaults)."""
    return _build(Params, data or {}, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the file and the dotted key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root or pass --params)")
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping")
    try:
        return params_from_dict(data)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def as_dict(obj: Any) -> dict:
    """Plain-dict copy of a params section, for provenance attributes and checkpoints."""
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- declared-params guard


class _Restricted:
    """Read-only view of a params object that lets a stage read only what dvc.yaml declares.

    DVC re-runs a stage only when a *declared* param changes, so a stage that quietly reads an
    undeclared one would go stale without anyone noticing. Reading it through this view fails loudly.
    """

    def __init__(self, obj: Any, prefix: str, allowed: tuple[str, ...], stage: str) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        path = f"{self._prefix}.{name}" if self._prefix else name
        if any(path == a or path.startswith(a + ".") for a in self._allowed):
            return value
        if any(a.startswith(path + ".") for a in self._allowed):
            return _Restricted(value, path, self._allowed, self._stage)
        raise ParamsError(
            f"stage {self._stage!r} reads params '{path}' but dvc.yaml does not declare it "
            f"(declared: {', '.join(self._allowed) or 'nothing'})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only inside a stage")

    def __repr__(self) -> str:
        return f"<params {self._prefix or '(root)'} restricted to {', '.join(self._allowed)}>"


def restrict(params: Params, allowed: list[str], stage: str) -> Params:
    """View of `params` through which `stage` can read only the dotted sections in `allowed`."""
    return typing.cast(Params, _Restricted(params, "", tuple(allowed), stage))


def declared_params(dvc_yaml: str | Path, stage: str) -> list[str] | None:
    """The params dvc.yaml declares for `stage` (None when the file or the stage is absent)."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return None
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    stage_spec = (spec.get("stages") or {}).get(stage)
    if stage_spec is None:
        return None
    names: list[str] = []
    for entry in stage_spec.get("params") or []:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict):  # {other_params_file.yaml: [keys]}
            for keys in entry.values():
                names.extend(keys or [])
    return names
