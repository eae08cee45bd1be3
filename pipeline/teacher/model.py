"""The CLAP teacher: load it from models/teacher/, embed cached log-mels and text.

The teacher runs on the `transformers` ClapModel (HTSAT audio tower + RoBERTa text tower).
A teacher folder holds, whether it was converted from the LAION checkpoint
(pipeline.teacher.convert) or built as the seeded random demo (build_demo_teacher):

    config.json            ClapConfig
    model.safetensors      weights
    tokenizer.json         byte-level BPE tokenizer (RoBERTa special tokens and post-processor)
    tokenizer_config.json  special tokens and max length, for tools that read it
    teacher.json           provenance: kind, source, sha256 of the weights and of the source file
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.atomic import atomic_path
from pipeline.params import DemoTeacherParams, TeacherModelParams
from student_clap.files import sha256_file
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 77  # what laion_clap tokenises with
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa order: ids 0..4
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE has at least its byte alphabet
WEIGHTS = "model.safetensors"
PROVENANCE = "teacher.json"
TOKENIZER = "tokenizer.json"
MEL_FRAMES = 1001
MEL_BINS = 64


class TeacherError(RuntimeError):
    """A teacher folder is missing files or holds something unusable; the message names the file."""


# --------------------------------------------------------------------------- configs


def htsat_base_audio_config() -> dict:
    """ClapAudioConfig of LAION-CLAP's HTSAT-base tower (the music checkpoint's audio encoder)."""
    return dict(
        depths=[2, 2, 12, 2],
        num_attention_heads=[4, 8, 16, 32],
        patch_embeds_hidden_size=128,
        hidden_size=1024,  # patch_embeds_hidden_size * 2**(stages - 1)
        window_size=8,
        spec_size=256,
        num_mel_bins=MEL_BINS,
        enable_fusion=False,
        enable_patch_layer_norm=True,
        projection_hidden_act="relu",
    )


def roberta_base_text_config(vocab_size: int = 50265) -> dict:
    """ClapTextConfig matching roberta-base; CLAP's default layer_norm_eps (1e-12) is wrong for it."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        projection_hidden_act="relu",
    )


def clap_config(audio: dict, text: dict, projection_dim: int = EMBED_DIM):
    from transformers import ClapConfig

    return ClapConfig(
        audio_config=audio, text_config=text, projection_dim=projection_dim, projection_hidden_act="relu"
    )


# --------------------------------------------------------------------------- demo tokenizer

# The demo tokenizer is trained on this fixed word list, not on the query terms file: the
# teacher_model stage declares only teacher.model params, so the demo teacher must not change
# when the query vocabulary does. Music description words keep the merges relevant; any other
# text still tokenises through the byte fallback of byte-level BPE.
_DEMO_WORDS = """
a an the and or with without of in on for to from by at as is are this that very slow fast
calm quiet loud soft heavy light dark bright warm cold happy sad angry peaceful relaxing
energetic aggressive dreamy melancholic romantic epic uplifting mellow groovy funky chill
upbeat downtempo tense mysterious playful nostalgic hopeful emotional intense gentle
music song track tune melody harmony rhythm beat tempo groove chord chords bass lead solo
vocals vocal voice singer singing choir female male spoken rap instrumental acoustic electric
electronic synth synthesizer pad drums drum kit percussion snare kick hihat cymbal clap
piano keyboard organ guitar guitars strings violin viola cello double harp flute clarinet
oboe bassoon saxophone sax trumpet trombone horn tuba brass woodwind bells marimba
xylophone vibraphone ukulele banjo mandolin accordion harmonica sitar tabla orchestra
orchestral ensemble band quartet trio duet live studio recording lofi reverb distorted
rock pop jazz blues folk country classical metal punk hiphop hip hop reggae soul funk
disco house techno trance ambient dubstep drum and bass edm latin world indie alternative
experimental soundtrack cinematic film game lounge gospel swing bossa nova waltz march
dance ballad anthem lullaby minor major key chorus verse bridge intro outro loop sample
sound sounds noise field high low bpm beats per minute short long minutes seconds
background foreground party workout study sleep morning night summer winter rain
"""


def demo_word_corpus() -> list[str]:
    """The fixed music word list as words, short phrases and capitalised words."""
    words = _DEMO_WORDS.split()
    # Short phrases as well as words, so merges across a leading space ("Ġpiano") are learned.
    lines = [" ".join(words[i : i + 6]) for i in range(0, len(words), 3)]
    return words + lines + [w.capitalize() for w in words]


def build_demo_tokenizer(vocab_size: int, texts: list[str] | None = None):
    """A small byte-level BPE with RoBERTa's special tokens and <s> ... </s> framing.

    Trained on `texts` (the trained demo teacher passes its captions and the query vocabulary),
    else on the fixed music word list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts if texts is not None else demo_word_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")),  # sep (positional: the keyword name changed across versions)
        ("<s>", tokenizer.token_to_id("<s>")),  # cls
        trim_offsets=True,
        add_prefix_space=False,
    )
    return tokenizer


def write_tokenizer_config(out_dir: Path) -> None:
    """tokenizer_config.json next to tokenizer.json (RoBERTa special tokens, laion's max length)."""
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "model_max_length": TEXT_MAX_LENGTH,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "add_prefix_space": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- writing a teacher folder


def write_teacher_dir(model, tokenizer, out_dir: Path, provenance: dict) -> Path:
    """Save model + tokenizer + teacher.json into out_dir atomically (a sibling temp dir, then rename;
    ordinary permissions under the umask, as every output)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / WEIGHTS).exists():
            raise TeacherError(f"{tmp}: save_pretrained did not write {WEIGHTS}")
        tokenizer.save(str(tmp / TOKENIZER))
        write_tokenizer_config(tmp)
        record = dict(provenance)
        record["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        record["tokenizer_sha256"] = sha256_file(tmp / TOKENIZER)
        record["vocab_size"] = tokenizer.get_vocab_size()
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out_dir


def demo_clap_model(d: DemoTeacherParams, vocab_size: int):
    """A ClapModel of the demo shape (HTSAT with fewer, narrower blocks; a small RoBERTa), seeded by
    the caller's torch RNG state (audio_heads has one entry per audio_depths entry: pipeline.params)."""
    from transformers import ClapModel

    audio = htsat_base_audio_config()
    audio.update(
        depths=list(d.audio_depths),
        num_attention_heads=list(d.audio_heads),
        patch_embeds_hidden_size=d.audio_patch_hidden,
        hidden_size=d.audio_patch_hidden * 2 ** (len(d.audio_depths) - 1),
        patch_size=d.audio_patch_size,
        patch_stride=[d.audio_patch_size, d.audio_patch_size],
        hidden_dropout_prob=0.0,  # a model this small trained on a few hundred clips learns faster without
    )
    text = roberta_base_text_config(vocab_size=vocab_size)
    text.update(
        hidden_size=d.text_hidden,
        num_hidden_layers=d.text_layers,
        num_attention_heads=d.text_heads,
        intermediate_size=d.text_intermediate,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ClapModel(clap_config(audio, text))


def build_demo_teacher(p: TeacherModelParams, out_dir: Path) -> Path:
    """Seeded random ClapModel in the real teacher's format; same params -> same weights and tokenizer."""
    d = p.demo
    tokenizer = build_demo_tokenizer(d.vocab_size)
    torch.manual_seed(d.seed)
    model = demo_clap_model(d, tokenizer.get_vocab_size()).eval()
    n_params = sum(t.numel() for t in model.parameters())
    log.info("demo teacher: seeded random ClapModel, %.2fM parameters, vocab %d", n_params / 1e6, tokenizer.get_vocab_size())
    provenance = {"kind": "demo_random", "params": asdict(d)}
    return write_teacher_dir(model, tokenizer, Path(out_dir), provenance)


def install_demo_teacher(p: TeacherModelParams, out_dir: Path) -> Path:
    """Copy the committed trained demo teacher into out_dir after checking its sha256.

    The expected hash comes from params (teacher.model.demo.weights_sha256), so a weights file
    swapped or damaged in the repository is refused rather than silently used."""
    src = Path(p.demo.weights_dir)
    expected = p.demo.weights_sha256.strip().lower()
    if not expected:
        raise TeacherError("teacher.model.demo.weights_sha256 is empty: the trained demo teacher cannot be verified")
    for name in ("config.json", WEIGHTS, TOKENIZER, PROVENANCE):
        if not (src / name).is_file():
            raise TeacherError(
                f"{src / name}: missing; train the demo teacher with `student-clap demo teacher` "
                "or use teacher.model.source demo_random"
            )
    actual = sha256_file(src / WEIGHTS)
    if actual != expected:
        raise TeacherError(
            f"{src / WEIGHTS}: sha256 {actual} differs from teacher.model.demo.weights_sha256 {expected}"
        )
    from tokenizers import Tokenizer

    check_tokenizer(Tokenizer.from_file(str(src / TOKENIZER)), src / TOKENIZER)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)  # contents only: permissions follow the umask
        if sha256_file(tmp / WEIGHTS) != expected:
            raise TeacherError(f"{tmp / WEIGHTS}: copy differs from {src / WEIGHTS}")
    log.info("installed the trained demo teacher from %s (sha256 %s)", src, actual[:12])
    return out_dir


# --------------------------------------------------------------------------- loading and embedding


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"teacher.device is {device!r} but CUDA is not available on this machine")
    return device


def check_tokenizer(tokenizer, where: str | Path, error: type[TeacherError] = TeacherError):
    """Refuse a RoBERTa-style tokenizer that lost its vocabulary or special tokens (`where` names it).

    Missing vocabulary files do not always fail loudly (transformers 5 returns an empty tokenizer),
    so the size and the special tokens are checked wherever a teacher tokenizer is loaded."""
    size = tokenizer.get_vocab_size()
    if size < MIN_VOCAB:
        raise error(f"{where}: tokenizer has only {size} tokens; its vocabulary files are missing or broken")
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise error(f"{where}: tokenizer lacks RoBERTa's special tokens {missing}")
    return tokenizer


def load_tokenizer(path: Path):
    """Tokenizer with laion's framing (<s> ... </s>, truncation at 77 tokens), padded per batch.

    laion_clap pads every text to 77 tokens; padding only to the longest text of a batch gives the
    same embeddings (padding is masked out) for a fraction of the compute.
    """
    from tokenizers import Tokenizer

    if not path.exists():
        raise TeacherError(f"{path}: tokenizer file missing (rebuild the teacher folder)")
    tokenizer = check_tokenizer(Tokenizer.from_file(str(path)), path)
    tokenizer.enable_truncation(max_length=TEXT_MAX_LENGTH)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("<pad>"), pad_token="<pad>")
    return tokenizer


@dataclass
class Teacher:
    """A loaded teacher. All outputs are float32 on the CPU-side device of the caller's choice."""

    model: torch.nn.Module
    tokenizer: object
    device: str
    dtype: torch.dtype
    sha256: str  # of model.safetensors
    provenance: dict

    @torch.inference_mode()
    def embed_mels_raw(self, mels: torch.Tensor) -> torch.Tensor:
        """[B, 1001, 64] teacher log-mels -> [B, 512] audio projections before L2."""
        if mels.ndim != 3 or mels.shape[-1] != MEL_BINS:
            raise ValueError(f"teacher mels must be [B, {MEL_FRAMES}, {MEL_BINS}], got {list(mels.shape)}")
        features = mels.to(self.device, self.dtype).unsqueeze(1)  # [B, 1, T, 64]
        is_longer = torch.zeros(features.shape[0], 1, dtype=torch.bool, device=self.device)
        out = self.model.audio_model(input_features=features, is_longer=is_longer)
        return self.model.audio_projection(out.pooler_output).float()

    def embed_mels(self, mels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_mels_raw(mels), dim=-1)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    @torch.inference_mode()
    def embed_text_raw(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        out = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return self.model.text_projection(out.pooler_output).float()

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.embed_text_raw(texts), dim=-1)


def read_provenance(model_dir: str | Path) -> dict:
    path = Path(model_dir) / PROVENANCE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TeacherError(
            f"{path}: missing; build the teacher with `student-clap run teacher_model` "
            "or convert a checkpoint with `student-clap teacher convert`"
        ) from None
    except json.JSONDecodeError as exc:
        raise TeacherError(f"{path}: not valid JSON: {exc}") from exc


def load_teacher(dir: str | Path, device: str = "cpu", dtype: str = "fp32", verify: bool = True) -> Teacher:
    """Load a teacher folder; `device` may be "auto"; `dtype` "bf16" only on CUDA (else fp32 with a
    warning), "auto" = bf16 on CUDA and fp32 elsewhere."""
    from transformers import ClapModel

    model_dir = Path(dir)
    provenance = read_provenance(model_dir)
    for name in ("config.json", WEIGHTS):
        if not (model_dir / name).exists():
            raise TeacherError(f"{model_dir / name}: missing from the teacher folder")
    sha = provenance.get("weights_sha256", "")
    if verify:
        actual = sha256_file(model_dir / WEIGHTS)
        if sha and actual != sha:
            raise TeacherError(f"{model_dir / WEIGHTS}: sha256 {actual} differs from {PROVENANCE} ({sha})")
        sha = actual
    tokenizer = load_tokenizer(model_dir / TOKENIZER)

    model, info = ClapModel.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise TeacherError(f"{model_dir / WEIGHTS}: does not match config.json: {problems}")
    text_vocab = model.config.text_config.vocab_size
    if tokenizer.get_vocab_size() > text_vocab:
        raise TeacherError(
            f"{model_dir / TOKENIZER}: {tokenizer.get_vocab_size()} tokens but the text tower has {text_vocab}"
        )

    device = resolve_device(device)
    torch_dtype = torch.float32
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype == "bf16":
        if device.startswith("cuda"):
            torch_dtype = torch.bfloat16
        else:
            log.warning("teacher.dtype bf16 is for GPUs; running fp32 on %s", device)
    model = model.to(device=device, dtype=torch_dtype).eval()
    log.info(
        "teacher %s (%s) on %s/%s, weights sha256 %s",
        model_dir, provenance.get("kind", "?"), device, str(torch_dtype).removeprefix("torch."), sha[:12],
    )
    return Teacher(model=model, tokenizer=tokenizer, device=device, dtype=torch_dtype, sha256=sha, provenance=provenance)
