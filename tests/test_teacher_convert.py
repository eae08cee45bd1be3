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
from pathlib import Path

import pytest
import torch

from pipeline.teacher.model import build_demo_tokenizer, clap_config, htsat_base_audio_config, load_teacher, sha256_file
from pipeline.teacher.convert import (
    ConversionError,
    convert_checkpoint,
    load_into,
    main,
    map_state_dict,
    text_config_from,
)

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


def test_convert_file_end_to_end(tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "music.pt"
    # like a training checkpoint: DataParallel prefix, plus a non-tensor object in the pickle
    torch.save({"epoch": 15, "args": argparse.Namespace(lr=1e-4),
                "state_dict": {f"module.{k}": v for k, v in laion_state().items()}}, ckpt)
    with caplog.at_level(logging.WARNING):
        out = convert_checkpoint(ckpt, tokenizer_dir, tmp_path / "teacher")
    assert "safe loader refused" in caplog.text and "trusted source" in caplog.text
    record = json.loads((out / "teacher.json").read_text())
    assert record["kind"] == "checkpoint" and record["source_sha256"] == sha256_file(ckpt)
    config = json.loads((out / "config.json").read_text())
    assert config["audio_config"]["depths"] == [2, 2, 12, 2]
    assert config["text_config"]["layer_norm_eps"] == 1e-5
    teacher = load_teacher(out)
    ids, _ = teacher.tokenize(["a calm piano song"])
    reference = build_demo_tokenizer(700).encode("a calm piano song").ids
    assert ids[0, : len(reference)].tolist() == reference  # built from vocab.json + merges.txt alike
    assert teacher.embed_text(["a calm piano song"]).shape == (1, 512)


def test_cli_reports_bad_checkpoint(tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "bad.pt"
    torch.save({"state_dict": {"module.visual.proj.weight": torch.zeros(2)}}, ckpt)
    args = argparse.Namespace(checkpoint=str(ckpt), tokenizer=str(tokenizer_dir), out=str(tmp_path / "out"))
    assert main(args) == 1
    assert "visual.proj.weight: unknown checkpoint key" in caplog.text
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    args.tokenizer = str(empty)
    assert main(args) == 1 and "no roberta-base tokenizer" in caplog.text


def test_teacher_model_stage_converts_and_verifies_sha256(
    tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.params import Params
    from pipeline.stages import teacher_model

    ckpt = tmp_path / "music.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in laion_state(seed=3).items()}}, ckpt)
    params = Params()
    p = params.teacher.model
    p.source, p.checkpoint, p.tokenizer_dir, p.dir = "checkpoint", str(ckpt), str(tokenizer_dir), str(tmp_path / "t")
    p.checkpoint_sha256 = "f" * 64
    ns = argparse.Namespace(shard=None, resume=False)
    assert teacher_model.run(params, ns) == 1
    assert "differs from teacher.model.checkpoint_sha256" in caplog.text and not (tmp_path / "t").exists()
    p.checkpoint_sha256 = sha256_file(ckpt)
    assert teacher_model.run(params, ns) == 0
    assert json.loads((tmp_path / "t" / "teacher.json").read_text())["source_sha256"] == p.checkpoint_sha256
