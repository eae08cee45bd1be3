"""Typed view of params.yaml.

Every knob of the pipeline is a field of one of the dataclasses below; each stage reads only
its own sections (the ones dvc.yaml declares for it). Unknown keys and values of the wrong type
are refused with the dotted path of the offending field, so a typo in `dvc exp run -S` fails at
once. The dataclasses hold types and ranges but no defaults: params.yaml is the one place a value
is written, and a key missing from it is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml


class ParamsError(ValueError):
    """params.yaml (or a -S override) holds a key or value the pipeline cannot use."""


# --------------------------------------------------------------------------- ranges
# A numeric field carries its allowed range in its type, `Annotated[int, AT_LEAST_1]`, checked at load
# wherever its section appears (LossParams under both students).


@dataclass(frozen=True)
class Range:
    """Allowed interval of a number: lo/hi None = unbounded; *_open excludes the bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: float) -> str | None:
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if not (lo_bad or hi_bad):
            return None
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"must be in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}"
        return f"must be {'<' if self.hi_open else '<='} {self.hi:g}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)
PROBABILITY = Range(0, 1)  # [0, 1]


# --------------------------------------------------------------------------- sections


@dataclass
class AudioParams:
    """Audio conventions shared by every stage that touches waveforms."""

    sample_rate: Annotated[int, AT_LEAST_1]  # decode rate; CLAP works at 48 kHz
    segment_seconds: Annotated[float, POSITIVE]
    hop_seconds: Annotated[float, POSITIVE]  # 50 % overlap


@dataclass
class TeacherFrontendParams:
    """CLAP HTSAT log-mel (laion_clap's torchlibrosa front-end)."""

    sample_rate: Annotated[int, AT_LEAST_1]
    n_fft: Annotated[int, AT_LEAST_1]
    hop_length: Annotated[int, AT_LEAST_1]
    n_mels: Annotated[int, AT_LEAST_1]
    f_min: Annotated[float, NON_NEGATIVE]
    f_max: float


@dataclass
class StudentFrontendParams:
    """EfficientAT AugmentMelSTFT at inference (what the pretrained weights expect)."""

    sample_rate: Annotated[int, AT_LEAST_1]
    n_fft: Annotated[int, AT_LEAST_1]
    win_length: Annotated[int, AT_LEAST_1]
    hop_length: Annotated[int, AT_LEAST_1]
    n_mels: Annotated[int, AT_LEAST_1]
    preemphasis: Annotated[float, FRACTION]
    f_min: Annotated[float, NON_NEGATIVE]
    f_max: float


@dataclass
class FrontendParams:
    teacher: TeacherFrontendParams
    student: StudentFrontendParams


@dataclass
class SourceParams:
    """One song source: the lists/metadata to read and where its audio lives."""

    lists: list[str]  # *_SONGS_LICENSE.md song lists
    metadata: list[str]  # native metadata (CSV/TSV/JSON)
    licenses_file: str  # MTG-Jamendo audio_licenses.txt
    audio_root: str
    download_base_url: str  # where missing audio is fetched from when ingest.download


@dataclass
class LicensePolicyParams:
    allow_public_domain: bool
    allow_cc0: bool
    allow_by: bool
    allow_by_sa: bool
    allow_nc: bool
    allow_nd: bool
    allow_unknown: bool


@dataclass
class DownloadParams:
    concurrency: Annotated[int, AT_LEAST_1]
    retries: Annotated[int, NON_NEGATIVE]
    backoff_seconds: Annotated[float, NON_NEGATIVE]
    timeout_seconds: Annotated[float, POSITIVE]
    # a response larger than this is cut off and refused (a file of known size is capped at that size)
    max_megabytes: Annotated[float, POSITIVE]


@dataclass
class IngestParams:
    sources: dict[str, SourceParams]
    policy: LicensePolicyParams
    val_ratio: Annotated[float, FRACTION]
    split_salt: str
    download: bool
    downloads: DownloadParams


@dataclass
class MelPrecisionParams:
    """Step the mel cache rounds each front-end's values to (0 = full float16). Measured with
    benchmarks/mel_precision.py: see docs/mel-cache.md."""

    teacher_db: Annotated[float, Range(0, 1)]  # CLAP log-mel, in dB
    student: Annotated[float, Range(0, 0.1)]  # EfficientAT normalised log-mel units ((ln(x + 1e-5) + 4.5) / 5)


@dataclass
class MelsParams:
    workers: Annotated[int, NON_NEGATIVE]
    max_failure_ratio: Annotated[float, PROBABILITY]
    compression: Literal["gzip", "lzf", "none"]  # HDF5 filter for the mels (+ byte shuffle)
    compression_level: Annotated[int, Range(0, 9)]  # gzip only; 1 is ~25 % faster than 4 for ~2 % more bytes on fp16 mels
    max_track_minutes: Annotated[float, NON_NEGATIVE]  # 0 = whole track
    chunk_frames: int  # HDF5 chunk length in frames (per front-end; a segment spans ~1000)
    precision: MelPrecisionParams


@dataclass
class ClusterParams:
    """Where the per-song stages (mels, teacher) run (docs/cluster.md); their outputs do not depend on it."""

    ray_address: str  # "" = here, without Ray; "auto" = RAY_ADDRESS / this machine's cluster / a new one
    tracks_per_task: Annotated[int, AT_LEAST_1]  # mels: tracks per Ray task
    teacher_actors: Annotated[int, NON_NEGATIVE]  # teacher actors; 0 = one per GPU, or one per teacher_cpus CPUs without GPUs
    teacher_cpus: Annotated[int, AT_LEAST_1]  # CPUs (torch threads) of a teacher actor on a cluster without GPUs


@dataclass
class DemoTrainParams:
    """How `student-clap demo teacher` trains the demo teacher (pipeline.teacher.demo)."""

    clips: int  # synthetic 10-s training clips, every attribute combination equally often
    val_clips: int  # held-out clips (other seeds) for the zero-shot accuracy it prints
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    logit_scale: float  # 1 / temperature of the contrastive loss (CLAP starts at 1 / 0.07)
    codec_share: float  # share of clips sent through a low-bitrate MP3/Vorbis round trip
    seed: int
    threads: int  # torch CPU threads (0 = torch's default); the committed weights were trained with 1 (another count rounds sums differently)


@dataclass
class DemoTeacherParams:
    """The offline demo teacher: its shape, where its trained weights are committed, how they were trained.

    source demo: the trained weights in weights_dir (checked against weights_sha256) are installed;
    source demo_random: a seeded random ClapModel of this shape is built instead."""

    seed: int
    audio_depths: list[int]
    audio_heads: list[int]
    audio_patch_hidden: Annotated[int, AT_LEAST_1]
    # HTSAT folds the 1001 x 64 mel into a 256 x 256 image cut into patches (4 x 4 in LAION's); 8 x 8
    # patches give a quarter of the tokens, which is what lets the demo teacher train on a CPU
    audio_patch_size: int
    text_hidden: Annotated[int, AT_LEAST_1]
    text_layers: Annotated[int, AT_LEAST_1]
    text_heads: Annotated[int, AT_LEAST_1]
    text_intermediate: Annotated[int, AT_LEAST_1]
    vocab_size: Annotated[int, Range(10)]
    weights_dir: str
    weights_sha256: str
    train: DemoTrainParams


@dataclass
class HubFileParams:
    """A file in a Hugging Face Hub repository, at a pinned revision (a commit hash, so it cannot move)."""

    repo_id: str
    filename: str  # empty for a repository whose files are listed elsewhere (the tokenizer's)
    revision: str


@dataclass
class TeacherModelParams:
    source: Literal["demo", "demo_random", "checkpoint"]
    dir: str
    checkpoint: str
    # `teacher fetch` / the fetch_teacher stage get it from the Hub with huggingface_hub ...
    checkpoint_hub: HubFileParams
    # ... or, when set, from this non-Hub URL (a mirror) with the project's downloader
    checkpoint_url: str
    # the published LAION-CLAP music checkpoint (2 352 471 003 bytes)
    checkpoint_sha256: str
    tokenizer_dir: str
    tokenizer_hub: HubFileParams
    tokenizer_url: str  # a non-Hub base URL holding the tokenizer files instead
    tokenizer_sha256: dict[str, str]
    # accept fetched files without a pinned sha256 or with another one (recorded as trusted)
    trust_unverified: bool
    demo: DemoTeacherParams


@dataclass
class TextQueryParams:
    terms: str
    n_train: Annotated[int, AT_LEAST_1]
    n_val: Annotated[int, NON_NEGATIVE]
    min_categories: Annotated[int, AT_LEAST_1]
    max_categories: Annotated[int, AT_LEAST_1]
    held_out_terms_per_category: Annotated[int, NON_NEGATIVE]
    single_terms: bool  # also train on every seen term alone, in each case form
    seed: int
    free_phrasings: list[str]  # held-out phrasings
    eval_prompts: list[str]


@dataclass
class TeacherParams:
    model: TeacherModelParams
    batch_size: Annotated[int, AT_LEAST_1]  # segments per forward pass on CPU
    cuda_batch_size: int  # segments per forward pass on CUDA
    device: str  # auto | cpu | cuda
    dtype: Literal["auto", "fp32", "bf16"]  # auto: bf16 on CUDA, fp32 on CPU


@dataclass
class DistillationParams:
    audio_enabled: bool
    text_enabled: bool


@dataclass
class PlateauParams:
    mode: Literal["max", "min"]
    factor: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]
    patience: Annotated[int, NON_NEGATIVE]
    threshold: Annotated[float, NON_NEGATIVE]
    min_lr: Annotated[float, NON_NEGATIVE]


@dataclass
class AugmentParams:
    gain_db: Annotated[float, NON_NEGATIVE]  # +/- range of a random level change, 0 = off
    spec_masks: bool
    freq_mask: Annotated[int, NON_NEGATIVE]
    time_mask: Annotated[int, NON_NEGATIVE]
    mixup: Annotated[float, PROBABILITY]  # mixup probability, 0 = off
    # the student's input only (the cached teacher target stays the clean segment's):
    eq_tilt_db: Annotated[float, NON_NEGATIVE]  # +/- dB of a random spectral tilt across the band, 0 = off
    noise_snr_db: Annotated[float, NON_NEGATIVE]  # a noise floor this many dB (up to +20) below the row's mean power, 0 = off
    time_shift_frames: Annotated[int, NON_NEGATIVE]  # +/- frames of a random shift (edge frames repeated), 0 = off


@dataclass
class LossParams:
    kind: Literal["cosine", "mse", "mse_raw"]
    temperature: Annotated[float, POSITIVE]
    contrastive_weight: Annotated[float, NON_NEGATIVE]
    contrastive_logit_scale: float  # log(1/0.07), learnable only for contrastive
    # similarity-preserving term: the batch's student-student cosine matrix against the teacher's
    relational_weight: Annotated[float, NON_NEGATIVE]
    # cosine after whitening by the training teacher segments' covariance (distill_audio only)
    whitened_weight: Annotated[float, NON_NEGATIVE]


@dataclass
class DistillAudioParams:
    model: str
    pretrained: str  # path to EfficientAT .pt, empty = random init
    dropout: Annotated[float, FRACTION]
    epochs: Annotated[int, AT_LEAST_1]
    stage2_epochs: Annotated[int, NON_NEGATIVE]
    batch_size: Annotated[int, AT_LEAST_1]
    lr: Annotated[float, POSITIVE]
    stage2_lr: Annotated[float, POSITIVE]
    weight_decay: Annotated[float, NON_NEGATIVE]
    grad_clip: Annotated[float, NON_NEGATIVE]
    strategy: Literal["segments", "tracks", "both"]
    # tracks/both: segments drawn per track item and step (0 = all of the track's segments)
    segments_per_track: Annotated[int, NON_NEGATIVE]
    use_teacher_embedding_cache: bool
    loss: LossParams
    augment: AugmentParams
    scheduler: PlateauParams
    # add -cos(student - mean, teacher - mean) to the loss (mean = mean train teacher embedding)
    centred_loss: bool
    # validation metric for ReduceLROnPlateau and the best checkpoint: track_cosine[_centred] |
    # segment_cosine[_centred] | track_top5_overlap | track_neighbour_spearman (the last two need
    # at least 3 validation tracks)
    monitor: Literal["track_cosine", "track_cosine_centred", "segment_cosine", "segment_cosine_centred",
                     "track_top5_overlap", "track_neighbour_spearman"]
    # after training, fit the output-bias length on held-out (validation) tracks, kept only where it
    # lowers neither their neighbour rankings nor their centred cosine
    calibrate: bool
    calibration_segments: int  # held-out segments (spread over tracks) the fit sees
    max_train_tracks: Annotated[int, NON_NEGATIVE]  # train on this many training tracks (a fixed subset), 0 = all
    threads: Annotated[int, NON_NEGATIVE]  # torch CPU threads for training (0 = torch's default)
    device: str  # auto | cpu | cuda
    # DataLoader worker processes per rank; "auto": none when the mels are held in memory,
    # else the CPUs per rank minus one, 1..8
    num_workers: Annotated[int | Literal["auto"], NON_NEGATIVE]
    # train/val mels are held in memory (float16) up to this many GiB per rank, else streamed
    # from data/mels.h5; "auto": half the available memory, shared by the ranks
    in_memory_gb: float | Literal["auto"]
    # per-epoch validation: every validation track, at most this many segments (evenly spaced
    # within each track); the whole split is scored once after training
    val_max_segments: int
    precision: Literal["bf16", "fp32"]  # bf16 autocast on CUDA; CPU always trains in fp32
    channels_last: bool  # CUDA only
    compile: bool  # torch.compile the student for training
    nproc: Annotated[int, AT_LEAST_1]
    seed: int


@dataclass
class TextStudentModelParams:
    vocab_size: Annotated[int, Range(10)]
    dim: Annotated[int, AT_LEAST_1]
    layers: Annotated[int, AT_LEAST_1]
    heads: Annotated[int, AT_LEAST_1]
    ff_dim: Annotated[int, AT_LEAST_1]
    max_length: Annotated[int, Range(2)]
    dropout: Annotated[float, FRACTION]


@dataclass
class DistillTextParams:
    model: TextStudentModelParams
    epochs: Annotated[int, AT_LEAST_1]
    stage2_epochs: Annotated[int, NON_NEGATIVE]
    batch_size: Annotated[int, AT_LEAST_1]
    lr: Annotated[float, POSITIVE]
    stage2_lr: Annotated[float, POSITIVE]
    weight_decay: Annotated[float, NON_NEGATIVE]
    grad_clip: Annotated[float, NON_NEGATIVE]
    loss: LossParams
    scheduler: PlateauParams
    # compare student and teacher after subtracting the mean teacher train embedding: the
    # differences between queries are a small part of each CLAP text vector, a raw cosine
    # loss barely sees them
    centred_loss: bool
    # share of the training queries (whole term combinations) kept aside to drive the LR
    # schedule and pick the best epoch, so the held-out sets are never used for selection
    monitor_fraction: Annotated[float, FRACTION]
    # training queries (evenly spaced) on which the output anchor scale is fitted after training
    calibration_queries: int
    threads: Annotated[int, NON_NEGATIVE]  # torch CPU threads for training (0 = torch's default)
    seed: int


@dataclass
class SameSpaceParams:
    """The bar for "the student stands in for its teacher" (an independent check's thresholds)."""

    min_median_cosine: float
    min_top5_overlap: float
    # a bar the mean embedding cannot pass: it scores exactly 0 centred, however high its raw cosine
    min_median_centred_cosine: float


@dataclass
class EvaluateParams:
    top_k: Annotated[int, AT_LEAST_1]
    batch_size: Annotated[int, AT_LEAST_1]
    same_space: SameSpaceParams


@dataclass
class ExportParams:
    opset: Annotated[int, Range(11)]
    quantize_int8: bool
    parity_min_cosine: Annotated[float, Range(-1, 1)]
    int8_calibration_segments: int  # training mels for the static int8 calibration (and as many held out)


@dataclass
class Params:
    audio: AudioParams
    frontend: FrontendParams
    ingest: IngestParams
    mels: MelsParams
    cluster: ClusterParams
    teacher: TeacherParams
    text_queries: TextQueryParams
    distillation: DistillationParams
    distill_audio: DistillAudioParams
    distill_text: DistillTextParams
    evaluate: EvaluateParams
    export: ExportParams


# --------------------------------------------------------------------------- loading


# scalar annotation -> (the types a value may have, what a message says was expected); a bool is not a number
_SCALARS = {bool: ((bool,), "true/false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
            str: ((str,), "a string")}


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
    if tp in _SCALARS:
        accepted, expected = _SCALARS[tp]
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise ParamsError(f"{where}: expected {expected}, got {value!r}")
        return float(value) if tp is float else value
    raise ParamsError(f"{where}: unsupported annotation {tp!r}")  # a bug in this module


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ParamsError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys here: {', '.join(sorted(names))}")
    required = [name for name in names if name not in data]
    if required:
        raise ParamsError(f"missing key(s) {', '.join(prefix + k for k in required)}: params.yaml sets every "
                         "key (there are no defaults in code; copy it from the project's params.yaml)")
    return cls(**{key: _convert(hints[key], value, prefix + key) for key, value in data.items()})


def section_from_dict(cls: type, data: dict, where: str) -> Any:
    """One section (`cls`) from a plain mapping holding every key, e.g. a policy a stage recorded;
    problems name `where`."""
    section = _convert(cls, data, where)
    problems = check_ranges(section, where)
    if problems:
        raise ParamsError("\n".join(problems))
    return section


def params_from_dict(data: dict | None) -> Params:
    """Build validated Params from a parsed params.yaml mapping (every key must be there).

    Types, then ranges (each numeric field's `Annotated` Range) and RELATIONS: every problem is reported with
    its dotted name, e.g. `distill_audio.epochs: must be >= 1, got -1`.
    """
    return section_from_dict(Params, data or {}, "")


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


# --------------------------------------------------------------------------- declared-params guard


class _Restricted:
    """Read-only view of a params object that lets a stage read only what dvc.yaml declares.

    DVC re-runs a stage only when a *declared* param changes, so a stage that quietly reads an
    undeclared one would go stale without anyone noticing. Reading it through this view fails loudly.
    """

    def __init__(self, obj: Any, prefix: str, allowed: tuple[str, ...], stage: str) -> None:
        vars(self).update(_obj=obj, _prefix=prefix, _allowed=allowed, _stage=stage)  # __setattr__ refuses

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


# --------------------------------------------------------------------------- relations


# (section class, field named in the message, test, what it must satisfy) for rules between fields.
RELATIONS: list[tuple[type, str, typing.Callable[[Any], bool], typing.Callable[[Any], str]]] = [
    (AudioParams, "hop_seconds", lambda a: a.hop_seconds <= a.segment_seconds,
     lambda a: f"must be <= segment_seconds ({a.segment_seconds:g}), got {a.hop_seconds:g}"),
    *[(cls, "f_max", lambda f: f.f_min < f.f_max <= f.sample_rate / 2,
       lambda f: f"must be above f_min ({f.f_min:g}) and at most sample_rate / 2 ({f.sample_rate / 2:g}), got {f.f_max:g}")
      for cls in (TeacherFrontendParams, StudentFrontendParams)],
    (StudentFrontendParams, "win_length", lambda f: f.win_length <= f.n_fft,
     lambda f: f"must be <= n_fft ({f.n_fft}), got {f.win_length}"),
    # int16 codes: CLAP dB values lie in [-100, ~50], EfficientAT units in [-1.4, ~4]; finer steps overflow
    (MelPrecisionParams, "teacher_db", lambda m: m.teacher_db == 0 or m.teacher_db >= 0.01,
     lambda m: f"must be 0 (full float16) or >= 0.01 dB, got {m.teacher_db:g}"),
    (MelPrecisionParams, "student", lambda m: m.student == 0 or m.student >= 0.001,
     lambda m: f"must be 0 (full float16) or >= 0.001, got {m.student:g}"),
    (TextQueryParams, "max_categories", lambda q: q.max_categories >= q.min_categories,
     lambda q: f"must be >= min_categories ({q.min_categories}), got {q.max_categories}"),
    (DemoTeacherParams, "audio_heads", lambda d: len(d.audio_heads) == len(d.audio_depths),
     lambda d: f"must have one entry per audio_depths entry ({len(d.audio_depths)}), got {len(d.audio_heads)}"),
    (TextStudentModelParams, "heads", lambda m: m.dim % m.heads == 0 if m.heads >= 1 else True,
     lambda m: f"must divide dim ({m.dim}), got {m.heads}"),
    (DistillTextParams, "loss", lambda t: t.loss.whitened_weight == 0,
     lambda t: f"whitened_weight must be 0 (the whitened term is distill_audio's), got {t.loss.whitened_weight:g}"),
    (TeacherModelParams, "checkpoint_sha256",
     lambda t: not t.checkpoint_sha256 or (len(t.checkpoint_sha256) == 64
                                           and all(c in "0123456789abcdefABCDEF" for c in t.checkpoint_sha256)),
     lambda t: f"must be empty or 64 hex digits, got {t.checkpoint_sha256!r}"),
]


def range_of(hint: Any) -> Range | None:
    """The Range a field's `Annotated[type, Range(...)]` hint carries, if any."""
    return next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)), None)


def check_ranges(obj: Any, where: str = "") -> list[str]:
    """Every range or relation `obj` (Params or any section) breaks, as 'dotted.name: problem' lines."""
    problems: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            problems += check_ranges(value, f"{where}.{key}" if where else str(key))
        return problems
    if not dataclasses.is_dataclass(obj):
        return problems
    cls = type(obj)
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        rule = range_of(hints[f.name])
        if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            why = rule.problem(value)
            if why:
                problems.append(f"{prefix}{f.name}: {why}, got {value!r}")
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            problems += check_ranges(value, prefix + f.name)
    if not problems:  # relations assume each field is in range on its own
        for rel_cls, name, ok, message in RELATIONS:
            if rel_cls is cls and not ok(obj):
                problems.append(f"{prefix}{name}: {message(obj)}")
    return problems
