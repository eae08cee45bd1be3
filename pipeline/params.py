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

    lists: list[str] = field(default_factory=list)  # *_SONGS_LICENSE.md song lists
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
    # a response larger than this is cut off and refused (a file of known size is capped at that size)
    max_megabytes: float = 1024.0


@dataclass(kw_only=True)
class IngestParams:
    sources: dict[str, SourceParams]  # no default: which corpora to read is always written down
    policy: LicensePolicyParams = field(default_factory=LicensePolicyParams)
    val_ratio: float = 0.25
    split_salt: str = "student-clap"
    download: bool = False
    downloads: DownloadParams = field(default_factory=DownloadParams)


@dataclass
class MelPrecisionParams:
    """Step the mel cache rounds each front-end's values to (0 = full float16). Measured with
    benchmarks/mel_precision.py: see docs/mel-cache.md."""

    teacher_db: float = 0.1  # CLAP log-mel, in dB
    student: float = 0.005  # EfficientAT normalised log-mel units ((ln(x + 1e-5) + 4.5) / 5)


@dataclass
class MelsParams:
    workers: int = 2
    max_failure_ratio: float = 0.5
    compression: Literal["gzip", "lzf", "none"] = "gzip"  # HDF5 filter for the mels (+ byte shuffle)
    compression_level: int = 1  # gzip only; 1 is ~25 % faster than 4 for ~2 % more bytes on fp16 mels
    max_track_minutes: float = 0.0  # 0 = whole track
    chunk_frames: int = 1024  # HDF5 chunk length in frames (per front-end; a segment spans ~1000)
    precision: MelPrecisionParams = field(default_factory=MelPrecisionParams)


@dataclass
class ClusterParams:
    """Where the per-song stages (mels, teacher) run (docs/cluster.md); their outputs do not depend on it."""

    ray_address: str = ""  # "" = here, without Ray; "auto" = RAY_ADDRESS / this machine's cluster / a new one
    tracks_per_task: int = 4  # mels: tracks per Ray task
    teacher_actors: int = 0  # teacher actors; 0 = one per GPU, or one per teacher_cpus CPUs without GPUs
    teacher_cpus: int = 1  # CPUs (torch threads) of a teacher actor on a cluster without GPUs


@dataclass
class DemoTrainParams:
    """How `student-clap demo teacher` trains the demo teacher (pipeline.teacher.demo)."""

    clips: int = 1280  # synthetic 10-s training clips, every attribute combination equally often
    val_clips: int = 128  # held-out clips (other seeds) for the zero-shot accuracy it prints
    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.003
    weight_decay: float = 0.01
    logit_scale: float = 14.3  # 1 / temperature of the contrastive loss (CLAP starts at 1 / 0.07)
    codec_share: float = 0.5  # share of clips sent through a low-bitrate MP3/Vorbis round trip
    seed: int = 0
    threads: int = 1  # torch CPU threads (0 = torch's default); the committed weights were trained with 1 (another count rounds sums differently)


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
    weights_sha256: str = "053134b89e71b4bbd07dbf753bb08d20a79100744109f6c750b608345dbb50d5"
    train: DemoTrainParams = field(default_factory=DemoTrainParams)


@dataclass
class HubFileParams:
    """A file in a Hugging Face Hub repository, at a pinned revision (a commit hash, so it cannot move)."""

    repo_id: str = ""
    filename: str = ""  # empty for a repository whose files are listed elsewhere (the tokenizer's)
    revision: str = ""


@dataclass
class TeacherModelParams:
    source: Literal["demo", "demo_random", "checkpoint"] = "demo"
    dir: str = "models/teacher"
    checkpoint: str = "models/teacher_src/music_audioset_epoch_15_esc_90.14.pt"
    # `teacher fetch` / the fetch_teacher stage get it from the Hub with huggingface_hub ...
    checkpoint_hub: HubFileParams = field(default_factory=lambda: HubFileParams(
        "lukewys/laion_clap", "music_audioset_epoch_15_esc_90.14.pt", "b3708341862f581175dba5c356a4ebf74a9b6651"))
    # ... or, when set, from this non-Hub URL (a mirror) with the project's downloader
    checkpoint_url: str = ""
    # the published LAION-CLAP music checkpoint (2 352 471 003 bytes)
    checkpoint_sha256: str = "fae3e9c087f2909c28a09dc31c8dfcdacbc42ba44c70e972b58c1bd1caf6dedd"
    tokenizer_dir: str = "models/teacher_src/roberta-base"
    tokenizer_hub: HubFileParams = field(default_factory=lambda: HubFileParams(
        "FacebookAI/roberta-base", "", "e2da8e2f811d1448a5b465c236feacd80ffbac7b"))
    tokenizer_url: str = ""  # a non-Hub base URL holding the tokenizer files instead
    tokenizer_sha256: dict[str, str] = field(default_factory=lambda: {
        "vocab.json": "9e7f63c2d15d666b52e21d250d2e513b87c9b713cfa6987a82ed89e5e6e50655",
        "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "tokenizer.json": "847bbeab6174d66a88898f729d52fa8d355fafe1bea101cf960dd404581df70e",
        "config.json": "ef0185e2aae6e06c5f105a285006952c340e20c7dbf43c86ec82601b13fc45e9",
    })
    # accept fetched files without a pinned sha256 or with another one (recorded as trusted)
    trust_unverified: bool = False
    demo: DemoTeacherParams = field(default_factory=DemoTeacherParams)


@dataclass(kw_only=True)
class TextQueryParams:
    terms: str = "data/demo/query_terms.json"
    n_train: int = 2000
    n_val: int = 200
    min_categories: int = 1
    max_categories: int = 4
    held_out_terms_per_category: int = 2
    single_terms: bool = True  # also train on every seen term alone, in each case form
    seed: int = 0
    free_phrasings: list[str]  # no default: the held-out phrasings and prompts live in params.yaml only
    eval_prompts: list[str]


@dataclass
class TeacherParams:
    model: TeacherModelParams = field(default_factory=TeacherModelParams)
    batch_size: int = 8  # segments per forward pass on CPU
    cuda_batch_size: int = 256  # segments per forward pass on CUDA
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


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
    gain_db: float = 6.0  # +/- range of a random level change, 0 = off
    spec_masks: bool = False
    freq_mask: int = 16
    time_mask: int = 64
    mixup: float = 0.0  # mixup probability, 0 = off
    # the student's input only (the cached teacher target stays the clean segment's):
    eq_tilt_db: float = 0.0  # +/- dB of a random spectral tilt across the band, 0 = off
    noise_snr_db: float = 0.0  # a noise floor this many dB (up to +20) below the row's mean power, 0 = off
    time_shift_frames: int = 0  # +/- frames of a random shift (edge frames repeated), 0 = off


@dataclass
class LossParams:
    kind: Literal["cosine", "mse", "mse_raw"] = "cosine"
    temperature: float = 1.0
    contrastive_weight: float = 0.0
    contrastive_logit_scale: float = 2.6592  # log(1/0.07), learnable only for contrastive
    # similarity-preserving term: the batch's student-student cosine matrix against the teacher's
    relational_weight: float = 0.0


@dataclass
class DistillAudioParams:
    model: str = "mn04_as"
    pretrained: str = ""  # path to EfficientAT .pt, empty = random init
    dropout: float = 0.1
    epochs: int = 30
    stage2_epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-3
    stage2_lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    strategy: Literal["segments", "tracks", "both"] = "segments"
    # tracks/both: segments drawn per track item and step (0 = all of the track's segments)
    segments_per_track: int = 4
    use_teacher_embedding_cache: bool = True
    loss: LossParams = field(default_factory=lambda: LossParams(contrastive_weight=1.0, relational_weight=1.0))
    augment: AugmentParams = field(default_factory=AugmentParams)
    scheduler: PlateauParams = field(default_factory=lambda: PlateauParams(patience=6))  # 9 demo val tracks: a noisy monitor
    # add -cos(student - mean, teacher - mean) to the loss (mean = mean train teacher embedding)
    centred_loss: bool = True
    # validation metric for ReduceLROnPlateau and the best checkpoint: track_cosine[_centred] |
    # segment_cosine[_centred] | track_top5_overlap | track_neighbour_spearman (the last two need
    # at least 3 validation tracks)
    monitor: Literal["track_cosine", "track_cosine_centred", "segment_cosine", "segment_cosine_centred",
                     "track_top5_overlap", "track_neighbour_spearman"] = "track_cosine_centred"
    # after training, fit the output-bias length on held-out (validation) tracks, kept only where it
    # lowers neither their neighbour rankings nor their centred cosine
    calibrate: bool = False
    calibration_segments: int = 1024  # held-out segments (spread over tracks) the fit sees
    max_train_tracks: int = 0  # train on this many training tracks (a fixed subset), 0 = all
    threads: int = 1  # torch CPU threads for training (0 = torch's default)
    device: str = "auto"  # auto | cpu | cuda
    # DataLoader worker processes per rank; "auto": none when the mels are held in memory,
    # else the CPUs per rank minus one, 1..8
    num_workers: int | Literal["auto"] = "auto"
    # train/val mels are held in memory (float16) up to this many GiB per rank, else streamed
    # from data/mels.h5; "auto": half the available memory, shared by the ranks
    in_memory_gb: float | Literal["auto"] = "auto"
    # per-epoch validation: every validation track, at most this many segments (evenly spaced
    # within each track); the whole split is scored once after training
    val_max_segments: int = 2048
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA; CPU always trains in fp32
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the student for training
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
    epochs: int = 12
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
    # training queries (evenly spaced) on which the output anchor scale is fitted after training
    calibration_queries: int = 2000
    threads: int = 1  # torch CPU threads for training (0 = torch's default)
    seed: int = 0


@dataclass
class SameSpaceParams:
    """The bar for "the student stands in for its teacher" (an independent check's thresholds)."""

    min_median_cosine: float = 0.98
    min_top5_overlap: float = 0.9
    # a bar the mean embedding cannot pass: it scores exactly 0 centred, however high its raw cosine
    min_median_centred_cosine: float = 0.9


@dataclass
class EvaluateParams:
    top_k: int = 10
    batch_size: int = 16
    same_space: SameSpaceParams = field(default_factory=SameSpaceParams)


@dataclass
class ExportParams:
    opset: int = 17
    quantize_int8: bool = True
    parity_min_cosine: float = 0.9999
    int8_calibration_segments: int = 64  # training mels for the static int8 calibration (and as many held out)


class MissingSection:
    """Stands in for a section that params.yaml lacks and that has no defaults of its own: reading
    from it fails naming the section, so nothing runs on values nobody wrote down."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        raise ParamsError(f"{self._name}.{key}: the {self._name} section is missing from params.yaml")

    def __repr__(self) -> str:
        return f"<missing params section {self._name}>"


def _missing(name: str) -> Any:
    return field(default_factory=lambda: MissingSection(name))


@dataclass
class Params:
    audio: AudioParams = field(default_factory=AudioParams)
    frontend: FrontendParams = field(default_factory=FrontendParams)
    ingest: IngestParams = _missing("ingest")
    mels: MelsParams = field(default_factory=MelsParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    text_queries: TextQueryParams = _missing("text_queries")
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
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if required:
        prefix = f"{where}." if where else ""
        raise ParamsError(f"missing key(s) {', '.join(prefix + k for k in required)}: params.yaml must set them")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def params_from_dict(data: dict | None) -> Params:
    """Build validated Params from a parsed params.yaml mapping (missing keys take defaults).

    Types, then ranges and relations (RANGES, RELATIONS below): every problem is reported with
    its dotted name, e.g. `distill_audio.epochs: must be >= 1, got -1`.
    """
    params = _build(Params, data or {}, "")
    problems = check_ranges(params)
    if problems:
        raise ParamsError("\n".join(problems))
    return params


def missing_sections(data: dict | None, names: typing.Iterable[str]) -> list[str]:
    """The dotted names (e.g. 'distill_audio', 'teacher.model') absent from a parsed params mapping."""
    missing = []
    for name in names:
        node: Any = data or {}
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(name)
                break
            node = node[part]
    return missing


def load_params(path: str | Path = "params.yaml", require: typing.Iterable[str] = ()) -> Params:
    """Read and validate params.yaml; errors name the file and the dotted key.

    `require`: dotted sections that must be written in the file (a stage's declared params), so a
    missing section is an error instead of a silent fall-back to the defaults.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the project root or pass --params)")
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping")
    absent = missing_sections(data, require)
    if absent:
        raise ParamsError(
            f"{path}: missing section(s) {', '.join(absent)} (the defaults are not used silently; "
            "copy them from the project's params.yaml)"
        )
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


# --------------------------------------------------------------------------- ranges and relations


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

# (section class, field) -> allowed range; a class used in several places (LossParams under both
# students) is checked wherever it appears. New numeric knobs: add a line here.
RANGES: dict[tuple[type, str], Range] = {
    (AudioParams, "sample_rate"): AT_LEAST_1,
    (AudioParams, "segment_seconds"): POSITIVE,
    (AudioParams, "hop_seconds"): POSITIVE,
    (TeacherFrontendParams, "sample_rate"): AT_LEAST_1,
    (TeacherFrontendParams, "n_fft"): AT_LEAST_1,
    (TeacherFrontendParams, "hop_length"): AT_LEAST_1,
    (TeacherFrontendParams, "n_mels"): AT_LEAST_1,
    (TeacherFrontendParams, "f_min"): NON_NEGATIVE,
    (StudentFrontendParams, "sample_rate"): AT_LEAST_1,
    (StudentFrontendParams, "n_fft"): AT_LEAST_1,
    (StudentFrontendParams, "win_length"): AT_LEAST_1,
    (StudentFrontendParams, "hop_length"): AT_LEAST_1,
    (StudentFrontendParams, "n_mels"): AT_LEAST_1,
    (StudentFrontendParams, "preemphasis"): FRACTION,
    (StudentFrontendParams, "f_min"): NON_NEGATIVE,
    (DownloadParams, "concurrency"): AT_LEAST_1,
    (DownloadParams, "retries"): NON_NEGATIVE,
    (DownloadParams, "backoff_seconds"): NON_NEGATIVE,
    (DownloadParams, "timeout_seconds"): POSITIVE,
    (DownloadParams, "max_megabytes"): POSITIVE,
    (IngestParams, "val_ratio"): FRACTION,
    (MelsParams, "workers"): NON_NEGATIVE,
    (MelsParams, "max_failure_ratio"): PROBABILITY,
    (MelsParams, "compression_level"): Range(0, 9),
    (MelsParams, "max_track_minutes"): NON_NEGATIVE,
    (ClusterParams, "tracks_per_task"): AT_LEAST_1,
    (ClusterParams, "teacher_actors"): NON_NEGATIVE,
    (ClusterParams, "teacher_cpus"): AT_LEAST_1,
    (MelPrecisionParams, "teacher_db"): Range(0, 1),
    (MelPrecisionParams, "student"): Range(0, 0.1),
    (DemoTeacherParams, "audio_patch_hidden"): AT_LEAST_1,
    (DemoTeacherParams, "text_hidden"): AT_LEAST_1,
    (DemoTeacherParams, "text_layers"): AT_LEAST_1,
    (DemoTeacherParams, "text_heads"): AT_LEAST_1,
    (DemoTeacherParams, "text_intermediate"): AT_LEAST_1,
    (DemoTeacherParams, "vocab_size"): Range(10),
    (TeacherParams, "batch_size"): AT_LEAST_1,
    (TextQueryParams, "n_train"): AT_LEAST_1,
    (TextQueryParams, "n_val"): NON_NEGATIVE,
    (TextQueryParams, "min_categories"): AT_LEAST_1,
    (TextQueryParams, "max_categories"): AT_LEAST_1,
    (TextQueryParams, "held_out_terms_per_category"): NON_NEGATIVE,
    (PlateauParams, "factor"): Range(0, 1, lo_open=True, hi_open=True),
    (PlateauParams, "patience"): NON_NEGATIVE,
    (PlateauParams, "threshold"): NON_NEGATIVE,
    (PlateauParams, "min_lr"): NON_NEGATIVE,
    (AugmentParams, "gain_db"): NON_NEGATIVE,
    (AugmentParams, "freq_mask"): NON_NEGATIVE,
    (AugmentParams, "time_mask"): NON_NEGATIVE,
    (AugmentParams, "mixup"): PROBABILITY,
    (AugmentParams, "eq_tilt_db"): NON_NEGATIVE,
    (AugmentParams, "noise_snr_db"): NON_NEGATIVE,
    (AugmentParams, "time_shift_frames"): NON_NEGATIVE,
    (LossParams, "relational_weight"): NON_NEGATIVE,
    (LossParams, "temperature"): POSITIVE,
    (LossParams, "contrastive_weight"): NON_NEGATIVE,
    (DistillAudioParams, "dropout"): FRACTION,
    (DistillAudioParams, "epochs"): AT_LEAST_1,
    (DistillAudioParams, "stage2_epochs"): NON_NEGATIVE,
    (DistillAudioParams, "batch_size"): AT_LEAST_1,
    (DistillAudioParams, "lr"): POSITIVE,
    (DistillAudioParams, "stage2_lr"): POSITIVE,
    (DistillAudioParams, "weight_decay"): NON_NEGATIVE,
    (DistillAudioParams, "grad_clip"): NON_NEGATIVE,
    (DistillAudioParams, "segments_per_track"): NON_NEGATIVE,
    (DistillAudioParams, "num_workers"): NON_NEGATIVE,
    (DistillAudioParams, "nproc"): AT_LEAST_1,
    (DistillAudioParams, "max_train_tracks"): NON_NEGATIVE,
    (DistillAudioParams, "threads"): NON_NEGATIVE,
    (DistillTextParams, "threads"): NON_NEGATIVE,
    (TextStudentModelParams, "vocab_size"): Range(10),
    (TextStudentModelParams, "dim"): AT_LEAST_1,
    (TextStudentModelParams, "layers"): AT_LEAST_1,
    (TextStudentModelParams, "heads"): AT_LEAST_1,
    (TextStudentModelParams, "ff_dim"): AT_LEAST_1,
    (TextStudentModelParams, "max_length"): Range(2),
    (TextStudentModelParams, "dropout"): FRACTION,
    (DistillTextParams, "epochs"): AT_LEAST_1,
    (DistillTextParams, "stage2_epochs"): NON_NEGATIVE,
    (DistillTextParams, "batch_size"): AT_LEAST_1,
    (DistillTextParams, "lr"): POSITIVE,
    (DistillTextParams, "stage2_lr"): POSITIVE,
    (DistillTextParams, "weight_decay"): NON_NEGATIVE,
    (DistillTextParams, "grad_clip"): NON_NEGATIVE,
    (DistillTextParams, "monitor_fraction"): FRACTION,
    (EvaluateParams, "top_k"): AT_LEAST_1,
    (EvaluateParams, "batch_size"): AT_LEAST_1,
    (ExportParams, "opset"): Range(11),
    (ExportParams, "parity_min_cosine"): Range(-1, 1),
}

# (section class, field named in the message, test, what it must satisfy) for rules between fields.
RELATIONS: list[tuple[type, str, typing.Callable[[Any], bool], typing.Callable[[Any], str]]] = [
    (AudioParams, "hop_seconds", lambda a: a.hop_seconds <= a.segment_seconds,
     lambda a: f"must be <= segment_seconds ({a.segment_seconds:g}), got {a.hop_seconds:g}"),
    (TeacherFrontendParams, "f_max", lambda f: f.f_min < f.f_max <= f.sample_rate / 2,
     lambda f: f"must be above f_min ({f.f_min:g}) and at most sample_rate / 2 ({f.sample_rate / 2:g}), got {f.f_max:g}"),
    (StudentFrontendParams, "f_max", lambda f: f.f_min < f.f_max <= f.sample_rate / 2,
     lambda f: f"must be above f_min ({f.f_min:g}) and at most sample_rate / 2 ({f.sample_rate / 2:g}), got {f.f_max:g}"),
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
    (TeacherModelParams, "checkpoint_sha256",
     lambda t: not t.checkpoint_sha256 or (len(t.checkpoint_sha256) == 64
                                           and all(c in "0123456789abcdefABCDEF" for c in t.checkpoint_sha256)),
     lambda t: f"must be empty or 64 hex digits, got {t.checkpoint_sha256!r}"),
]


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
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        rule = RANGES.get((cls, f.name))
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
