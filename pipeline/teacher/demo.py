"""Train the demo teacher (`student-clap demo teacher`): a small ClapModel that knows the demo's
synthetic music, trained on rendered clips and captions of their attributes. Details: docs/demo.md.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.demo_audio import INSTRUMENTS, MODES, TEMPI, Music, caption, fits, render
from pipeline.params import DemoTeacherParams, DemoTrainParams, Params, TeacherFrontendParams

log = logging.getLogger(__name__)

SEGMENT_SECONDS = 10.0
VAL_SEED_OFFSET = 1_000_000  # held-out clips use seeds no training clip (nor demo song) uses
SOURCE_RATES = (16000, 22050, 44100, 48000)
SOURCE_RATE_WEIGHTS = (0.15, 0.45, 0.25, 0.15)

# Prompts for the held-out zero-shot check, one list per attribute (same order as the classes).
ZERO_SHOT: dict[str, tuple[tuple, list[str]]] = {
    "instrument": (INSTRUMENTS, [f"This is a song with {w}." for w in
                                 ("piano", "guitar", "strings", "organ", "flute", "synthesizer", "brass", "bells")]),
    "drums": ((True, False), ["a song with drums", "a song without drums"]),
    "tempo": (tuple(TEMPI), ["a slow song", "a fast song"]),
    "mode": (MODES, ["a song in a major key", "a song in a minor key"]),
}
_ATTR = {"instrument": "lead", "drums": "drums", "tempo": "tempo", "mode": "mode"}


@dataclass(frozen=True)
class ClipSpec:
    music: Music
    seed: int
    source_rate: int
    codec: str  # "" | "mp3" | "ogg"
    level_db: float


def plan_clips(n: int, seed: int, codec_share: float, instruments: tuple[str, ...] = INSTRUMENTS) -> list[ClipSpec]:
    """n clips cycling through every attribute combination (balanced), each with its own seed."""
    combos = [Music(*c) for c in itertools.product(instruments, (True, False), tuple(TEMPI), MODES)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    out = []
    for i in range(n):
        music = combos[order[i % len(combos)]]
        if i % len(combos) == len(combos) - 1:
            order = rng.permutation(len(combos))
        rate = int(rng.choice(SOURCE_RATES, p=SOURCE_RATE_WEIGHTS))
        codec = str(rng.choice(["mp3", "ogg"])) if rng.random() < codec_share else ""
        out.append(ClipSpec(music, int(seed * 10_000 + 1000 + i), rate, codec, float(rng.uniform(-8.0, -1.0))))
    return out


def _lossy_round_trip(wave: np.ndarray, sr: int, codec: str) -> np.ndarray:
    """Encode at the lowest bitrate and decode again, as the low-bitrate demo files are."""
    buf = io.BytesIO()
    fmt, subtype = ("MP3", "MPEG_LAYER_III") if codec == "mp3" else ("OGG", "VORBIS")
    sf.write(buf, wave, sr, format=fmt, subtype=subtype, compression_level=0.99)
    buf.seek(0)
    out, _ = sf.read(buf, dtype="float32", always_2d=True)
    return out.mean(axis=1)


def clip_mels(specs: list[ClipSpec], frontend: TeacherFrontendParams, desc: str = "clips") -> torch.Tensor:
    """Teacher log-mels [N, 1001, 64] (fp16) of the clips, through the pipeline's audio path."""
    from pipeline.data.frontends import TeacherMel
    from student_clap.audio import (
        int16_to_float,
        repeat_pad,
        resample_int16,
        segment_length,
        to_int16,
    )

    mel = TeacherMel(frontend).eval()
    seg = segment_length(frontend.sample_rate, SEGMENT_SECONDS)
    out = []
    for spec in tqdm(specs, desc=desc, unit="clip"):
        wave = render(spec.music, SEGMENT_SECONDS, spec.source_rate, spec.seed, channels=1,
                      level_db=spec.level_db, fade_seconds=0.0)[0].astype(np.float32)
        if spec.codec:
            wave = _lossy_round_trip(wave, spec.source_rate, spec.codec)
        wave = resample_int16(to_int16(wave), spec.source_rate, frontend.sample_rate)
        wave = repeat_pad(wave, seg)[:seg]
        with torch.inference_mode():
            out.append(mel(torch.from_numpy(int16_to_float(wave))[None])[0].half())
    return torch.stack(out)


# --------------------------------------------------------------------------- tokenizer and model


def tokenizer_texts(params: Params | None, rng_seed: int = 0, n_captions: int = 3000) -> list[str]:
    """Texts the demo tokenizer is trained on: captions, query terms, eval prompts, music words."""
    from pipeline.teacher.model import demo_word_corpus

    rng = np.random.default_rng(rng_seed)
    combos = [Music(*c) for c in itertools.product(INSTRUMENTS, (True, False), tuple(TEMPI), MODES)]
    texts = [caption(combos[i % len(combos)], rng)[0] for i in range(n_captions)]
    texts += [p for _, prompts in ZERO_SHOT.values() for p in prompts]
    if params is not None:
        terms_path = Path(params.text_queries.terms)
        if terms_path.is_file():
            terms = json.loads(terms_path.read_text())
            for words in terms.values():
                texts += [str(w) for w in words] + [str(w).lower() for w in words]
        texts += list(params.text_queries.free_phrasings) + list(params.text_queries.eval_prompts)
    return texts + demo_word_corpus()


def vary_case(text: str, rng: np.random.Generator, share: float = 0.4) -> str:
    """Sometimes recase a caption (Title Case, first letter, UPPER) as queries and tag lists are written,
    so the teacher reads "Piano" as it reads "piano" (docs/demo.md)."""
    if rng.random() >= share:
        return text
    style = int(rng.integers(3))
    if style == 0:
        return " ".join(w[:1].upper() + w[1:] for w in text.split())
    return text[:1].upper() + text[1:] if style == 1 else text.upper()


def _embed_audio(model, mels: torch.Tensor) -> torch.Tensor:
    features = mels.float().unsqueeze(1)
    is_longer = torch.zeros(features.shape[0], 1, dtype=torch.bool)
    out = model.audio_model(input_features=features, is_longer=is_longer)
    return F.normalize(model.audio_projection(out.pooler_output), dim=-1)


def _embed_text(model, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    out = model.text_model(input_ids=ids, attention_mask=mask)
    return F.normalize(model.text_projection(out.pooler_output), dim=-1)


def multi_positive_loss(audio: torch.Tensor, text: torch.Tensor, fit: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric contrastive loss where every fitting (clip, caption) pair of the batch is a positive."""
    logits = scale * audio @ text.T
    target_a = fit / fit.sum(dim=1, keepdim=True)
    target_t = fit.T / fit.T.sum(dim=1, keepdim=True)
    loss_a = -(target_a * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target_t * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_a + loss_t)


def class_prompts(name: str, rng: np.random.Generator) -> list[str]:
    """One freshly worded prompt per class of an attribute, for the classification term of the loss."""
    from pipeline.data.demo_audio import (
        DRUM_WORDS,
        INSTRUMENT_WORDS,
        MODE_KEY,
        MODE_WORDS,
        NOUNS,
        TEMPO_WORDS,
    )

    pick = lambda words: str(words[int(rng.integers(len(words)))])
    noun = pick(NOUNS)
    if name == "instrument":
        form = int(rng.integers(3))
        words = [pick(INSTRUMENT_WORDS[c]) for c in INSTRUMENTS]
        return [w if form == 0 else f"This is a {noun} with {w}." if form == 1 else f"{w} {noun}" for w in words]
    if name == "drums":
        return [f"a {noun} {pick(DRUM_WORDS[c])}" for c in (True, False)]
    if name == "tempo":
        return [f"a {pick(TEMPO_WORDS[c])} {noun}" for c in TEMPI]
    if rng.random() < 0.5:
        return [f"a {noun} {pick(MODE_KEY[c])}" for c in MODES]
    return [f"a {pick(MODE_WORDS[c])} {noun}" for c in MODES]


def classification_loss(model, tokenizer, audio: torch.Tensor, musics: list[Music], rng: np.random.Generator,
                        scale: float) -> torch.Tensor:
    """Zero-shot classification of every clip of the batch, per attribute, against worded class prompts.

    The contrastive term sees a given attribute word only when a caption happens to use it; this term
    asks every clip for every attribute at every step, which makes a few hundred CPU steps enough."""
    names = list(ZERO_SHOT)
    prompts = [class_prompts(n, rng) for n in names]
    text = _embed_text(model, tokenizer, [p for group in prompts for p in group])
    loss, start = audio.new_zeros(()), 0
    for name, group in zip(names, prompts):
        classes = ZERO_SHOT[name][0]
        logits = scale * audio @ text[start : start + len(group)].T
        target = torch.tensor([classes.index(getattr(m, _ATTR[name])) for m in musics])
        loss = loss + F.cross_entropy(logits, target)
        start += len(group)
    return loss / len(names)


def attribute_head_loss(heads: torch.nn.ModuleDict, audio: torch.Tensor, musics: list[Music], scale: float) -> torch.Tensor:
    """Cross-entropy of the training-only linear heads, averaged over the attributes."""
    loss = audio.new_zeros(())
    for name, head in heads.items():
        classes = ZERO_SHOT[name][0]
        target = torch.tensor([classes.index(getattr(m, _ATTR[name])) for m in musics])
        loss = loss + F.cross_entropy(head(scale * audio), target)
    return loss / len(heads)


@torch.inference_mode()
def zero_shot(model, tokenizer, mels: torch.Tensor, musics: list[Music], batch: int = 32,
              instruments: tuple[str, ...] = INSTRUMENTS) -> dict[str, float]:
    """Accuracy per attribute of nearest-prompt classification of the clips (among `instruments`)."""
    model.eval()
    audio = torch.cat([_embed_audio(model, mels[i : i + batch]) for i in range(0, len(mels), batch)])
    result = {}
    for name, (classes, prompts) in ZERO_SHOT.items():
        if name == "instrument":
            prompts = [prompts[INSTRUMENTS.index(i)] for i in instruments]
            classes = tuple(instruments)
        pred = (audio @ _embed_text(model, tokenizer, prompts).T).argmax(dim=1)
        truth = torch.tensor([classes.index(getattr(m, _ATTR[name])) for m in musics])
        result[name] = float((pred == truth).float().mean())
    return result


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train_demo_teacher(d: DemoTeacherParams, t: DemoTrainParams, frontend: TeacherFrontendParams,
                       params: Params | None, out_dir: Path, instruments: tuple[str, ...] = INSTRUMENTS) -> dict:
    """Train, evaluate on held-out clips, write the teacher folder; returns the report.

    `params`: whose query terms and prompts the tokenizer also learns (None: the captions only);
    `instruments` narrows the lead instruments (the quick test trains on two).
    Long: one seeded run from data to written folder, kept in order so the RNG stream is plain to see."""
    from pipeline.teacher.model import (
        build_demo_tokenizer,
        demo_clap_model,
        write_teacher_dir,
    )

    start_cpu, start_wall = _cpu_seconds(), time.time()
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    tokenizer = build_demo_tokenizer(d.vocab_size, tokenizer_texts(params, t.seed))
    tokenizer.enable_truncation(max_length=77)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("<pad>"), pad_token="<pad>")

    train_specs = plan_clips(t.clips, t.seed, t.codec_share, instruments)
    val_specs = plan_clips(t.val_clips, t.seed + VAL_SEED_OFFSET, t.codec_share, instruments)
    train_mels = clip_mels(train_specs, frontend, "training clips")
    val_mels = clip_mels(val_specs, frontend, "held-out clips")
    train_music = [s.music for s in train_specs]
    val_music = [s.music for s in val_specs]
    mel_cpu = _cpu_seconds() - start_cpu

    torch.manual_seed(d.seed)
    model = demo_clap_model(d, tokenizer.get_vocab_size())
    # Linear attribute heads on the audio embedding, used only while training: a random text tower
    # gives the audio tower almost no contrastive signal at first (all captions embed alike), and
    # these give it one from the first step. They are not part of the saved ClapModel.
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(model.config.projection_dim, len(v[0])) for k, v in ZERO_SHOT.items()})
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(train_specs) / t.batch_size)
    total = steps_per_epoch * t.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=max(total, 1), pct_start=0.1)
    rng = np.random.default_rng(t.seed)
    history = []
    bar = tqdm(total=total, desc="demo teacher", unit="step")
    for epoch in range(t.epochs):
        model.train()
        order = rng.permutation(len(train_specs))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * t.batch_size : (s + 1) * t.batch_size]
            if len(idx) < 2:
                continue
            musics = [train_music[i] for i in idx]
            caps = [(vary_case(text, rng), named) for text, named in (caption(m, rng) for m in musics)]
            fit = torch.tensor([[float(fits(m, named)) for _, named in caps] for m in musics])
            audio = _embed_audio(model, train_mels[idx])
            text = _embed_text(model, tokenizer, [c for c, _ in caps])
            loss = multi_positive_loss(audio, text, fit, t.logit_scale)
            loss = loss + classification_loss(model, tokenizer, audio, musics, rng, t.logit_scale)
            loss = loss + attribute_head_loss(heads, audio, musics, t.logit_scale)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses):.3f}")
        history.append(float(np.mean(losses)) if losses else float("nan"))
    bar.close()
    model.eval()
    held_out = zero_shot(model, tokenizer, val_mels, val_music, instruments=instruments)
    report = {
        "held_out_zero_shot": held_out,
        "n_train_clips": len(train_specs),
        "n_held_out_clips": len(val_specs),
        "chance": {k: 1.0 / (len(instruments) if k == "instrument" else len(v[0])) for k, v in ZERO_SHOT.items()},
        "loss_per_epoch": history,
        "cpu_seconds": round(_cpu_seconds() - start_cpu, 1),
        "cpu_seconds_clips": round(mel_cpu, 1),
        "wall_seconds": round(time.time() - start_wall, 1),
    }
    provenance = {"kind": "demo", "trained": True, "params": asdict(d), "report": report}
    tokenizer.no_padding()
    tokenizer.no_truncation()
    write_teacher_dir(model, tokenizer, Path(out_dir), provenance)
    return report


def main(args: argparse.Namespace) -> int:
    from pipeline.params import load_params

    params = load_params(args.params)
    d = params.teacher.model.demo
    out = Path(args.out or d.weights_dir)
    report = train_demo_teacher(d, d.train, params.frontend.teacher, params, out)
    print(f"demo teacher written to {out} ({report['n_train_clips']} training clips, "
          f"{report['cpu_seconds']:.0f} CPU-s, {report['wall_seconds']:.0f} s wall)")
    print(f"held-out zero-shot accuracy on {report['n_held_out_clips']} clips not used in training:")
    for name, acc in report["held_out_zero_shot"].items():
        print(f"  {name:<10} {acc:.3f}  (chance {report['chance'][name]:.3f}, {round(1 / report['chance'][name])} classes)")
    sha = json.loads((out / "teacher.json").read_text())["weights_sha256"]
    print(f"weights sha256 {sha}; set teacher.model.demo.weights_sha256 to it in params.yaml")
    return 0
