"""The demo's labelled synthetic music, its song lists, and the trained demo teacher."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data.demo_audio import INSTRUMENTS, SONGS, Music, caption, fits, tags
from pipeline.params import load_params
from pipeline.teacher.model import TeacherError, load_teacher, sha256_file
from repo_params import repo_params, section

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "data" / "demo" / "teacher"


def _usable(song) -> bool:
    return "Cash_Song" not in song.path  # the NC-licensed one the policy excludes


# --------------------------------------------------------------------------- captions and tags


def test_captions_name_only_true_attributes_and_vary() -> None:
    rng = np.random.default_rng(0)
    named_keys: Counter = Counter()
    texts = set()
    for i in range(400):
        music = Music(INSTRUMENTS[i % len(INSTRUMENTS)], bool(i % 2), ("slow", "fast")[i // 2 % 2], ("major", "minor")[i // 4 % 2])
        text, named = caption(music, rng)
        assert named and fits(music, named), (text, named)
        other = dataclasses.replace(music, lead=INSTRUMENTS[(i + 1) % len(INSTRUMENTS)])
        assert fits(other, named) == ("lead" not in named)
        named_keys.update(named)
        texts.add(text)
    assert set(named_keys) == {"lead", "drums", "tempo", "mode"}
    assert len(texts) > 250  # varied wording, not one template


def test_music_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError, match="kazoo"):
        Music("kazoo", True, "fast", "major")


def test_song_lists_carry_the_synthesised_attributes() -> None:
    rows = (REPO / "data/sources/jamendo/autotagging.tsv").read_text().splitlines()[1:]
    by_path = {r.split("\t")[3]: r.split("\t")[5:] for r in rows}
    jamendo = [s for s in SONGS if s.path.startswith("jamendo/")]
    assert len(jamendo) == len(by_path)
    listing = (REPO / "data/sources/jamendo/MTG_JAMENDO_SONGS_LICENSE.md").read_text()
    for song in jamendo:
        rel = song.path.split("/", 1)[1]
        assert by_path[rel] == tags(song.music), rel
        assert f"{song.title} by {song.artist} from Jamendo" in listing


def test_every_lead_instrument_has_four_songs_and_one_in_validation() -> None:
    from pipeline.stages.ingest import artist_group, split_of

    params = load_params(REPO / "params.yaml")
    counts: Counter = Counter()
    in_val: Counter = Counter()
    for song in filter(_usable, SONGS):
        counts[song.lead] += 1
        source = song.path.split("/", 1)[0]
        track = f"{source}:{Path(song.path).name}"
        group = artist_group(song.artist or None, track)
        if split_of(group, params.ingest.val_ratio, params.ingest.split_salt) == "val":
            in_val[song.lead] += 1
    assert len(counts) >= 6 and min(counts.values()) >= 4, counts
    assert set(in_val) == set(counts), in_val


# --------------------------------------------------------------------------- the committed teacher


def _committed() -> Path:
    if not (TEACHER / "model.safetensors").is_file():
        pytest.skip(f"{TEACHER} not trained yet (student-clap demo teacher)")
    return TEACHER


def test_committed_teacher_matches_params_sha256() -> None:
    params = load_params(REPO / "params.yaml")
    assert sha256_file(_committed() / "model.safetensors") == params.teacher.model.demo.weights_sha256


@pytest.mark.slow
def test_committed_teacher_knows_the_attributes_on_fresh_clips() -> None:
    """Held-out zero-shot accuracy on clips from seeds neither training nor its own check used."""
    from pipeline.teacher.demo import clip_mels, plan_clips, zero_shot

    torch.set_num_threads(2)
    teacher = load_teacher(_committed())
    specs = plan_clips(64, 7_777, codec_share=0.5)
    acc = zero_shot(teacher.model, teacher.tokenizer, clip_mels(specs, section("frontend.teacher")), [s.music for s in specs])
    assert acc["instrument"] >= 0.8, acc
    assert acc["tempo"] >= 0.8, acc
    assert acc["drums"] >= 0.9, acc


def test_committed_teacher_reads_query_words_in_any_case() -> None:
    """Users type "piano", the query sets write "Piano": one meaning, as for a real text tower.

    (UPPER CASE is rarer in its training captions and is not held to this.)"""
    teacher = load_teacher(_committed())
    words = ["piano", "guitar", "organ", "flute", "bells", "a slow song", "fast song with drums"]
    forms = [f(w) for w in words for f in (str, str.title, str.capitalize)]
    emb = teacher.embed_text(forms).numpy().reshape(len(words), 3, -1)
    same = np.einsum("wd,wkd->wk", emb[:, 0], emb[:, 1:])
    other = emb[:, 0] @ emb[:, 0].T
    assert same.min() >= 0.9, same
    assert same.min() > other[~np.eye(len(words), dtype=bool)].max() + 0.3, (same, other)


def test_committed_tokenizer_covers_captions_and_query_terms() -> None:
    from pipeline.data.demo_audio import (
        DRUM_WORDS,
        INSTRUMENT_WORDS,
        MODE_WORDS,
        TEMPO_WORDS,
    )
    from pipeline.teacher.model import load_tokenizer

    tok = load_tokenizer(_committed() / "tokenizer.json")
    phrases = {p for group in (*INSTRUMENT_WORDS.values(), *TEMPO_WORDS.values(), *MODE_WORDS.values(),
                               *DRUM_WORDS.values()) for p in group}
    for phrase in sorted(phrases):
        pieces = tok.pre_tokenizer.pre_tokenize_str(" " + phrase)  # words (and hyphens) as the BPE sees them
        assert len(tok.encode(" " + phrase).ids) - 2 == len(pieces), phrase  # each one whole token
    text_queries = yaml.safe_load((REPO / "params.yaml").read_text())["text_queries"]
    terms = json.loads((REPO / text_queries["terms"]).read_text())
    prompts = text_queries["eval_prompts"]
    words = [w.lower() for t in [t for group in terms.values() for t in group] + prompts for w in t.replace("-", " ").split()]
    pieces = [len(tok.encode(" " + w).ids) - 2 for w in words]
    # query words are whole words or a few pieces (2 on average), never spelt out letter by letter
    assert np.mean(pieces) <= 2.0, dict(zip(words, pieces))
    assert max(pieces) <= 5, dict(zip(words, pieces))


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_reduced_retrain_learns(tmp_path: Path) -> None:
    """A tiny teacher on few clips: held-out accuracy clearly above chance within seconds of CPU."""
    from pipeline.teacher.demo import train_demo_teacher

    d = section("teacher.model.demo", audio_depths=[1, 1], audio_heads=[1, 2], audio_patch_hidden=16, text_hidden=32,
                          text_layers=1, text_heads=2, text_intermediate=64, vocab_size=700)
    t = section("teacher.model.demo.train", clips=96, val_clips=48, epochs=8, batch_size=16, codec_share=0.0)
    report = train_demo_teacher(d, t, section("frontend.teacher"), None, tmp_path / "teacher", instruments=("organ", "bell"))
    acc = report["held_out_zero_shot"]
    assert report["loss_per_epoch"][-1] < report["loss_per_epoch"][0]
    assert acc["instrument"] >= 0.75, report
    teacher = load_teacher(tmp_path / "teacher")  # a normal teacher folder, loadable like the real one
    assert teacher.provenance["kind"] == "demo" and teacher.provenance["trained"]


# --------------------------------------------------------------------------- the teacher_model stage


def test_teacher_model_stage_installs_and_verifies_the_trained_teacher(tmp_path: Path, caplog) -> None:
    from pipeline.stages import teacher_model

    src = _committed()
    params = repo_params()
    params.teacher.model.dir = str(tmp_path / "teacher")
    params.teacher.model.demo.weights_dir = str(src)
    params.teacher.model.demo.weights_sha256 = sha256_file(src / "model.safetensors")
    assert teacher_model.run(params, argparse.Namespace(shard=None, resume=False)) == 0
    assert sha256_file(tmp_path / "teacher" / "model.safetensors") == params.teacher.model.demo.weights_sha256
    old = os.umask(0o022)  # an ordinary output folder, not a temporary directory's 0700/0600
    try:
        assert teacher_model.run(params, argparse.Namespace(shard=None, resume=False)) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "teacher").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "teacher" / "model.safetensors").stat().st_mode) == 0o644

    params.teacher.model.dir = str(tmp_path / "other")
    params.teacher.model.demo.weights_sha256 = "0" * 64
    assert teacher_model.run(params, argparse.Namespace(shard=None, resume=False)) == 1
    assert "differs from teacher.model.demo.weights_sha256" in caplog.text
    assert not (tmp_path / "other").exists()


def test_install_names_a_missing_teacher_folder(tmp_path: Path) -> None:
    from pipeline.teacher.model import install_demo_teacher

    p = repo_params().teacher.model
    p.demo.weights_dir = str(tmp_path / "nowhere")
    p.demo.weights_sha256 = "0" * 64
    with pytest.raises(TeacherError, match="student-clap demo teacher"):
        install_demo_teacher(p, tmp_path / "out")
