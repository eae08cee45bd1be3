"""LAION checkpoint -> ClapModel conversion: key mapping, strictness, file loading.

The key list in tests/fixtures/teacher/laion_htsat_base_keys.txt was written from laion_clap
1.1.7's own CLAP_Module(amodel='HTSAT-base') (text tower: a 2-layer RoBERTa with hidden size 768),
so these tests check the mapping against laion's real names without needing laion_clap installed.
The numerical equality with laion_clap is tests/test_teacher_oracle.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from pipeline.teacher.model import build_demo_tokenizer, clap_config, htsat_base_audio_config, load_teacher, sha256_file
from pipeline.cli import main as cli_main
from pipeline.teacher.convert import (
    PUBLISHED_SHA256,
    ConversionError,
    convert_checkpoint,
    load_checkpoint_state,
    load_into,
    main,
    map_state_dict,
    text_config_from,
    verify_checkpoint,
)
from repo_params import repo_params

KEYS = Path(__file__).resolve().parent / "fixtures" / "teacher" / "laion_htsat_base_keys.txt"
SMALL_ROBERTA = {
    "model_type": "roberta", "vocab_size": 700, "hidden_size": 768, "num_hidden_layers": 2,
    "num_attention_heads": 12, "intermediate_size": 1024, "max_position_embeddings": 514,
    "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}


def laion_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under laion's key names and shapes (module. prefix removed)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for line in KEYS.read_text().splitlines():
        if line.startswith("#"):
            continue
        key, dtype, shape = (line.split(" ") + [""])[:3]
        dims = [int(d) for d in shape.split(",") if d]
        key = key.removeprefix("module.")
        if dtype == "int64":
            state[key] = torch.arange(dims[-1]).expand(*dims).clone() if "position_ids" in key else torch.zeros(dims, dtype=torch.long)
        else:
            state[key] = torch.randn(dims, generator=g) * 0.02
    return state


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("roberta-base")
    build_demo_tokenizer(700).model.save(str(d))  # vocab.json + merges.txt, as roberta-base ships them
    (d / "config.json").write_text(json.dumps(SMALL_ROBERTA))
    return d


@pytest.fixture(scope="module")
def model(tokenizer_dir: Path):
    from transformers import ClapModel

    torch.set_num_threads(1)
    return ClapModel(clap_config(htsat_base_audio_config(), text_config_from(tokenizer_dir))).eval()


def test_every_model_weight_comes_from_the_checkpoint(model) -> None:
    state = laion_state()
    mapped, dropped, origin = map_state_dict(state)
    load_into(model, mapped, "ckpt", origin)
    got = model.state_dict()
    a = "audio_model.audio_encoder."
    qkv = state["audio_branch.layers.2.blocks.11.attn.qkv.weight"]  # stage 2 has 12 blocks in HTSAT-base
    dim = qkv.shape[0] // 3
    torch.testing.assert_close(got[a + "layers.2.blocks.11.attention.self.query.weight"], qkv[:dim])
    torch.testing.assert_close(got[a + "layers.2.blocks.11.attention.self.key.weight"], qkv[dim : 2 * dim])
    torch.testing.assert_close(got[a + "layers.2.blocks.11.attention.self.value.bias"],
                               state["audio_branch.layers.2.blocks.11.attn.qkv.bias"][2 * dim :])
    pairs = {
        a + "layers.0.blocks.1.layernorm_before.weight": "audio_branch.layers.0.blocks.1.norm1.weight",
        a + "layers.3.blocks.1.layernorm_after.bias": "audio_branch.layers.3.blocks.1.norm2.bias",
        a + "layers.1.blocks.0.attention.output.dense.weight": "audio_branch.layers.1.blocks.0.attn.proj.weight",
        a + "layers.1.blocks.0.intermediate.dense.weight": "audio_branch.layers.1.blocks.0.mlp.fc1.weight",
        a + "layers.1.blocks.0.output.dense.bias": "audio_branch.layers.1.blocks.0.mlp.fc2.bias",
        a + "batch_norm.running_var": "audio_branch.bn0.running_var",
        a + "patch_embed.proj.weight": "audio_branch.patch_embed.proj.weight",
        a + "layers.2.downsample.reduction.weight": "audio_branch.layers.2.downsample.reduction.weight",
        a + "norm.weight": "audio_branch.norm.weight",
        "audio_projection.linear2.weight": "audio_projection.2.weight",
        "text_projection.linear1.bias": "text_projection.0.bias",
        "text_model.encoder.layer.1.output.dense.weight": "text_branch.encoder.layer.1.output.dense.weight",
        "text_model.pooler.dense.weight": "text_branch.pooler.dense.weight",
        "logit_scale_a": "logit_scale_a",
    }
    for new, old in pairs.items():
        torch.testing.assert_close(got[new], state[old], msg=new)
    kinds = {k.split(".")[1] if k.startswith("audio_branch.") else k.split(".")[0] for k in dropped}
    assert kinds == {"spectrogram_extractor", "logmel_extractor", "layers", "tscam_conv", "head",
                     "audio_transform", "text_transform", "text_branch"}
    assert all(k.endswith("attn_mask") for k in dropped if ".layers." in k)


def test_position_ids_are_optional() -> None:
    with_ids = laion_state()
    without = dict(with_ids)
    del without["text_branch.embeddings.position_ids"]
    assert map_state_dict(with_ids)[0].keys() == map_state_dict(without)[0].keys()


def test_shape_mismatch_names_the_key(model) -> None:
    state = laion_state()
    state["text_projection.0.weight"] = torch.zeros(512, 512)
    mapped, _, origin = map_state_dict(state)
    with pytest.raises(ConversionError, match=r"text_projection\.0\.weight .*shape \(512, 512\)"):
        load_into(model, mapped, "ckpt", origin)


def test_missing_blocks_are_refused_not_dropped(model) -> None:
    # HTSAT-tiny-like depth 6 in stage 2: a non-strict load would silently lose blocks 6-11
    state = {k: v for k, v in laion_state().items()
             if not any(f"layers.2.blocks.{i}." in k for i in range(6, 12))}
    mapped, _, origin = map_state_dict(state)
    with pytest.raises(ConversionError, match=r"lacks \d+ model weights.*layers\.2\.blocks\.(6|7|8|9|10|11)\."):
        load_into(model, mapped, "ckpt", origin)


def test_unknown_key_is_refused(model) -> None:
    state = laion_state()
    state["audio_branch.extra_head.weight"] = torch.zeros(3)
    mapped, _, origin = map_state_dict(state)
    with pytest.raises(ConversionError, match=r"no place in the model: audio_branch\.extra_head\.weight"):
        load_into(model, mapped, "ckpt", origin)
    with pytest.raises(ConversionError, match="vision.weight: unknown checkpoint key"):
        map_state_dict({"vision.weight": torch.zeros(1)})


@pytest.mark.slow
def test_convert_file_end_to_end(tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    ckpt = tmp_path / "music.pt"
    # like LAION's training checkpoints: DataParallel prefix, numpy scalars in the epoch record
    torch.save({"epoch": 15, "esc_acc": np.float64(0.9014), "steps": np.int64(3),
                "state_dict": {f"module.{k}": v for k, v in laion_state().items()}}, ckpt)
    with pytest.raises(ConversionError, match=r"music\.pt: no sha256 to verify it against.*--trust"):
        convert_checkpoint(ckpt, tokenizer_dir, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()
    with caplog.at_level(logging.WARNING):
        out = convert_checkpoint(ckpt, tokenizer_dir, tmp_path / "teacher", trust=True)
    assert "used unverified" in caplog.text
    record = json.loads((out / "teacher.json").read_text())
    assert record["kind"] == "checkpoint" and record["source_sha256"] == sha256_file(ckpt)
    assert record["trusted_unverified"] is True and record["verified"] == "no"
    from pipeline.stages.evaluate import teacher_identity

    assert teacher_identity(out)["trusted_unverified"] is True  # carried into models/report/metrics.json
    config = json.loads((out / "config.json").read_text())
    assert config["audio_config"]["depths"] == [2, 2, 12, 2]
    assert config["text_config"]["layer_norm_eps"] == 1e-5
    teacher = load_teacher(out)
    ids, _ = teacher.tokenize(["a calm piano song"])
    reference = build_demo_tokenizer(700).encode("a calm piano song").ids
    assert ids[0, : len(reference)].tolist() == reference  # built from vocab.json + merges.txt alike
    assert teacher.embed_text(["a calm piano song"]).shape == (1, 512)


def test_numpy_scalars_under_numpy1_names_load(tmp_path: Path) -> None:
    """LAION's files were written with numpy 1: their pickle names numpy.core.multiarray.scalar."""
    import zipfile

    import numpy as np

    new = tmp_path / "new.pt"
    torch.save({"epoch": 15, "acc": np.float64(0.9), "state_dict": {"module.a": torch.ones(3)}}, new)
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(new) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                assert b"numpy.core.multiarray" in data
            zout.writestr(name, data)
    assert torch.equal(load_checkpoint_state(old)["a"], torch.ones(3))


def test_published_sha256_is_checked_by_file_name(tmp_path: Path) -> None:
    ckpt = tmp_path / "music_audioset_epoch_15_esc_90.14.pt"
    torch.save({"state_dict": {"module.x": torch.zeros(1)}}, ckpt)
    # a file under the published name that is not the published file is refused even with trust
    with pytest.raises(ConversionError, match=f"differs from the expected {PUBLISHED_SHA256[ckpt.name]}"):
        verify_checkpoint(ckpt, trust=True)
    assert verify_checkpoint(ckpt, sha256_file(ckpt).upper())["verified"] == "pinned sha256"


class _Payload:
    """Pickles as a call that creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _hostile_checkpoint(path: Path, marker: Path) -> str:
    torch.save({"epoch": _Payload(marker), "state_dict": {f"module.{k}": v for k, v in laion_state().items()}}, path)
    return sha256_file(path)


def test_hostile_pickle_never_runs_through_convert(
    tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    sha = _hostile_checkpoint(ckpt, marker)
    assert not marker.exists()
    # through the CLI, trusted and with its own sha256 pinned: still refused, nothing executed
    for extra in ([], ["--trust"], ["--sha256", sha]):
        assert cli_main(["teacher", "convert", str(ckpt), "--tokenizer", str(tokenizer_dir),
                         "--out", str(tmp_path / "out"), *extra]) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert f"{ckpt}: refused" in caplog.text and "never does" in caplog.text
    with pytest.raises(ConversionError, match="refused"):
        load_checkpoint_state(ckpt)
    assert not marker.exists()


def test_hostile_pickle_never_runs_through_the_stage(
    tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.stages import teacher_model

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    sha = _hostile_checkpoint(ckpt, marker)
    params = repo_params()
    p = params.teacher.model
    p.source, p.checkpoint, p.tokenizer_dir, p.dir = "checkpoint", str(ckpt), str(tokenizer_dir), str(tmp_path / "t")
    ns = argparse.Namespace(shard=None, resume=False)
    for sha256, trust in (("", False), ("", True), (sha, False)):
        p.checkpoint_sha256, p.trust_unverified = sha256, trust
        assert teacher_model.run(params, ns) == 1
    assert not marker.exists() and not (tmp_path / "t").exists()
    assert "no sha256 to verify it against" in caplog.text and f"{ckpt}: refused" in caplog.text


def test_cli_reports_bad_checkpoint(tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "bad.pt"
    torch.save({"state_dict": {"module.visual.proj.weight": torch.zeros(2)}}, ckpt)
    args = argparse.Namespace(checkpoint=str(ckpt), tokenizer=str(tokenizer_dir), out=str(tmp_path / "out"),
                              sha256=None, trust=True)
    assert main(args) == 1
    assert "visual.proj.weight: unknown checkpoint key" in caplog.text
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    args.tokenizer = str(empty)
    assert main(args) == 1 and "no roberta-base tokenizer" in caplog.text
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(ckpt.read_bytes()[:200])
    args.checkpoint, args.tokenizer = str(truncated), str(tokenizer_dir)
    assert main(args) == 1 and f"{truncated}: not a readable PyTorch checkpoint" in caplog.text


@pytest.mark.slow
def test_teacher_model_stage_converts_and_verifies_sha256(
    tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.stages import teacher_model

    ckpt = tmp_path / "music.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in laion_state(seed=3).items()}}, ckpt)
    params = repo_params()
    p = params.teacher.model
    p.source, p.checkpoint, p.tokenizer_dir, p.dir = "checkpoint", str(ckpt), str(tokenizer_dir), str(tmp_path / "t")
    p.checkpoint_sha256 = "f" * 64
    ns = argparse.Namespace(shard=None, resume=False)
    assert teacher_model.run(params, ns) == 1
    assert f"differs from the expected {'f' * 64}" in caplog.text and not (tmp_path / "t").exists()
    p.checkpoint_sha256, p.trust_unverified = "", False
    assert teacher_model.run(params, ns) == 1
    assert "trust_unverified: true" in caplog.text and not (tmp_path / "t").exists()
    p.checkpoint_sha256 = sha256_file(ckpt)
    assert teacher_model.run(params, ns) == 0
    record = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert record["source_sha256"] == p.checkpoint_sha256 and record["verified"] == "pinned sha256"
    # an ordinary output folder: 0755 / 0644 under the usual umask, not a temp dir's 0700 / 0600
    old = os.umask(0o022)
    try:
        assert teacher_model.run(params, ns) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "t" / "teacher.json").stat().st_mode) == 0o644
