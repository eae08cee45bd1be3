"""distill_audio: batches for strategy "both", augmentations in the right domain, the stage's outputs,
resume, the disabled-student markers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.data import datasets
from pipeline.models.audio_student import build_audio_student, load_audio_student
from pipeline.params import Params
from pipeline.stages import distill_audio as stage
from pipeline.training.augment import (
    Augmenter,
    kaldi_mel_centres,
    mixup_targets,
    power_to_student_mel,
    slaney_mel_centres,
    student_gain,
    student_mel_to_power,
    student_colour,
    teacher_gain,
    time_shift,
)
from repo_params import repo_params, section

N_FRAMES = 48  # short mels keep the CPU tests fast; the network is length-agnostic


# ----------------------------------------------------------------------------- fixtures


class FakeMelCache:
    """In-memory stand-in with the MelCache reader API of the contract."""

    def __init__(self, student: np.ndarray, teacher: np.ndarray, track_ids: list[str], counts: list[int]):
        self._student, self._teacher = student, teacher
        self.track_ids = track_ids
        starts = np.cumsum([0] + counts)
        self._ranges = {t: range(int(a), int(b)) for t, a, b in zip(track_ids, starts[:-1], starts[1:])}
        self.n_segments = int(starts[-1])
        self.segment_track = np.repeat(np.arange(len(track_ids)), counts)
        self.attrs = {"params": json.dumps({"frontend": {  # as pipeline.data.mel_cache records them
            "student": {"n_mels": 128, "f_min": 0.0, "f_max": 15000.0},
            "teacher": {"n_mels": 64, "f_min": 50.0, "f_max": 14000.0},
        }})}
        self.reads = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def track_segments(self, track_id: str) -> range:
        return self._ranges[track_id]

    def student_mels(self, idx) -> np.ndarray:
        self.reads += 1
        return self._student[idx if isinstance(idx, slice) else np.asarray(idx)]

    def teacher_mels(self, idx) -> np.ndarray:
        return self._teacher[idx if isinstance(idx, slice) else np.asarray(idx)]


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch):
    """8 tracks (5 train, 3 val) of 1-3 segments; the teacher embedding depends on the mel's level
    and spectral tilt around a large common direction, like a random CLAP teacher."""
    rng = np.random.default_rng(0)
    counts = [2, 1, 3, 2, 1, 2, 3, 1]
    ids = [f"fma:{i}" for i in range(len(counts))]
    n = sum(counts)
    level = rng.uniform(-1.0, 1.0, n)
    tilt = rng.uniform(-1.0, 1.0, n)
    freq = np.linspace(-1, 1, 128)[:, None]
    student = (-0.5 + 0.3 * level[:, None, None] + 0.2 * tilt[:, None, None] * freq[None]
               + 0.05 * rng.standard_normal((n, 128, N_FRAMES))).astype(np.float32)
    teacher_mels = rng.standard_normal((n, 1001, 64)).astype(np.float32) * 10 - 40
    base, a, b = (rng.standard_normal(512) for _ in range(3))
    raw = 5 * base + level[:, None] * a + tilt[:, None] * b
    seg_norm = np.linalg.norm(raw, axis=1)
    seg_emb = raw / seg_norm[:, None]
    starts = np.cumsum([0] + counts)
    trk = np.stack([raw[s:e].mean(0) for s, e in zip(starts[:-1], starts[1:])])
    trk /= np.linalg.norm(trk, axis=1, keepdims=True)

    teacher_h5 = tmp_path / "teacher.h5"
    with h5py.File(teacher_h5, "w") as f:
        f["segments/embedding"] = seg_emb.astype(np.float32)
        f["segments/raw_norm"] = seg_norm.astype(np.float32)
        f["tracks/track_id"] = np.array(ids, dtype=object).astype(h5py.string_dtype())
        f["tracks/embedding"] = trk.astype(np.float32)
        f.create_group("text")
        f.attrs["teacher_sha256"] = json.dumps("0" * 64)
    manifest = tmp_path / "manifest.jsonl"
    splits = ["train", "train", "val", "train", "val", "train", "val", "train"]
    rows = [{"track_id": t, "source": "fma", "artist": f"artist {i}", "title": f"song {i}", "audio_path": f"{i}.ogg",
             "license": "CC0-1.0", "license_url": "https://creativecommons.org/publicdomain/zero/1.0/",
             "url": f"https://example.org/{i}", "split": s, "tags": [], "duration": 20.0}
            for i, (t, s) in enumerate(zip(ids, splits))]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = FakeMelCache(student, teacher_mels, ids, counts)
    monkeypatch.setattr(datasets, "open_mels", lambda path: cache)
    return {"teacher": teacher_h5, "manifest": manifest, "cache": cache, "tmp": tmp_path}


def _params(**over) -> Params:
    section = {
        "model": "mn04_as", "epochs": 2, "stage2_epochs": 1, "batch_size": 4, "lr": 0.003, "stage2_lr": 0.001,
        "dropout": 0.0, "augment": {"gain_db": 3.0, "spec_masks": True, "freq_mask": 8, "time_mask": 8, "mixup": 0.5},
        "device": "cpu", "num_workers": 0,
    }
    section.update(over)
    return repo_params({"distill_audio": section})


def _train(ws, out: Path, resume: bool = False, **over):
    params = _params(**over)
    return stage.train_audio_student(params.distill_audio, params.frontend.student.n_mels, out,
                                                  Path(params.teacher.model.dir), resume=resume,
                                                  mels_path=Path("unused"), teacher_path=ws["teacher"],
                                                  manifest_path=ws["manifest"])


# ----------------------------------------------------------------------------- batches


def test_both_strategy_mixes_segments_and_track_averages(workspace) -> None:
    from pipeline.data.teacher_cache import TeacherCache

    cache = workspace["cache"]
    with TeacherCache(workspace["teacher"]) as t:
        train, val = datasets.load_splits(cache, t, [json.loads(x) for x in workspace["manifest"].read_text().splitlines()])
        seg_emb, seg_norm = t.segment_embeddings, t.segment_raw_norms
    assert train.track_ids == ["fma:0", "fma:1", "fma:3", "fma:5", "fma:7"]
    assert len(train.segments) == 8 and len(val.segments) == 7
    assert len(datasets.TrainItems(train, "both")) == 5 and len(datasets.TrainItems(train, "segments")) == 8
    source = datasets.MelSource(Path("unused"), train.segments, with_teacher=False)

    p = _params(strategy="both", segments_per_track=0, augment={"gain_db": 0.0}).distill_audio
    task = stage.AudioDistillTask(build_audio_student({"backbone": "mn04_as", "dropout": 0.1}), train, val, source,
                                               seg_emb, seg_norm, p, Augmenter(p.augment))
    batch = task.collate_fn([0, 2])  # fma:0 (2 segments) and fma:3 (2 segments)
    assert batch["row_item"].tolist() == [0, 0, 1, 1]
    assert batch["mels"].shape == (4, 128, N_FRAMES) and batch["mels"].dtype == torch.float16

    calls = []

    def encode(mels):
        calls.append(mels.shape[0])
        return mels.mean(dim=2)[:, :64].repeat(1, 8)  # any deterministic [S, 512] map

    student, target = task.embed_batch(encode, batch)
    assert calls == [4]  # one forward pass serves segment and track rows
    assert student.shape == target.shape == (4 + 2, 512)
    segs = train.track_segments[0]
    np.testing.assert_allclose(target[0].numpy(), seg_emb[segs[0]], rtol=1e-5, atol=1e-6)
    # track row: L2(mean of raw teacher projections) over the drawn segments = the cached track vector
    np.testing.assert_allclose(target[4].numpy(), train.teacher_tracks[0], rtol=1e-4, atol=1e-5)
    rows = encode(batch["mels"].float())  # the loader hands float16, as stored
    assert torch.allclose(student[4], rows[:2].mean(0)) and torch.allclose(student[:4], rows)

    # a cap on segments per track draws a subset; "tracks" keeps only the track rows
    capped = datasets.Collate(train, source, seg_emb, seg_norm, True, 1)([0, 2, 4])
    assert capped["row_item"].tolist() == [0, 1, 2]
    p_tr = _params(strategy="tracks", augment={"gain_db": 0.0}).distill_audio
    task_tr = stage.AudioDistillTask(task.model, train, val, source, seg_emb, seg_norm, p_tr,
                                                  Augmenter(p_tr.augment))
    s_tr, _ = task_tr.embed_batch(encode, task_tr.collate_fn([0, 2]))
    assert s_tr.shape == (2, 512)
    assert datasets.average_rows(torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]), torch.tensor([0, 0, 1]), 2).tolist() \
        == [[2.0, 1.0], [5.0, 5.0]]


# ----------------------------------------------------------------------------- augmentation


def test_gain_is_a_power_change_in_the_efficientat_domain() -> None:
    power = torch.tensor([[1e-7, 1e-5, 1e-3, 1.0, 50.0]]).reshape(1, 5, 1)
    x = power_to_student_mel(power)
    assert torch.allclose(student_mel_to_power(x), power, rtol=1e-4)
    out = student_gain(x, torch.tensor([6.0]))
    expected = (torch.log(power * 10 ** 0.6 + 1e-5) + 4.5) / 5
    assert torch.allclose(out, expected, atol=1e-5)
    shift = (out - x).flatten()
    # loud bins move by log(10^0.6)/5, quiet ones (near the +1e-5 floor) by much less
    assert shift[-1] == pytest.approx(np.log(10 ** 0.6) / 5, abs=1e-4)
    assert shift[0] < 0.2 * shift[-1]
    db = torch.tensor([[[-100.0, -30.0, 0.0]]])
    assert teacher_gain(db, torch.tensor([-6.0])).flatten().tolist() == [-100.0, -36.0, -6.0]


def test_masks_fill_with_the_mean_and_match_across_front_ends() -> None:
    torch.manual_seed(0)
    aug = Augmenter(section("distill_audio.augment", gain_db=0.0, spec_masks=True, freq_mask=20, time_mask=30, mixup=0.0),
                    kaldi_mel_centres(128, 0.0, 15000.0), slaney_mel_centres(64, 50.0, 14000.0))
    s = torch.randn(3, 128, 100)
    t = torch.randn(3, 101, 64)
    plan = aug.draw(torch.arange(3), 128, 100)
    plan.f_lo[:] = 40
    plan.f_hi[:] = 60
    plan.t_lo[:] = 10
    plan.t_hi[:] = 25
    out_s, out_t = aug.apply_student(s, plan), aug.apply_teacher(t, plan)
    for i in range(3):
        assert torch.allclose(out_s[i, 40:60], s[i].mean().expand(20, 100))
        assert torch.allclose(out_s[i, :, 10:25], s[i].mean().expand(128, 15))
        assert torch.equal(out_s[i, :40, :10], s[i, :40, :10])
        assert torch.allclose(out_t[i, 10:25], t[i].mean().expand(15, 64))
    # the teacher band covers the same frequencies as student bins 40..59
    sc, tc = kaldi_mel_centres(128, 0, 15000), slaney_mel_centres(64, 50, 14000)
    masked = (out_t[0, 50] == t[0].mean()).numpy()
    assert masked.any()
    assert (tc[masked] >= sc[40] - 1e-6).all() and (tc[masked] <= sc[59] + 1e-6).all()


def test_mixup_mixes_power_and_targets_the_same_way() -> None:
    torch.manual_seed(1)
    aug = Augmenter(section("distill_audio.augment", gain_db=0.0, mixup=1.0))
    row_item = torch.tensor([0, 0, 1, 2])
    plan = aug.draw(row_item, 128, 10)
    assert plan.mixed.all() and (plan.lam >= 0.5).all()
    assert (row_item[plan.partner] != row_item).all()  # partners come from other items
    x = torch.randn(4, 128, 10) * 0.2 - 0.5
    out = aug.apply_student(x, plan)
    p = student_mel_to_power(x)
    lam = plan.lam[0]
    expected = power_to_student_mel(lam * p[0] + (1 - lam) * p[plan.partner[0]])
    assert torch.allclose(out[0], expected, atol=1e-5)
    raw = torch.randn(4, 512)
    tgt = mixup_targets(raw, plan)
    assert torch.allclose(tgt[0], lam * raw[0] + (1 - lam) * raw[plan.partner[0]])
    # rows without a partner are left bit-identical
    plan.partner[3] = -1
    assert torch.equal(aug.apply_student(x, plan)[3], x[3])
    assert not Augmenter(section("distill_audio.augment", gain_db=0.0, mixup=0.0)).draw(row_item, 128, 10).mixed.any()


def test_student_only_changes_leave_the_teacher_and_the_rest_of_the_plan_alone() -> None:
    """Tilt, noise floor and shift reach the student's input only (the cached target is the clean
    segment's); turning them on draws after the other options, so those draws stay the same."""
    row_item = torch.tensor([0, 0, 1, 2])
    base = section("distill_audio.augment", gain_db=6.0, mixup=0.5)
    torch.manual_seed(5)
    plain = Augmenter(base).draw(row_item, 128, 50)
    torch.manual_seed(5)
    robust = Augmenter(section("distill_audio.augment", gain_db=6.0, mixup=0.5, eq_tilt_db=6.0, noise_snr_db=20.0,
                                     time_shift_frames=5)).draw(row_item, 128, 50)
    for name in ("gain_db", "partner", "lam"):
        assert torch.equal(getattr(plain, name), getattr(robust, name))
    assert torch.equal(robust.tilt_db[0], robust.tilt_db[1]) and robust.tilt_db.abs().max() <= 6.0  # per item
    assert ((robust.snr_db >= 20.0) & (robust.snr_db <= 40.0)).all()
    assert robust.shift.abs().max() <= 5
    aug = Augmenter(section("distill_audio.augment", gain_db=0.0, eq_tilt_db=6.0, noise_snr_db=20.0, time_shift_frames=5))
    teacher = torch.randn(4, 51, 64)
    plan = aug.draw(row_item, 128, 50)
    assert torch.equal(aug.apply_teacher(teacher, plan), teacher)
    assert aug.active and not Augmenter(section("distill_audio.augment", gain_db=0.0)).active


def test_tilt_and_noise_act_on_power() -> None:
    power = torch.full((2, 128, 4), 1e-2)
    x = power_to_student_mel(power)
    tilted = student_mel_to_power(student_colour(x, torch.tensor([6.0, -6.0]), None))
    assert tilted[0, -1, 0] / tilted[0, 0, 0] == pytest.approx(10 ** 1.2, rel=1e-3)  # -6 dB -> +6 dB
    assert tilted[1, 0, 0] / tilted[1, -1, 0] == pytest.approx(10 ** 1.2, rel=1e-3)
    noisy = student_mel_to_power(student_colour(x, None, torch.tensor([20.0, 10.0])))
    assert noisy[0].mean() / power[0].mean() == pytest.approx(1.01, rel=1e-3)
    assert noisy[1].mean() / power[1].mean() == pytest.approx(1.1, rel=1e-3)


def test_time_shift_delays_or_advances_and_repeats_the_edge() -> None:
    x = torch.arange(6.0).reshape(1, 1, 6).repeat(2, 3, 1)
    out = time_shift(x, torch.tensor([2, -1]))
    assert out[0, 0].tolist() == [0, 0, 0, 1, 2, 3]
    assert out[1, 2].tolist() == [1, 2, 3, 4, 5, 5]


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_student_metrics_plots_and_resumes(workspace) -> None:
    out = workspace["tmp"] / "audio"
    report = _train(workspace, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] is False and metrics["pretrained"] is False
    assert metrics["params_count"] == 516128 + 384 * 512 + 512 * 512 + 512
    for k in ("segment_cosine", "segment_cosine_centred", "track_cosine", "track_cosine_centred"):
        assert -1.0 <= metrics["val"][k] <= 1.0
    assert metrics["baseline"]["track_cosine_centred"] == 0.0
    assert metrics["epochs"] == 3 and report["best_epoch"] >= 1
    student = load_audio_student(out / "student.pt")
    assert torch.load(out / "student.pt", weights_only=True)["metrics"]["pretrained"] is False
    assert student(torch.randn(1, 128, N_FRAMES)).shape == (1, 512)
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "epoch_003.pt").is_file()
    assert (out / "plots" / "plots" / "metrics" / "val" / "track_cosine_centred.tsv").is_file()
    assert not (out / "plots" / "metrics.json").exists()

    # one more stage-2 epoch, continued from the checkpoint
    _train(workspace, out, resume=True, stage2_epochs=2)
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 4


def test_whitened_term_reaches_training_from_the_training_teacher_segments(workspace, monkeypatch) -> None:
    seen = []
    real = stage.whitener
    monkeypatch.setattr(stage, "whitener", lambda rows: seen.append(rows.copy()) or real(rows))
    gap = {}
    for weight in (0.0, 1.0):
        out = workspace["tmp"] / f"white{weight}"
        _train(workspace, out, epochs=1, stage2_epochs=0, loss={**dataclasses.asdict(_params().distill_audio.loss),
                                                                 "whitened_weight": weight})
        train = json.loads((out / "metrics.json").read_text())["train"]
        gap[weight] = abs(train["loss"] + train["cosine"])
    # the loss is -cosine alone, then -cosine - whitened cosine
    assert gap[0.0] < 1e-6 < 1e-4 < gap[1.0]
    train_segments = sum(1 for i in workspace["cache"].segment_track if i in (0, 1, 3, 5, 7))  # the train split
    assert len(seen) == 1 and len(seen[0]) == train_segments


def test_teacher_recompute_mode_runs_teacher_on_augmented_input(workspace, monkeypatch) -> None:
    seen = []

    class EchoTeacher:
        """Stand-in teacher: embedding = mean level per mel bin, tiled to 512."""

        def embed_mels_raw(self, mels: torch.Tensor) -> torch.Tensor:
            seen.append(mels.clone())
            return mels.mean(dim=1).repeat(1, 8)

    monkeypatch.setattr("pipeline.teacher.model.load_teacher", lambda *a, **k: EchoTeacher())
    _train(workspace, workspace["tmp"] / "audio2", use_teacher_embedding_cache=False, epochs=1, stage2_epochs=0,
           augment={"gain_db": 6.0, "spec_masks": False, "mixup": 0.0})
    cache = workspace["cache"]
    assert seen, "the teacher was not called"
    # gains moved the teacher mels away from the cached clean ones
    clean = cache._teacher.reshape(len(cache._teacher), -1)
    first = seen[0].reshape(len(seen[0]), -1).numpy()
    assert not any(np.allclose(row, c, atol=1e-3) for row in first for c in clean)


def test_disabled_student_writes_markers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = repo_params({"distillation": {"audio_enabled": False}})
    assert stage.run(params, argparse.Namespace(resume=False, shard=None, params="params.yaml")) == 0
    assert json.loads(Path("models/audio/metrics.json").read_text())["skipped"] is True
    assert torch.load("models/audio/student.pt", weights_only=True)["skipped"] is True
    with pytest.raises(ValueError, match="skipped"):
        load_audio_student("models/audio/student.pt")


@pytest.mark.slow
def test_stage_resume_reproduces_the_straight_run(workspace) -> None:
    """Augmentation, segment draws and BatchNorm recalibration included: 2 epochs straight (no
    loader workers) equal 1 epoch + --resume + 1 epoch (2 workers), weight for weight."""
    kw = dict(epochs=2, stage2_epochs=0)
    _train(workspace, workspace["tmp"] / "a", **kw)
    # the interrupted run uses 2 loader workers: segment draws come from (seed, epoch, track),
    # not from a worker's RNG, so neither the worker count nor the restart changes them
    # and streams its mels where the straight run holds them in memory
    _train(workspace, workspace["tmp"] / "b", epochs=1, stage2_epochs=0, num_workers=2, in_memory_gb=0)
    _train(workspace, workspace["tmp"] / "b", resume=True, num_workers=2, in_memory_gb=0, **kw)
    a = torch.load(workspace["tmp"] / "a" / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(workspace["tmp"] / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["params"] == b["params"]  # where the work ran is not recorded: the checkpoints are the same file
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


# ----------------------------------------------------------------------------- loader and validation subset


def test_streamed_reads_one_slice_per_run_and_match_memory(workspace) -> None:
    cache = workspace["cache"]
    # values float16 cannot hold exactly (the real cache decodes int16 codes to float32): held in
    # memory as float16, so the streamed path must round the same way or training sees other values
    assert not np.array_equal(cache._student, cache._student.astype(np.float16).astype(np.float32))
    assert datasets.contiguous_runs(np.array([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    segs = np.array([7, 0, 1, 2, 5, 8, 1])  # any order, repeats allowed
    streamed = datasets.MelSource(Path("unused"), np.arange(15), with_teacher=True, memory_limit=0)
    in_memory = datasets.MelSource(Path("unused"), np.arange(15), with_teacher=True, memory_limit=1 << 30)
    assert not streamed.in_memory and in_memory.in_memory
    cache.reads = 0
    rows = streamed.student(segs)
    assert cache.reads == 3  # runs 0-2, 5, 7-8: one slice each
    np.testing.assert_array_equal(rows, cache._student[segs].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(in_memory.student(segs), rows)
    np.testing.assert_array_equal(in_memory.teacher(segs), streamed.teacher(segs))
    np.testing.assert_array_equal(in_memory.batch(segs).numpy(), streamed.batch(segs).numpy())
    assert datasets.loader_workers("auto", in_memory) == 0 and datasets.loader_workers(3, in_memory) == 3
    assert datasets.loader_workers("auto", streamed) == "auto"
    assert datasets.in_memory_limit(0) == 0 and datasets.in_memory_limit(1.5) == 3 << 29
    # auto: a quarter of the available memory for each of 2 ranks (which moves a little meanwhile)
    assert 0.5 < 4 * datasets.in_memory_limit("auto", world=2) / datasets.available_memory_bytes() < 1.5


def test_segment_draws_depend_on_seed_epoch_and_track_only(workspace) -> None:
    from pipeline.data.teacher_cache import TeacherCache

    with TeacherCache(workspace["teacher"]) as t:
        train, _ = datasets.load_splits(workspace["cache"], t, [json.loads(x) for x in workspace["manifest"].read_text().splitlines()])
        seg_emb, seg_norm = t.segment_embeddings, t.segment_raw_norms
    source = datasets.MelSource(Path("unused"), train.segments, with_teacher=False)
    collate = datasets.Collate(train, source, seg_emb, seg_norm, True, 1, seed=4)
    assert datasets.TrainItems(train, "both")[(3, 1)] == (3, 1)

    def drawn(epoch: int) -> list[float]:
        return collate([(epoch, 0), (epoch, 2)])["teacher_raw_rows"][:, 0].tolist()

    torch.manual_seed(0)
    first = drawn(1)
    torch.manual_seed(99)  # no process RNG is involved
    assert drawn(1) == first
    assert any(drawn(e) != first for e in range(2, 8))  # other epochs draw other segments


def test_per_epoch_validation_watches_a_bounded_subset_of_every_track(workspace) -> None:
    from pipeline.data.teacher_cache import TeacherCache

    with TeacherCache(workspace["teacher"]) as t:
        _, val = datasets.load_splits(workspace["cache"], t, [json.loads(x) for x in workspace["manifest"].read_text().splitlines()])
        seg_emb, seg_norm = np.asarray(t.segment_embeddings), np.asarray(t.segment_raw_norms)
    assert [len(s) for s in val.track_segments] == [3, 1, 3]
    assert datasets.monitor_subset(val, 7, seg_emb, seg_norm) is val  # fits: the whole split
    sub = datasets.monitor_subset(val, 4, seg_emb, seg_norm)  # 1 per track (4 // 3)
    assert sub.track_ids == val.track_ids and len(sub.segments) == 3
    assert [s.tolist() for s in sub.track_segments] == [[val.track_segments[0][0]], val.track_segments[1].tolist(),
                                                         [val.track_segments[2][0]]]
    np.testing.assert_allclose(sub.teacher_tracks[0], seg_emb[val.track_segments[0][0]], atol=1e-6)
    np.testing.assert_array_equal(sub.teacher_tracks[1], val.teacher_tracks[1])  # complete track: cached vector
    sub2 = datasets.monitor_subset(val, 6, seg_emb, seg_norm)  # 2 per track: first and last
    assert [s.tolist() for s in sub2.track_segments][0] == [val.track_segments[0][0], val.track_segments[0][2]]
    with pytest.raises(ValueError, match="val_max_segments"):
        datasets.monitor_subset(val, 0, seg_emb, seg_norm)


def test_subset_of_training_tracks_and_held_out_calibration(workspace) -> None:
    """max_train_tracks trains on a fixed, nested subset; calibrate fits on the validation tracks only."""
    report = _train(workspace, workspace["tmp"] / "audio_few", epochs=1, stage2_epochs=0, max_train_tracks=3,
                    calibrate=True, calibration_segments=100)
    assert report["n_train_tracks"] == 3 and report["n_val_tracks"] == 3
    fit = report["calibration"]
    assert fit["n_items"] == 3 and fit["n_rows"] == 7  # the 3 validation tracks and their 7 segments
    assert fit["fit_after"]["centred_cosine"] >= fit["fit_before"]["centred_cosine"]
    assert report["runtime"] == {"threads": 1, "device": "cpu"}
    assert not any("seconds" in key for key in json.dumps(report).split('"'))  # no timings in an output
    from pipeline.data.teacher_cache import TeacherCache

    with datasets.open_mels(Path("unused")) as mels, TeacherCache(workspace["teacher"]) as tc:
        train, _ = datasets.load_splits(mels, tc, [json.loads(r) for r in workspace["manifest"].read_text().splitlines()])
    two, three = (stage.train_subset(train, n, seed=0) for n in (2, 3))
    assert set(two.track_ids) < set(three.track_ids) < set(train.track_ids)
    assert stage.train_subset(train, 0, seed=0) is train
    off = _train(workspace, workspace["tmp"] / "audio_nocal", epochs=1, stage2_epochs=0)
    assert off["calibration"]["skipped"] is True and off["n_train_tracks"] == 5


def test_stage_validates_on_the_subset_and_reports_the_full_split(workspace, monkeypatch) -> None:
    scored = []
    real = stage.validation_metrics

    def spy(raw, val, *args):
        scored.append((len(raw), len(val.track_ids)))
        return real(raw, val, *args)

    monkeypatch.setattr(stage, "validation_metrics", spy)
    _train(workspace, workspace["tmp"] / "audio_sub", epochs=2, stage2_epochs=0, val_max_segments=3)
    # every epoch: 1 segment of each of the 3 validation tracks; after training, all 7 segments
    # twice: before and after the output calibration ("val_before_calibration" and "val")
    assert scored == [(3, 3), (3, 3), (7, 3), (7, 3)]
