"""`student-clap compare`: teacher vs exported student on a folder of mixed real formats.

A tiny exported student (10-s segments at 16 kHz, decoded at 48 kHz like the pipeline) and the
seeded demo teacher; the figures the command prints are checked against a computation by hand:
the segmentation rule applied with the audio primitives, the PyTorch models behind the ONNX
files, and brute-force neighbours, zero-shot and recall.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.stats import spearmanr

from pipeline.cli import main
from pipeline.data.frontends import TeacherMel
from pipeline.data.mel_cache import dequantise, quantise
from pipeline.evaluation import compare as C
from pipeline.params import load_params
from pipeline.teacher.model import build_demo_teacher, load_teacher
from student_clap.audio import cut, decode_int16, int16_to_float, map_starts, resample_int16, segment_starts
from student_clap.tokenizer import encode
from repo_params import section

torch.set_num_threads(1)
SR, DECODE_SR, SEG_S, HOP_S = 16000, 48000, 10.0, 5.0
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "audio"
LABELS = ("ambient", "jazz", "rock")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_export_builder):
    """models/export-like folder (audio + text student) and a demo teacher folder, with the PyTorch models."""
    corpus = [f"this audio is a {g} song" for g in LABELS] + [f"{a} {b}" for a in ("calm", "loud") for b in LABELS] * 3
    built = tiny_export_builder(tmp_path_factory.mktemp("export"), rate=SR, segment_seconds=SEG_S, hop_seconds=HOP_S,
                                decode_rate=DECODE_SR, corpus=corpus, max_length=16)
    teacher_dir = build_demo_teacher(section("teacher.model"), tmp_path_factory.mktemp("teacher") / "teacher")
    return {**built, "teacher_dir": teacher_dir, "teacher": load_teacher(teacher_dir)}


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """GTZAN layout: label subfolders holding demo songs and songs written here, in mixed formats,
    rates and channel counts (one shorter than a segment); plus a corrupt mp3, a text file, and a
    silent and a 0.1-s file (refused by the usability rule)."""
    root = tmp_path_factory.mktemp("songs")
    for label in LABELS:
        (root / label).mkdir()
    shutil.copy(DEMO / "fma" / "Cash_Song.ogg", root / "rock" / "Cash_Song.ogg")
    shutil.copy(DEMO / "fma" / "Iron_Steps.flac", root / "jazz" / "Iron_Steps.flac")
    shutil.copy(DEMO / "fma" / "Night_Engine.wav", root / "ambient" / "Night_Engine.wav")
    rng = np.random.default_rng(0)
    for rel, rate, seconds, channels, freq, fmt in (
        ("rock/riff.wav", 22050, 12.0, 1, 330.0, None),
        ("jazz/short.flac", 44100, 7.0, 2, 523.0, None),
        ("ambient/pad.ogg", 32000, 15.0, 1, 110.0, "OGG"),
    ):
        t = np.arange(int(rate * seconds)) / rate
        x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t)) + 0.05 * rng.standard_normal(t.size)
        data = np.stack([x, 0.8 * x], axis=1) if channels == 2 else x
        sf.write(root / rel, data, rate, **({"format": fmt, "subtype": "VORBIS"} if fmt else {}))
    (root / "broken.mp3").write_bytes(b"ID3" + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    (root / "notes.txt").write_text("not audio")
    sf.write(root / "rock" / "silent.wav", np.zeros(44100), 22050)
    sf.write(root / "jazz" / "blip.wav", 0.5 * np.ones(2205), 22050)
    return root


def _readable(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac", ".ogg") and p.name not in REFUSED)


REFUSED = ("silent.wav", "blip.wav")


def _by_hand(path: Path, m) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) track vectors: decode at 48 kHz, the segment rule, each window on its own."""
    wave = decode_int16(path, DECODE_SR)
    starts = segment_starts(len(wave), DECODE_SR, SEG_S, HOP_S)
    with torch.no_grad():
        s_win = int16_to_float(cut(resample_int16(wave, DECODE_SR, SR), map_starts(starts, DECODE_SR, SR), int(SR * SEG_S)))
        s = m["audio"].embed_raw(m["frontend"](torch.from_numpy(s_win))).double().mean(0).numpy()
        t_win = int16_to_float(cut(wave, starts, int(DECODE_SR * SEG_S)))
        step = load_params(REPO / "params.yaml").mels.precision.teacher_db  # rounded as the mel cache stores them
        mels = torch.from_numpy(dequantise(quantise(TeacherMel(section("frontend.teacher"))(torch.from_numpy(t_win)).numpy(), step), step))
        t = m["teacher"].embed_mels_raw(mels).double().mean(0).numpy()
    return t / np.linalg.norm(t), s / np.linalg.norm(s)


def _student_text(texts: list[str], m) -> np.ndarray:
    ids, mask = encode(m["tokenizer"], texts, 16)
    with torch.no_grad():
        return m["text"](torch.from_numpy(ids), torch.from_numpy(mask)).double().numpy()


def _neighbours(e: np.ndarray, k: int) -> list[set[int]]:
    return [set(sorted((j for j in range(len(e)) if j != i), key=lambda j: -float(e[i] @ e[j]))[:k]) for i in range(len(e))]


@pytest.fixture(scope="module")
def hand(models, songs):
    files = _readable(songs)
    vectors = [_by_hand(f, models) for f in files]
    return files, np.stack([v[0] for v in vectors]), np.stack([v[1] for v in vectors])


def _run(tmp_path: Path, songs: Path, models, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = main(["compare", str(songs), "--models", str(models["export"]), "--teacher", str(models["teacher_dir"]),
               "--params", str(REPO / "params.yaml"), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


@pytest.mark.slow
def test_compare_figures_equal_a_hand_computation(tmp_path, models, songs, hand, capsys):
    files, t, s = hand
    captions = tmp_path / "captions.csv"  # Song Describer style: extra columns, a header, several per song
    captions.write_text("caption_id,path,caption\n"
                        "1,rock/riff.wav,a loud rock riff\n2,rock/riff.wav,guitar with energy\n"
                        "3,jazz/short.flac,a short calm jazz tune\n4,ambient/pad.ogg,a slow ambient pad\n"
                        f"5,{songs / 'ambient' / 'Night_Engine.wav'},night drone\n6,missing.wav,nothing\n")
    rc, rep = _run(tmp_path, songs, models, "--labels", str(songs), "--captions", str(captions))
    assert rc == 0
    printed = capsys.readouterr()
    assert "broken.mp3" in printed.out and "Same space as the teacher" in printed.out
    assert rep["n_files"] == 9 and rep["n_tracks"] == 6
    # silent and too-short files are reported and skipped, and the report is still written
    failed = {Path(f["path"]).name: f["reason"] for f in rep["failed"]}
    assert set(failed) == {"broken.mp3", "silent.wav", "blip.wav"}
    assert failed["silent.wav"].startswith("silent") and failed["blip.wav"].startswith("too short")
    assert "silent.wav" in printed.out and "blip.wav" in printed.out
    assert rep["teacher"]["kind"] == "demo_random" and len(rep["teacher"]["weights_sha256"]) == 64

    # same space: cosines, neighbours (6 songs: k clipped to 2), Spearman, verdict
    same, a = rep["same_space"], rep["same_space"]["audio_student"]
    cos = np.sum(t * s, axis=1)
    assert a["track_cosine"]["median"] == pytest.approx(np.median(cos), abs=1e-5)
    assert a["track_cosine"]["min"] == pytest.approx(cos.min(), abs=1e-5)
    assert a["track_cosine"]["p05"] == pytest.approx(np.percentile(cos, 5), abs=1e-5)
    centre = t.mean(0) / np.linalg.norm(t.mean(0))
    tc, sc = t - centre, s - centre
    centred = np.sum(tc * sc, 1) / np.linalg.norm(tc, axis=1) / np.linalg.norm(sc, axis=1)
    assert a["track_cosine_centred"]["mean"] == pytest.approx(centred.mean(), abs=1e-4)
    assert a["top5_k"] == 2 and "clipped" in a["note"]
    expected = np.mean([len(x & y) / 2 for x, y in zip(_neighbours(t, 2), _neighbours(s, 2))])
    assert a["top5_overlap"] == pytest.approx(expected)
    rho = np.mean([spearmanr([t[i] @ t[j] for j in range(6) if j != i], [s[i] @ s[j] for j in range(6) if j != i]).statistic
                   for i in range(6)])
    assert a["neighbour_spearman"] == pytest.approx(rho, abs=1e-6)
    assert same["same_space"] == (np.median(cos) >= 0.98 and expected >= 0.9)

    # zero-shot with LAION's prompt: teacher, audio student (teacher text), end to end (student text)
    zs = rep["zero_shot"]
    prompts = [f"This audio is a {g} song." for g in LABELS]
    truth = np.array([LABELS.index(f.parent.name) for f in files])
    t_prompts = models["teacher"].embed_text(prompts).double().numpy()
    s_prompts = _student_text(prompts, models)
    assert zs["n_tracks"] == 6 and zs["n_labels"] == 3 and zs["template"] == "This audio is a {label} song."
    assert zs["teacher"] == pytest.approx(np.mean(np.argmax(t @ t_prompts.T, 1) == truth))
    assert zs["audio_student"] == pytest.approx(np.mean(np.argmax(s @ t_prompts.T, 1) == truth))
    assert zs["end_to_end"] == pytest.approx(np.mean(np.argmax(s @ s_prompts.T, 1) == truth))

    # captions: recall@k of the captioned song; the row naming no readable song is reported
    cap = rep["captions"]
    rows = [("rock/riff.wav", "a loud rock riff"), ("rock/riff.wav", "guitar with energy"),
            ("jazz/short.flac", "a short calm jazz tune"), ("ambient/pad.ogg", "a slow ambient pad"),
            ("ambient/Night_Engine.wav", "night drone")]
    target = np.array([files.index(songs / p) for p, _ in rows])
    texts = [c for _, c in rows]
    tt = models["teacher"].embed_text(texts).double().numpy()
    st = _student_text(texts, models)
    for name, audio_side, text_side in (("teacher", t, tt), ("audio_student", s, tt), ("end_to_end", s, st)):
        scores = text_side @ audio_side.T
        ranks = [int(np.sum(row > row[target[i]])) for i, row in enumerate(scores)]  # songs scored above
        for k in (1, 5, 10):
            assert cap[name][f"recall@{k}"] == pytest.approx(np.mean(np.array(ranks) < k)), (name, k)
    assert cap["n_captions"] == 5 and "recall@10 is 1 by construction" in cap["note"]
    assert any("missing.wav" in p and "captions.csv:7" in p for p in rep["problems"])


@pytest.mark.slow
def test_labels_csv_gives_the_same_zero_shot_as_the_folder_layout(tmp_path, models, songs):
    files = _readable(songs)
    labels = tmp_path / "labels.csv"  # no header; relative and absolute paths; one unknown song
    lines = [f"{f.relative_to(songs) if i % 2 else f},{f.parent.name}" for i, f in enumerate(files)]
    labels.write_text("\n".join(lines + ["nowhere/x.wav,rock"]) + "\n")
    rc, by_csv = _run(tmp_path, songs, models, "--labels", str(labels))
    assert rc == 0
    rc, by_dir = _run(tmp_path, songs, models, "--labels", str(songs))
    assert rc == 0
    for key in ("teacher", "audio_student", "end_to_end", "n_tracks"):
        assert by_csv["zero_shot"][key] == by_dir["zero_shot"][key]
    assert any("nowhere/x.wav" in p for p in by_csv["problems"])


def test_labels_from_a_folder_of_symlinks(tmp_path, models, songs):
    """The GTZAN layout made of links (label subfolders linking to the music elsewhere): the label
    is the folder the link is in, not its target's."""
    flat = tmp_path / "music"
    flat.mkdir()
    linked = tmp_path / "by_genre"
    for f in _readable(songs):
        target = flat / f"{f.parent.name}-{f.name}"
        shutil.copy(f, target)
        (linked / f.parent.name).mkdir(parents=True, exist_ok=True)
        (linked / f.parent.name / f.name).symlink_to(target)
    rc, by_links = _run(tmp_path, linked, models, "--labels", str(linked))
    assert rc == 0 and by_links["problems"] == []
    rc, by_dir = _run(tmp_path, songs, models, "--labels", str(songs))
    assert rc == 0
    for key in ("teacher", "audio_student", "end_to_end", "n_tracks", "n_labels"):
        assert by_links["zero_shot"][key] == by_dir["zero_shot"][key]
    assert by_links["zero_shot"]["n_tracks"] == 6


def test_clear_errors(tmp_path, models, songs, caplog):
    base = ["compare", str(songs), "--teacher", str(models["teacher_dir"]), "--params", str(REPO / "params.yaml")]
    assert main([*base, "--models", str(tmp_path / "none")]) == 2
    assert "student_clap.json" in caplog.text
    bad = tmp_path / "bad.csv"
    bad.write_text("path,genre\nrock/riff.wav,rock\n")
    assert main([*base, "--models", str(models["export"]), "--labels", str(bad)]) == 2
    assert "bad.csv" in caplog.text and "'label'" in caplog.text
    assert main([*base, "--models", str(models["export"]), "--prompt", "a {genre} song"]) == 2
    assert "{label}" in caplog.text
    assert main(["compare", str(songs), "--params", str(tmp_path / "nope.yaml")]) == 2


def test_read_pairs_reports_bad_rows(tmp_path):
    root = tmp_path
    (root / "a.wav").write_bytes(b"")
    known = [root / "a.wav"]
    csv_path = root / "c.csv"
    csv_path.write_text("a.wav,rock\nb.wav,jazz\na.wav,\nonly-one-column\n\n")
    pairs, problems = C.read_pairs(csv_path, "label", root, known)
    assert pairs == [(0, "rock")]
    assert len(problems) == 3 and "c.csv:2" in problems[0] and "c.csv:3: empty label" in problems[1]
    with pytest.raises(C.CompareError, match="not found"):
        C.read_pairs(root / "none.csv", "label", root, known)


