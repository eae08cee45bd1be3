"""The demo teacher and the Teacher API: build, load, embed audio mels and text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from pipeline.teacher.model import (
    TEXT_MAX_LENGTH,
    TeacherError,
    build_demo_teacher,
    load_teacher,
    sha256_file,
)
from repo_params import repo_params, section


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_teacher(section("teacher.model"), tmp_path_factory.mktemp("teacher") / "models" / "teacher")


@pytest.fixture(scope="module")
def teacher(demo_dir: Path):
    torch.set_num_threads(1)
    return load_teacher(demo_dir)


def _mels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1001, 64, generator=g) * 15 - 40  # dB-like values


def test_demo_teacher_files_and_provenance(demo_dir: Path) -> None:
    names = sorted(p.name for p in demo_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "teacher.json", "tokenizer.json", "tokenizer_config.json"]
    record = json.loads((demo_dir / "teacher.json").read_text())
    assert record["kind"] == "demo_random"
    assert record["weights_sha256"] == sha256_file(demo_dir / "model.safetensors")
    config = json.loads((demo_dir / "config.json").read_text())
    audio = config["audio_config"]
    # the real front-end shape, so the demo teacher reads the same cached mels as the real one
    assert (audio["num_mel_bins"], audio["spec_size"], audio["window_size"]) == (64, 256, 8)
    assert audio["enable_fusion"] is False
    assert config["projection_dim"] == 512
    assert config["text_config"]["layer_norm_eps"] == 1e-5


def test_demo_teacher_is_deterministic_and_seeded(tmp_path: Path, demo_dir: Path) -> None:
    again = build_demo_teacher(section("teacher.model"), tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256_file(again / name) == sha256_file(demo_dir / name), name
    other = build_demo_teacher(section("teacher.model", demo={"seed": 1}), tmp_path / "other")
    assert sha256_file(other / "model.safetensors") != sha256_file(demo_dir / "model.safetensors")


def test_embed_mels_shapes_norms_and_batch_independence(teacher) -> None:
    mels = _mels(3)
    emb = teacher.embed_mels(mels)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    raw = teacher.embed_mels_raw(mels)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), emb)
    # eval mode: one item alone gives the same row as inside a batch
    torch.testing.assert_close(teacher.embed_mels(mels[1:2]), emb[1:2], atol=1e-5, rtol=0)
    # different inputs give different embeddings
    assert (emb[0] - emb[1]).abs().max() > 1e-4


def test_embed_mels_rejects_wrong_shape(teacher) -> None:
    with pytest.raises(ValueError, match="1001, 64"):
        teacher.embed_mels(torch.zeros(2, 1001, 128))


def test_embed_text_tokenises_like_laion(teacher) -> None:
    ids, mask = teacher.tokenize(["a calm piano song", "rock " * 200])
    assert ids.shape == (2, TEXT_MAX_LENGTH)  # the long one is truncated, the short one padded to it
    assert ids[0, 0].item() == 0 and ids[0, int(mask[0].sum()) - 1].item() == 2  # <s> ... </s>
    assert (ids[0, int(mask[0].sum()) :] == 1).all()  # <pad>
    assert mask[1].sum() == TEXT_MAX_LENGTH and ids[1, -1].item() == 2  # truncated, still closed
    emb = teacher.embed_text(["a calm piano song", "heavy metal with drums", "a calm piano song"])
    assert emb.shape == (3, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[0], emb[2])
    assert (emb[0] - emb[1]).abs().max() > 1e-4
    # padding is masked out: a text alone (no padding) embeds like inside a padded batch
    assert teacher.tokenize(["a calm piano song"])[0].shape[1] < TEXT_MAX_LENGTH
    torch.testing.assert_close(teacher.embed_text(["a calm piano song"])[0], emb[0], atol=1e-5, rtol=0)


def test_sha256_mismatch_is_refused(tmp_path: Path, demo_dir: Path) -> None:
    import shutil

    broken = tmp_path / "t"
    shutil.copytree(demo_dir, broken)
    record = json.loads((broken / "teacher.json").read_text())
    record["weights_sha256"] = "0" * 64
    (broken / "teacher.json").write_text(json.dumps(record))
    with pytest.raises(TeacherError, match="model.safetensors: sha256"):
        load_teacher(broken)


def test_empty_or_missing_tokenizer_is_refused(tmp_path: Path, demo_dir: Path) -> None:
    import shutil

    from tokenizers import Tokenizer, models

    broken = tmp_path / "t"
    shutil.copytree(demo_dir, broken)
    Tokenizer(models.BPE()).save(str(broken / "tokenizer.json"))  # what an empty tokenizer looks like
    with pytest.raises(TeacherError, match="only 0 tokens"):
        load_teacher(broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(TeacherError, match="tokenizer.json: tokenizer file missing"):
        load_teacher(broken)


def test_missing_teacher_folder_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="teacher.json: missing.*teacher_model"):
        load_teacher(tmp_path / "nothing")


def test_bf16_on_cpu_falls_back_to_fp32(demo_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = load_teacher(demo_dir, device="cpu", dtype="bf16", verify=False)
    assert t.dtype == torch.float32
    assert "bf16 is for GPUs" in caplog.text
    caplog.clear()
    auto = load_teacher(demo_dir, device="cpu", dtype="auto", verify=False)  # auto: fp32 off CUDA, quietly
    assert auto.dtype == torch.float32 and "bf16" not in caplog.text


def test_teacher_model_stage_builds_demo_random(tmp_path: Path, demo_dir: Path) -> None:
    from pipeline.stages import teacher_model

    params = repo_params()
    params.teacher.model.source = "demo_random"
    params.teacher.model.dir = str(tmp_path / "teacher")
    assert teacher_model.run(params, argparse.Namespace(shard=None, resume=False)) == 0
    assert sha256_file(tmp_path / "teacher" / "model.safetensors") == sha256_file(demo_dir / "model.safetensors")


def test_teacher_model_stage_names_missing_checkpoint_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.stages import teacher_model

    params = repo_params()
    params.teacher.model.source = "checkpoint"
    params.teacher.model.dir = str(tmp_path / "teacher")
    params.teacher.model.checkpoint = str(tmp_path / "src" / "music.pt")
    params.teacher.model.tokenizer_dir = str(tmp_path / "src" / "roberta-base")
    assert teacher_model.run(params, argparse.Namespace(shard=None, resume=False)) == 1
    assert str(tmp_path / "src" / "music.pt") in caplog.text
    assert "roberta-base" in caplog.text and "vocab.json" in caplog.text
    assert "student-clap teacher fetch" in caplog.text
    assert not (tmp_path / "teacher").exists()
